"""What a user's folder holds, to prove a command left it alone.

``snapshot(folder)`` maps every entry under ``folder`` (relative path) to what it is: a file's
SHA-256, a symbolic link's target, or ``"dir"``; two snapshots are equal exactly when no file was
written, replaced by a link, removed or added there.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def snapshot(folder: str | os.PathLike) -> dict[str, str]:
    """Every entry under ``folder``: ``{relative path: "sha256:<hex>" | "link:<target>" | "dir"}``."""
    folder = Path(folder)
    entries: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        key = path.relative_to(folder).as_posix()
        if path.is_symlink():
            entries[key] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            entries[key] = "dir"
        else:
            entries[key] = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def assert_unchanged(before: dict[str, str], folder: str | os.PathLike) -> None:
    """Fail naming the entries of ``folder`` that differ from the snapshot ``before``."""
    after = snapshot(folder)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"{folder}: changed {changed[:10]}{' ...' if len(changed) > 10 else ''}"
