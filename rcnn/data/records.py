"""What the COCO and VOC readers share: image loading, box validation, problems, the dataset base.

Validation policy (both readers, see docs/data.md):

- an unreadable annotation file, a missing image, a NaN / infinite / malformed box, an
  inverted box (x2 < x1), a box far outside the image, an unknown category: **error**
  (``ValueError`` / ``FileNotFoundError`` naming the file, the annotation and the problem);
- a box overhanging the image by at most ``max(2 px, 2% of the side)``: clipped to the image,
  reported in the file's warning;
- a zero-area box (after clipping): dropped, reported in the file's warning;
- grayscale, RGBA, palette, CMYK and 16-bit images: converted to RGB when loaded.

With ``skip_broken`` (:func:`settle_problems`), every image is decoded once when the data set is
built, and an error that concerns one image only (its annotation file is unreadable, the image is
missing, truncated or corrupt, one of its boxes is unusable: :attr:`Problem.image` is set) leaves
that image out instead of refusing the data set; each skipped image is one warning.

Warnings go through the ``warnings`` module with category :class:`DataWarning`, one warning
per annotation file (naming every changed annotation) and one per skipped image. ``rcnn data
check`` prints the same list of :class:`Problem` s without raising.

Shape shorthand:
    N: number of annotated objects in an image
    H, W: image height and width
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from rcnn.io.headers import probe_image
from rcnn.io.images import EXIF_ORIENTATIONS, exif_orientation, load_image
from rcnn.io.images import image_size as _pil_image_size

__all__ = [
    "BACKGROUND",
    "DataWarning",
    "DetectionDataset",
    "IMAGE_CHECKS",
    "ImageCheck",
    "ImageRecord",
    "PackedBytes",
    "Problem",
    "RecordTable",
    "check_box",
    "check_images",
    "image_size",
    "load_image",
    "repeated_images",
    "report_problems",
    "same_file_key",
    "settle_problems",
    "size_mismatch",
    "skip_broken_images",
]

BACKGROUND = "__background__"
# Overhang (px) that is clipped rather than refused: max(2 px, 2% of the image side).
OVERHANG_PIXELS = 2.0
OVERHANG_FRACTION = 0.02
# Overhang below this is floating-point noise from xywh -> xyxy: clipped without a report.
_ROUNDING = 1e-3
# How many errors an exception message lists before "... and N more".
_MAX_LISTED = 5

Transform = Callable[[Tensor, dict[str, Any]], tuple[Tensor, dict[str, Any]]]


class DataWarning(UserWarning):
    """A data set was loaded with changes: boxes clipped or dropped, polygons dropped."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data set: ``severity`` is ``"error"`` or ``"warning"``."""

    severity: str
    file: str
    message: str
    where: str | None = None  # e.g. "annotation id 17", "object 3"
    missing_file: bool = False  # the error is a file that does not exist
    # The one image this problem concerns (its path, or its annotation file where no image is
    # known yet): leaving that image out removes the problem (``skip_broken``). None: the problem
    # concerns the data set as a whole.
    image: str | None = None
    skipped: bool = False  # a warning: the image was left out because of this (``skip_broken``)

    def describe(self) -> str:
        """``file: where: message``."""
        where = f" {self.where}:" if self.where else ""
        return f"{self.file}:{where} {self.message}"

    def __str__(self) -> str:
        return f"{self.severity}: {self.describe()}"


def report_problems(problems: Sequence[Problem], hint: str = "") -> None:
    """Raise ``ValueError`` listing the errors among ``problems``; warn once per file otherwise.

    When every error is a missing file the exception is a ``FileNotFoundError``.

    ``hint`` is appended to the exception message (e.g. how to see the full list).
    """
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        if len(errors) == 1:
            message = f"{errors[0].describe()}{hint}"
        else:
            listed = "\n  ".join(p.describe() for p in errors[:_MAX_LISTED])
            more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else ""
            message = f"{len(errors)} errors in the data set:\n  {listed}{more}{hint}"
        if all(p.missing_file for p in errors):
            raise FileNotFoundError(message)
        raise ValueError(message)
    by_file: dict[str, list[Problem]] = {}
    for problem in problems:
        if problem.skipped:  # a whole image left out: a line of its own, not one change among many
            warnings.warn(problem.describe(), DataWarning, stacklevel=3)
            continue
        by_file.setdefault(problem.file, []).append(problem)
    for file, found in by_file.items():
        details = "; ".join(f"{p.where}: {p.message}" if p.where else p.message for p in found)
        warnings.warn(f"{file}: {len(found)} change(s) on load: {details}", DataWarning, stacklevel=3)


def check_box(
    box: Sequence[Any],
    image_hw: tuple[int, int],
    file: str,
    where: str,
    problems: list[Problem],
) -> list[float] | None:
    """Validate one ``(x1, y1, x2, y2)`` box; return it (clipped) or ``None`` if it is unusable.

    Appends to ``problems``: an error for non-numbers, NaN/inf, x2 < x1 / y2 < y1 or an
    overhang beyond ``max(2 px, 2% of the side)``; a warning for a clipped box or a dropped
    zero-area box.
    """
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        problems.append(Problem("error", file, f"box {list(box)!r} is not 4 numbers", where))
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        problems.append(Problem("error", file, f"box {[x1, y1, x2, y2]} has a NaN or infinite value", where))
        return None
    if x2 < x1 or y2 < y1:
        problems.append(
            Problem(
                "error",
                file,
                f"box {[x1, y1, x2, y2]} (x1, y1, x2, y2) has negative width or height; "
                "check the coordinate order of the annotation",
                where,
            )
        )
        return None
    height, width = image_hw
    overhang_x = max(-x1, x2 - width, 0.0)
    overhang_y = max(-y1, y2 - height, 0.0)
    limit_x = max(OVERHANG_PIXELS, OVERHANG_FRACTION * width)
    limit_y = max(OVERHANG_PIXELS, OVERHANG_FRACTION * height)
    if overhang_x > limit_x or overhang_y > limit_y:
        problems.append(
            Problem(
                "error",
                file,
                f"box {[x1, y1, x2, y2]} lies outside the {width}x{height} image by "
                f"{max(overhang_x, overhang_y):.1f} px (more than the {max(limit_x, limit_y):.1f} px "
                "that are clipped); check the image size or the box",
                where,
            )
        )
        return None
    clipped = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
               min(max(x2, 0.0), width), min(max(y2, 0.0), height)]  # fmt: skip
    if (clipped[2] - clipped[0]) * (clipped[3] - clipped[1]) <= 0:
        problems.append(Problem("warning", file, f"zero-area box {[x1, y1, x2, y2]} dropped", where))
        return None
    if max(overhang_x, overhang_y) > _ROUNDING:
        problems.append(
            Problem(
                "warning",
                file,
                f"box {[x1, y1, x2, y2]} overhangs the {width}x{height} image by "
                f"{max(overhang_x, overhang_y):.2f} px, clipped",
                where,
            )
        )
    return clipped


def same_file_key(path: os.PathLike | str, cwd: str) -> str:
    """What two spellings of one file name share (``a.jpg``, ``./a.jpg``, ``sub/../a.jpg``, the
    absolute path): the absolute path with ``.`` and ``..`` resolved lexically, cased as the system
    compares names. Symbolic links are not followed: that costs a look-up per image."""
    return os.path.normcase(os.path.normpath(os.path.join(cwd, path)))


def repeated_images(paths: Sequence[os.PathLike | str | None]) -> list[list[int]]:
    """The positions in ``paths`` that name one image file (compared by :func:`same_file_key`),
    a list for each file named more than once, in order; ``None`` entries are no file."""
    cwd = os.getcwd()
    by_file: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        if path is not None:
            by_file.setdefault(same_file_key(path, cwd), []).append(i)
    return [positions for positions in by_file.values() if len(positions) > 1]


def size_mismatch(path: str | os.PathLike, image_hw: tuple[int, int], annotated_hw: tuple[int, int]) -> str:
    """The message for an image whose size (as loaded) differs from its annotation's.

    When the difference is exactly a transpose and the file carries an EXIF orientation that
    swaps the sides (5 to 8), the message says so: the annotation was made on the stored pixels
    by a tool that does not apply the orientation, while the library applies it (rcnn.io.images).
    """
    (height, width), (ann_height, ann_width) = image_hw, annotated_hw
    message = f"the image is {width}x{height} (WxH) but its annotations say {ann_width}x{ann_height}"
    orientation = 1
    if (height, width) == (ann_width, ann_height):
        try:
            orientation = exif_orientation(path)
        except (FileNotFoundError, ValueError):
            pass
    if orientation >= 5:
        return (
            f"{message}: the JPEG's EXIF orientation ({orientation}: {EXIF_ORIENTATIONS[orientation]}) turns "
            f"the {height}x{width} pixels into {width}x{height}; rcnn applies EXIF orientation as annotation "
            "tools do, so these annotations were made on the unturned pixels: re-export them from a tool "
            "that shows the image turned, or save the image with its pixels turned and without the tag"
        )
    return f"{message}; fix the annotation file"


@dataclass
class ImageRecord:
    """The validated annotations of one image (boxes already clipped, unusable ones removed).

    A data set holds its records as columns (:class:`RecordTable`); an ``ImageRecord`` is one
    image's row, with arrays of its own (changing them changes nothing in the table).
    """

    image_id: int
    path: Path
    height: int
    width: int
    boxes: np.ndarray  # [N, 4] float32, x1 y1 x2 y2
    labels: np.ndarray  # [N] int64, 1..K
    iscrowd: np.ndarray  # [N] bool
    difficult: np.ndarray  # [N] bool
    ann_ids: list[int] = field(default_factory=list)  # [N]
    areas: list[float] = field(default_factory=list)  # [N], the COCO "area" (mask area if known)
    segmentations: list[Any] | None = None  # [N] COCO polygons / RLE, None when there are none

    @staticmethod
    def empty_arrays(n: int = 0) -> dict[str, np.ndarray]:
        """Zero-length arrays of the right dtypes, for images without objects."""
        return {
            "boxes": np.zeros((n, 4), dtype=np.float32),
            "labels": np.zeros(n, dtype=np.int64),
            "iscrowd": np.zeros(n, dtype=bool),
            "difficult": np.zeros(n, dtype=bool),
        }


def _dumps(value: Any) -> str:
    """Compact JSON text of a segmentation: ASCII (non-ASCII characters escaped), so that its
    characters are its bytes; NaN and infinities as ``json`` writes and reads them."""
    return json.dumps(value, separators=(",", ":"))


class PackedBytes:
    """Byte strings packed into one buffer: ``data [C]`` uint8 and ``offsets [n + 1]`` int64 (item
    ``i`` is ``data[offsets[i]:offsets[i + 1]]``). Two arrays instead of ``n`` Python objects: no
    per-item memory overhead, and nothing that data-loading processes copy by touching it."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data = data  # [C] uint8
        self.offsets = offsets  # [n + 1] int64

    @classmethod
    def of(cls, items: Sequence[bytes]) -> PackedBytes:
        lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))  # [n]
        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.frombuffer(b"".join(items), dtype=np.uint8), offsets)

    @classmethod
    def of_texts(cls, texts: Sequence[str]) -> PackedBytes:
        """ASCII texts, packed without a bytes object per item."""
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))  # [n]
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.frombuffer("".join(texts).encode("ascii"), dtype=np.uint8), offsets)

    @classmethod
    def of_json(cls, values: Sequence[Any]) -> PackedBytes:
        """Each value as compact JSON; ``None`` as no bytes (:meth:`json` reads it back as ``None``)."""
        return cls.of_texts(["" if v is None else _dumps(v) for v in values])

    def json(self, i: int) -> Any:
        """Item ``i`` read as JSON; ``None`` for an empty item."""
        text = self[i]
        return json.loads(text) if text else None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        return self.data[self.offsets[i] : self.offsets[i + 1]].tobytes()

    def lengths(self) -> np.ndarray:
        """``[n]`` the byte length of each item."""
        return np.diff(self.offsets)

    def take(self, indices: np.ndarray) -> PackedBytes:
        """The items at ``indices`` (``[m]`` int), in that order."""
        return PackedBytes.of([self[int(i)] for i in indices])


def _spans(first: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The positions of the objects of images ``indices`` (``[m]``), image after image, given each
    image's first object ``first [I + 1]``: ``[M]`` int64."""
    starts, counts = first[indices], first[indices + 1] - first[indices]  # [m]
    total = int(counts.sum())
    ends = np.cumsum(counts)  # [m]
    return np.repeat(starts - (ends - counts), counts) + np.arange(total, dtype=np.int64)


class RecordTable(Sequence[ImageRecord]):
    """The records of a data set as columns: one array per field for all images (``[I]``) and one
    per object field for all objects (``[B]``), the objects of image ``i`` at
    ``first[i]:first[i + 1]``.

    A ``Sequence`` of :class:`ImageRecord` s (``table[i]`` builds image ``i``'s record), so code that
    reads records one by one reads a table as it read a list. Whole-set code reads the columns
    (``boxes``, ``labels``, ``heights``, ...) without building a record. Held this way, the
    annotations of COCO's 118,287 images and 684,443 objects take tens of megabytes instead of
    over a gigabyte of Python objects, and data-loading processes share them: a list of objects
    is copied page by page into each worker as reference counts are written
    (docs/data.md, "Large data sets").

    Shape shorthand: I images, B objects of all images.
    """

    def __init__(
        self,
        *,
        image_ids: np.ndarray,  # [I] int64
        paths: PackedBytes,  # [I] UTF-8 file paths
        heights: np.ndarray,  # [I] int32
        widths: np.ndarray,  # [I] int32
        first: np.ndarray,  # [I + 1] int64, each image's first object
        boxes: np.ndarray,  # [B, 4] float32 x1 y1 x2 y2
        labels: np.ndarray,  # [B] int64 1..K
        iscrowd: np.ndarray,  # [B] bool
        difficult: np.ndarray,  # [B] bool
        ann_ids: np.ndarray,  # [B] int64 (where the format has them)
        areas: np.ndarray,  # [B] float64 (where the format has them)
        segmentations: PackedBytes,  # compact JSON of segmentations, b"" for none
        segmentation_index: np.ndarray | None = None,  # [B] int64: each object's item of segmentations (default: the B items in order)
        has_ann_ids: np.ndarray,  # [I] bool: the record's ann_ids are known
        has_areas: np.ndarray,  # [I] bool: the record's areas are known
        has_segmentations: np.ndarray,  # [I] bool: the record's segmentations list is not None
    ) -> None:
        self.image_ids, self.paths, self.heights, self.widths, self.first = image_ids, paths, heights, widths, first
        self.boxes, self.labels, self.iscrowd, self.difficult = boxes, labels, iscrowd, difficult
        self.ann_ids, self.areas, self.segmentations = ann_ids, areas, segmentations
        # (an index into the packed segmentations: a subset or a reordering shares them)
        self.segmentation_index = np.arange(len(labels), dtype=np.int64) if segmentation_index is None else segmentation_index
        self.has_ann_ids, self.has_areas, self.has_segmentations = has_ann_ids, has_areas, has_segmentations

    @classmethod
    def from_records(cls, records: Sequence[ImageRecord]) -> RecordTable:
        """The table of a list of records (or a table itself)."""
        if isinstance(records, RecordTable):
            return records
        counts = np.fromiter((len(r.labels) for r in records), dtype=np.int64, count=len(records))  # [I]
        first = np.zeros(len(records) + 1, dtype=np.int64)
        np.cumsum(counts, out=first[1:])

        def objects(name: str, dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:
            parts = [np.asarray(getattr(r, name), dtype=dtype).reshape(-1, *shape) for r in records]
            return np.concatenate(parts) if parts else np.zeros((0, *shape), dtype=dtype)

        def known(name: str, dtype: Any) -> np.ndarray:  # a field a record may leave empty
            values = [getattr(r, name) if len(getattr(r, name)) == n else [0] * n for r, n in zip(records, counts.tolist())]
            flat = [v for part in values for v in part]
            return np.asarray(flat, dtype=dtype)

        segmentations = [
            s for r, n in zip(records, counts.tolist()) for s in (r.segmentations if r.segmentations is not None else [None] * n)
        ]
        return cls(
            image_ids=np.fromiter((int(r.image_id) for r in records), dtype=np.int64, count=len(records)),
            paths=PackedBytes.of([os.fsencode(r.path) for r in records]),
            heights=np.fromiter((r.height for r in records), dtype=np.int32, count=len(records)),
            widths=np.fromiter((r.width for r in records), dtype=np.int32, count=len(records)),
            first=first,
            boxes=objects("boxes", np.float32, (4,)),
            labels=objects("labels", np.int64),
            iscrowd=objects("iscrowd", bool),
            difficult=objects("difficult", bool),
            ann_ids=known("ann_ids", np.int64),
            areas=known("areas", np.float64),
            segmentations=PackedBytes.of_json(segmentations),
            has_ann_ids=np.fromiter((len(r.ann_ids) == n and n > 0 for r, n in zip(records, counts.tolist())), bool, len(records)),
            has_areas=np.fromiter((len(r.areas) == n and n > 0 for r, n in zip(records, counts.tolist())), bool, len(records)),
            has_segmentations=np.fromiter((r.segmentations is not None for r in records), bool, len(records)),
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def path(self, i: int) -> str:
        """The image file of image ``i``."""
        return os.fsdecode(self.paths[i])

    def path_strings(self) -> list[str]:
        """The image file of every image."""
        return [os.fsdecode(self.paths[i]) for i in range(len(self))]

    def counts(self) -> np.ndarray:
        """``[I]`` the number of objects of each image."""
        return np.diff(self.first)

    def segmentation_count(self) -> int:
        """How many objects have a segmentation."""
        return int((self.segmentations.lengths()[self.segmentation_index] > 0).sum())

    def __getitem__(self, i: int) -> ImageRecord:  # type: ignore[override]
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])  # type: ignore[return-value]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of a table of {len(self)}")
        a, b = int(self.first[i]), int(self.first[i + 1])
        segmentations = None
        if self.has_segmentations[i]:
            segmentations = [self.segmentations.json(k) for k in self.segmentation_index[a:b].tolist()]
        return ImageRecord(
            image_id=int(self.image_ids[i]),
            path=Path(self.path(i)),
            height=int(self.heights[i]),
            width=int(self.widths[i]),
            boxes=self.boxes[a:b].copy(),
            labels=self.labels[a:b].copy(),
            iscrowd=self.iscrowd[a:b].copy(),
            difficult=self.difficult[a:b].copy(),
            ann_ids=self.ann_ids[a:b].tolist() if self.has_ann_ids[i] else [],
            areas=self.areas[a:b].tolist() if self.has_areas[i] else [],
            segmentations=segmentations,
        )

    def __iter__(self) -> Iterator[ImageRecord]:
        for i in range(len(self)):
            yield self[i]

    def take(self, indices: Sequence[int] | np.ndarray) -> RecordTable:
        """A table of the images at ``indices`` (``[m]``), in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # [m]
        objects = _spans(self.first, idx)  # [M]
        first = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(self.first[idx + 1] - self.first[idx], out=first[1:])
        return RecordTable(
            image_ids=self.image_ids[idx], paths=self.paths.take(idx), heights=self.heights[idx],
            widths=self.widths[idx], first=first, boxes=self.boxes[objects], labels=self.labels[objects],
            iscrowd=self.iscrowd[objects], difficult=self.difficult[objects], ann_ids=self.ann_ids[objects],
            areas=self.areas[objects], segmentations=self.segmentations,
            segmentation_index=self.segmentation_index[objects],
            has_ann_ids=self.has_ann_ids[idx], has_areas=self.has_areas[idx],
            has_segmentations=self.has_segmentations[idx],
        )  # fmt: skip

    def labels_of(self, i: int) -> np.ndarray:
        """``[N]`` the labels of image ``i`` (a view: no record built)."""
        return self.labels[self.first[i] : self.first[i + 1]]


def image_size(path: str | os.PathLike, decode: bool = False) -> tuple[int, int]:
    """:func:`rcnn.io.images.image_size`: ``(height, width)`` of an image file as
    :func:`load_image` returns it, from its header unless ``decode``.

    A JPEG or PNG header is read by :func:`rcnn.io.headers.probe_image` (a few system calls, about
    ten times faster than opening the file with PIL); every other case, and every error, by PIL.
    """
    if not decode:
        found = probe_image(path, check_end=False)
        if found is not None:
            return found
    return _pil_image_size(path, decode=decode)


ImageCheck = Literal["header", "complete", "decode"]
IMAGE_CHECKS: dict[str, str] = {
    "header": "the header of each image file (its size), nothing more",
    "complete": "the header of each image file and whether the file ends as its format does (a file cut "
    "short is found); a file that does not, or of another format than JPEG and PNG, is decoded",
    "decode": "every pixel of every image file",
}
_CHUNK = 256  # images a thread checks at once: few tasks, a fine-grained progress bar


def _image_problem(path: str, height: int, width: int, how: ImageCheck) -> Problem | None:
    """The problem of one image file: unreadable, missing, or not of its annotated size."""
    try:
        hw = None if how == "decode" else probe_image(path, check_end=how == "complete")
        if hw is None:
            hw = _pil_image_size(path, decode=how != "header")
    except FileNotFoundError as exc:
        return Problem("error", path, str(exc).removeprefix(f"{path}: "), missing_file=True, image=path)
    except ValueError as exc:
        return Problem("error", path, str(exc).removeprefix(f"{path}: "), image=path)
    if hw != (height, width):
        return Problem("error", path, size_mismatch(path, hw, (height, width)), image=path)
    return None


def check_images(
    records: Sequence[ImageRecord], decode: bool | ImageCheck = True, *, progress: bool = False
) -> list[Problem]:
    """Check each record's image file against its record: ``decode`` is one of
    :data:`IMAGE_CHECKS` (``True``: ``"decode"``, ``False``: ``"header"``).

    One error per unreadable image or size mismatch, with :attr:`Problem.image` set. Images are
    read in a few threads (file reads and decoders release the interpreter lock), a chunk at a
    time, and nothing is kept. ``progress``: a progress bar on the terminal (stderr), if it is one.
    """
    how: ImageCheck = "decode" if decode is True else "header" if decode is False else decode
    if how not in IMAGE_CHECKS:
        raise ValueError(f"check_images: decode must be one of {', '.join(IMAGE_CHECKS)}, True or False, got {decode!r}")
    if isinstance(records, RecordTable):
        items = list(zip(records.path_strings(), records.heights.tolist(), records.widths.tolist()))
    else:
        items = [(str(r.path), r.height, r.width) for r in records]

    def chunk(start: int) -> list[Problem | None]:
        return [_image_problem(p, h, w, how) for p, h, w in items[start : start + _CHUNK]]

    starts = range(0, len(items), _CHUNK)
    found: list[Problem | None] = []
    with tqdm(total=len(items), desc=f"images ({how})", unit="img", disable=None if progress else True,
              leave=False, dynamic_ncols=True) as bar:  # fmt: skip
        if len(items) < 8:
            found = chunk(0) if items else []
        else:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                for part in pool.map(chunk, starts):  # in record order: the report is deterministic
                    found += part
                    bar.update(len(part))
    return [p for p in found if p is not None]


def skip_broken_images(
    records: Sequence[ImageRecord], problems: Sequence[Problem]
) -> tuple[Sequence[ImageRecord], list[Problem]]:
    """Leave out every image that an error concerns; the errors become ``skipped`` warnings.

    Errors that concern no single image (:attr:`Problem.image` is ``None``) stay errors. An image
    with several problems gives one warning, with the reason of its first error. A table gives a
    table, a list a list (of the same record objects).
    """
    broken = {p.image for p in problems if p.severity == "error" and p.image is not None}
    kept: list[Problem] = []
    warned: set[str] = set()
    for problem in problems:
        if problem.image not in broken:  # None never is
            kept.append(problem)
        elif problem.severity == "error" and problem.image not in warned:
            warned.add(problem.image)
            kept.append(replace(problem, severity="warning", message=f"skipped: {problem.message}", skipped=True))
        # its other problems (further errors, clipped boxes) go with the image
    if isinstance(records, RecordTable):
        if not broken:
            return records, kept
        return records.take([i for i, path in enumerate(records.path_strings()) if path not in broken]), kept
    return [r for r in records if str(r.path) not in broken], kept


def settle_problems(
    records: Sequence[ImageRecord], problems: list[Problem], *, skip_broken: bool = False, hint: str = ""
) -> Sequence[ImageRecord]:
    """What a reader does with what it found: raise on errors (:func:`report_problems`), or with
    ``skip_broken`` decode every image once, leave out the broken ones and warn about each.

    Returns the records to keep (a table for a table, a list for a list).
    """
    if skip_broken:
        records, problems = skip_broken_images(records, [*problems, *check_images(records, decode=True)])
    else:
        errors = [p for p in problems if p.severity == "error"]
        if errors and all(p.image is not None for p in errors):
            count = len({p.image for p in errors})
            hint += (
                f"\n(each error concerns one image; skip_broken=True, `--set data.skip_broken=true` or "
                f"`--skip-broken` leaves the {count} image(s) out)"
            )
    report_problems(problems, hint=hint)
    return records


class DetectionDataset(Dataset):
    """Base of :class:`~rcnn.data.coco.CocoDetection` and :class:`~rcnn.data.voc.VOCDetection`.

    Items are ``(image [3, H, W] float32 0..1, target)`` with target keys ``boxes [N, 4]``
    float32, ``labels [N]`` int64 in 1..K, ``iscrowd [N]`` bool, ``image_id`` int,
    ``orig_size (H, W)``, plus ``masks [N, H, W]`` uint8 when masks are loaded and
    ``difficult [N]`` bool where the format has it. With ``train=True`` crowd objects (and
    objects the subclass excludes from training) are left out of the target.

    The records are held as a :class:`RecordTable` (a list of records given is made one): a few
    arrays, whatever the number of images, which data-loading processes share without copying.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        class_names: Sequence[str],
        *,
        label_to_cat_id: dict[int, int] | None = None,
        train: bool = False,
        transforms: Transform | None = None,
        with_masks: bool = False,
    ) -> None:
        self.records = RecordTable.from_records(records)
        self.class_names: list[str] = [BACKGROUND, *class_names]
        self.num_classes = len(self.class_names)
        if label_to_cat_id is None:
            label_to_cat_id = {label: label for label in range(1, self.num_classes)}
        self.label_to_cat_id = dict(label_to_cat_id)
        self.cat_id_to_label = {cat: label for label, cat in self.label_to_cat_id.items()}
        self.train = train
        self.transforms = transforms
        self.with_masks = with_masks
        self.image_ids: list[int] = self.records.image_ids.tolist()
        self._index_of: dict[int, int] | None = None  # built on first use

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, index: int) -> Path:
        """Path of the image file of item ``index``."""
        return Path(self.records.path(index))

    def index_of(self, image_id: int) -> int:
        """Position of the image with id ``image_id`` (``KeyError`` naming it if unknown)."""
        if self._index_of is None:
            self._index_of = {image_id: i for i, image_id in enumerate(self.image_ids)}
        try:
            return self._index_of[int(image_id)]
        except KeyError:
            raise KeyError(f"image id {image_id} is not in this data set") from None

    def _target_keep(self, record: ImageRecord) -> np.ndarray:
        """``[N]`` bool: the objects ``__getitem__`` returns (crowds are left out for training)."""
        if self.train:
            return ~record.iscrowd
        return np.ones(len(record.labels), dtype=bool)

    def annotation(self, index: int) -> dict[str, Any]:
        """All ground truth of item ``index`` without reading the image (for evaluation).

        Crowd and difficult objects are always included here (flagged), whatever ``train`` is.
        """
        record = self.records[index]
        return {
            "boxes": torch.from_numpy(record.boxes.copy()),  # [N, 4]
            "labels": torch.from_numpy(record.labels.copy()),  # [N]
            "iscrowd": torch.from_numpy(record.iscrowd.copy()),  # [N]
            "difficult": torch.from_numpy(record.difficult.copy()),  # [N]
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
        }

    def _decode_masks(self, record: ImageRecord, keep: np.ndarray) -> np.ndarray:
        """``[N', H, W]`` uint8 masks of the kept objects; formats with masks override this."""
        raise ValueError(f"{type(self).__name__} has no instance masks")

    def _extra_target(self, record: ImageRecord, keep: np.ndarray) -> dict[str, Tensor]:
        """Format-specific target fields (VOC adds ``difficult``)."""
        return {}

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        record = self.records[index]
        image = load_image(record.path)  # [3, H, W]
        if tuple(image.shape[1:]) != (record.height, record.width):
            hw = (int(image.shape[1]), int(image.shape[2]))
            raise ValueError(f"{record.path}: {size_mismatch(record.path, hw, (record.height, record.width))}")
        keep = self._target_keep(record)  # [N]
        target: dict[str, Any] = {
            "boxes": torch.from_numpy(record.boxes[keep]),  # [N, 4]
            "labels": torch.from_numpy(record.labels[keep]),  # [N]
            "iscrowd": torch.from_numpy(record.iscrowd[keep]),  # [N]
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
        }
        target.update(self._extra_target(record, keep))
        if self.with_masks:
            target["masks"] = torch.from_numpy(self._decode_masks(record, keep))  # [N, H, W]
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def subset(self, indices: Sequence[int]) -> DetectionDataset:
        """A data set of the same kind holding the items at ``indices`` (in that order).

        The table holds the chosen rows (copied: a few arrays); image ids are kept.
        """
        sub = copy.copy(self)
        sub.__dict__.pop("coco", None)  # the cached ground truth is the whole set's
        sub.records = self.records.take(indices)
        if isinstance(getattr(self, "image_names", None), list):  # VOC and the folder layouts
            sub.image_names = [self.image_names[i] for i in indices]
        sub.image_ids = sub.records.image_ids.tolist()
        sub._index_of = None
        return sub

    def _coco_categories(self) -> list[dict[str, Any]]:
        return [
            {"id": self.label_to_cat_id[label], "name": self.class_names[label]}
            for label in range(1, self.num_classes)
        ]

    def coco_dict(self) -> dict[str, Any]:
        """The validated ground truth as a COCO instances dictionary (all objects, flagged).

        VOC ``difficult`` objects become ``iscrowd = 1``, which COCO evaluation also ignores.
        """
        images, annotations = [], []
        next_id = 1
        for record in self.records:
            images.append(
                {"id": record.image_id, "file_name": str(record.path), "height": record.height, "width": record.width}
            )
            for j, (box, label) in enumerate(zip(record.boxes.tolist(), record.labels.tolist())):
                x1, y1, x2, y2 = box
                ann = {
                    "id": record.ann_ids[j] if record.ann_ids else next_id,
                    "image_id": record.image_id,
                    "category_id": self.label_to_cat_id[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": record.areas[j] if record.areas else (x2 - x1) * (y2 - y1),
                    "iscrowd": int(record.iscrowd[j] or record.difficult[j]),
                }
                if record.segmentations is not None and record.segmentations[j] is not None:
                    ann["segmentation"] = record.segmentations[j]
                annotations.append(ann)
                next_id += 1
        return {"images": images, "annotations": annotations, "categories": self._coco_categories()}

    @cached_property
    def coco(self):  # -> pycocotools.coco.COCO
        """The ground truth as a ``pycocotools.coco.COCO`` object (built on first use)."""
        import contextlib
        import io

        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = self.coco_dict()
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
            coco.createIndex()
        return coco
