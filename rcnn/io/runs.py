"""One run per run folder: a lock held by the training that writes it, and no silent restart.

A run folder (``rcnn train --out RUN``) is written by one process at a time. :func:`claim_run_folder`
takes an exclusive lock on ``RUN/.lock`` for the whole training and refuses, naming the process
that holds it, when another training is writing there. The lock is an advisory file lock
(``flock`` on POSIX, ``msvcrt.locking`` on Windows) that the operating system drops when its
process ends, however it ends: a training killed with ``kill -9`` leaves no stale lock behind.

A folder that already holds a run is continued with ``resume=True``; without it the training is
refused, unless ``overwrite=True``, which deletes what the folder holds and starts over.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_NAME", "RunFolderBusy", "claim_run_folder", "holds_run", "previous_run"]

LOCK_NAME = ".lock"
# What a training leaves in its folder (the loop's checkpoints and logs; the checkpoints of the
# sub-runs of R-CNN's stages and of alternating training one folder down).
_RUN_MARKS = ("last", "metrics.jsonl")


class RunFolderBusy(ValueError):
    """Another process is training into the run folder."""


def previous_run(run_dir: str | os.PathLike) -> Path | None:
    """The file that shows ``run_dir`` holds a run (its ``last`` checkpoint, a ``step_*`` folder or a
    ``metrics.jsonl``, here or in a sub-run one folder down), or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    for folder in (run_dir, *sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.is_symlink())):
        for mark in _RUN_MARKS:
            if (folder / mark).exists() or (folder / mark).is_symlink():
                return folder / mark
        steps = sorted(folder.glob("step_*"))
        if steps:
            return steps[-1]
    return None


def holds_run(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds checkpoints or logs of an earlier training."""
    return previous_run(run_dir) is not None


def _lock(handle) -> bool:
    """Take the exclusive lock on the open file ``handle`` without waiting; False if it is held."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return "another process"
    return f"process {text}" if text.isdigit() else "another process"


@contextmanager
def claim_run_folder(
    run_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, what: str = "--out"
) -> Iterator[Path]:
    """Hold ``run_dir`` for one training (a ``with`` block); yields the folder.

    ``RunFolderBusy`` (a ``ValueError``) when another process holds it; ``ValueError`` when it holds
    an earlier run and neither ``resume`` (continue it) nor ``overwrite`` (delete it first) is set.
    ``what`` names the option that chose the folder, for the messages.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_NAME
    handle = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the block)
    try:
        if not _lock(handle):
            raise RunFolderBusy(
                f"{run_dir}: {_holder(lock_path)} is training into this run folder; wait for it to end, "
                f"or give another {what}"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        found = previous_run(run_dir)
        if found is not None and not resume:
            if not overwrite:
                raise ValueError(
                    f"{run_dir}: holds an earlier run ({found.relative_to(run_dir)}); add --resume to continue "
                    f"it, --overwrite to delete it and start over, or give another {what}"
                )
            for entry in run_dir.iterdir():
                if entry.name == LOCK_NAME:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        yield run_dir
    finally:
        handle.close()  # releases the lock; the file stays (removing it would race with a new holder)
