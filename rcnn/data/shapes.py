"""The built-in synthetic data set: coloured shapes on a noisy background, in COCO layout.

``make_shapes(root)`` writes::

    root/images/train/000000.png ...      root/annotations/instances_train.json
    root/images/val/000000.png ...        root/annotations/instances_val.json

Each image holds 1..``max_objects`` objects of five classes (circle, square, triangle, star,
hexagon) with a random size (from ``min_object_size`` ~ 8 px to half the image), colour,
rotation and position. Later objects may partly cover earlier ones (at most
``max_occlusion`` of an object's area is hidden); an object's mask is its *visible* part and
its box encloses that mask tightly. Segmentations are stored as compressed RLE, so masks
decode back to exactly the painted pixels.

Everything is drawn from ``numpy.random.default_rng([seed, split, index])``: the same
arguments give the same bytes, and image ``i`` of a split does not depend on how many images
the other split has.

Shape shorthand:
    H, W: image height and width
    V: number of polygon vertices
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from rcnn.io.files import write_bytes

__all__ = ["SHAPES_CLASSES", "SHAPES_MARKER", "NotAShapesFolder", "make_shapes", "render_shapes_image", "shapes_paths"]

SHAPES_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")

# Index of each split in the random seed sequence: train and val never share a stream.
_SPLIT_STREAM = {"train": 0, "val": 1}
_SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point shift: vertices placed to 1/16 px
_IMAGE_NAME = re.compile(r"^\d{6}\.png$")
SHAPES_MARKER = ".rcnn-shapes"  # in every folder make_shapes writes to
_DESCRIPTION = "rcnn synthetic shapes"


class NotAShapesFolder(ValueError):
    """The folder holds files, and they are not a shapes set: nothing may be generated there."""


def _holds_shapes(root: Path) -> bool:
    """Whether ``root`` holds a shapes set of ours (the marker, or annotation files saying so)."""
    if (root / SHAPES_MARKER).is_file():
        return True
    for split in _SPLIT_STREAM:
        ann_file = shapes_paths(root, split)[1]
        try:
            with ann_file.open("rb") as fh:
                head = fh.read(200)  # the info block comes first
        except OSError:
            continue
        if _DESCRIPTION.encode() in head:
            return True
    return False


def _claim_folder(root: Path) -> None:
    """Make ``root`` a shapes folder, or raise ``NotAShapesFolder`` before writing anything."""
    if root.exists() and not root.is_dir():
        raise NotAShapesFolder(f"{root}: is a file; the shapes data set is written into a folder")
    if root.is_dir() and not _holds_shapes(root) and any(root.iterdir()):
        raise NotAShapesFolder(
            f"{root}: is not empty and holds no shapes data set; the synthetic shapes are generated only into a "
            "new or empty folder (or over an earlier shapes set), never among other files: choose another folder"
        )
    root.mkdir(parents=True, exist_ok=True)
    if not (root / SHAPES_MARKER).is_file():
        write_bytes(root / SHAPES_MARKER, json.dumps({"format": _DESCRIPTION}).encode("utf-8") + b"\n")


def shapes_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """``(images_dir, annotation_file)`` of ``split`` in a shapes (or COCO-style) root."""
    root = Path(root)
    return root / "images" / split, root / "annotations" / f"instances_{split}.json"


def _polygon(cls: str, centre: tuple[float, float], radius: float, angle: float) -> np.ndarray:
    """Vertices ``[V, 2]`` (x, y) of a shape inscribed in a circle of ``radius``."""
    if cls == "circle":
        thetas = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
        radii = np.full_like(thetas, radius)
    elif cls == "star":
        thetas = angle + np.arange(10) * (math.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    else:
        sides = {"square": 4, "triangle": 3, "hexagon": 6}[cls]
        thetas = angle + np.arange(sides) * (2 * math.pi / sides)
        radii = np.full_like(thetas, radius)
    xs = centre[0] + radii * np.cos(thetas)
    ys = centre[1] + radii * np.sin(thetas)
    return np.stack((xs, ys), axis=1)  # [V, 2]


def _fill(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """Binary mask ``[H, W]`` (uint8) of the pixels a polygon ``[V, 2]`` covers."""
    mask = np.zeros((height, width), dtype=np.uint8)
    # A pixel (i, j) covers [j, j+1) x [i, i+1); cv2 samples pixel centres at integers,
    # so shift by -0.5 to sample at (j + 0.5, i + 0.5).
    points = np.round((polygon - 0.5) * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(mask, [points], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return mask


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random colour field ``[H, W, 3]`` float32 in 0..255 (texture added later)."""
    grid = rng.uniform(20, 235, size=(4, 4, 3)).astype(np.float32)
    field = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(field, 0, 255)


def render_shapes_image(
    rng: np.random.Generator,
    image_size: tuple[int, int],
    *,
    max_objects: int = 5,
    min_object_size: float = 8.0,
    max_object_size: float | None = None,
    max_occlusion: float = 0.5,
    empty_fraction: float = 0.0,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draw one image; return ``(image [H, W, 3] uint8 RGB, [(label 1..5, visible mask [H, W])])``.

    Object sizes (diameter of the circumscribed circle) are log-uniform in
    ``[min_object_size, max_object_size]`` (default: half the shorter image side).
    A candidate object that would hide more than ``max_occlusion`` of an earlier object, or
    would itself be too small to see, is redrawn (up to 20 tries, then skipped).
    """
    height, width = image_size
    if max_object_size is None:
        max_object_size = min(height, width) / 2
    if not 0 < min_object_size <= max_object_size <= min(height, width):
        raise ValueError(
            f"object sizes must satisfy 0 < min_object_size ({min_object_size}) <= "
            f"max_object_size ({max_object_size}) <= image side ({min(height, width)})"
        )
    canvas = _background(rng, height, width)  # [H, W, 3]
    plain_background = canvas.copy()
    n_objects = 0 if rng.uniform() < empty_fraction else int(rng.integers(1, max_objects + 1))
    objects: list[tuple[int, np.ndarray, int]] = []  # (label, visible mask, full area)
    for _ in range(n_objects):
        for _attempt in range(20):
            label = int(rng.integers(1, len(SHAPES_CLASSES) + 1))
            size = math.exp(rng.uniform(math.log(min_object_size), math.log(max_object_size)))
            radius = size / 2
            centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
            angle = rng.uniform(0, 2 * math.pi)
            mask = _fill(_polygon(SHAPES_CLASSES[label - 1], centre, radius, angle), height, width)
            area = int(mask.sum())
            if area < 16:
                continue
            hidden = [int((m & mask).sum()) for _, m, _ in objects]
            if any(m.sum() - h < (1 - max_occlusion) * full for (_, m, full), h in zip(objects, hidden)):
                continue
            # A colour that stands out from the background under the object.
            local = plain_background[mask.astype(bool)].mean(axis=0)  # [3]
            for _ in range(10):
                colour = rng.uniform(0, 255, size=3).astype(np.float32)
                if np.linalg.norm(colour - local) > 90:
                    break
            canvas[mask.astype(bool)] = colour
            objects = [(lab, m & (1 - mask), full) for lab, m, full in objects]
            objects.append((label, mask, area))
            break
    # Sensor-like texture over everything, so that flat colour alone does not give objects away.
    canvas = canvas + rng.normal(0.0, 8.0, size=canvas.shape).astype(np.float32)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return image, [(label, mask) for label, mask, _ in objects]


def _make_split(
    root: Path,
    split: str,
    n_images: int,
    seed: int,
    image_size: tuple[int, int],
    render_kwargs: dict,
) -> None:
    images_dir, ann_file = shapes_paths(root, split)
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    height, width = image_size
    images, annotations = [], []
    for index in range(n_images):
        rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
        image, objects = render_shapes_image(rng, image_size, **render_kwargs)
        file_name = f"{index:06d}.png"
        ok, png = cv2.imencode(".png", image[:, :, ::-1])  # cv2 wants BGR
        if not ok:  # pragma: no cover - cv2 only fails on invalid arrays
            raise ValueError(f"could not encode {images_dir / file_name} as PNG")
        write_bytes(images_dir / file_name, png.tobytes())
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for label, mask in objects:
            rows = np.flatnonzero(mask.any(axis=1))
            cols = np.flatnonzero(mask.any(axis=0))
            x1, y1, x2, y2 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                }
            )
    # Remove images of an earlier, larger run so the folder matches the annotation file.
    for stale in images_dir.iterdir():
        if _IMAGE_NAME.match(stale.name) and int(stale.name[:6]) >= n_images:
            stale.unlink()
    dataset = {
        "info": {
            "description": _DESCRIPTION,
            "version": "1",
            "split": split,
            "seed": seed,
            "image_size": [height, width],
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES_CLASSES)
        ],
    }
    write_bytes(ann_file, json.dumps(dataset, separators=(",", ":")).encode("utf-8"))


def make_shapes(
    root: str | os.PathLike,
    n_train: int = 400,
    n_val: int = 100,
    seed: int = 0,
    image_size: int | tuple[int, int] = 128,
    max_objects: int = 5,
    *,
    min_object_size: float = 8.0,
    max_object_size: float | None = None,
    max_occlusion: float = 0.5,
    empty_fraction: float = 0.0,
) -> Path:
    """Write the synthetic shapes data set under ``root`` and return ``root`` as a ``Path``.

    ``image_size`` is a side length or ``(height, width)``. ``empty_fraction`` of the images
    (in expectation) have no objects at all, to exercise the images-without-objects path.
    The annotation file of a split is written last (atomically): a split is complete when
    ``annotations/instances_{split}.json`` exists. ``NotAShapesFolder`` (a ``ValueError``) when
    ``root`` holds other files (module docstring).
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    height, width = (int(s) for s in image_size)
    if height < 16 or width < 16:
        raise ValueError(f"image_size must be at least 16 px on each side, got {image_size}")
    if n_train < 0 or n_val < 0:
        raise ValueError(f"n_train and n_val must be >= 0, got {n_train} and {n_val}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    if not 0 <= max_occlusion < 1 or not 0 <= empty_fraction <= 1:
        raise ValueError(
            f"max_occlusion must be in [0, 1) and empty_fraction in [0, 1], "
            f"got {max_occlusion} and {empty_fraction}"
        )
    render_kwargs = {
        "max_objects": max_objects,
        "min_object_size": min_object_size,
        "max_object_size": max_object_size,
        "max_occlusion": max_occlusion,
        "empty_fraction": empty_fraction,
    }
    root = Path(root)
    _claim_folder(root)
    for split, n_images in (("train", n_train), ("val", n_val)):
        _make_split(root, split, n_images, int(seed), (height, width), render_kwargs)
    return root
