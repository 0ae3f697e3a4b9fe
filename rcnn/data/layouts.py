"""What the annotation-tool layouts share: parsed images -> validated records, splits, the data set.

Each layout reader (:mod:`~rcnn.data.labelimg`, :mod:`~rcnn.data.yolo`, :mod:`~rcnn.data.labelme`,
:mod:`~rcnn.data.via`, :mod:`~rcnn.data.cvat`) only turns its files into a :class:`RawSet`: one
:class:`RawImage` per image with its objects as written (class name, box or polygon in pixels)
and the problems met while parsing. Everything after that is here, once, for all of them:

- the classes: given (``class_names``), declared by the layout (YOLO ``names``, CVAT labels, a
  ``classes.txt``; an object of another class is then an error) or discovered (the sorted names
  over *all* images, so that every split gets the same labels, as for VOC);
- the split (:func:`select_split`): every image (``"all"``), a split the layout defines (YOLO
  ``images/train``, CVAT ``subset``), a split file ``{split}.txt``, or a seeded stratified
  ``val_fraction`` of the images (:mod:`rcnn.data.splits`);
- validation with the COCO/VOC readers' rules (``check_box``); a polygon's box is its bounds
  and the polygon is kept as a COCO polygon segmentation, so masks and ``coco_dict()`` work as for
  COCO. A polygon with fewer than 3 points is an error here (unlike a COCO segmentation part it
  *is* the object);
- :class:`LayoutDetection`, the ``torch`` data set.

Image ids are positions in the whole set sorted by key, from 1: an image has the same id in
every split.

Shape shorthand:
    N: number of objects in an image
    H, W: image height and width
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from rcnn.data.coco import decode_masks, polygon_area
from rcnn.data.records import (
    DetectionDataset,
    ImageRecord,
    Problem,
    Transform,
    check_box,
    image_size,
    repeated_images,
    settle_problems,
)
from rcnn.data.splits import (
    SPLIT_ALL,
    KeyLookup,
    find_split_files,
    read_split_file,
    stratified_split,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "LayoutDetection",
    "LayoutIndex",
    "RawImage",
    "RawObject",
    "RawSet",
    "build_records",
    "find_image",
    "is_image_file",
    "layout_splits",
    "list_images",
    "read_class_list",
    "read_layout",
    "select_split",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FORMAT_NAMES = {
    "labelimg": "LabelImg / VOC XML folder",
    "yolo": "YOLO txt",
    "labelme": "LabelMe JSON",
    "via": "VIA JSON",
    "cvat": "CVAT for images XML",
}


@dataclass
class RawObject:
    """One object as an annotation file writes it, in pixels (``x1, y1, x2, y2`` continuous)."""

    name: str  # the class name
    where: str  # where in the annotation file, for messages: "object 2 (cat)", "line 4"
    box: tuple[float, float, float, float] | None = None  # a box object
    polygons: list[list[float]] | None = None  # an outlined object: parts [x1, y1, x2, y2, ...]
    difficult: bool = False  # VOC's flag (LabelImg)


@dataclass
class RawImage:
    """One image and its objects as parsed, before validation."""

    key: str  # what split files list: the path below the layout's folder, without the extension
    file: str  # the annotation file, named in problems
    path: Path | None  # the image file; None when it was not found (a problem says so)
    size: tuple[int, int] | None = None  # (H, W) the annotation states; None: read from the image header
    objects: list[RawObject] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # met while parsing this image's entry
    where: str | None = None  # this image's entry in ``file`` when one file describes many images

    @property
    def ident(self) -> str:
        """What identifies this image in problems for ``skip_broken``: its file, else its entry."""
        if self.path is not None:
            return str(self.path)
        return f"{self.file}: {self.where}" if self.where else self.file


@dataclass
class RawSet:
    """What a layout reader found, before the split is chosen and the objects validated."""

    format: str  # "labelimg", "yolo", "labelme", "via", "cvat"
    root: Path  # the folder split files are looked for in (and written to by ``rcnn data split``)
    images: list[RawImage]
    description: str  # one line for reports: the format and where its files are
    class_names: list[str] | None = None  # declared by the layout (label order); None: discover
    class_source: str = ""  # where declared classes come from ("data.yaml names"), for messages
    splits: dict[str, list[str]] = field(default_factory=dict)  # splits the layout defines (keys)
    problems: list[Problem] = field(default_factory=list)  # not tied to one image

    def __post_init__(self) -> None:
        self.images.sort(key=lambda im: im.key)


@dataclass
class LayoutIndex:
    """What :func:`read_layout` found: validated records of one split, classes and problems."""

    records: list[ImageRecord]
    class_names: list[str]  # foreground names, label 1..K
    image_names: list[str]  # the keys of the records' images
    problems: list[Problem]
    raw: RawSet
    split: str


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a file with an image extension (any case)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` (and below it when ``recursive``), sorted."""
    if not folder.is_dir():
        return []
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."))


def read_class_list(path: Path) -> list[str]:
    """Class names from a text file, one per line (``classes.txt``); blank lines ignored."""
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason}); a class list has one name per line") from None
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path}: class names {repeated} appear more than once")
    if not names:
        raise ValueError(f"{path}: the class list is empty")
    return names


def find_image(
    folders: Sequence[Path],
    name: str | None,
    stem: str,
    field_name: str,
    file: str,
    where: str | None,
    problems: list[Problem],
) -> Path | None:
    """The image an annotation names: ``name`` (relative, in one of ``folders``), else its file
    name alone, else ``stem`` with an image extension (a warning says so); ``None`` and an error
    naming ``field_name`` when there is none.

    Absolute paths in annotation files are the annotator's own machine: only their file name
    is used. Backslashes (Windows) are read as folder separators.
    """
    tried: list[str] = []
    if name:
        text = name.replace("\\", "/")
        candidates = [] if os.path.isabs(text) or (len(text) > 1 and text[1] == ":") else [text]
        candidates.append(text.rsplit("/", 1)[-1])
        for candidate in dict.fromkeys(candidates):
            for folder in folders:
                path = folder / candidate
                if path.is_file():
                    return path
                tried.append(str(path))
    for folder in folders:
        for suffix in IMAGE_SUFFIXES:
            for variant in (suffix, suffix.upper()):
                path = folder / f"{stem}{variant}"
                if path.is_file():
                    if name:
                        problems.append(
                            Problem("warning", file, f"{field_name} {name!r} is not found ({tried[0]}); "
                                    f"using {path}, the image named like the annotation", where)
                        )
                    return path
    shown = tried[0] if tried else str(folders[0] / f"{stem}.jpg")
    why = f"{field_name} {name!r}" if name else f"no {field_name}, and no image named {stem}.*"
    problems.append(
        Problem("error", file, f"image file not found: {shown} ({why}); put the image there, or correct "
                f"{field_name} in the annotation", where, missing_file=True)
    )
    return None


def _entry(raw: RawImage) -> str:
    """An image's entry for messages: its annotation file, and where in it when one file holds many."""
    return f"{raw.file} ({raw.where})" if raw.where else raw.file


def _polygon_problem(polygon: Sequence[float]) -> str | None:
    """What is wrong with one polygon ``[x1, y1, x2, y2, ...]``, or ``None``."""
    if len(polygon) % 2:
        return f"polygon has an odd number ({len(polygon)}) of coordinates"
    if not all(math.isfinite(v) for v in polygon):
        return "polygon has a NaN or infinite coordinate"
    if len(polygon) < 6:
        return f"polygon has {len(polygon) // 2} point(s); an outline needs at least 3"
    return None


def build_records(
    images: Sequence[tuple[int, RawImage]],
    class_names: Sequence[str],
    *,
    fixed_classes: bool,
    class_source: str = "",
    require_masks: bool = False,
) -> tuple[list[ImageRecord], list[Problem]]:
    """Validate parsed images (``(image_id, RawImage)`` pairs) into records, without raising.

    An image with a parse error gives no record. Objects with an error are left out (the error is
    reported); every problem is tagged with its image for ``skip_broken``. ``require_masks`` makes
    a box without a polygon an error (masks need outlines). Two entries (annotation files, or
    entries of one file) that describe one image file are an error and give no record: each holds
    its own part of the image's objects, which training would learn as background of the other.
    """
    label_of = {name: label for label, name in enumerate(class_names, start=1)}
    known = ", ".join(class_names) or "none"
    records: list[ImageRecord] = []
    problems: list[Problem] = []
    repeated: set[int] = set()  # positions of images that another entry describes too
    for positions in repeated_images([raw.path for _, raw in images]):
        first, *others = (images[k][1] for k in positions)
        problems.append(
            Problem("error", first.file, f"describes the image {first.path}, which "
                    f"{' and '.join(_entry(raw) for raw in others)} describe{'s' if len(others) == 1 else ''} too: "
                    "an image has one list of objects: merge the entries into one and remove the other",
                    first.where, image=first.ident)
        )  # fmt: skip
        repeated.update(positions)
    for position, (image_id, raw) in enumerate(images):
        if position in repeated:
            continue
        found = list(raw.problems)
        if raw.path is None or any(p.severity == "error" for p in found):
            problems += [replace(p, image=raw.ident) for p in found]
            continue
        hw = raw.size
        if hw is None:
            try:
                hw = image_size(raw.path)
            except (FileNotFoundError, ValueError) as exc:
                file = str(raw.path)
                found.append(Problem("error", file, str(exc).removeprefix(f"{file}: "),
                                     missing_file=isinstance(exc, FileNotFoundError)))
                problems += [replace(p, image=raw.ident) for p in found]
                continue
        boxes, labels, difficult, areas, segmentations = [], [], [], [], []
        for obj in raw.objects:
            if obj.name not in label_of:
                hint = f" from {class_source}" if fixed_classes and class_source else ""
                found.append(
                    Problem("error", raw.file, f"unknown class {obj.name!r} (known{hint}: {known}); "
                            "fix the name or add the class to the class list", obj.where)
                )
                continue
            box = obj.box
            segmentation = None
            if obj.polygons:
                segmentation = [[float(v) for v in polygon] for polygon in obj.polygons]
                problem = next((p for p in map(_polygon_problem, segmentation) if p is not None), None)
                if problem is not None:
                    found.append(Problem("error", raw.file, problem, obj.where))
                    continue
                xs = [v for polygon in segmentation for v in polygon[0::2]]
                ys = [v for polygon in segmentation for v in polygon[1::2]]
                box = (min(xs), min(ys), max(xs), max(ys))  # the outline's bounds
            elif require_masks:
                found.append(
                    Problem("error", raw.file, "is a box without a polygon outline; loading masks "
                            "(Mask R-CNN) needs a polygon for every object", obj.where)
                )
                continue
            if box is None:
                found.append(Problem("error", raw.file, "has neither a box nor a polygon", obj.where))
                continue
            checked = check_box(box, hw, raw.file, obj.where, found)
            if checked is None:
                continue
            boxes.append(checked)
            labels.append(label_of[obj.name])
            difficult.append(obj.difficult)
            if segmentation is not None:
                areas.append(polygon_area(segmentation, hw[0], hw[1]))
            else:
                areas.append((checked[2] - checked[0]) * (checked[3] - checked[1]))
            segmentations.append(segmentation)
        problems += [replace(p, image=str(raw.path)) for p in found]
        arrays = ImageRecord.empty_arrays(len(boxes))
        if boxes:
            arrays["boxes"] = np.asarray(boxes, dtype=np.float32)
            arrays["labels"] = np.asarray(labels, dtype=np.int64)
            arrays["difficult"] = np.asarray(difficult, dtype=bool)
        records.append(
            ImageRecord(
                image_id=image_id,
                path=raw.path,
                height=hw[0],
                width=hw[1],
                areas=areas,
                segmentations=segmentations if any(s is not None for s in segmentations) else None,
                **arrays,
            )
        )
    return records, problems


def _lookup(raw: RawSet) -> KeyLookup:
    aliases: dict[str, list[str]] = {}
    for image in raw.images:
        if image.path is not None:
            names = [image.path.name]
            try:
                names.append(image.path.relative_to(raw.root).as_posix())
            except ValueError:
                pass
            aliases[image.key] = names
    return KeyLookup([im.key for im in raw.images], aliases)


def layout_splits(raw: RawSet, splits_dir: Path | None = None) -> list[str]:
    """The splits a parsed layout offers: its own (YOLO folders, CVAT subsets) and split files."""
    folder = splits_dir or raw.root
    return sorted({*raw.splits, *find_split_files(folder)})


def select_split(
    raw: RawSet,
    split: str,
    *,
    splits_dir: Path | None = None,
    val_fraction: float | None = None,
    split_seed: int = 0,
) -> tuple[list[str], list[Problem]]:
    """The keys of ``split`` (see the module docstring for the order of the rules) and the
    problems of its split file.
    """
    keys = [im.key for im in raw.images]
    if split == SPLIT_ALL:
        return keys, []
    if val_fraction is not None:
        if split not in ("train", "val"):
            raise ValueError(
                f"{raw.root}: with val_fraction the splits are 'train' and 'val' (or 'all'), not {split!r}; "
                "set the train / val split names to train and val"
            )
        classes = [{obj.name for obj in im.objects} for im in raw.images]
        return stratified_split(keys, classes, val_fraction, split_seed)[split], []
    if split in raw.splits:
        return list(raw.splits[split]), []
    folder = splits_dir or raw.root
    split_file = folder / f"{split}.txt"
    if not split_file.is_file():
        available = layout_splits(raw, folder)
        found = f"its splits: {', '.join(available)}" if available else "it has no split files"
        raise FileNotFoundError(
            f"{split_file}: split file not found ({found}); write train.txt / val.txt with "
            f"`rcnn data split {raw.root}` (--out DIR when the folder is read-only), split on the fly with "
            "val_fraction (`--set data.val_fraction=0.2`), or use the split 'all'"
        )
    return read_split_file(split_file, _lookup(raw))


def discover_classes(raw: RawSet) -> list[str]:
    """The sorted object names over every image of the set."""
    return sorted({obj.name for image in raw.images for obj in image.objects if obj.name})


def read_layout(
    raw: RawSet,
    split: str,
    *,
    class_names: Sequence[str] | None = None,
    splits_dir: Path | None = None,
    val_fraction: float | None = None,
    split_seed: int = 0,
    require_masks: bool = False,
) -> LayoutIndex:
    """Choose ``split`` of a parsed layout and validate its images, without raising on
    per-image problems (they are in ``LayoutIndex.problems``)."""
    if class_names is not None:
        names, fixed, source = list(class_names), True, "class_names"
    elif raw.class_names is not None:
        names, fixed, source = list(raw.class_names), True, raw.class_source
    else:
        names, fixed, source = discover_classes(raw), False, ""
    keys, problems = select_split(raw, split, splits_dir=splits_dir, val_fraction=val_fraction, split_seed=split_seed)
    position = {im.key: i for i, im in enumerate(raw.images)}
    chosen = [(position[k] + 1, raw.images[position[k]]) for k in keys]
    records, found = build_records(chosen, names, fixed_classes=fixed, class_source=source, require_masks=require_masks)
    key_of = {image_id: image.key for image_id, image in chosen}
    return LayoutIndex(
        records=records,
        class_names=names,
        image_names=[key_of[r.image_id] for r in records],
        problems=[*raw.problems, *problems, *found],
        raw=raw,
        split=split,
    )


class LayoutDetection(DetectionDataset):
    """One split of an annotation-tool layout (LabelImg, YOLO, LabelMe, VIA, CVAT) as a data set.

    Built by :func:`rcnn.data.build_dataset` from a :class:`LayoutIndex`. Items are those of every
    reader (:class:`~rcnn.data.records.DetectionDataset`); ``masks [N, H, W]`` come from the
    polygons (``with_masks``), and LabelImg's VOC ``difficult`` flag is kept as VOC's is
    (``keep_difficult``, default ``not train``). ``image_names`` are the images' keys (what split
    files list); ``format``, ``root`` and ``split`` say where the data came from.
    """

    def __init__(
        self,
        index: LayoutIndex,
        *,
        with_masks: bool = False,
        train: bool = False,
        transforms: Transform | None = None,
        keep_difficult: bool | None = None,
        skip_broken: bool = False,
        hint: str = "",
    ) -> None:
        records = settle_problems(index.records, index.problems, skip_broken=skip_broken, hint=hint)
        kept = {id(r) for r in records}
        super().__init__(records, index.class_names, train=train, transforms=transforms, with_masks=with_masks)
        self.format = index.raw.format
        self.root = index.raw.root
        self.split = index.split
        self.description = index.raw.description
        self.image_names = [n for n, r in zip(index.image_names, index.records) if id(r) in kept]
        self.has_difficult = self.format == "labelimg"
        self.keep_difficult = (not train) if keep_difficult is None else keep_difficult

    def _target_keep(self, record: ImageRecord) -> np.ndarray:
        keep = super()._target_keep(record)  # [N]
        if self.has_difficult and not self.keep_difficult:
            keep = keep & ~record.difficult
        return keep

    def _extra_target(self, record: ImageRecord, keep: np.ndarray) -> dict:
        return {"difficult": torch.from_numpy(record.difficult[keep])} if self.has_difficult else {}  # [N]

    def _decode_masks(self, record: ImageRecord, keep: np.ndarray) -> np.ndarray:
        return decode_masks(record, keep)  # [N, H, W]
