"""COCO instances files (``instances_*.json``) as a detection / instance segmentation data set.

Category ids (any integers) map to contiguous labels 1..K in increasing id order; the mapping
is kept (``label_to_cat_id``) to write results back. Boxes are converted from COCO's
``[x, y, width, height]`` to ``(x1, y1, x2, y2)`` and validated once at construction (see
``rcnn.data.records`` for the policy); images are read in ``__getitem__``.

Shape shorthand:
    N: number of annotated objects in an image
    H, W: image height and width
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import json.scanner
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from rcnn.data.records import (
    DetectionDataset,
    ImageRecord,
    OVERHANG_FRACTION,
    OVERHANG_PIXELS,
    _ROUNDING,
    PackedBytes,
    Problem,
    RecordTable,
    Transform,
    check_box,
    repeated_images,
    settle_problems,
)

__all__ = [
    "CocoDetection",
    "CocoIndex",
    "check_segmentation",
    "decode_masks",
    "image_name",
    "image_names",
    "polygon_area",
    "read_coco",
    "rle_string_totals",
    "segmentation_to_mask",
]


@dataclass
class CocoIndex:
    """What :func:`read_coco` found: validated records, classes and the problems it saw."""

    records: RecordTable
    class_names: list[str]  # foreground names, label 1..K
    label_to_cat_id: dict[int, int]
    problems: list[Problem]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load_json(ann_file: Path) -> dict[str, Any]:
    """The whole file parsed by the standard ``json`` module and checked at its top level (what
    :func:`_read_file` falls back on: its errors are the standard parser's)."""
    data = _load_json_text(ann_file)
    _check_top_level(ann_file, data)
    return data


def _check_top_level(ann_file: Path, data: Any) -> None:
    """A JSON object with the ``images``, ``annotations`` and ``categories`` lists, categories not empty."""
    if not isinstance(data, dict):
        raise ValueError(
            f"{ann_file}: expected a JSON object with images/annotations/categories, got a {type(data).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(
                f"{ann_file}: missing the '{key}' list of a COCO instances file "
                f"(found keys: {sorted(data)})"
            )
    if not data["categories"]:
        raise ValueError(f"{ann_file}: the 'categories' list is empty")


def _load_json_text(ann_file: Path) -> Any:
    """The file parsed by the standard ``json`` module, its errors worded for the file."""
    try:
        with open(ann_file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{ann_file}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{ann_file}: not UTF-8 text ({exc.reason}); is it really a JSON file?") from None


def _read_categories(ann_file: Path, categories: list[Any]) -> tuple[list[str], dict[int, int]]:
    by_id: dict[int, str] = {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise ValueError(f"{ann_file}: categories[{i}] = {cat!r} needs an integer 'id' and a string 'name'")
        if cat["id"] in by_id:
            raise ValueError(f"{ann_file}: category id {cat['id']} appears twice in 'categories'")
        by_id[cat["id"]] = cat["name"]
    cat_ids = sorted(by_id)
    return [by_id[c] for c in cat_ids], {label: cat for label, cat in enumerate(cat_ids, start=1)}


def _tag(problems: list[Problem], start: int, image: str | None) -> None:
    """Mark the problems appended since ``start`` as concerning ``image`` (for ``skip_broken``)."""
    if image is not None:
        for k in range(start, len(problems)):
            problems[k] = replace(problems[k], image=image)


# COCO's compressed RLE string (pycocotools' rleToString / rleFrString): the run lengths of a
# column-major mask, alternately background and object, each written as 5-bit groups, least
# significant first, in characters offset by 48 ('0'). Bit 0x20 of a character says another
# group of the same number follows; bit 0x10 of a number's last character is its sign. From the
# fourth run on, the number written is the difference to the run two before (runs of one colour
# are alike, so the differences are short).
_RLE_OFFSET = 48  # '0'
_RLE_VALUE = 0x1F
_RLE_SIGN = 0x10
_RLE_MORE = 0x20
_RLE_MAX_GROUPS = 7  # 35 bits, far beyond any image's pixel count: a longer number is corruption
_RLE_ALPHABET = "has characters outside COCO's RLE alphabet ('0' to 'o')"
_RLE_CHUNK = 1 << 22  # characters parsed at once: bounds the memory of the arrays below


def rle_string_totals(strings: Sequence[str]) -> list[int | str]:
    """For each COCO compressed RLE string, the pixels its runs cover, or why it cannot be read.

    A valid mask of an ``H x W`` image covers exactly ``H * W`` pixels. The strings are parsed
    together, a few million characters at a time, in a few array passes: no pixel is decoded and
    no Python loop runs per character, so checking every RLE of a large file costs little next to
    reading the file.
    """
    out: list[int | str] = []
    start = 0
    while start < len(strings):
        stop, size = start, 0
        while stop < len(strings) and (stop == start or size + len(strings[stop]) <= _RLE_CHUNK):
            size += len(strings[stop])
            stop += 1
        out += _rle_totals(strings[start:stop])
        start = stop
    return out


def _rle_totals(strings: Sequence[str]) -> list[int | str]:
    """:func:`rle_string_totals` of strings parsed at once.

    Shorthand: S strings, C characters in all, R run lengths in all.
    """
    count = len(strings)
    why: list[str | None] = [None if text.isascii() else _RLE_ALPHABET for text in strings]
    texts = [text if reason is None else "" for text, reason in zip(strings, why)]
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=count)  # [S]
    string_end = np.cumsum(lengths)  # [S] one past each string's last character
    chars = np.frombuffer("".join(texts).encode("ascii"), dtype=np.uint8) - np.uint8(_RLE_OFFSET)  # [C]
    outside = chars > 2 * _RLE_MORE - 1  # [C] below '0' wraps around to a large value

    def strings_with(positions: np.ndarray) -> np.ndarray:  # [S] bool: a string holds one of the positions
        return np.bincount(np.searchsorted(string_end, positions, side="right"), minlength=count)[:count] > 0

    bad_char = strings_with(np.flatnonzero(outside))
    more = (chars & _RLE_MORE) != 0  # [C] another group of the same number follows
    last = string_end[lengths > 0] - 1  # the last character of each non-empty string
    unfinished = np.zeros(count, dtype=bool)
    unfinished[lengths > 0] = more[last]
    more[last] = False  # no number runs on into the next string
    ends = np.flatnonzero(~more)  # [R] the last character of each number
    starts = np.concatenate(([0], ends[:-1] + 1))[: len(ends)]  # [R]
    groups = ends - starts + 1  # [R] characters of each number
    terminal = (~more).view(np.uint8)  # [C]
    runs = np.zeros(count, dtype=np.int64)  # [S] numbers in each string
    runs[lengths > 0] = np.add.reduceat(terminal, string_end[lengths > 0] - lengths[lengths > 0], dtype=np.int64)
    run_owner = np.repeat(np.arange(count), runs)  # [R]
    too_long = np.zeros(count, dtype=bool)
    too_long[run_owner[groups > _RLE_MAX_GROUPS]] = True
    values = (chars[starts] & _RLE_VALUE).astype(np.int64)  # [R] the first group
    for g in range(1, min(int(groups.max(initial=0)), _RLE_MAX_GROUPS)):
        has = np.flatnonzero(groups > g)
        values[has] += (chars[starts[has] + g] & _RLE_VALUE).astype(np.int64) << (5 * g)
    signed = (chars[ends] & _RLE_SIGN) != 0  # [R]
    values[signed] -= np.left_shift(1, 5 * np.minimum(groups[signed], _RLE_MAX_GROUPS))
    first_run = np.cumsum(runs) - runs  # [S]
    index = np.arange(len(ends)) - first_run[run_owner]  # [R] position of each run in its string
    # Undo the differences: a run is the sum of the numbers written for it and for every run
    # before it of the same parity, back to run 1 (odd runs) or run 2 (even runs; run 0 stands alone).
    odd = index % 2 == 1  # [R]
    decoded = values.copy()  # [R]
    for chain in (odd, ~odd & (index >= 2)):
        summed = np.cumsum(np.where(chain, values, 0))  # [R]
        before = np.concatenate(([0], summed))[first_run]  # [S] the chain's sum before each string
        decoded = np.where(chain, summed - before[run_owner], decoded)
    negative = np.zeros(count, dtype=bool)
    negative[run_owner[decoded < 0]] = True
    totals = np.zeros(count, dtype=np.int64)  # [S]
    has_runs = runs > 0
    if has_runs.any():
        totals[has_runs] = np.add.reduceat(decoded, first_run[has_runs])
    out: list[int | str] = totals.tolist()
    for s in np.flatnonzero(bad_char | unfinished | too_long | negative | np.array([w is not None for w in why])):
        if why[s] is not None or bad_char[s]:
            out[s] = _RLE_ALPHABET
        elif unfinished[s]:
            out[s] = "ends inside a run length (the string is cut short)"
        elif too_long[s]:
            out[s] = f"has a run length longer than {5 * _RLE_MAX_GROUPS} bits"
        else:
            out[s] = "decodes to a negative run length"
    return out


def check_segmentation(
    seg: Any,
    hw: tuple[int, int],
    file: str,
    where: str,
    problems: list[Problem],
    box: Any = None,
    *,
    rle_total: int | str | None = None,
) -> tuple[str, Any]:
    """Validate a COCO segmentation: ``("ok", seg)``, ``("degenerate", None)`` or ``("error", None)``.

    Polygons with fewer than 3 points are degenerate: dropped with a warning ("degenerate"
    when none is left). Odd-length or non-numeric polygons and RLEs of the wrong size are errors.
    As boxes are, the segmentation is checked against the image and, given the object's ``box``
    (x1, y1, x2, y2, clipped), against it: a polygon point beyond the image by more than a box may
    overhang, a mask covering no pixel, and a mask whose extent does not match the box (IoU under
    ``MASK_BOX_MIN_IOU``) are errors.

    An RLE must be of the image's size and its runs must cover exactly ``H * W`` pixels (pycocotools
    refuses to decode it otherwise, or decodes a shifted mask); this is checked on the run lengths,
    without decoding a pixel. ``rle_total``: what :func:`rle_string_totals` gave for a compressed
    RLE's ``counts`` (:func:`read_coco` parses every string of a file at once); computed if absent.
    """
    status, seg = _check_segmentation_format(seg, hw, file, where, problems, rle_total)
    if status != "ok":
        return status, seg
    height, width = hw
    if isinstance(seg, list):
        limit_x = max(OVERHANG_PIXELS, OVERHANG_FRACTION * width)
        limit_y = max(OVERHANG_PIXELS, OVERHANG_FRACTION * height)
        for k, poly in enumerate(seg):
            xs, ys = np.asarray(poly[0::2], dtype=np.float64), np.asarray(poly[1::2], dtype=np.float64)
            far_x = np.maximum(-xs, xs - width) > limit_x
            far_y = np.maximum(-ys, ys - height) > limit_y
            if bool((far_x | far_y).any()):
                j = int(np.flatnonzero(far_x | far_y)[0])
                problems.append(Problem(
                    "error", file, f"polygon {k} has the point ({xs[j]:g}, {ys[j]:g}), outside the {width}x{height} "
                    "image; polygons are in the image's pixel coordinates", where,
                ))  # fmt: skip
                return "error", None
        extent = [max(min(float(min(p[0::2])) for p in seg), 0.0), max(min(float(min(p[1::2])) for p in seg), 0.0),
                  min(max(float(max(p[0::2])) for p in seg), width), min(max(float(max(p[1::2])) for p in seg), height)]  # fmt: skip
        empty = extent[2] <= extent[0] or extent[3] <= extent[1]
    else:
        try:
            rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        except Exception as exc:  # a compressed string pycocotools cannot read
            problems.append(Problem("error", file, f"RLE 'counts' cannot be decoded ({exc})", where))
            return "error", None
        extent, empty = [x, y, x + w, y + h], w <= 0 or h <= 0
    if empty:
        problems.append(Problem("error", file, "the segmentation covers no pixel of the image", where))
        return "error", None
    if box is not None:
        overlap = _iou(extent, [float(v) for v in box])
        apart = max(abs(e - float(b)) for e, b in zip(extent, box))  # px: small objects round coarsely
        if overlap < MASK_BOX_MIN_IOU and apart > OVERHANG_PIXELS:
            problems.append(Problem(
                "error", file, f"the segmentation spans {[round(v, 2) for v in extent]} but the bbox is "
                f"{[round(float(v), 2) for v in box]} (x1, y1, x2, y2; IoU {overlap:.2f}, under {MASK_BOX_MIN_IOU}): "
                "they should outline the same object", where,
            ))  # fmt: skip
            return "error", None
    return "ok", seg


# A COCO bbox is the tight box of its segmentation; annotation tools round both, so they agree
# only approximately. Under this IoU they do not describe the same object.
MASK_BOX_MIN_IOU = 0.5


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _check_segmentation_format(
    seg: Any, hw: tuple[int, int], file: str, where: str, problems: list[Problem], rle_total: int | str | None = None
) -> tuple[str, Any]:
    """The format checks of :func:`check_segmentation`: polygons of numbers, RLE of the image's size
    whose runs cover exactly its pixels (``rle_total``: of a compressed RLE, computed already)."""
    height, width = hw
    if isinstance(seg, list):
        kept = []
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in poly
            ):
                problems.append(Problem("error", file, f"polygon {k} is not a list of finite numbers", where))
                return "error", None
            if len(poly) % 2:
                problems.append(Problem("error", file, f"polygon {k} has an odd number ({len(poly)}) of coordinates", where))
                return "error", None
            if len(poly) < 6:
                problems.append(Problem("warning", file, f"polygon {k} has fewer than 3 points, dropped", where))
                continue
            kept.append(poly)
        return ("ok", kept) if kept else ("degenerate", None)
    if isinstance(seg, dict):
        counts, size = seg.get("counts"), seg.get("size")
        if not (isinstance(size, list) and all(_is_int(v) for v in size)) or size != [height, width]:
            problems.append(
                Problem("error", file, f"RLE size {size!r} does not match the image size [{height}, {width}] (H, W)", where)
            )
            return "error", None
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts):
                problems.append(Problem("error", file, "uncompressed RLE counts must be non-negative integers", where))
                return "error", None
            total: int | str = sum(counts)
            kind = "uncompressed"
        elif isinstance(counts, str):
            total = rle_string_totals([counts])[0] if rle_total is None else rle_total
            kind = "compressed"
            if isinstance(total, str):
                problems.append(Problem("error", file, f"the compressed RLE 'counts' {total}; the mask is corrupt: "
                                        "export it again", where))  # fmt: skip
                return "error", None
        else:
            problems.append(Problem("error", file, "RLE 'counts' must be a string or a list of integers", where))
            return "error", None
        if total != height * width:
            problems.append(Problem(
                "error", file, f"the {kind} RLE 'counts' cover {total} pixels but its size {height}x{width} (H x W) "
                f"has {height * width}; the mask is corrupt: export it again", where,
            ))  # fmt: skip
            return "error", None
        return "ok", seg
    problems.append(Problem("error", file, f"segmentation must be polygons or RLE, got {type(seg).__name__}", where))
    return "error", None


def segmentation_to_mask(seg: Any, height: int, width: int) -> np.ndarray:
    """Rasterise a COCO segmentation (polygons, uncompressed or compressed RLE) -> ``[H, W]`` uint8."""
    if isinstance(seg, list):
        if not seg:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle)


def polygon_area(polygons: list[list[float]], height: int, width: int) -> float:
    """COCO's ``area`` of a polygon segmentation (parts ``[x1, y1, x2, y2, ...]``): its pixel count
    when rasterised, as COCO's own annotations give it."""
    return float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))))


def decode_masks(record: ImageRecord, keep: np.ndarray) -> np.ndarray:
    """``[N', H, W]`` uint8 masks of the kept objects (``keep [N]``) of a record with segmentations."""
    masks = [
        segmentation_to_mask(seg, record.height, record.width)
        for seg, k in zip(record.segmentations or [], keep)
        if k
    ]
    if not masks:
        return np.zeros((0, record.height, record.width), dtype=np.uint8)
    return np.stack(masks).astype(np.uint8, copy=False)  # [N, H, W]


def _is_file(path: Path) -> bool:
    """``path.is_file()``, and ``False`` for a name no file can have (a NUL character in it)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def image_name(path: Path, images_dir: Path) -> str:
    """How reports and split keys name a COCO image: its ``file_name``, i.e. its path below
    ``images_dir``, or, for an absolute ``file_name``, that path (images outside ``images_dir``
    are read like the others)."""
    try:
        return path.relative_to(images_dir).as_posix()  # lexical: "../x.png" stays "../x.png"
    except ValueError:
        return path.as_posix()


def image_names(paths: Sequence[str], images_dir: Path) -> list[str]:
    """:func:`image_name` of many image paths (strings, as a :class:`RecordTable` gives them): a
    path below ``images_dir`` loses its prefix without building a ``Path`` (a path the table
    holds is already in ``Path``'s normal form)."""
    base = str(images_dir)
    prefix = "" if base == "." else base if base.endswith(os.sep) else base + os.sep
    if not prefix or os.sep != "/":
        return [image_name(Path(p), images_dir) for p in paths]
    cut = len(prefix)
    return [p[cut:] if p.startswith(prefix) else image_name(Path(p), images_dir) for p in paths]


def _is_plain(name: str) -> bool:
    """A relative ``file_name`` with no ``.``, ``..`` or empty part: ``images_dir / name`` is the
    joined text, and two such names are one file only if they are equal."""
    text = f"/{name}/"
    return "//" not in text and "/./" not in text and "/../" not in text


class _Images:
    """The usable entries of a file's ``images``, as columns, in the file's order, read a chunk at a
    time (:meth:`add`): ids, file names and sizes checked, the files' existence looked up."""

    def __init__(self, images_dir: Path, file: str, problems: list[Problem]) -> None:
        self.images_dir, self.file, self.problems = images_dir, file, problems
        base = str(images_dir)
        self.prefix = "" if base == "." else base if base.endswith(os.sep) else base + os.sep
        self.ids: list[int] = []
        self.paths: list[str] = []
        self.names: list[str] = []  # file_name as written
        self.heights: list[int] = []
        self.widths: list[int] = []
        self.plain = True  # every file_name passes _is_plain
        self.known_ids: set[Any] = set()  # the ids of every entry, usable or not (hashable ones)
        self.seen: set[int] = set()  # the ids of the usable entries so far
        self.entries = 0

    def position(self) -> dict[int, int]:
        return {image_id: k for k, image_id in enumerate(self.ids)}

    def add(self, entries: list[Any], spans: Any = None) -> None:
        file, problems, seen = self.file, self.problems, self.seen
        for i, img in enumerate(entries, start=self.entries):
            image_id = img.get("id") if type(img) is dict else None
            name = img.get("file_name") if type(img) is dict else None
            if type(img) is dict and _hashable(image_id):
                self.known_ids.add(image_id)
            if not _is_int(image_id) or not isinstance(name, str):
                where = f"images[{i}]"
                message = f"{img!r} needs an integer 'id' and a string 'file_name'"
                problems.append(Problem("error", file, message, where, image=f"{file} {where}"))
                continue
            if not _I64_MIN <= image_id <= _I64_MAX:
                where = f"images[{i}]"
                problems.append(Problem("error", file, f"image id {image_id} is beyond 64-bit integers", where,
                                        image=f"{file} {where}"))  # fmt: skip
                continue
            if image_id in seen:
                problems.append(Problem("error", file, "image id appears twice in 'images'", f"image id {image_id} ({name})"))
                continue
            # An absolute file_name, or one that starts with ../, names an image outside images_dir:
            # it is read like any other (nothing is ever written where a file_name points).
            plain = os.sep == "/" and _is_plain(name)
            path = self.prefix + name if plain else str(self.images_dir / name)
            self.plain = self.plain and plain
            height, width = img.get("height"), img.get("width")
            if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
                message = f"needs positive integer 'height' and 'width', got {height!r} x {width!r}"
                problems.append(Problem("error", file, message, f"image id {image_id} ({name})", image=path))
                continue
            if not (os.path.isfile(path) if plain else _is_file(Path(path))):
                problems.append(Problem("error", file, f"image file not found: {path}", f"image id {image_id} ({name})",
                                        missing_file=True, image=path))  # fmt: skip
                continue
            seen.add(image_id)
            self.ids.append(image_id)
            self.paths.append(path)
            self.names.append(name)
            self.heights.append(height)
            self.widths.append(width)
        self.entries += len(entries)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _one_entry_per_image(images: _Images, file: str) -> list[Problem]:
    """An error for each image file that more than one entry of ``images`` names; those entries
    are removed from ``images`` (their annotations are then left out with them).

    Each entry holds part of the image's objects, so a reader would see each part as an image
    whose other objects are background, and an evaluation would score the image once per entry.
    """
    if images.plain and len(set(images.paths)) == len(images.paths):
        return []  # plain names below one folder: distinct names are distinct files
    problems, removed = [], set()
    for positions in repeated_images(images.paths):
        ids = [images.ids[k] for k in positions]
        names = list(dict.fromkeys(images.names[k] for k in positions))
        if len(names) == 1:
            spelled = f"file_name {names[0]!r} appears in each"
        else:
            spelled = f"file_names {' and '.join(map(repr, names))} name one image file"
        listed = ", ".join(str(i) for i in ids[:-1]) + f" and {ids[-1]}"
        others = "entries'" if len(ids) > 2 else "entry's"
        problems.append(Problem(
            "error", file, f"{spelled}: one image listed {len(ids)} times, its objects split between the entries; "
            f"merge them into one entry (keep id {ids[0]} and set the image_id of the other {others} annotations "
            f"to {ids[0]})", f"image ids {listed}", image=images.paths[positions[0]],
        ))  # fmt: skip
        removed.update(positions)
    if removed:
        keep = [k for k in range(len(images.ids)) if k not in removed]
        for column in ("ids", "paths", "names", "heights", "widths"):
            values = getattr(images, column)
            setattr(images, column, [values[k] for k in keep])
    return problems


def _compressed_rle_totals(annotations: dict[int, Any]) -> dict[int, int | str]:
    """:func:`rle_string_totals` of every compressed RLE segmentation among ``annotations`` (by
    position in the file), parsed together."""
    found = [
        (i, ann["segmentation"]["counts"])
        for i, ann in annotations.items()
        if isinstance(ann, dict) and isinstance(ann.get("segmentation"), dict)
        and isinstance(ann["segmentation"].get("counts"), str)
    ]  # fmt: skip
    return dict(zip((i for i, _ in found), rle_string_totals([counts for _, counts in found])))


_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_FLOAT_MAX = float(np.finfo(np.float64).max)


def _ints(values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """``([n] int64, [n] bool)``: the values that are integers (not booleans) within 64 bits, and which."""
    n = len(values)
    if set(map(type, values)) <= {int}:
        try:
            return np.array(values, dtype=np.int64).reshape(n), np.ones(n, dtype=bool)
        except OverflowError:
            pass
    ok = np.fromiter((type(v) is int and _I64_MIN <= v <= _I64_MAX for v in values), dtype=bool, count=n)
    out = np.zeros(n, dtype=np.int64)
    out[ok] = np.fromiter(itertools.compress(values, ok.tolist()), dtype=np.int64, count=int(ok.sum()))
    return out, ok


def _numbers(values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """``([n] float64, [n] bool)``: the values that are ``int`` or ``float`` (not booleans), as
    floats, and which (an integer too large for a float is not; NaN may be either)."""
    n = len(values)
    if set(map(type, values)) <= {int, float}:
        try:
            return np.array(values, dtype=np.float64).reshape(n), np.ones(n, dtype=bool)
        except OverflowError:
            pass
    ok = np.fromiter((type(v) in (int, float) and abs(v) <= _FLOAT_MAX for v in values), dtype=bool, count=n)
    out = np.zeros(n, dtype=np.float64)
    out[ok] = np.fromiter(itertools.compress(values, ok.tolist()), dtype=np.float64, count=int(ok.sum()))
    return out, ok


def _get(mapping: dict[Any, int], key: Any) -> int:
    """``mapping.get(key, -1)``, and ``-1`` for an unhashable key (a list where an id should be)."""
    try:
        return mapping.get(key, -1)
    except TypeError:
        return -1


def _member(values: set[Any], key: Any) -> bool:
    """``key in values``, and ``False`` for an unhashable key."""
    try:
        return key in values
    except TypeError:
        return False


def _duplicates(ids: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``[n]`` bool: the rows whose id (``ok`` rows only) an earlier ``ok`` row already has."""
    rows = np.flatnonzero(ok)
    order = rows[np.argsort(ids[rows], kind="stable")]  # equal ids in file order
    repeated = np.zeros(len(ids), dtype=bool)
    repeated[order[1:][ids[order[1:]] == ids[order[:-1]]]] = True
    return repeated


def _dumps(value: Any) -> str:
    """Compact JSON text (ASCII) of a segmentation, as :class:`PackedBytes` holds it."""
    return json.dumps(value, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# Reading a large file: its top level parsed by the standard parser's own scanner, the images and
# annotations a chunk at a time, each chunk reduced to columns (typed fields, the segmentations as
# compact JSON) and dropped, so that they never exist as Python objects all at once (parsed whole,
# COCO 2017 train's boxes take about 600 MB as objects, against tens as columns).

_CHUNK = 16_384  # annotations (and images) parsed and reduced to columns at a time
_BLOCK = 1 << 17  # annotations checked as arrays at a time: bounds the temporary arrays
_SCANNER = json.scanner.make_scanner(json.JSONDecoder())  # json.loads' scanner: the same values
_SPACE = re.compile(r"[ \t\n\r]*")
_WHITESPACE = " \t\n\r"
_MISSING, _POLYGONS, _OTHER = 0, 1, 2  # kinds of segmentation, for check_masks
Feed = Callable[[list[Any], list[tuple[int, int]]], None]


class _Streamed(list):
    """Stands for an array of the top level that was handed over a chunk at a time."""


def _parse_top_level(text: str, feeds: dict[str, Feed]) -> dict[str, Any] | None:
    """The top-level object of ``text``; the arrays under the keys of ``feeds`` are handed to their
    feed a chunk at a time (with each element's span in ``text``) instead of being kept. ``None``
    for anything but a well-formed object with distinct keys: the standard parser then reads the
    file whole (and words the error)."""
    space = _SPACE.match
    try:
        pos = space(text, 0).end()
        if text[pos] != "{":
            return None
        pos = space(text, pos + 1).end()
        data: dict[str, Any] = {}
        while text[pos] != "}":
            if text[pos] != '"':
                return None
            key, pos = _SCANNER(text, pos)
            pos = space(text, pos).end()
            if text[pos] != ":" or key in data:  # a repeated key: json.loads keeps the last
                return None
            pos = space(text, pos + 1).end()
            if key in feeds and text[pos] == "[":
                pos = _parse_elements(text, pos, feeds[key])
                data[key] = _Streamed()
            else:
                data[key], pos = _SCANNER(text, pos)
            pos = space(text, pos).end()
            if text[pos] == ",":
                pos = space(text, pos + 1).end()
                if text[pos] == "}":
                    return None  # a trailing comma
            elif text[pos] != "}":
                return None
        return data if space(text, pos + 1).end() == len(text) else None
    except (StopIteration, ValueError, IndexError):
        return None


def _parse_elements(text: str, pos: int, feed: Feed) -> int:
    """Parse the array at ``pos``, handing its elements to ``feed`` in chunks; the position after it."""
    pos = _SPACE.match(text, pos + 1).end()
    if text[pos] == "]":
        return pos + 1
    chunk: list[Any] = []
    spans: list[tuple[int, int]] = []
    while True:
        value, end = _SCANNER(text, pos)
        chunk.append(value)
        spans.append((pos, end))
        pos = end
        if text[pos] in _WHITESPACE:
            pos = _SPACE.match(text, pos).end()
        if text[pos] == ",":
            pos += 1
            if text[pos] in _WHITESPACE:
                pos = _SPACE.match(text, pos).end()
            if len(chunk) == _CHUNK:
                feed(chunk, spans)
                chunk, spans = [], []
            continue
        if text[pos] != "]":
            raise ValueError("not an array")
        feed(chunk, spans)
        return pos + 1


class _Columns:
    """The annotations of a file as typed columns (``[n]`` each), gathered a chunk at a time.

    A row is *regular* when its fields have the types a valid annotation has (a dict; integer ids
    within 64 bits; a list of 4 numbers as bbox; iscrowd 0 or 1; with ``check_masks``, a
    segmentation that is absent, empty or a list of polygons): those are checked as arrays. The
    others are checked one by one (:func:`_annotation`), from their text, kept as the file has it.
    Each row's segmentation is kept as compact JSON (``segmentations``, packed a chunk at a time).
    """

    def __init__(self, check_masks: bool) -> None:
        self.check_masks = check_masks
        self.parts: dict[str, list[np.ndarray]] = {}
        self.columns: dict[str, np.ndarray] = {}
        self.texts: dict[int, str] = {}  # the text of each irregular row (few), by row
        self.rows = 0

    def _append(self, **columns: np.ndarray) -> None:
        for name, values in columns.items():
            self.parts.setdefault(name, []).append(values)

    def add(self, annotations: list[Any], spans: list[tuple[int, int]] | None, text: str | None) -> None:
        n = len(annotations)
        dicts = [a if type(a) is dict else _NO_FIELDS for a in annotations]
        is_dict = np.fromiter((type(a) is dict for a in annotations), dtype=bool, count=n)
        ann_id, id_ok = _ints([a.get("id") for a in dicts])
        image_id, image_ok = _ints([a.get("image_id") for a in dicts])
        category, category_ok = _ints([a.get("category_id") for a in dicts])
        bboxes = [a.get("bbox") for a in dicts]
        box_ok = np.fromiter((type(b) is list and len(b) == 4 for b in bboxes), dtype=bool, count=n)
        values, numeric = _numbers(list(itertools.chain.from_iterable(itertools.compress(bboxes, box_ok.tolist()))))
        xywh = np.zeros((n, 4), dtype=np.float64)
        xywh[box_ok] = values.reshape(-1, 4)
        box_ok[box_ok] = numeric.reshape(-1, 4).all(axis=1)
        crowd_values = [a.get("iscrowd", 0) for a in dicts]
        crowd_ok = np.fromiter((type(c) is int and (c == 0 or c == 1) for c in crowd_values), dtype=bool, count=n)
        crowd = np.fromiter((c == 1 for c in crowd_values), dtype=bool, count=n)
        area, area_ok = _numbers([a.get("area") for a in dicts])
        area_ok &= np.isfinite(area)
        segmentations = [a.get("segmentation") for a in dicts]
        texts = ["" if s is None else _dumps(s) for s in segmentations]
        regular = is_dict & id_ok & image_ok & category_ok & box_ok & crowd_ok
        if self.check_masks:
            kind = np.fromiter((_segmentation_kind(s) for s in segmentations), dtype=np.int8, count=n)
            regular &= kind != _OTHER
            outlined = list(itertools.compress(segmentations, (kind == _POLYGONS).tolist()))
            polygons = [p for s in outlined for p in s]
            coords, coords_ok = _numbers(list(itertools.chain.from_iterable(polygons)))
            self._append(kind=kind, coords=coords, coords_ok=coords_ok,
                         polygon_lengths=np.fromiter(map(len, polygons), dtype=np.int64, count=len(polygons)),
                         polygon_parts=np.fromiter(map(len, outlined), dtype=np.int64, count=len(outlined)))  # fmt: skip
        if text is not None and spans is not None:  # checked one by one later: parsed again from their text
            for k in np.flatnonzero(~regular).tolist():
                self.texts[self.rows + k] = text[spans[k][0] : spans[k][1]]
        self._append(ann_id=ann_id, id_ok=id_ok, image_id=image_id, category=category, xywh=xywh, crowd=crowd,
                     area=area, area_ok=area_ok, regular=regular,
                     start=np.fromiter((s for s, _ in spans), dtype=np.int64, count=n) if spans else np.full(n, -1),
                     segmentation_lengths=np.fromiter(map(len, texts), dtype=np.int64, count=n),
                     segmentation_data=np.frombuffer("".join(texts).encode("ascii"), dtype=np.uint8))  # fmt: skip
        self.rows += n

    def finish(self) -> None:
        """Each column as one array; the chunks' parts dropped (one column at a time: little memory
        is held twice)."""
        for name in list(self.parts):
            self.columns[name] = np.concatenate(self.parts.pop(name))

    def column(self, name: str, dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:
        found = self.columns.get(name)
        return found if found is not None else np.zeros((0, *shape), dtype=dtype)

    def segmentations(self) -> PackedBytes:
        """Every row's segmentation as compact JSON, in the file's order."""
        lengths = self.column("segmentation_lengths", np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return PackedBytes(self.column("segmentation_data", np.uint8), offsets)


def _segmentation_kind(segmentation: Any) -> int:
    """``_MISSING`` (absent or ``[]``), ``_POLYGONS`` (a list of polygons of 3 points or more: a
    list of an even length of at least 6, whatever its values) or ``_OTHER`` (RLE, or anything else)."""
    if segmentation is None or segmentation == []:
        return _MISSING
    if type(segmentation) is list and all(type(p) is list and len(p) >= 6 and not len(p) % 2 for p in segmentation):
        return _POLYGONS
    return _OTHER


def _read_file(
    ann_file: Path, images_dir: Path, check_masks: bool
) -> tuple[dict[str, Any], _Images, _Columns, Callable[[int], Any]]:
    """The file's top level, checked to be a COCO instances file, its ``images`` checked into an
    :class:`_Images` and its ``annotations`` read into columns; and a function that gives
    annotation ``i`` again as parsed (from its text, or from the file read again)."""
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file}: annotation file not found")
    try:
        with open(ann_file, encoding="utf-8") as f:  # as json.load reads it
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{ann_file}: not UTF-8 text ({exc.reason}); is it really a JSON file?") from None
    images, columns = _Images(images_dir, str(ann_file), []), _Columns(check_masks)
    data = _parse_top_level(text, {"images": images.add,
                                   "annotations": lambda chunk, spans: columns.add(chunk, spans, text)})  # fmt: skip
    text = ""  # (freed: the rows checked one by one are parsed again from their own text, or the file again)
    if data is None:  # not a plain object: the standard parser reads it whole and says what is wrong
        data = _load_json(ann_file)
        images, columns = _Images(images_dir, str(ann_file), []), _Columns(check_masks)
        images.add(data["images"])
        annotations = data["annotations"]
        for start in range(0, len(annotations), _CHUNK):
            columns.add(annotations[start : start + _CHUNK], None, None)
        columns.finish()
        return data, images, columns, annotations.__getitem__
    _check_top_level(ann_file, data)
    columns.finish()
    return data, images, columns, _Refetch(ann_file, columns)


class _Refetch:
    """Annotation ``i`` parsed again: an irregular row from its text, any other from the file, read
    again on the first such call (only a row that a check finds wrong needs it)."""

    def __init__(self, ann_file: Path, columns: _Columns) -> None:
        self.ann_file, self.columns, self.text = ann_file, columns, None

    def __call__(self, i: int) -> Any:
        kept = self.columns.texts.get(i)
        if kept is not None:
            return _SCANNER(kept, 0)[0]
        if self.text is None:
            with open(self.ann_file, encoding="utf-8") as f:
                self.text = f.read()
        return _SCANNER(self.text, int(self.columns.column("start", np.int64)[i]))[0]


def _box_checks(xywh: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(clipped [n, 4] x1 y1 x2 y2, silent [n] bool)``: the boxes as :func:`check_box` clips
    them, and whether it takes each without a word (finite, not inverted, inside the image up to
    rounding, some area left)."""
    with np.errstate(invalid="ignore", over="ignore"):
        x1, y1 = xywh[:, 0], xywh[:, 1]
        x2, y2 = x1 + xywh[:, 2], y1 + xywh[:, 3]
        silent = np.isfinite(xywh).all(axis=1) & np.isfinite(x2) & np.isfinite(y2)
        silent &= (xywh[:, 2] >= 0) & (xywh[:, 3] >= 0)
        silent &= np.maximum(np.maximum(-x1, x2 - widths), 0.0) <= _ROUNDING
        silent &= np.maximum(np.maximum(-y1, y2 - heights), 0.0) <= _ROUNDING
        clipped = np.stack([np.minimum(np.maximum(x1, 0.0), widths), np.minimum(np.maximum(y1, 0.0), heights),
                            np.minimum(np.maximum(x2, 0.0), widths), np.minimum(np.maximum(y2, 0.0), heights)], axis=1)  # fmt: skip
        silent &= (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1]) > 0
    return clipped, silent


def _polygons_silent(
    coords: np.ndarray, coords_ok: np.ndarray, lengths: np.ndarray, parts: np.ndarray,
    boxes: np.ndarray, heights: np.ndarray, widths: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """``[S]`` bool: whether :func:`check_segmentation` passes each of S polygon segmentations
    without a word (finite numbers, no point beyond the image by more than a box may overhang,
    the extent matching the box). ``coords [C]`` (``coords_ok``: numbers), ``lengths [P]`` of the
    polygons, ``parts [S]`` polygons of each; ``boxes [S, 4]`` clipped, images' sizes ``[S]``."""
    count = len(parts)
    if not count:
        return np.zeros(0, dtype=bool)
    points = np.add.reduceat(lengths, np.cumsum(parts) - parts) // 2  # [S] points of each
    owner = np.repeat(np.arange(count), points)  # [C / 2]
    bad = np.bincount(np.repeat(owner, 2), weights=~(coords_ok & np.isfinite(coords)), minlength=count) > 0
    xs, ys = coords[0::2], coords[1::2]  # every polygon has an even length: x and y alternate throughout
    width, height = widths.astype(np.float64), heights.astype(np.float64)  # [S]
    limit_x = np.maximum(OVERHANG_PIXELS, OVERHANG_FRACTION * width)[owner]
    limit_y = np.maximum(OVERHANG_PIXELS, OVERHANG_FRACTION * height)[owner]
    with np.errstate(invalid="ignore"):
        far = (np.maximum(-xs, xs - width[owner]) > limit_x) | (np.maximum(-ys, ys - height[owner]) > limit_y)
    bad |= np.bincount(owner, weights=far, minlength=count) > 0
    starts = np.cumsum(points) - points
    extent = np.stack([
        np.maximum(np.minimum.reduceat(xs, starts), 0.0), np.maximum(np.minimum.reduceat(ys, starts), 0.0),
        np.minimum(np.maximum.reduceat(xs, starts), width), np.minimum(np.maximum.reduceat(ys, starts), height),
    ], axis=1)  # fmt: skip  # [S, 4]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        iw = np.maximum(np.minimum(extent[:, 2], boxes[:, 2]) - np.maximum(extent[:, 0], boxes[:, 0]), 0.0)
        ih = np.maximum(np.minimum(extent[:, 3], boxes[:, 3]) - np.maximum(extent[:, 1], boxes[:, 1]), 0.0)
        inter = iw * ih
        union = ((extent[:, 2] - extent[:, 0]) * (extent[:, 3] - extent[:, 1])
                 + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter)  # fmt: skip
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
        apart = np.abs(extent - boxes).max(axis=1)
    empty = (extent[:, 2] <= extent[:, 0]) | (extent[:, 3] <= extent[:, 1])
    bad |= empty | ((iou < MASK_BOX_MIN_IOU) & (apart > OVERHANG_PIXELS)) | ~np.isfinite(iou) | ~np.isfinite(apart)
    return ~bad


@dataclass
class _Kept:
    """The annotations kept, as columns ``[n]`` over every row of the file, and which rows are
    kept (``keep``): their image (position), id, box (x1 y1 x2 y2, clipped), label, crowd flag,
    area, and item of ``segmentations`` (every row's, then those that a check changed)."""

    keep: np.ndarray
    image: np.ndarray
    ann_id: np.ndarray
    box: np.ndarray  # [n, 4] float32
    label: np.ndarray
    crowd: np.ndarray
    area: np.ndarray
    segmentation: np.ndarray
    segmentations: PackedBytes


def _check_annotations(
    columns: _Columns,
    fetch: Callable[[int], Any],
    images: _Images,
    cat_id_to_label: dict[int, int],
    problems: list[Problem],
    *,
    require_masks: bool,
) -> _Kept:
    """Validate every annotation: at once (arrays, a block at a time) for the regular rows that pass
    every check, one by one (:func:`_annotation`, the messages' one place; ``fetch(i)`` gives
    annotation ``i``) for the others, in the file's order. Consumes ``columns``."""
    def take(name: str, dtype: Any, shape: tuple[int, ...] = ()) -> np.ndarray:  # a column, dropped from columns
        found = columns.columns.pop(name, None)
        return found if found is not None else np.zeros((0, *shape), dtype=dtype)

    regular = take("regular", bool)
    n = len(regular)
    ann_id = take("ann_id", np.int64)
    repeated = _duplicates(ann_id, take("id_ok", bool))
    position = images.position()
    known, image, label = np.zeros(n, dtype=bool), np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    rows = np.flatnonzero(regular)
    if len(rows):  # looked up once per distinct id, by Python's equality (as _annotation looks them up)
        ids, inverse = np.unique(take("image_id", np.int64)[rows], return_inverse=True)
        known[rows] = np.fromiter((_member(images.known_ids, v) for v in ids.tolist()), dtype=bool, count=len(ids))[inverse]
        image[rows] = np.fromiter((_get(position, v) for v in ids.tolist()), dtype=np.int64, count=len(ids))[inverse]
        cats, inverse = np.unique(take("category", np.int64)[rows], return_inverse=True)
        label[rows] = np.fromiter((_get(cat_id_to_label, v) for v in cats.tolist()), dtype=np.int64, count=len(cats))[inverse]
        del ids, cats, inverse
    del rows
    # (_annotation's order: an irregular or repeated row, or one of an unknown image, goes there;
    # one of an image with a problem of its own is left out without a word, as _annotation does)
    considered = regular & ~repeated & known & (image >= 0)
    all_heights = np.asarray(images.heights, dtype=np.float64)
    all_widths = np.asarray(images.widths, dtype=np.float64)
    xywh = take("xywh", np.float64, (4,))
    boxes = np.zeros((n, 4), dtype=np.float32)  # clipped, as the records hold them
    box_area = np.zeros(n, dtype=np.float64)  # of the clipped box, for an annotation without an area
    suspect = label < 0
    kind = take("kind", np.int8) if columns.check_masks else None
    if kind is not None:
        polygon_row = np.cumsum(kind == _POLYGONS) - 1  # [n] each row's place among those with polygons
        parts, lengths = take("polygon_parts", np.int64), take("polygon_lengths", np.int64)
        coords, coords_ok = take("coords", np.float64), take("coords_ok", bool)
        first_polygon = np.concatenate(([0], np.cumsum(parts)))  # [S + 1]
        first_coord = np.concatenate(([0], np.cumsum(lengths)))  # [P + 1]
    for block in range(0, n, _BLOCK):  # the checks of check_box and check_segmentation, at once
        part = slice(block, min(block + _BLOCK, n))
        where = np.maximum(image[part], 0)
        heights = all_heights[where] if len(all_heights) else np.zeros(len(where))
        widths = all_widths[where] if len(all_widths) else np.zeros(len(where))
        clipped, silent = _box_checks(xywh[part], heights, widths)
        boxes[part] = clipped
        box_area[part] = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        suspect[part] |= ~silent
        if kind is None:
            continue
        if require_masks:
            suspect[part] |= kind[part] == _MISSING
        outlined = np.flatnonzero(kind[part] == _POLYGONS)  # in this block
        if len(outlined):
            s0, s1 = polygon_row[block + outlined[0]], polygon_row[block + outlined[-1]] + 1  # their range
            p0, p1 = first_polygon[s0], first_polygon[s1]
            c0, c1 = first_coord[p0], first_coord[p1]
            passed = _polygons_silent(coords[c0:c1], coords_ok[c0:c1], lengths[p0:p1], parts[s0:s1],
                                      clipped[outlined], heights[outlined], widths[outlined])  # fmt: skip
            suspect[block + outlined[~passed]] = True
    del xywh, kind
    if columns.check_masks:
        del polygon_row, parts, lengths, coords, coords_ok, first_polygon, first_coord
    if not _AT_ONCE:  # every annotation one by one: the reference the tests compare the arrays with
        suspect[:] = True
    keep = considered & ~suspect
    area = np.where(take("area_ok", bool), take("area", np.float64), box_area)
    del box_area
    crowd = take("crowd", bool)
    segmentation = np.arange(n, dtype=np.int64)
    one_by_one = np.flatnonzero(~regular | (regular & (repeated | ~known)) | (considered & suspect)).tolist()
    fetched = {i: fetch(i) for i in one_by_one}
    rle_totals = _compressed_rle_totals(fetched) if columns.check_masks else {}
    found: list[tuple[Any, ...]] = []
    for i in one_by_one:
        start, path = len(problems), None
        try:
            path = _annotation(i, fetched[i], bool(repeated[i]), images.known_ids, position, images, cat_id_to_label,
                               images.file, problems, found, check_masks=columns.check_masks,
                               require_masks=require_masks, rle_total=rle_totals.get(i))  # fmt: skip
        finally:
            _tag(problems, start, path)
    del fetched
    segmentations = columns.segmentations()
    if found:  # written into their rows; their segmentations as a check left them (a dropped polygon)
        rows_, image_, id_, box_, label_, crowd_, area_, segs_ = zip(*found)
        at = np.asarray(rows_, dtype=np.int64)
        keep[at], image[at], ann_id[at], label[at], crowd[at], area[at] = True, image_, id_, label_, crowd_, area_
        boxes[at] = np.asarray(box_, dtype=np.float64).reshape(-1, 4)
        segmentation[at] = n + np.arange(len(found), dtype=np.int64)
        added = PackedBytes.of_texts(["" if s is None else _dumps(s) for s in segs_])
        segmentations = PackedBytes(np.concatenate([segmentations.data, added.data]),
                                    np.concatenate([segmentations.offsets, segmentations.offsets[-1] + added.offsets[1:]]))  # fmt: skip
    return _Kept(keep, image, ann_id, boxes, label, crowd, area, segmentation, segmentations)


_NO_FIELDS: dict[str, Any] = {}
_AT_ONCE = True  # False: _check_annotations checks every annotation one by one (slower, same result)
_CROWD_VALUES = (0, 1)


def _annotation(
    i: int,
    ann: Any,
    repeated: bool,
    known_ids: set[Any],
    position: dict[int, int],
    images: _Images,
    cat_id_to_label: dict[int, int],
    file: str,
    problems: list[Problem],
    found: list[tuple[Any, ...]],
    *,
    check_masks: bool,
    require_masks: bool,
    rle_total: int | str | None,
) -> str | None:
    """Validate annotation ``i`` one check after another, each problem in its words; a usable one
    is appended to ``found``. Returns the path of its image, once known (for ``skip_broken``)."""
    if not isinstance(ann, dict) or not _is_int(ann.get("id")):
        problems.append(Problem("error", file, f"{str(ann)[:80]} needs an integer 'id'", f"annotations[{i}]"))
        return None
    where = f"annotation id {ann['id']}"
    if not _I64_MIN <= ann["id"] <= _I64_MAX:
        problems.append(Problem("error", file, "the id is beyond 64-bit integers", where))
        return None
    if repeated:
        problems.append(Problem("error", file, "annotation id appears twice", where))
        return None
    image_id = ann.get("image_id")
    if not _member(known_ids, image_id):
        problems.append(Problem("error", file, f"image_id {image_id!r} is not in 'images'", where))
        return None
    k = _get(position, image_id)
    if k < 0:  # the image itself has a problem, reported above
        return None
    image = images.paths[k]
    if _get(cat_id_to_label, ann.get("category_id")) < 0:
        message = f"unknown category_id {ann.get('category_id')!r} (known: {sorted(cat_id_to_label)})"
        problems.append(Problem("error", file, message, where))
        return image
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, int) and abs(v) > _FLOAT_MAX)
        for v in bbox
    ):
        problems.append(Problem("error", file, f"bbox {bbox!r} must be 4 numbers [x, y, width, height]", where))
        return image
    x, y, w, h = (float(v) for v in bbox)
    if all(math.isfinite(v) for v in bbox) and (w < 0 or h < 0):
        message = f"bbox {bbox} has a negative width or height; COCO boxes are [x, y, width, height]"
        problems.append(Problem("error", file, message, where))
        return image
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in _CROWD_VALUES:
        problems.append(Problem("error", file, f"iscrowd must be 0 or 1, got {iscrowd!r}", where))
        return image
    hw = (images.heights[k], images.widths[k])
    box = check_box((x, y, x + w, y + h), hw, file, where, problems)
    if box is None:
        return image
    seg = ann.get("segmentation")
    if check_masks:
        if seg is None or seg == []:
            if require_masks:
                problems.append(Problem("error", file, "has no 'segmentation', needed to load masks", where))
                return image
        else:
            status, seg = check_segmentation(
                seg, hw, file, f"{where} (image id {image_id})", problems, box, rle_total=rle_total
            )
            if status == "error":
                return image
            if status == "degenerate":
                if require_masks:
                    problems.append(Problem("warning", file, "no valid polygon left, annotation dropped", where))
                    return image
                problems.append(Problem("warning", file, "no valid polygon (dropped when masks are loaded)", where))
    area = ann.get("area")
    if not isinstance(area, (int, float)) or isinstance(area, bool) or not abs(area) <= _FLOAT_MAX:
        area = (box[2] - box[0]) * (box[3] - box[1])
    found.append((i, k, ann["id"], box, cat_id_to_label[ann["category_id"]], bool(iscrowd), float(area), seg))
    return image


def read_coco(
    images_dir: str | os.PathLike,
    ann_file: str | os.PathLike,
    *,
    check_masks: bool = False,
    require_masks: bool = False,
) -> CocoIndex:
    """Read and validate a COCO instances file without raising on per-annotation problems.

    Unreadable or structurally broken files (not JSON, no ``categories``) raise at once.
    Everything else is collected in ``CocoIndex.problems``; annotations with an error are
    left out of the records. ``check_masks`` validates segmentations (an RLE's run lengths
    against its image, without decoding: :func:`check_segmentation`); ``require_masks`` also
    makes a missing or degenerate segmentation a problem (as loading masks needs).

    A ``file_name`` is relative to ``images_dir``; an absolute one, or one starting with ``../``,
    is read where it points. Entries that name one image file (the same ``file_name``, or two
    spellings of it) are an error, and none of them gives a record.

    Built for large files (docs/data.md, "Large data sets"): the images and annotations are parsed
    a chunk at a time into columns and checked as arrays, so that they never exist as Python
    objects all at once; those that fail a check (or that a check would change: a clipped box, a
    dropped polygon) are parsed again and checked one by one, which words each problem. The
    records are a :class:`~rcnn.data.records.RecordTable`.
    """
    images_dir, ann_file = Path(images_dir), Path(ann_file)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: images directory not found (for {ann_file})")
    check_masks = check_masks or require_masks
    with _collector_paused():
        data, images, columns, fetch = _read_file(ann_file, images_dir, check_masks)
        class_names, label_to_cat_id = _read_categories(ann_file, data["categories"])
        del data
        cat_id_to_label = {cat: label for label, cat in label_to_cat_id.items()}
        problems = images.problems
        problems += _one_entry_per_image(images, str(ann_file))
        kept = _check_annotations(columns, fetch, images, cat_id_to_label, problems, require_masks=require_masks)
        del columns, fetch
        return CocoIndex(_table(images, kept), class_names, label_to_cat_id, problems)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off: parsing creates millions of containers, each few hundred of
    which start a collection that walks the objects alive (40 % of the reading time of COCO 2017
    train); what JSON values hold has no cycles, and reference counting frees it all the same."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _table(images: _Images, kept: _Kept) -> RecordTable:
    """The records: each image's kept objects in the file's order."""
    rows = np.flatnonzero(kept.keep)
    order = rows[np.argsort(kept.image[rows], kind="stable")]  # by image, then by position in the file
    count = len(images.ids)
    per_image = np.bincount(kept.image[order], minlength=count)[:count] if len(order) else np.zeros(count, np.int64)
    first = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(per_image, out=first[1:])
    return RecordTable(
        image_ids=np.asarray(images.ids, dtype=np.int64).reshape(count),
        paths=PackedBytes.of([os.fsencode(p) for p in images.paths]),
        heights=np.asarray(images.heights, dtype=np.int32).reshape(count),
        widths=np.asarray(images.widths, dtype=np.int32).reshape(count),
        first=first,
        boxes=kept.box[order],
        labels=kept.label[order],
        iscrowd=kept.crowd[order],
        difficult=np.zeros(len(order), dtype=bool),
        ann_ids=kept.ann_id[order],
        areas=kept.area[order],
        segmentations=kept.segmentations,
        segmentation_index=kept.segmentation[order],
        has_ann_ids=per_image > 0,
        has_areas=per_image > 0,
        has_segmentations=np.ones(count, dtype=bool),
    )


class CocoDetection(DetectionDataset):
    """A COCO instances file and its images directory as a ``torch`` data set.

    Args:
        images_dir: folder the ``file_name`` of each image is relative to.
        ann_file: the ``instances_*.json`` file.
        with_masks: decode segmentations into ``target["masks"] [N, H, W]`` uint8.
        train: leave crowd objects (``iscrowd = 1``) out of the targets; with
            ``train=False`` they are kept and flagged in ``target["iscrowd"]``.
        transforms: callable ``(image, target) -> (image, target)`` (see ``rcnn.data.transforms``).
        skip_broken: decode every image now and leave out the images that cannot be used (missing,
            truncated or corrupt, an unusable annotation), one ``DataWarning`` each, instead of
            refusing the data set.

    Problems in the file raise one ``ValueError`` (or ``FileNotFoundError`` when only files
    are missing) listing them; clipped and dropped boxes give one ``DataWarning`` per file.
    Images without annotations are kept: they are valid negatives.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        *,
        with_masks: bool = False,
        train: bool = False,
        transforms: Transform | None = None,
        skip_broken: bool = False,
    ) -> None:
        index = read_coco(images_dir, ann_file, check_masks=with_masks, require_masks=with_masks)
        records = settle_problems(
            index.records,
            index.problems,
            skip_broken=skip_broken,
            hint=f"\n(`rcnn data check {ann_file} --images {images_dir}` lists every problem)",
        )
        super().__init__(
            records,
            index.class_names,
            label_to_cat_id=index.label_to_cat_id,
            train=train,
            transforms=transforms,
            with_masks=with_masks,
        )
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)

    def _decode_masks(self, record: ImageRecord, keep: np.ndarray) -> np.ndarray:
        return decode_masks(record, keep)  # [N, H, W]
