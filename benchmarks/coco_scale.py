"""A COCO instances file of COCO-2017-train size, to measure reading, checking and loading at scale.

    python -m benchmarks.coco_scale /tmp/coco118k                    # 118,287 images, 684,443 boxes
    python -m benchmarks.coco_scale /tmp/coco10k --images 10000      # the same distributions, scaled
    python -m benchmarks.coco_scale /tmp/yolo100k --images 100000 --format yolo

Writes ``OUT/annotations/instances_train2017.json`` and ``OUT/train2017/`` (COCO's own layout:
``rcnn data check OUT/annotations/instances_train2017.json`` finds the images), or with
``--format yolo`` a YOLO folder (``OUT/images/train/``, ``OUT/labels/train/``, ``OUT/data.yaml``),
with the same objects. What the file holds follows COCO 2017 train:

- 118,287 images and 684,443 boxes at full size (5.79 per image; the count per image is 1 + a
  negative binomial, heavy-tailed as COCO's, 1 % of the images without objects), scaled
  proportionally for ``--images``; sparse image ids (COCO's are up to 581,929) and the
  annotations in shuffled order (a file lists them by id, not grouped by image);
- image sizes from COCO's most common ones (640x480, 640x427, 480x640, ...);
- box sizes ``sqrt(w * h)`` log-normal around 42 px (40 % small, under 32 px; 22 % large, over
  96 px, as COCO's 41 % / 24 %), aspect ratios log-normal, coordinates with two decimals;
- COCO's 80 categories (ids 1..90 with COCO's gaps), frequencies falling off as COCO's do
  (``person`` the most frequent);
- polygon segmentations (6 to 16 points, ellipses in their boxes) on 20 % of the objects, and
  1 % crowd objects with an uncompressed RLE, as COCO gives its crowds. COCO outlines every
  object; outlining a fifth keeps the file near the size the figures were first measured at
  (docs/benchmarks.md).

Every image file is a symbolic link to one small JPEG of its size (one per size, in
``OUT/_jpeg/``): the images cost no disk space, and a flat JPEG decodes fast. The same
``--images`` and ``--seed`` give the same bytes. The output folder must be new, empty or one this
script wrote (it then replaces it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from rcnn.commands.options import float_range, int_range

__all__ = ["COCO_BOXES", "COCO_IMAGES", "make_coco_scale", "main"]

COCO_IMAGES = 118_287  # COCO 2017 train
COCO_BOXES = 684_443  # the figure the project's measurements use for it
MAX_IMAGES = 10_000_000
MARKER = ".coco_scale"  # what marks a folder this script wrote (and may replace)
SPLIT = "train2017"

# COCO's 80 categories: ids 1..90 with gaps, in COCO's order.
CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"),
    (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"),
    (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
)  # fmt: skip
# (width, height) of COCO's most common image sizes, with their rough shares.
SIZES = ((640, 480), (640, 427), (480, 640), (640, 426), (427, 640), (640, 428), (640, 425), (500, 375),
         (640, 360), (612, 612), (640, 640), (375, 500), (640, 512), (640, 443))  # fmt: skip
SIZE_WEIGHTS = (30, 16, 10, 7, 5, 4, 4, 3, 3, 3, 3, 2, 2, 2)
EMPTY_FRACTION = 0.01  # COCO 2017 train: 1,021 of 118,287 images have no object
POLYGON_FRACTION = 0.20
CROWD_FRACTION = 0.01
BOX_SIDE_MEDIAN = 42.0  # px, sqrt(w * h)
BOX_SIDE_SIGMA = 1.05  # of log(side)
ASPECT_SIGMA = 0.6  # of log(h / w)


def _check_out(out: Path) -> None:
    """Refuse a folder that is neither new, empty nor written by this script; clear one that was."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{out}: exists and is not a folder; name a new folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise SystemExit(f"{out}: the folder is not empty and was not written by benchmarks.coco_scale; "
                             "name a new or empty folder")  # fmt: skip
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by python -m benchmarks.coco_scale\n")


def _objects_per_image(rng: np.random.Generator, images: int, boxes: int) -> np.ndarray:
    """``[I]`` counts summing to ``boxes``: 1 + a negative binomial, ``EMPTY_FRACTION`` zeros."""
    extra = max(boxes / max(images, 1) - 1.0, 0.0)
    shape = 1.2  # a heavy tail: a few images with dozens of objects, as COCO's crowd scenes
    counts = 1 + rng.negative_binomial(shape, shape / (shape + extra), size=images) if extra > 0 else np.ones(images, np.int64)
    counts[rng.random(images) < EMPTY_FRACTION] = 0
    difference = boxes - int(counts.sum())
    while difference != 0:  # add to or take from random images until the total is exact
        if difference > 0:
            np.add.at(counts, rng.integers(0, images, size=difference), 1)
        else:
            take = rng.choice(np.flatnonzero(counts > 1), size=min(-difference, int((counts > 1).sum())), replace=False)
            counts[take] -= 1
        difference = boxes - int(counts.sum())
    return counts


def _boxes(rng: np.random.Generator, widths: np.ndarray, heights: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``[B, 4]`` COCO ``[x, y, w, h]`` boxes inside images of the given sizes (``[B]`` each), 2 decimals."""
    count = len(widths)
    side = np.exp(rng.normal(np.log(BOX_SIDE_MEDIAN * scale), BOX_SIDE_SIGMA, size=count))
    ratio = np.exp(rng.normal(0.0, ASPECT_SIGMA, size=count))  # h / w
    w = np.round(np.clip(side / np.sqrt(ratio), 1.0, widths), 2)
    h = np.round(np.clip(side * np.sqrt(ratio), 1.0, heights), 2)
    x = np.floor(rng.random(count) * (widths - w) * 100) / 100  # rounded down: the box stays inside
    y = np.floor(rng.random(count) * (heights - h) * 100) / 100
    return np.stack([x, y, w, h], axis=1)


def _polygon(rng: np.random.Generator, box: np.ndarray) -> list[float]:
    """An ellipse of 6 to 16 points inscribed in ``box`` ``[x, y, w, h]``, as COCO's ``[x1, y1, ...]``."""
    x, y, w, h = box
    points = int(rng.integers(6, 17))
    angles = rng.random() * 2 * np.pi / points + np.arange(points) * 2 * np.pi / points
    xs = x + w / 2 + w / 2 * np.cos(angles)
    ys = y + h / 2 + h / 2 * np.sin(angles)
    return np.round(np.stack([xs, ys], axis=1).reshape(-1), 2).tolist()


def _polygon_area(polygon: list[float]) -> float:
    xs, ys = np.asarray(polygon[0::2]), np.asarray(polygon[1::2])
    return round(float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))), 2)


def _rectangle_rle(box: np.ndarray, width: int, height: int) -> dict[str, object]:
    """COCO's uncompressed RLE (column-major runs) of the pixels the box ``[x, y, w, h]`` covers."""
    x0, y0 = int(box[0]), int(box[1])
    x1, y1 = max(int(np.ceil(box[0] + box[2])), x0 + 1), max(int(np.ceil(box[1] + box[3])), y0 + 1)
    x1, y1 = min(x1, width), min(y1, height)
    counts = [x0 * height + y0]
    for _ in range(x0, x1 - 1):
        counts += [y1 - y0, height - (y1 - y0)]
    counts += [y1 - y0, height * width - sum(counts) - (y1 - y0)]
    return {"counts": counts, "size": [height, width]}


def _jpegs(out: Path, sizes: list[tuple[int, int]]) -> dict[tuple[int, int], Path]:
    """One small flat JPEG per image size, in ``out/_jpeg``."""
    folder = out / "_jpeg"
    folder.mkdir()
    found = {}
    for k, (width, height) in enumerate(sizes):
        path = folder / f"{width}x{height}.jpg"
        Image.new("RGB", (width, height), (96 + 8 * k, 128, 160)).save(path, quality=75)
        found[(width, height)] = path
    return found


def make_coco_scale(
    out: str | os.PathLike,
    images: int = COCO_IMAGES,
    *,
    boxes: int | None = None,
    seed: int = 0,
    fmt: str = "coco",
    scale: float = 1.0,
) -> Path:
    """Write the data set (module docstring) into ``out``; returns the annotation file (COCO) or
    the folder (YOLO). ``boxes`` defaults to COCO's boxes per image times ``images``. ``scale``
    multiplies the image sizes and the boxes (0.25: 160x120 images, for measuring a data loader
    whose decoding should cost little)."""
    out = Path(out)
    _check_out(out)
    boxes = round(images * COCO_BOXES / COCO_IMAGES) if boxes is None else boxes
    rng = np.random.default_rng(seed)
    sizes = [(max(round(w * scale), 8), max(round(h * scale), 8)) for w, h in SIZES]
    size_index = rng.choice(len(sizes), size=images, p=np.asarray(SIZE_WEIGHTS) / sum(SIZE_WEIGHTS))
    image_w = np.asarray([sizes[k][0] for k in size_index])  # [I]
    image_h = np.asarray([sizes[k][1] for k in size_index])  # [I]
    image_ids = np.sort(rng.choice(max(5 * images, 600_000), size=images, replace=False) + 1)  # [I]
    counts = _objects_per_image(rng, images, boxes)  # [I]
    owner = np.repeat(np.arange(images), counts)  # [B] the image of each box
    bbox = _boxes(rng, image_w[owner], image_h[owner], scale)  # [B, 4]
    weights = 1.0 / np.arange(1, len(CATEGORIES) + 1) ** 1.1
    category = rng.choice(len(CATEGORIES), size=boxes, p=weights / weights.sum())  # [B]
    crowd = rng.random(boxes) < CROWD_FRACTION  # [B]
    outlined = ~crowd & (rng.random(boxes) < POLYGON_FRACTION)  # [B]
    jpegs = _jpegs(out, sizes)
    names = [f"{int(i):012d}.jpg" for i in image_ids]
    if fmt == "yolo":
        return _write_yolo(out, names, image_w, image_h, counts, bbox, category, jpegs)

    folder = out / SPLIT
    folder.mkdir()
    for name, w, h in zip(names, image_w.tolist(), image_h.tolist()):
        os.symlink(os.path.relpath(jpegs[(w, h)], folder), folder / name)
    ann_file = out / "annotations" / f"instances_{SPLIT}.json"
    ann_file.parent.mkdir()
    order = rng.permutation(boxes)  # a file lists its annotations by id, not by image
    ann_ids = np.sort(rng.choice(max(3 * boxes, 1), size=boxes, replace=False) + 1)
    with open(ann_file, "w", encoding="utf-8") as f:
        info = {"description": "COCO-2017-train-sized synthetic data (benchmarks.coco_scale)", "version": "1.0", "year": 2017}
        f.write(f'{{"info": {json.dumps(info)}, "licenses": [{{"id": 1, "name": "none", "url": ""}}], "images": [')
        f.write(",".join(
            json.dumps({"license": 1, "file_name": name, "height": h, "width": w, "id": i})
            for name, w, h, i in zip(names, image_w.tolist(), image_h.tolist(), image_ids.tolist())
        ))  # fmt: skip
        f.write('], "annotations": [')
        for k, j in enumerate(order.tolist()):
            box = bbox[j]
            i = owner[j]
            ann: dict[str, object] = {"id": int(ann_ids[k]), "image_id": int(image_ids[i]),
                                      "category_id": CATEGORIES[category[j]][0], "bbox": box.tolist(),
                                      "iscrowd": int(crowd[j])}  # fmt: skip
            if outlined[j]:
                polygon = _polygon(rng, box)
                ann["segmentation"] = [polygon]
                ann["area"] = _polygon_area(polygon)
            elif crowd[j]:
                ann["segmentation"] = _rectangle_rle(box, int(image_w[i]), int(image_h[i]))
                ann["area"] = round(float(box[2] * box[3]), 2)
            else:
                ann["area"] = round(float(box[2] * box[3]), 2)
            f.write(("," if k else "") + json.dumps(ann))
        f.write('], "categories": ')
        f.write(json.dumps([{"supercategory": "object", "id": c, "name": n} for c, n in CATEGORIES]))
        f.write("}\n")
    return ann_file


def _write_yolo(out: Path, names: list[str], widths: np.ndarray, heights: np.ndarray, counts: np.ndarray,
                bbox: np.ndarray, category: np.ndarray, jpegs: dict[tuple[int, int], Path]) -> Path:  # fmt: skip
    """The same objects as a YOLO folder: ``images/train``, ``labels/train``, ``data.yaml``."""
    images, labels = out / "images" / "train", out / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    start = np.concatenate(([0], np.cumsum(counts)))
    for k, (name, w, h) in enumerate(zip(names, widths.tolist(), heights.tolist())):
        os.symlink(os.path.relpath(jpegs[(w, h)], images), images / name)
        rows = bbox[start[k] : start[k + 1]]
        lines = [f"{c} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}"
                 for c, (x, y, bw, bh) in zip(category[start[k] : start[k + 1]].tolist(), rows.tolist())]  # fmt: skip
        (labels / f"{Path(name).stem}.txt").write_text("".join(line + "\n" for line in lines))
    names_yaml = "".join(f"  {k}: {name}\n" for k, (_, name) in enumerate(CATEGORIES))
    (out / "data.yaml").write_text(f"path: .\ntrain: images/train\nnames:\n{names_yaml}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder: new, empty, or one this script wrote (replaced)")
    parser.add_argument("--images", type=int_range(1, MAX_IMAGES), default=COCO_IMAGES,
                        help=f"number of images (default {COCO_IMAGES}, COCO 2017 train)")  # fmt: skip
    parser.add_argument("--boxes-per-image", type=float_range(0.0, 100.0), default=None,
                        help=f"boxes per image on average (default COCO's, {COCO_BOXES / COCO_IMAGES:.2f})")  # fmt: skip
    parser.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0, help="random seed (default 0)")
    parser.add_argument("--format", choices=("coco", "yolo"), default="coco", help="what to write (default coco)")
    parser.add_argument("--scale", type=float_range(0.05, 4.0), default=1.0,
                        help="multiply the image sizes and boxes by this (default 1: COCO's sizes)")  # fmt: skip
    args = parser.parse_args(argv)
    boxes = None if args.boxes_per_image is None else round(args.images * args.boxes_per_image)
    tic = time.perf_counter()
    written = make_coco_scale(args.out, args.images, boxes=boxes, seed=args.seed, fmt=args.format, scale=args.scale)
    print(f"wrote {written} ({args.images} images) in {time.perf_counter() - tic:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
