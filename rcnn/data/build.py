"""Find out what a data set path is (COCO root, COCO JSON file, VOC root) and build its reader.

Accepted forms of ``path_or_spec``:

- a COCO-style root with ``annotations/instances_{split}.json`` and images in
  ``images/{split}/``, ``{split}/`` or ``images/`` (the shapes layout and COCO's own);
- a COCO ``.json`` file; the images folder is ``images_dir`` or found next to it;
- a VOC root with ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/{split}.txt``;
- a mapping ``{"format": "coco", "annotations": FILE, "images": DIR}`` or
  ``{"format": "voc", "root": DIR, "class_names": [...]}``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcnn.data.coco import CocoDetection
from rcnn.data.common import DetectionDataset, Transform
from rcnn.data.voc import VOCDetection, is_voc_root, voc_splits

__all__ = ["DatasetSource", "build_dataset", "find_splits", "resolve_dataset"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class DatasetSource:
    """Where one split of a data set lives and in which format."""

    format: str  # "coco" or "voc"
    split: str
    ann_file: Path | None = None  # COCO
    images_dir: Path | None = None  # COCO
    root: Path | None = None  # VOC
    options: dict[str, Any] = field(default_factory=dict)  # VOC: class_names

    def describe(self) -> str:
        """One line for reports: the format and the files."""
        if self.format == "coco":
            return f"COCO (annotations {self.ann_file}, images {self.images_dir})"
        return f"Pascal VOC (root {self.root}, split {self.split})"


def _coco_images_dir(ann_file: Path, split: str) -> Path:
    """The images folder that belongs to a COCO annotation file, by the usual layouts."""
    stem = ann_file.stem.removeprefix("instances_")
    parent, grand = ann_file.parent, ann_file.parent.parent
    candidates = [grand / "images" / split, grand / "images" / stem, grand / split, grand / stem,
                  parent / "images" / stem, parent / "images", grand / "images"]  # fmt: skip
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    if any(p.suffix.lower() in _IMAGE_SUFFIXES for p in parent.iterdir()):
        return parent
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise FileNotFoundError(
        f"{ann_file}: no images folder found (tried {tried}); pass the images folder explicitly "
        "(--images DIR, or a spec {'format': 'coco', 'annotations': FILE, 'images': DIR})"
    )


def resolve_dataset(
    path_or_spec: str | os.PathLike | Mapping[str, Any], split: str, images_dir: str | os.PathLike | None = None
) -> DatasetSource:
    """Detect the format of ``path_or_spec`` and locate ``split`` in it (see the module docstring).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the path when it is neither format.
    """
    if isinstance(path_or_spec, Mapping):
        spec = dict(path_or_spec)
        fmt = spec.get("format") or ("coco" if "annotations" in spec else "voc" if "root" in spec else None)
        if fmt == "coco" and "annotations" in spec:
            ann_file = Path(spec["annotations"])
            images = spec.get("images") or images_dir
            images = Path(images) if images else _coco_images_dir(ann_file, split)
            return DatasetSource("coco", split, ann_file=ann_file, images_dir=images)
        if fmt == "voc" and "root" in spec:
            options = {"class_names": spec["class_names"]} if spec.get("class_names") else {}
            return DatasetSource("voc", split, root=Path(spec["root"]), options=options)
        raise ValueError(
            f"data set spec {spec!r} must be {{'format': 'coco', 'annotations': FILE, 'images': DIR}} "
            "or {'format': 'voc', 'root': DIR}"
        )
    path = Path(path_or_spec)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data set path not found")
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ValueError(f"{path}: expected a COCO .json file or a data set folder")
        images = Path(images_dir) if images_dir else _coco_images_dir(path, split)
        return DatasetSource("coco", split, ann_file=path, images_dir=images)
    if is_voc_root(path):
        return DatasetSource("voc", split, root=path)
    ann_file = path / "annotations" / f"instances_{split}.json"
    if ann_file.is_file():
        images = Path(images_dir) if images_dir else _coco_images_dir(ann_file, split)
        return DatasetSource("coco", split, ann_file=ann_file, images_dir=images)
    if (path / "annotations").is_dir():
        raise FileNotFoundError(f"{ann_file}: not found (splits in {path}: {find_splits(path) or 'none'})")
    voc_inside = sorted(p.name for p in path.glob("VOC*") if is_voc_root(p))
    hint = f"; the VOC roots inside are {voc_inside}" if voc_inside else ""
    raise ValueError(
        f"{path}: neither a COCO root (annotations/instances_{split}.json) nor a VOC root "
        f"(Annotations/, JPEGImages/, ImageSets/Main/){hint}"
    )


def find_splits(path: str | os.PathLike) -> list[str]:
    """The splits a data set folder offers (COCO ``instances_*.json`` or VOC ``ImageSets/Main``)."""
    path = Path(path)
    if is_voc_root(path):
        return voc_splits(path)
    return sorted(p.stem.removeprefix("instances_") for p in (path / "annotations").glob("instances_*.json"))


def build_dataset(
    path_or_spec: str | os.PathLike | Mapping[str, Any],
    split: str,
    *,
    with_masks: bool = False,
    train: bool = False,
    transforms: Transform | None = None,
    images_dir: str | os.PathLike | None = None,
) -> DetectionDataset:
    """The data set reader for ``split`` of ``path_or_spec`` (format detected, see module docstring)."""
    source = resolve_dataset(path_or_spec, split, images_dir)
    if source.format == "coco":
        return CocoDetection(
            source.images_dir, source.ann_file, with_masks=with_masks, train=train, transforms=transforms
        )
    if with_masks:
        raise ValueError(f"{source.root}: VOC detection annotations have no instance masks (with_masks=True)")
    return VOCDetection(source.root, split, train=train, transforms=transforms, **source.options)
