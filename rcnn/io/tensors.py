"""Tensors on disk: safetensors files with a format tag and metadata, and weights files read safely.

- :func:`write_tensor_file` / :func:`read_tensor_file`: a safetensors file whose metadata holds a
  ``format`` tag (checked on reading) and JSON values — the parts of R-CNN trained outside the
  network (SVMs, ridge regressors), proposals, pre-trained backbones.
- :func:`read_state_dict`: a state dict from a ``.safetensors`` file or a ``torch.save`` file,
  the latter read with ``weights_only=True`` so that a hostile file cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from rcnn.io.files import atomic_write

__all__ = ["read_state_dict", "read_tensor_file", "save_tensors", "write_tensor_file"]


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (made contiguous, on the CPU) to a safetensors file atomically."""
    cpu = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def write_tensor_file(path: str | os.PathLike, tensors: dict[str, Tensor], file_format: str, metadata: dict[str, Any]) -> Path:
    """Write ``tensors`` and JSON-able ``metadata`` to a safetensors file atomically.

    ``file_format`` is stored and checked by :func:`read_tensor_file`.
    """
    strings = {"format": file_format, **{key: json.dumps(value) for key, value in metadata.items()}}
    return save_tensors(path, tensors, strings)


def read_tensor_file(path: str | os.PathLike, file_format: str, what: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a file written by :func:`write_tensor_file` with ``file_format``.

    ``what`` names the content in errors ("SVM file"): ``FileNotFoundError`` for a missing file,
    ``ValueError`` naming the file for a damaged or foreign one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            strings = handle.metadata() or {}
        tensors = load_file(str(path))
        if strings.get("format") != file_format:
            raise ValueError(f"format {strings.get('format')!r}, expected {file_format!r}")
        metadata = {key: json.loads(value) for key, value in strings.items() if key != "format"}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable {what} ({exc})") from None
    return tensors, metadata


def read_state_dict(path: str | os.PathLike, what: str = "weights file") -> dict[str, Tensor]:
    """The state dict in ``path``: a ``.safetensors`` file or a ``torch.save`` file (``.pth``, ``.pt``).

    ``torch.load`` runs with ``weights_only=True``: pickled code is refused, never run. Common
    wrappers (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped. Errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: say which and why
        raise ValueError(f"cannot read weights from {path}: {exc}") from exc
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state
