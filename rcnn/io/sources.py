"""What ``rcnn predict`` reads: image and video files named directly, found in folders (recursively,
by extension), matched by glob patterns or listed in text files; and the frames of a video.

Each input becomes a :class:`Source` with a ``name``: its path relative to the folder that all
inputs share, file extension kept (``d1/x.jpg``, ``d2/x.png``). Distinct files have distinct names,
so outputs named after them never collide, and the same file named twice is read once.

Shape shorthand:
    H, W: frame height and width
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "LIST_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "Source",
    "VideoInfo",
    "VideoWriter",
    "expand_sources",
    "read_video_frames",
    "video_info",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
LIST_EXTENSIONS = (".txt", ".lst")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Source:
    """One input file: ``path`` (absolute), ``name`` (unique among the inputs, ``/``-separated, with
    the file's extension) and ``kind`` (``"image"`` or ``"video"``)."""

    path: Path
    name: str
    kind: str


def _kind(path: Path) -> str:
    return "video" if path.suffix.lower() in VIDEO_EXTENSIONS else "image"


def _in_folder(folder: Path, exclude: Path | None) -> list[Path]:
    """Image and video files under ``folder`` (recursively, sorted), hidden entries and ``exclude`` left out."""
    found = []
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (exclude is None or root_path / d != exclude))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
                found.append(root_path / name)
    if not found:
        raise ValueError(
            f"{folder}: no image or video files in this folder or below it "
            f"(extensions {', '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)})"
        )
    return found


def _list_file(path: Path, exclude: Path | None) -> list[Path]:
    """The files a text list names: one path, folder or glob pattern a line (relative to the list's
    folder); blank lines and lines starting with ``#`` are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the list of inputs ({exc})") from None
    files: list[Path] = []
    for number, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        target = Path(entry) if Path(entry).is_absolute() else path.parent / entry
        if target.suffix.lower() in LIST_EXTENSIONS and target.is_file():
            raise ValueError(f"{path}, line {number}: {entry} is itself a list file; lists do not nest")
        try:
            files += _expand_one(str(target), exclude, lists=False)
        except (FileNotFoundError, ValueError) as exc:
            raise type(exc)(f"{path}, line {number}: {exc}") from None
    if not files:
        raise ValueError(f"{path}: the list names no files")
    return files


def _expand_one(entry: str, exclude: Path | None, lists: bool = True) -> list[Path]:
    path = Path(entry)
    if path.is_dir():
        return _in_folder(path, exclude)
    if path.is_file():
        if lists and path.suffix.lower() in LIST_EXTENSIONS:
            return _list_file(path, exclude)
        return [path]
    if _GLOB_CHARS & set(entry):
        matches = sorted(Path(m) for m in glob.glob(entry, recursive=True) if Path(m).is_file())
        matches = [m for m in matches if m.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS]
        if not matches:
            raise FileNotFoundError(f"{entry}: the pattern matches no image or video file")
        return matches
    raise FileNotFoundError(f"{entry}: no such file or folder")


def expand_sources(inputs: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None) -> list[Source]:
    """The input files named by ``inputs`` (files, folders, glob patterns, list files), in order,
    each once, with unique names (module docstring).

    ``exclude``: a folder whose files are never inputs (the output folder, so that a second run
    over a folder that contains it does not read the first run's pictures).
    """
    if not inputs:
        raise ValueError("no inputs: name image or video files, folders, glob patterns or list files")
    excluded = Path(exclude).resolve() if exclude is not None else None
    seen: dict[Path, None] = {}
    for entry in inputs:
        for path in _expand_one(os.fspath(entry), excluded):
            resolved = path.resolve()
            if excluded is not None and resolved.is_relative_to(excluded) and not Path(entry).is_file():
                continue
            seen.setdefault(resolved, None)
    paths = list(seen)
    if not paths:
        raise ValueError(f"no inputs left: every file found is inside the output folder {exclude}")
    root = Path(os.path.commonpath([p.parent for p in paths]))
    return [Source(p, p.relative_to(root).as_posix(), _kind(p)) for p in paths]


@dataclass(frozen=True)
class VideoInfo:
    """A video's frame rate, frame count (as the container states it) and frame size ``(H, W)``."""

    fps: float
    frames: int
    size: tuple[int, int]


def _capture(path: Path):  # -> cv2.VideoCapture
    import cv2

    if not path.is_file():
        raise FileNotFoundError(f"{path}: video file not found")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError(f"{path}: cannot open the video (unknown container or codec); convert it to MP4 (H.264)")
    return capture


def video_info(path: str | os.PathLike) -> VideoInfo:
    """:class:`VideoInfo` of a video file, from its container."""
    import cv2

    capture = _capture(Path(path))
    try:
        fps = float(capture.get(cv2.CAP_PROP_FPS)) or 25.0
        frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        size = (int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)))
    finally:
        capture.release()
    return VideoInfo(fps, frames, size)


def read_video_frames(path: str | os.PathLike, stride: int = 1) -> Iterator[tuple[int, Tensor]]:
    """``(frame index, frame [3, H, W] float32 RGB in 0..1)`` for every ``stride``-th frame (0, stride, ...).

    Frames in between are skipped without being converted. Raises naming the file when it cannot
    be opened or when its first frame cannot be decoded.
    """

    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    path = Path(path)
    capture = _capture(path)
    try:
        index = 0
        while True:
            if not capture.grab():
                if index == 0:
                    raise ValueError(f"{path}: no frame could be decoded")
                return
            if index % stride == 0:
                ok, bgr = capture.retrieve()  # [H, W, 3] uint8, BGR
                if not ok:
                    raise ValueError(f"{path}: frame {index} cannot be decoded")
                rgb = np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1))
                yield index, torch.from_numpy(rgb).float().div_(255.0)
            index += 1
    finally:
        capture.release()


class VideoWriter:
    """Writes RGB frames (``PIL.Image`` or ``[H, W, 3]`` uint8 arrays) to a video file (MPEG-4 part 2,
    OpenCV's ``mp4v``); the file appears under its name only when :meth:`close` succeeds."""

    def __init__(self, path: str | os.PathLike, fps: float, size: tuple[int, int]) -> None:
        import cv2

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self.size = size  # (H, W)
        self._writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (size[1], size[0]))
        if not self._writer.isOpened():
            raise ValueError(f"{self.path}: OpenCV cannot write this video format; use a .mp4 or .avi name")
        self.frames = 0

    def write(self, frame) -> None:  # noqa: ANN001 - PIL image or array
        array = np.asarray(frame, dtype=np.uint8)
        if array.shape[:2] != self.size:
            raise ValueError(f"{self.path}: frame {self.frames} is {array.shape[:2]}, the video {self.size}")
        self._writer.write(np.ascontiguousarray(array[:, :, ::-1]))  # RGB -> BGR
        self.frames += 1

    def close(self) -> Path:
        self._writer.release()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._writer.release()
        self._tmp.unlink(missing_ok=True)
