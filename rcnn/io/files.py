"""Atomic writes: a file is either the old one or the complete new one, never half-written.

Each write goes to a temporary file in the destination's folder (a unique name, so two writers
never share one) that is renamed over the destination when complete; ``os.replace`` is atomic on
POSIX and Windows. A failed write removes its temporary file and leaves the destination as it was.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "dumps_json", "read_json", "strict_json", "write_bytes", "write_json", "write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` with a temporary path beside ``path``, then move it onto ``path``.

    The parent folder is created if needed. ``write`` must create the file at ``tmp`` (it may be a
    library call taking a file name, such as ``safetensors.torch.save_file``). Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def strict_json(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by ``None`` (JSON ``null``): strict JSON
    has no NaN, and a metric that is undefined (no ground truth to score) is better said absent."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(value) for value in data]
    return data


def dumps_json(data: Any, indent: int | None = 1) -> str:
    """Strict JSON text of ``data`` (:func:`strict_json`: NaN and infinities become ``null``)."""
    return json.dumps(strict_json(data), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> Path:
    """Write ``data`` as strict JSON to ``path`` atomically (NaN and infinities as ``null``)."""
    return write_text(path, dumps_json(data, indent=indent))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON content of ``path``; ``FileNotFoundError`` / ``ValueError`` naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: corrupt JSON ({exc})") from None
