"""Find out what a data set path is and build its reader.

Accepted forms of ``path_or_spec`` (see docs/data.md for each layout):

- a COCO-style root with ``annotations/instances_{split}.json`` and images in
  ``images/{split}/``, ``{split}/`` or ``images/`` (the shapes layout and COCO's own);
- a COCO ``.json`` file; the images folder is ``images_dir`` or found next to it;
- a VOC root with ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/{split}.txt``;
- an annotation tool's layout, read in place: a LabelImg folder of VOC XML files (one folder,
  or two sibling folders), a YOLO folder (or its ``data.yaml``), a folder of LabelMe JSON files,
  a VIA JSON file, a CVAT ``annotations.xml`` (or the folders that hold them);
- a folder with an ``rcnn_dataset.json`` naming such a data set and holding its split files
  (what ``rcnn data split --out DIR`` writes for data that cannot be written to);
- a mapping ``{"format": "coco", "annotations": FILE, "images": DIR}``,
  ``{"format": "voc", "root": DIR, "class_names": [...]}`` or
  ``{"format": "labelimg" | "yolo" | "labelme" | "via" | "cvat", "root": PATH, ...}`` with the
  optional keys ``splits`` (the folder of the split files), ``images``, ``annotations``
  (LabelImg), ``class_names``, ``class_attribute`` (VIA).

A layout without split files gives the split ``"all"``; ``val_fraction`` (with ``split_seed``)
splits any of them, or a single COCO file, into ``"train"`` and ``"val"`` on the fly
(:func:`rcnn.data.splits.stratified_split`), writing nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcnn.data.coco import CocoDetection, image_names
from rcnn.data.records import DetectionDataset, ImageRecord, RecordTable, Transform
from rcnn.data.cvat import find_cvat_file, is_cvat_file, read_cvat
from rcnn.data.labelimg import is_labelimg_folder, read_labelimg
from rcnn.data.labelme import is_labelme_folder, read_labelme
from rcnn.data.layouts import FORMAT_NAMES, LayoutDetection, LayoutIndex, RawSet, layout_splits, read_layout
from rcnn.data.splits import SPLIT_ALL, split_positions
from rcnn.data.via import find_via_file, is_via_file, read_via
from rcnn.data.voc import VOCDetection, is_voc_root, voc_splits
from rcnn.data.yolo import is_yolo_folder, read_yolo
from rcnn.io.files import read_json

__all__ = [
    "LAYOUT_FORMATS",
    "SPEC_FILE",
    "DatasetSource",
    "build_dataset",
    "coco_keys",
    "dataset_splits",
    "find_splits",
    "folder_format",
    "layout_index",
    "read_raw",
    "resolve_dataset",
]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
LAYOUT_FORMATS = tuple(FORMAT_NAMES)  # labelimg, yolo, labelme, via, cvat
SPEC_FILE = "rcnn_dataset.json"
_SPEC_KEYS = {"format", "root", "annotations", "images", "splits", "class_names", "class_attribute"}


@dataclass
class DatasetSource:
    """Where one split of a data set lives and in which format."""

    format: str  # "coco", "voc", or one of LAYOUT_FORMATS
    split: str
    ann_file: Path | None = None  # COCO
    images_dir: Path | None = None  # COCO; the layouts' images folder when given
    root: Path | None = None  # VOC; the layouts' folder or file
    options: dict[str, Any] = field(default_factory=dict)  # class_names, class_attribute, annotations, splits
    val_fraction: float | None = None  # split on the fly (layouts, a COCO file)
    split_seed: int = 0

    def describe(self) -> str:
        """One line for reports: the format and the files."""
        if self.format == "coco":
            text = f"COCO (annotations {self.ann_file}, images {self.images_dir})"
        elif self.format == "voc":
            text = f"Pascal VOC (root {self.root}, split {self.split})"
        else:
            text = f"{FORMAT_NAMES[self.format]} ({self.root})"
        if self.val_fraction is not None:
            text += f", split on the fly: val_fraction {self.val_fraction}, seed {self.split_seed}"
        return text


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


def _from_spec(spec: Mapping[str, Any], split: str, images_dir: str | os.PathLike | None, base: Path | None) -> DatasetSource:
    """A source from a mapping (``base``: the folder relative paths of a spec file start from)."""
    spec = dict(spec)
    where = f"{base / SPEC_FILE}: " if base is not None else ""
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f"{where}data set spec has unknown keys {unknown} (known: {sorted(_SPEC_KEYS)})")

    def path(key: str) -> Path | None:
        value = spec.get(key)
        if value in (None, ""):
            return None
        value = Path(value)
        return base / value if base is not None and not value.is_absolute() else value

    fmt = spec.get("format") or ("coco" if "annotations" in spec else "voc" if "root" in spec else None)
    images = path("images") or (Path(images_dir) if images_dir else None)
    if fmt == "coco" and "annotations" in spec:
        ann_file = path("annotations")
        return DatasetSource("coco", split, ann_file=ann_file, images_dir=images or _coco_images_dir(ann_file, split))  # type: ignore[arg-type]
    if fmt == "voc" and "root" in spec:
        options = {"class_names": spec["class_names"]} if spec.get("class_names") else {}
        return DatasetSource("voc", split, root=path("root"), options=options)
    if fmt in LAYOUT_FORMATS and "root" in spec:
        root = path("root")
        if not root.exists():  # type: ignore[union-attr]
            raise FileNotFoundError(f"{where}{root}: data set path not found")
        options: dict[str, Any] = {}
        for key in ("class_names", "class_attribute"):
            if spec.get(key):
                options[key] = spec[key]
        for key in ("annotations", "splits"):
            if spec.get(key):
                options[key] = path(key)
        if base is not None and "splits" not in options:
            options["splits"] = base  # the spec file's folder holds the split files
        return DatasetSource(fmt, split, root=root, images_dir=images, options=options)
    raise ValueError(
        f"{where}data set spec {spec!r} must be {{'format': 'coco', 'annotations': FILE, 'images': DIR}}, "
        f"{{'format': 'voc', 'root': DIR}} or {{'format': one of {', '.join(LAYOUT_FORMATS)}, 'root': PATH}}"
    )


def _spec_file(path: Path, split: str, images_dir: str | os.PathLike | None) -> DatasetSource:
    spec = read_json(path)
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a JSON object with 'format' and 'root'")
    return _from_spec(spec, split, images_dir, path.parent)


def _detect_layout(path: Path) -> str | None:
    """The annotation-tool layout of a folder, or ``None``."""
    if find_cvat_file(path) is not None:
        return "cvat"
    if is_yolo_folder(path):
        return "yolo"
    if find_via_file(path) is not None:
        return "via"
    if is_labelme_folder(path):
        return "labelme"
    if is_labelimg_folder(path):
        return "labelimg"
    return None


def resolve_dataset(
    path_or_spec: str | os.PathLike | Mapping[str, Any],
    split: str,
    images_dir: str | os.PathLike | None = None,
    *,
    val_fraction: float | None = None,
    split_seed: int = 0,
) -> DatasetSource:
    """Detect the format of ``path_or_spec`` and locate ``split`` in it (see the module docstring).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the path, and what was looked for, when
    it is none of the formats.
    """
    source = _resolve(path_or_spec, split, images_dir, val_fraction)
    source.val_fraction = None if val_fraction is None else float(val_fraction)
    source.split_seed = int(split_seed)
    return source


def _coco_whole_file(path: Path) -> Path:
    """The one annotation file of a COCO root that ``val_fraction`` splits."""
    files = sorted((path / "annotations").glob("instances_*.json"))
    named_all = [f for f in files if f.stem == f"instances_{SPLIT_ALL}"]
    if named_all or len(files) == 1:
        return (named_all or files)[0]
    raise ValueError(
        f"{path}: val_fraction splits one COCO file, but this root has {len(files)} "
        f"({', '.join(f.name for f in files)}); use its splits, or give the .json file to split"
    )


def _resolve(
    path_or_spec: str | os.PathLike | Mapping[str, Any],
    split: str,
    images_dir: str | os.PathLike | None,
    val_fraction: float | None,
) -> DatasetSource:
    if isinstance(path_or_spec, Mapping):
        return _from_spec(path_or_spec, split, images_dir, None)
    path = Path(path_or_spec)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data set path not found")
    if path.is_file():
        suffix = path.suffix.lower()
        if path.name == SPEC_FILE:
            return _spec_file(path, split, images_dir)
        if suffix == ".json":
            if is_via_file(path):
                return DatasetSource("via", split, root=path, images_dir=Path(images_dir) if images_dir else None)
            images = Path(images_dir) if images_dir else _coco_images_dir(path, split)
            return DatasetSource("coco", split, ann_file=path, images_dir=images)
        if suffix == ".xml" and is_cvat_file(path):
            return DatasetSource("cvat", split, root=path, images_dir=Path(images_dir) if images_dir else None)
        if suffix in (".yaml", ".yml"):
            return DatasetSource("yolo", split, root=path)
        raise ValueError(
            f"{path}: expected a data set folder, a COCO or VIA .json file, a CVAT .xml file or a YOLO data.yaml"
        )
    fmt = folder_format(path)
    if fmt == "spec":
        return _spec_file(path / SPEC_FILE, split, images_dir)
    if fmt == "voc":
        if val_fraction is not None:
            raise ValueError(
                f"{path}: a VOC root has its splits in ImageSets/Main ({', '.join(voc_splits(path)) or 'none'}); "
                "val_fraction is for data sets without splits"
            )
        return DatasetSource("voc", split, root=path)
    if fmt == "coco":
        ann_file = _coco_whole_file(path) if val_fraction is not None else path / "annotations" / f"instances_{split}.json"
        if not ann_file.is_file():
            raise FileNotFoundError(f"{ann_file}: not found (splits in {path}: {find_splits(path) or 'none'})")
        stem = ann_file.stem.removeprefix("instances_")
        images = Path(images_dir) if images_dir else _coco_images_dir(ann_file, stem)
        return DatasetSource("coco", split, ann_file=ann_file, images_dir=images)
    if fmt is not None:
        return DatasetSource(fmt, split, root=path, images_dir=Path(images_dir) if images_dir else None)
    voc_inside = sorted(p.name for p in path.glob("VOC*") if is_voc_root(p))
    hint = f"; the VOC roots inside are {voc_inside}" if voc_inside else ""
    raise ValueError(
        f"{path}: not a data set folder. Looked for: a COCO root (annotations/instances_{split}.json), a VOC root "
        "(Annotations/, JPEGImages/, ImageSets/Main/), a CVAT annotations.xml, a YOLO folder (data.yaml, or images/ "
        "+ labels/, or .txt labels with classes.txt), a VIA .json file, LabelMe .json files, LabelImg / VOC .xml "
        f"files (here or in a folder inside), or {SPEC_FILE}{hint}"
    )


def folder_format(path: Path) -> str | None:
    """What a data set folder is: ``"spec"`` (it has an ``rcnn_dataset.json``), ``"voc"``,
    ``"coco"``, one of :data:`LAYOUT_FORMATS`, or ``None``; checked in that order."""
    if (path / SPEC_FILE).is_file():
        return "spec"
    if is_voc_root(path):
        return "voc"
    if any((path / "annotations").glob("instances_*.json")):
        return "coco"
    return _detect_layout(path)


def read_raw(source: DatasetSource) -> RawSet:
    """Parse the files of an annotation-tool layout (``source.format`` in :data:`LAYOUT_FORMATS`)."""
    options, images = source.options, source.images_dir
    if source.format == "labelimg":
        return read_labelimg(source.root, annotations_dir=options.get("annotations"), images_dir=images)  # type: ignore[arg-type]
    if source.format == "yolo":
        return read_yolo(source.root, class_names=options.get("class_names"))  # type: ignore[arg-type]
    if source.format == "labelme":
        return read_labelme(source.root, images_dir=images)  # type: ignore[arg-type]
    if source.format == "via":
        return read_via(source.root, class_attribute=options.get("class_attribute"), images_dir=images)  # type: ignore[arg-type]
    if source.format == "cvat":
        return read_cvat(source.root, images_dir=images)  # type: ignore[arg-type]
    raise ValueError(f"{source.root}: {source.format!r} is not an annotation-tool layout ({', '.join(LAYOUT_FORMATS)})")


def find_splits(path: str | os.PathLike | Mapping[str, Any]) -> list[str]:
    """The splits a data set offers: COCO ``instances_*.json``, VOC ``ImageSets/Main`` lists, or a
    layout's own splits and split files (``[]`` for a layout without any: it has ``"all"``)."""
    if not isinstance(path, Mapping):
        path = Path(path)
        if is_voc_root(path):
            return voc_splits(path)
        coco = sorted(p.stem.removeprefix("instances_") for p in (path / "annotations").glob("instances_*.json"))
        if coco or path.is_file() and path.suffix.lower() == ".json" and not is_via_file(path):
            return coco
    source = resolve_dataset(path, SPLIT_ALL)
    if source.format not in LAYOUT_FORMATS:
        return []
    return layout_splits(read_raw(source), source.options.get("splits"))


def dataset_splits(
    path_or_spec: str | os.PathLike | Mapping[str, Any],
    split: str | None = None,
    *,
    images_dir: str | os.PathLike | None = None,
    val_fraction: float | None = None,
) -> tuple[list[str], RawSet | None]:
    """The splits ``rcnn data check`` / ``convert`` go through, and the parsed layout (to reuse).

    ``split`` when given; ``train`` and ``val`` with ``val_fraction``; else every split found (VOC's
    ``train`` and ``val`` left out when ``trainval`` is there: they are inside it), ``all`` for a
    layout without splits, the file's own for a COCO file.
    """
    if not isinstance(path_or_spec, Mapping) and not Path(path_or_spec).exists():
        raise FileNotFoundError(f"{path_or_spec}: data set path not found")
    is_file = isinstance(path_or_spec, Mapping) or Path(path_or_spec).is_file()
    root_with_splits = not is_file and folder_format(Path(path_or_spec)) in ("coco", "voc")
    # A COCO or VOC root need not have the split "all": probe the format of the others only.
    probe = None if root_with_splits else resolve_dataset(path_or_spec, split or SPLIT_ALL, images_dir)
    raw = read_raw(probe) if probe is not None and probe.format in LAYOUT_FORMATS else None

    def without_nested(splits: list[str]) -> list[str]:
        return [s for s in splits if s not in ("train", "val")] if "trainval" in splits else splits

    if split:
        return [split], raw
    if val_fraction is not None:
        return ["train", "val"], raw
    if raw is not None:
        return without_nested(layout_splits(raw, probe.options.get("splits"))) or [SPLIT_ALL], raw  # type: ignore[union-attr]
    if is_file:
        return ["" if isinstance(path_or_spec, Mapping) else Path(path_or_spec).stem.removeprefix("instances_")], None
    splits = without_nested(find_splits(path_or_spec))
    if not splits:
        raise ValueError(f"{path_or_spec}: no splits found (ImageSets/Main/*.txt or annotations/instances_*.json)")
    return splits, None


def coco_keys(records: Sequence[ImageRecord], images_dir: Path) -> list[str]:
    """The keys of COCO images for on-the-fly splits: ``file_name`` without the extension."""
    paths = records.path_strings() if isinstance(records, RecordTable) else [str(r.path) for r in records]
    return [os.path.splitext(name)[0] for name in image_names(paths, images_dir)]


def layout_index(source: DatasetSource, raw: RawSet | None = None, *, require_masks: bool = False) -> LayoutIndex:
    """Read and validate ``source.split`` of a layout (``raw``: already parsed), without raising."""
    return read_layout(
        raw or read_raw(source),
        source.split,
        class_names=source.options.get("class_names"),
        splits_dir=source.options.get("splits"),
        val_fraction=source.val_fraction,
        split_seed=source.split_seed,
        require_masks=require_masks,
    )


def build_dataset(
    path_or_spec: str | os.PathLike | Mapping[str, Any],
    split: str,
    *,
    with_masks: bool = False,
    train: bool = False,
    transforms: Transform | None = None,
    images_dir: str | os.PathLike | None = None,
    val_fraction: float | None = None,
    split_seed: int = 0,
    skip_broken: bool = False,
) -> DetectionDataset:
    """The data set reader for ``split`` of ``path_or_spec`` (format detected, see module docstring).

    Args:
        val_fraction: split the whole data set on the fly, seeded by ``split_seed``: ``split``
            is then ``"train"`` or ``"val"`` (or ``"all"``); ``None`` uses the data set's splits.
        skip_broken: decode every image now and leave out the images that cannot be used
            (unreadable image or annotation file, missing image, unusable box), one
            ``DataWarning`` each, instead of refusing the data set.
    """
    source = resolve_dataset(path_or_spec, split, images_dir, val_fraction=val_fraction, split_seed=split_seed)
    if source.format == "coco":
        dataset: DetectionDataset = CocoDetection(
            source.images_dir,  # type: ignore[arg-type]
            source.ann_file,  # type: ignore[arg-type]
            with_masks=with_masks,
            train=train,
            transforms=transforms,
            skip_broken=skip_broken,
        )
        if val_fraction is None:
            return dataset
        keys = coco_keys(dataset.records, source.images_dir)  # type: ignore[arg-type]
        table = dataset.records
        classes = [{dataset.class_names[label] for label in table.labels_of(i).tolist()} for i in range(len(table))]
        return dataset.subset(split_positions(keys, classes, split, val_fraction, split_seed))
    if source.format == "voc":
        if with_masks:
            raise ValueError(f"{source.root}: VOC detection annotations have no instance masks (with_masks=True)")
        return VOCDetection(source.root, split, train=train, transforms=transforms, skip_broken=skip_broken, **source.options)  # type: ignore[arg-type]
    if with_masks and source.format == "labelimg":
        raise ValueError(f"{source.root}: LabelImg / VOC XML annotations are boxes and have no instance masks (with_masks=True)")
    index = layout_index(source, require_masks=with_masks)
    where = source.root if isinstance(path_or_spec, Mapping) else path_or_spec
    flags = f" --split {split}" + (f" --val-fraction {val_fraction} --seed {split_seed}" if val_fraction is not None else "")
    return LayoutDetection(
        index,
        with_masks=with_masks,
        train=train,
        transforms=transforms,
        skip_broken=skip_broken,
        hint=f"\n(`rcnn data check {where}{flags}` lists every problem)",
    )
