"""One run per run folder: its own marker, a lock held by the training that writes it, and no
silent restart or deletion.

A run folder (``rcnn train --out RUN``) is a folder the library created for one run, or a new or
empty one the user named for it. :func:`claim_run_folder` writes the marker file ``RUN/.rcnn-run``
into it, and takes an exclusive lock on ``RUN/.lock`` for the whole training, refusing, with the
process that holds it named, when another training is writing there. The lock is an advisory
file lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) that the operating system drops when
its process ends, however it ends: a training killed with ``kill -9`` leaves no stale lock behind.

What happens to a folder that is not new:

- empty (or holding only a lock file): it becomes the run folder;
- a run folder of ours (its marker) holding an earlier run: continued with ``resume=True``;
  refused without it, unless ``overwrite=True``, which deletes what that folder holds (that
  folder only) and starts over;
- a run written before run folders had a marker (checkpoints ``step_*/model.safetensors`` with
  ``last`` or ``metrics.jsonl`` in the folder itself): continued with ``resume=True`` (the marker
  is added then); never deleted by ``overwrite``;
- anything else (a folder of the user's files, a parent folder of several runs): refused before
  anything is written into it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rcnn.io.files import write_text

__all__ = ["LOCK_NAME", "RUN_MARKER", "RunFolderBusy", "claim_run_folder", "holds_run", "is_run_folder", "previous_run"]

LOCK_NAME = ".lock"
RUN_MARKER = ".rcnn-run"  # written into every run folder the library trains into
# What a training leaves in its folder (the loop's checkpoints and logs; the checkpoints of the
# sub-runs of R-CNN's stages and of alternating training one folder down).
_RUN_MARKS = ("last", "metrics.jsonl")


class RunFolderBusy(ValueError):
    """Another process is training into the run folder."""


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run folder the library made (it holds the marker file)."""
    return (Path(path) / RUN_MARKER).is_file()


def _checkpoint_dirs(folder: Path) -> list[Path]:
    """The ``step_*`` folders of ``folder`` that hold a checkpoint's files (not a photo named step_01.jpg)."""
    return sorted(p for p in folder.glob("step_*") if p.is_dir() and not p.is_symlink()
                  and ((p / "model.safetensors").is_file() or (p / "state.json").is_file()))  # fmt: skip


def previous_run(run_dir: str | os.PathLike) -> Path | None:
    """The file that shows ``run_dir`` holds a run (its ``last`` checkpoint, a ``step_*``
    checkpoint folder or a ``metrics.jsonl``, here or in a sub-run one folder down), or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    for folder in (run_dir, *sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.is_symlink())):
        for mark in _RUN_MARKS:
            if (folder / mark).exists() or (folder / mark).is_symlink():
                return folder / mark
        steps = _checkpoint_dirs(folder)
        if steps:
            return steps[-1]
    return None


def holds_run(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds checkpoints or logs of an earlier training."""
    return previous_run(run_dir) is not None


def _legacy_run(run_dir: Path) -> bool:
    """A run written before run folders had a marker: checkpoints of the loop in the folder itself."""
    steps = _checkpoint_dirs(run_dir)
    return bool(steps) and ((run_dir / "last").is_symlink() or (run_dir / "metrics.jsonl").is_file())


def _own_entries(run_dir: Path) -> list[Path]:
    """What ``run_dir`` holds besides its marker and lock file."""
    return sorted(p for p in run_dir.iterdir() if p.name not in (LOCK_NAME, RUN_MARKER))


def _refuse_foreign(run_dir: Path, resume: bool, overwrite: bool, what: str) -> None:
    """Refuse, before anything is written, a ``run_dir`` that is not new, empty or a run of ours."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir}: is a file, not a folder; give a new or empty folder as {what}")
    if not run_dir.is_dir() or is_run_folder(run_dir) or not _own_entries(run_dir):
        return
    if _legacy_run(run_dir):
        if overwrite and not resume:
            raise ValueError(
                f"{run_dir}: holds a run written by an earlier rcnn, without the {RUN_MARKER} file that lets "
                f"--overwrite delete a folder; add --resume to continue it, or delete it yourself, or give another {what}"
            )
        return
    entries = _own_entries(run_dir)
    shown = ", ".join(p.name for p in entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise ValueError(
        f"{run_dir}: is not empty ({shown}) and is not a run folder of rcnn (no {RUN_MARKER} file), so nothing "
        f"is written into it nor deleted from it; give a new or empty folder as {what}"
    )


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
    """Hold ``run_dir`` for one training (a ``with`` block); yields the folder (module docstring).

    ``RunFolderBusy`` (a ``ValueError``) when another process holds it; ``ValueError`` when it is
    not new, empty or a run folder of ours, or holds an earlier run and neither ``resume``
    (continue it) nor ``overwrite`` (delete it first; a run folder with the marker only) is set.
    ``what`` names the option that chose the folder, for the messages.
    """
    run_dir = Path(run_dir)
    _refuse_foreign(run_dir, resume, overwrite, what)
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
        entries = _own_entries(run_dir)
        found = previous_run(run_dir) or (entries[0] if entries else None)
        if found is not None and not resume:
            if not overwrite:
                raise ValueError(
                    f"{run_dir}: holds an earlier run ({found.relative_to(run_dir)}); add --resume to continue "
                    f"it, --overwrite to delete it and start over, or give another {what}"
                )
            for entry in entries:  # a run folder of ours (checked above): what it holds, and nothing outside it
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        if not is_run_folder(run_dir):
            write_text(run_dir / RUN_MARKER, json.dumps({"format": "rcnn run folder"}) + "\n")
        yield run_dir
    finally:
        handle.close()  # releases the lock; the file stays (removing it would race with a new holder)
