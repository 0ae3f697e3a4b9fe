"""Pascal VOC layouts (``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/{split}.txt``).

VOC boxes are 1-based inclusive pixel indices; pixel ``xmin`` .. ``xmax`` covers the
continuous interval ``[xmin - 1, xmax]``, so ``(x1, y1, x2, y2) = (xmin - 1, ymin - 1, xmax,
ymax)`` in the library's convention (``rcnn.core.boxes``). The ``difficult`` flag is kept for
evaluation. Image ids are positions in the split file (0, 1, ...); the VOC names are in
``image_names``.

Shape shorthand:
    N: number of annotated objects in an image
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rcnn.data.records import (
    DetectionDataset,
    ImageRecord,
    Problem,
    Transform,
    check_box,
    repeated_images,
    settle_problems,
)

__all__ = ["VOC_CLASSES", "VOCDetection", "VOCIndex", "VOCObject", "parse_voc_xml", "read_voc", "voc_splits"]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


@dataclass
class VOCIndex:
    """What :func:`read_voc` found: validated records, classes, VOC image names, problems."""

    records: list[ImageRecord]
    class_names: list[str]  # foreground names, label 1..K
    image_names: list[str]
    problems: list[Problem]


@dataclass
class VOCObject:
    """One ``<object>`` of a VOC XML file, its box already in the library's convention."""

    name: str
    difficult: bool
    box: tuple[float, float, float, float]
    where: str


def voc_splits(root: str | os.PathLike) -> list[str]:
    """Split names in ``root/ImageSets/Main`` (``train``, ``val``, ...; per-class lists excluded)."""
    main = Path(root) / "ImageSets" / "Main"
    if not main.is_dir():
        return []
    return sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem)


def is_voc_root(root: str | os.PathLike) -> bool:
    """Whether ``root`` has the VOC folders ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/``."""
    root = Path(root)
    return all((root / d).is_dir() for d in ("Annotations", "JPEGImages", "ImageSets/Main"))


def _text(node: ET.Element, path: str) -> str | None:
    found = node.find(path)
    return None if found is None or found.text is None else found.text.strip()


def parse_voc_xml(
    xml_path: Path, problems: list[Problem]
) -> tuple[tuple[int, int], str | None, list[VOCObject]] | None:
    """``((height, width), <filename>, objects)`` of one VOC / LabelImg XML file, or ``None`` when
    the file is unusable (missing, not XML, no ``<size>``); problems are appended to ``problems``.
    """
    file = str(xml_path)
    if not xml_path.is_file():
        problems.append(Problem("error", file, "annotation file not found", missing_file=True))
        return None
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        problems.append(Problem("error", file, f"not valid XML ({exc})"))
        return None
    try:
        width, height = int(float(_text(root, "size/width") or "")), int(float(_text(root, "size/height") or ""))
    except ValueError:
        width = height = 0
    if width <= 0 or height <= 0:
        problems.append(
            Problem("error", file, f"needs <size> with positive <width> and <height>, got "
                    f"{_text(root, 'size/width')!r} x {_text(root, 'size/height')!r}")
        )
        return None
    objects = []
    for k, obj in enumerate(root.findall("object")):
        where = f"object {k}"
        name = _text(obj, "name")
        if not name:
            problems.append(Problem("error", file, "has no <name>", where))
            continue
        where = f"object {k} ({name})"
        difficult = _text(obj, "difficult") or "0"
        if difficult not in ("0", "1"):
            problems.append(Problem("error", file, f"<difficult> must be 0 or 1, got {difficult!r}", where))
            continue
        values = [_text(obj, f"bndbox/{tag}") for tag in ("xmin", "ymin", "xmax", "ymax")]
        try:
            xmin, ymin, xmax, ymax = (float(v) for v in values)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            problems.append(Problem("error", file, f"<bndbox> xmin/ymin/xmax/ymax must be numbers, got {values}", where))
            continue
        objects.append(VOCObject(name, difficult == "1", (xmin - 1, ymin - 1, xmax, ymax), where))
    return (height, width), _text(root, "filename"), objects


def _discover_classes(root: Path) -> list[str]:
    """Sorted object names over *all* annotation files, so every split gets the same labels."""
    names: set[str] = set()
    for xml_path in sorted((root / "Annotations").glob("*.xml")):
        try:
            tree = ET.parse(xml_path)
        except ET.ParseError:
            continue  # reported when a split that uses it is read
        names.update(n.text.strip() for n in tree.getroot().findall("object/name") if n.text and n.text.strip())
    return sorted(names)


def read_voc(
    root: str | os.PathLike, split: str = "trainval", class_names: list[str] | tuple[str, ...] | None = None
) -> VOCIndex:
    """Read and validate one split of a VOC layout without raising on per-object problems.

    ``class_names`` (foreground, in label order) defaults to the 20 VOC classes when every
    object name is one of them, and otherwise to the sorted names found in all of
    ``Annotations/`` (pass it, or write ``root/classes.txt`` with one name per line, to fix
    the order).
    """
    root = Path(root)
    if not is_voc_root(root):
        raise FileNotFoundError(
            f"{root}: not a VOC layout (needs Annotations/, JPEGImages/ and ImageSets/Main/)"
        )
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file}: split file not found (available splits: {voc_splits(root)})")
    names = []
    for line in split_file.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            names.append(line.split()[0])
    names = list(dict.fromkeys(names))  # a name listed twice is one image (as split files of the layouts)
    problems: list[Problem] = []
    parsed = []
    for name in names:
        xml_path = root / "Annotations" / f"{name}.xml"
        found: list[Problem] = []  # this image's problems, tagged with it for skip_broken
        result = parse_voc_xml(xml_path, found)
        image_path = None
        if result is not None:
            hw, filename, objects = result
            candidates = ([filename] if filename else []) + [name + ext for ext in _IMAGE_EXTENSIONS]
            image_path = next((root / "JPEGImages" / c for c in candidates if (root / "JPEGImages" / c).is_file()), None)
            if image_path is None:
                found.append(
                    Problem("error", str(xml_path), f"image file not found: {root / 'JPEGImages' / (name + '.jpg')}",
                            missing_file=True)
                )
        problems += [replace(p, image=str(image_path or xml_path)) for p in found]
        if image_path is not None:
            parsed.append((name, xml_path, image_path, hw, objects))

    # Two XML files whose <filename> is one image: each holds part of its objects.
    repeated = repeated_images([image_path for _, _, image_path, _, _ in parsed])
    for positions in repeated:
        (_, first_xml, image_path, _, _), *others = (parsed[k] for k in positions)
        also = " and ".join(str(other[1]) for other in others)
        problems.append(
            Problem("error", str(first_xml), f"describes the image {image_path}, which {also} "
                    f"describe{'s' if len(others) == 1 else ''} too: an image has one list of objects: merge the files "
                    "into one and remove the others from the split list", image=str(image_path))
        )  # fmt: skip
    left_out = {k for positions in repeated for k in positions}
    parsed = [entry for k, entry in enumerate(parsed) if k not in left_out]

    if class_names is None:
        classes_file = root / "classes.txt"
        if classes_file.is_file():
            class_names = [c.strip() for c in classes_file.read_text(encoding="utf-8").splitlines() if c.strip()]
        else:
            found = {o.name for *_, objects in parsed for o in objects}
            class_names = list(VOC_CLASSES) if found <= set(VOC_CLASSES) else _discover_classes(root)
    class_names = list(class_names)
    label_of = {c: i for i, c in enumerate(class_names, start=1)}

    records: list[ImageRecord] = []
    image_names: list[str] = []
    for name, xml_path, image_path, hw, objects in parsed:
        file = str(xml_path)
        start = len(problems)
        boxes, labels, difficult = [], [], []
        for obj in objects:
            if obj.name not in label_of:
                problems.append(
                    Problem("error", file, f"unknown class {obj.name!r} (known: {', '.join(class_names)}); "
                            "pass class_names or add it to classes.txt", obj.where)
                )
                continue
            box = check_box(obj.box, hw, file, obj.where, problems)
            if box is None:
                continue
            boxes.append(box)
            labels.append(label_of[obj.name])
            difficult.append(obj.difficult)
        problems[start:] = [replace(p, image=str(image_path)) for p in problems[start:]]
        arrays = ImageRecord.empty_arrays(len(boxes))
        if boxes:
            arrays["boxes"] = np.asarray(boxes, dtype=np.float32)
            arrays["labels"] = np.asarray(labels, dtype=np.int64)
            arrays["difficult"] = np.asarray(difficult, dtype=bool)
        records.append(ImageRecord(image_id=len(records), path=image_path, height=hw[0], width=hw[1], **arrays))
        image_names.append(name)
    return VOCIndex(records, class_names, image_names, problems)


class VOCDetection(DetectionDataset):
    """One split of a Pascal VOC layout as a ``torch`` data set.

    Args:
        root: folder with ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/``
            (e.g. ``VOCdevkit/VOC2007``).
        split: name of a list in ``ImageSets/Main`` (``train``, ``val``, ``trainval``, ``test``).
        class_names: foreground class names in label order (see :func:`read_voc` for the default).
        train: training mode (see ``keep_difficult``).
        transforms: callable ``(image, target) -> (image, target)``.
        keep_difficult: whether ``difficult`` objects appear in ``__getitem__`` targets
            (flagged in ``target["difficult"]``). Default: kept for evaluation, left out for
            training (``not train``), as in Fast R-CNN's VOC training. Evaluation always sees
            them through :meth:`annotation`.
        skip_broken: decode every image now and leave out the unusable ones (one ``DataWarning``
            each) instead of refusing the data set.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "trainval",
        *,
        class_names: list[str] | tuple[str, ...] | None = None,
        train: bool = False,
        transforms: Transform | None = None,
        keep_difficult: bool | None = None,
        skip_broken: bool = False,
    ) -> None:
        index = read_voc(root, split, class_names)
        records = settle_problems(
            index.records,
            index.problems,
            skip_broken=skip_broken,
            hint=f"\n(`rcnn data check {root} --split {split}` lists every problem)",
        )
        kept = {id(r) for r in records}
        super().__init__(records, index.class_names, train=train, transforms=transforms)
        self.root = Path(root)
        self.split = split
        self.image_names = [n for n, r in zip(index.image_names, index.records) if id(r) in kept]
        self.keep_difficult = (not train) if keep_difficult is None else keep_difficult

    def _target_keep(self, record: ImageRecord) -> np.ndarray:
        keep = super()._target_keep(record)  # [N]
        if not self.keep_difficult:
            keep = keep & ~record.difficult
        return keep

    def _extra_target(self, record: ImageRecord, keep: np.ndarray) -> dict:
        return {"difficult": torch.from_numpy(record.difficult[keep])}  # [N]
