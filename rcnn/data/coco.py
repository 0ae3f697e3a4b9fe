"""COCO instances files (``instances_*.json``) as a detection / instance segmentation data set.

Category ids (any integers) map to contiguous labels 1..K in increasing id order; the mapping
is kept (``label_to_cat_id``) to write results back. Boxes are converted from COCO's
``[x, y, width, height]`` to ``(x1, y1, x2, y2)`` and validated once at construction (see
``rcnn.data.common`` for the policy); images are read in ``__getitem__``.

Shape shorthand:
    N: number of annotated objects in an image
    H, W: image height and width
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from rcnn.data.common import (
    DetectionDataset,
    ImageRecord,
    OVERHANG_FRACTION,
    OVERHANG_PIXELS,
    Problem,
    Transform,
    check_box,
    settle_problems,
)

__all__ = [
    "CocoDetection",
    "CocoIndex",
    "check_segmentation",
    "decode_masks",
    "polygon_area",
    "read_coco",
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


def check_segmentation(
    seg: Any, hw: tuple[int, int], file: str, where: str, problems: list[Problem], box: Any = None
) -> tuple[str, Any]:
    """Validate a COCO segmentation: ``("ok", seg)``, ``("degenerate", None)`` or ``("error", None)``.

    Polygons with fewer than 3 points are degenerate: dropped with a warning ("degenerate"
    when none is left). Odd-length or non-numeric polygons and RLEs of the wrong size are errors.
    As boxes are, the segmentation is checked against the image and, given the object's ``box``
    (x1, y1, x2, y2, clipped), against it: a polygon point beyond the image by more than a box may
    overhang, a mask covering no pixel, and a mask whose extent does not match the box (IoU under
    ``MASK_BOX_MIN_IOU``) are errors.
    """
    status, seg = _check_segmentation_format(seg, hw, file, where, problems)
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
    seg: Any, hw: tuple[int, int], file: str, where: str, problems: list[Problem]
) -> tuple[str, Any]:
    """The format checks of :func:`check_segmentation`: polygons of numbers, RLE of the image's size."""
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
        if size != [height, width]:
            problems.append(
                Problem("error", file, f"RLE size {size!r} does not match the image size [{height}, {width}] (H, W)", where)
            )
            return "error", None
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
                problems.append(Problem("error", file, f"uncompressed RLE counts do not sum to {height}*{width}", where))
                return "error", None
        elif not isinstance(counts, str):
            problems.append(Problem("error", file, "RLE 'counts' must be a string or a list of integers", where))
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
    left out of the records. ``check_masks`` validates segmentations; ``require_masks``
    also makes a missing or degenerate segmentation a problem (as loading masks needs).
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
        path = images_dir / img["file_name"]
        height, width = img.get("height"), img.get("width")
        if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
            message = f"needs positive integer 'height' and 'width', got {height!r} x {width!r}"
            problems.append(Problem("error", file, message, where, image=str(path)))
            continue
        if not path.is_file():
            problems.append(
                Problem("error", file, f"image file not found: {path}", where, missing_file=True, image=str(path))
            )
            continue
        images[img["id"]] = {"path": path, "hw": (height, width), "anns": []}
    known_ids = {img.get("id") for img in data["images"] if isinstance(img, dict)}

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
                    status, seg = check_segmentation(seg, hw, file, where, problems, box)
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
