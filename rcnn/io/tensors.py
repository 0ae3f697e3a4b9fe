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
import pickle
import warnings
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


def _refusal(exc: Exception) -> str:
    """What the weights-only unpickler refused ("unsupported GLOBAL posix.system ..."), without
    torch's advice to load the file with code execution allowed (never to be given for a file of
    unknown origin)."""
    parts = [p.strip() for p in str(exc).replace("WeightsUnpickler error:", "\n\n").split("\n\n")]
    kept = [p for p in parts if p and not any(w in p for w in ("weights_only", "Check the documentation", "file an issue"))]
    return " ".join(" ".join(kept).split()) or "a pickle that is not a state dict"


def read_state_dict(path: str | os.PathLike, what: str = "weights file") -> dict[str, Tensor]:
    """The state dict in ``path``: a ``.safetensors`` file or a ``torch.save`` file (``.pth``, ``.pt``).

    ``torch.load`` runs with ``weights_only=True``: pickled code is refused, never run. Common
    wrappers (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped. Errors name the file.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a {what}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not a {what}; copy it again")
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch's note on the pickle protocol: the error below says it all
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # refused by the weights-only unpickler
        detail = _refusal(exc)
        if "GLOBAL" not in detail and "global" not in detail:  # no code asked for: not a torch.save file
            raise ValueError(f"cannot read weights from {path}: not a torch.save or safetensors file ({detail})") from None
        raise ValueError(
            f"{path}: not loaded: the file holds pickled objects other than tensors ({detail}), and "
            f"a {what} is read as tensors only, never by running its code; save the state dict of tensors "
            "(or a .safetensors file) where the model was made"
        ) from None
    except Exception as exc:  # corrupt or foreign file: say which and why
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read weights from {path}: {reason}") from None
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state
