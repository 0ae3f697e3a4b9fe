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

import json
import math
import os
from collections.abc import Sequence
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
    Problem,
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
    "polygon_area",
    "read_coco",
    "rle_string_totals",
    "segmentation_to_mask",
]


@dataclass
class CocoIndex:
    """What :func:`read_coco` found: validated records, classes and the problems it saw."""

    records: list[ImageRecord]
    class_names: list[str]  # foreground names, label 1..K
    label_to_cat_id: dict[int, int]
    problems: list[Problem]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load_json(ann_file: Path) -> dict[str, Any]:
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file}: annotation file not found")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{ann_file}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{ann_file}: not UTF-8 text ({exc.reason}); is it really a JSON file?") from None
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
    return data


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


def _one_entry_per_image(images: dict[int, dict[str, Any]], file: str) -> list[Problem]:
    """An error for each image file that more than one entry of ``images`` names; those entries
    are removed from ``images`` (their annotations are then left out with them).

    Each entry holds part of the image's objects, so a reader would see each part as an image
    whose other objects are background, and an evaluation would score the image once per entry.
    """
    entries = list(images)
    problems = []
    for positions in repeated_images([images[image_id]["path"] for image_id in entries]):
        ids = [entries[k] for k in positions]
        names = list(dict.fromkeys(images[i]["file_name"] for i in ids))
        if len(names) == 1:
            spelled = f"file_name {names[0]!r} appears in each"
        else:
            spelled = f"file_names {' and '.join(map(repr, names))} name one image file"
        listed = ", ".join(str(i) for i in ids[:-1]) + f" and {ids[-1]}"
        others = "entries'" if len(ids) > 2 else "entry's"
        problems.append(Problem(
            "error", file, f"{spelled}: one image listed {len(ids)} times, its objects split between the entries; "
            f"merge them into one entry (keep id {ids[0]} and set the image_id of the other {others} annotations "
            f"to {ids[0]})", f"image ids {listed}", image=str(images[ids[0]]["path"]),
        ))  # fmt: skip
        for image_id in ids:
            del images[image_id]
    return problems


def _compressed_rle_totals(annotations: list[Any]) -> dict[int, int | str]:
    """:func:`rle_string_totals` of every compressed RLE segmentation, by position in ``annotations``."""
    found = [
        (i, ann["segmentation"]["counts"])
        for i, ann in enumerate(annotations)
        if isinstance(ann, dict) and isinstance(ann.get("segmentation"), dict)
        and isinstance(ann["segmentation"].get("counts"), str)
    ]  # fmt: skip
    return dict(zip((i for i, _ in found), rle_string_totals([counts for _, counts in found])))


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
    """
    images_dir, ann_file = Path(images_dir), Path(ann_file)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: images directory not found (for {ann_file})")
    data = _load_json(ann_file)
    file = str(ann_file)
    class_names, label_to_cat_id = _read_categories(ann_file, data["categories"])
    cat_id_to_label = {cat: label for label, cat in label_to_cat_id.items()}
    problems: list[Problem] = []
    check_masks = check_masks or require_masks

    images: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(img, dict) or not _is_int(img.get("id")) or not isinstance(img.get("file_name"), str):
            message = f"{img!r} needs an integer 'id' and a string 'file_name'"
            problems.append(Problem("error", file, message, where, image=f"{file} {where}"))
            continue
        where = f"image id {img['id']} ({img['file_name']})"
        if img["id"] in images:
            problems.append(Problem("error", file, "image id appears twice in 'images'", where))
            continue
        # An absolute file_name, or one that starts with ../, names an image outside images_dir:
        # it is read like any other (nothing is ever written where a file_name points).
        path = images_dir / img["file_name"]
        height, width = img.get("height"), img.get("width")
        if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
            message = f"needs positive integer 'height' and 'width', got {height!r} x {width!r}"
            problems.append(Problem("error", file, message, where, image=str(path)))
            continue
        if not _is_file(path):
            problems.append(
                Problem("error", file, f"image file not found: {path}", where, missing_file=True, image=str(path))
            )
            continue
        images[img["id"]] = {"path": path, "hw": (height, width), "anns": [], "file_name": img["file_name"]}
    known_ids = {img.get("id") for img in data["images"] if isinstance(img, dict)}
    problems += _one_entry_per_image(images, file)
    rle_totals = _compressed_rle_totals(data["annotations"]) if check_masks else {}

    seen_ann_ids: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        start, image = len(problems), None
        try:
            if not isinstance(ann, dict) or not _is_int(ann.get("id")):
                problems.append(Problem("error", file, f"{str(ann)[:80]} needs an integer 'id'", f"annotations[{i}]"))
                continue
            where = f"annotation id {ann['id']}"
            if ann["id"] in seen_ann_ids:
                problems.append(Problem("error", file, "annotation id appears twice", where))
                continue
            seen_ann_ids.add(ann["id"])
            image_id = ann.get("image_id")
            if image_id not in known_ids:
                problems.append(Problem("error", file, f"image_id {image_id!r} is not in 'images'", where))
                continue
            if image_id not in images:  # the image itself has a problem, reported above
                continue
            image = str(images[image_id]["path"])
            if ann.get("category_id") not in cat_id_to_label:
                message = f"unknown category_id {ann.get('category_id')!r} (known: {sorted(cat_id_to_label)})"
                problems.append(Problem("error", file, message, where))
                continue
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox
            ):
                problems.append(Problem("error", file, f"bbox {bbox!r} must be 4 numbers [x, y, width, height]", where))
                continue
            x, y, w, h = (float(v) for v in bbox)
            if all(math.isfinite(v) for v in bbox) and (w < 0 or h < 0):
                message = f"bbox {bbox} has a negative width or height; COCO boxes are [x, y, width, height]"
                problems.append(Problem("error", file, message, where))
                continue
            iscrowd = ann.get("iscrowd", 0)
            if iscrowd not in (0, 1):
                problems.append(Problem("error", file, f"iscrowd must be 0 or 1, got {iscrowd!r}", where))
                continue
            hw = images[image_id]["hw"]
            box = check_box((x, y, x + w, y + h), hw, file, where, problems)
            if box is None:
                continue
            seg = ann.get("segmentation")
            if check_masks:
                if seg is None or seg == []:
                    if require_masks:
                        problems.append(Problem("error", file, "has no 'segmentation', needed to load masks", where))
                        continue
                else:
                    status, seg = check_segmentation(
                        seg, hw, file, f"{where} (image id {image_id})", problems, box, rle_total=rle_totals.get(i)
                    )
                    if status == "error":
                        continue
                    if status == "degenerate":
                        if require_masks:
                            problems.append(Problem("warning", file, "no valid polygon left, annotation dropped", where))
                            continue
                        problems.append(Problem("warning", file, "no valid polygon (dropped when masks are loaded)", where))
            area = ann.get("area")
            if not isinstance(area, (int, float)) or isinstance(area, bool) or not math.isfinite(area):
                area = (box[2] - box[0]) * (box[3] - box[1])
            label = cat_id_to_label[ann["category_id"]]
            images[image_id]["anns"].append((ann["id"], box, label, bool(iscrowd), float(area), seg))
        finally:
            _tag(problems, start, image)

    records = []
    for image_id, img in images.items():
        anns = img["anns"]
        arrays = ImageRecord.empty_arrays(len(anns))
        if anns:
            arrays["boxes"] = np.asarray([a[1] for a in anns], dtype=np.float32)
            arrays["labels"] = np.asarray([a[2] for a in anns], dtype=np.int64)
            arrays["iscrowd"] = np.asarray([a[3] for a in anns], dtype=bool)
        records.append(
            ImageRecord(
                image_id=image_id,
                path=img["path"],
                height=img["hw"][0],
                width=img["hw"][1],
                ann_ids=[a[0] for a in anns],
                areas=[a[4] for a in anns],
                segmentations=[a[5] for a in anns],
                **arrays,
            )
        )
    return CocoIndex(records, class_names, label_to_cat_id, problems)


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
