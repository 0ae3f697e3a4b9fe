"""``rcnn data convert``: write a data set (any format ``build_dataset`` reads) as COCO, VOC or YOLO.

What is written, for each split of the source (its own, ``all`` for a layout without splits, or
``train`` / ``val`` drawn with ``val_fraction``):

- ``coco``: ``OUT/annotations/instances_{split}.json`` and ``OUT/images/{split}/``: boxes as
  ``[x, y, width, height]``, categories with the source's ids (1..K for the other formats),
  polygon / RLE segmentations as they are, VOC ``difficult`` objects as ``iscrowd = 1`` (which
  COCO evaluation ignores, as VOC's does difficult ones);
- ``voc``: ``OUT/Annotations/*.xml``, ``OUT/JPEGImages/``, ``OUT/ImageSets/Main/{split}.txt`` and
  ``OUT/classes.txt`` (keeps the label order); boxes as VOC's 1-based inclusive pixels
  (``xmin = x1 + 1``), crowd objects as ``difficult``; masks are not written (VOC XML has none);
- ``yolo``: ``OUT/images/{split}/``, ``OUT/labels/{split}/*.txt`` and ``OUT/data.yaml`` (``names``,
  and ``train`` / ``val`` / ``test``); ``class cx cy w h`` normalised with 8 significant digits,
  or the polygon line of an image whose every object is one polygon bounded by its box
  (Ultralytics reads a file as all boxes or all polygons); crowd and difficult objects are left
  out, as Ultralytics' own converters do.

Box coordinates are written as the shortest decimals that give back the same float32 values, so a
round trip through any of the three gives the same boxes and classes (YOLO's to the precision
written). Images are copied (bytes unchanged, EXIF included) or, with ``link``, symlinked; an
image keeps its base name (whatever folder its annotation names, ``../`` or absolute: nothing is
written outside ``OUT``) unless two images share one (then ``_2``, ``_3`` ... are added).

The source is never written to: every split is read first, and an ``OUT`` that holds any file the
source is read from (an annotation file, an image, the folder given; compared as written and with
symbolic links resolved) is refused before anything is written, ``force`` or not. Written there,
the copies would replace the source's own files, and links would point at themselves.
"""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rcnn.data.reading import build_dataset, dataset_splits, read_raw, resolve_dataset
from rcnn.data.records import DetectionDataset, ImageRecord
from rcnn.data.layouts import RawSet
from rcnn.io.files import atomic_write, write_json, write_text

__all__ = ["CONVERT_FORMATS", "ConvertReport", "convert_dataset"]

CONVERT_FORMATS = ("coco", "voc", "yolo")
_YOLO_DIGITS = 8  # significant digits of normalised coordinates: 1e-3 px even on 10000-px images
_POLYGON_BOX_TOLERANCE = 1e-3  # px: a polygon stands in for its box only when its bounds are the box


@dataclass
class SplitWritten:
    """What was written for one split."""

    split: str
    images: int
    objects: int
    left_out: int = 0  # objects the format cannot hold (YOLO: crowd / difficult)
    polygons: int = 0  # objects written with their outline


@dataclass
class ConvertReport:
    """What :func:`convert_dataset` wrote."""

    out: Path
    format: str
    splits: list[SplitWritten] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    masks_dropped: int = 0  # segmentations the format cannot hold (VOC; YOLO where not polygons)

    def lines(self) -> list[str]:
        """The summary ``rcnn data convert`` prints."""
        n = len(self.class_names)
        out = [f"wrote {self.format.upper()} to {self.out} ({n} class{'es' if n != 1 else ''}: {', '.join(self.class_names)})"]
        for s in self.splits:
            extra = f", {s.polygons} as polygons" if self.format == "yolo" and s.polygons else ""
            left = f", {s.left_out} crowd/difficult objects left out" if s.left_out else ""
            out.append(f"  {s.split}: {s.images} images, {s.objects} objects{extra}{left}")
        if self.masks_dropped:
            out.append(f"  {self.masks_dropped} segmentation(s) not written ({self.format} cannot hold them)")
        return out


def _short(value: float) -> float:
    """The shortest decimal that is the same float32 as ``value``."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _text(value: float) -> str:
    number = _short(value)
    return str(int(number)) if number == int(number) else repr(number)


class _Names:
    """Unique output file names: an image's own, with ``_2``, ``_3`` ... added on a clash."""

    def __init__(self) -> None:
        self._by_path: dict[Path, str] = {}
        self._taken: set[str] = set()

    def __call__(self, path: Path) -> str:
        if path not in self._by_path:
            stem, n = path.stem, 1
            name = stem
            while name.lower() in self._taken:
                n += 1
                name = f"{stem}_{n}"
            self._taken.add(name.lower())
            self._by_path[path] = name
        return self._by_path[path]


def _place_image(src: Path, dst: Path, link: bool) -> None:
    """Copy (or symlink) an image, atomically; an existing identical link is left alone."""
    if link:
        target = src.resolve()
        if dst.is_symlink() and dst.resolve() == target:
            return

        def make(tmp: Path) -> None:
            tmp.unlink()
            os.symlink(target, tmp)

        atomic_write(dst, make)
    else:
        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def _coco_split(dataset: DetectionDataset, out: Path, split: str, names: _Names, link: bool) -> SplitWritten:
    images, annotations = [], []
    next_id = 1
    objects = 0
    for record in dataset.records:
        file_name = names(record.path) + record.path.suffix
        _place_image(record.path, out / "images" / split / file_name, link)
        images.append({"id": record.image_id, "file_name": file_name, "height": record.height, "width": record.width})
        for j, (box, label) in enumerate(zip(record.boxes.tolist(), record.labels.tolist())):
            x1, y1, x2, y2 = (_short(v) for v in box)
            ann: dict[str, Any] = {
                "id": record.ann_ids[j] if record.ann_ids else next_id,
                "image_id": record.image_id,
                "category_id": dataset.label_to_cat_id[label],
                "bbox": [x1, y1, round(x2 - x1, 6), round(y2 - y1, 6)],
                "area": float(record.areas[j]) if record.areas else (x2 - x1) * (y2 - y1),
                "iscrowd": int(record.iscrowd[j] or record.difficult[j]),
            }
            if record.segmentations is not None and record.segmentations[j] is not None:
                ann["segmentation"] = record.segmentations[j]
            annotations.append(ann)
            next_id += 1
            objects += 1
    categories = [
        {"id": dataset.label_to_cat_id[label], "name": dataset.class_names[label]} for label in range(1, dataset.num_classes)
    ]
    write_json(out / "annotations" / f"instances_{split}.json", {"images": images, "annotations": annotations, "categories": categories})
    return SplitWritten(split, len(images), objects)


def _voc_xml(record: ImageRecord, file_name: str, class_names: list[str]) -> str:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = file_name
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(record.width)
    ET.SubElement(size, "height").text = str(record.height)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for j, (box, label) in enumerate(zip(record.boxes.tolist(), record.labels.tolist())):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = class_names[label]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(int(record.difficult[j] or record.iscrowd[j]))
        bndbox = ET.SubElement(obj, "bndbox")
        x1, y1, x2, y2 = (_short(v) for v in box)
        # VOC pixels are 1-based and inclusive: the interval [x1, x2] is pixels x1 + 1 .. x2.
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bndbox, tag).text = _text(value)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _voc_split(dataset: DetectionDataset, out: Path, split: str, names: _Names, link: bool) -> tuple[SplitWritten, int]:
    listed, objects, dropped = [], 0, 0
    for record in dataset.records:
        name = names(record.path)
        file_name = name + record.path.suffix
        _place_image(record.path, out / "JPEGImages" / file_name, link)
        write_text(out / "Annotations" / f"{name}.xml", _voc_xml(record, file_name, dataset.class_names))
        listed.append(name)
        objects += len(record.labels)
        dropped += sum(s is not None for s in record.segmentations or [])
    write_text(out / "ImageSets" / "Main" / f"{split}.txt", "".join(f"{n}\n" for n in listed))
    return SplitWritten(split, len(listed), objects), dropped


def _yolo_number(value: float) -> str:
    return f"{value:.{_YOLO_DIGITS}g}"


def _polygon_lines(record: ImageRecord, keep: np.ndarray) -> list[list[float]] | None:
    """The kept objects' polygons when each is one polygon bounded by its box, else ``None``."""
    if record.segmentations is None:
        return None
    polygons = []
    for j in np.flatnonzero(keep):
        seg = record.segmentations[j]
        if not (isinstance(seg, list) and len(seg) == 1 and len(seg[0]) >= 6):
            return None
        xs, ys = seg[0][0::2], seg[0][1::2]
        bounds = np.array([min(xs), min(ys), max(xs), max(ys)])
        if np.abs(bounds - record.boxes[j]).max() > _POLYGON_BOX_TOLERANCE:
            return None
        polygons.append(seg[0])
    return polygons


def _yolo_split(dataset: DetectionDataset, out: Path, split: str, names: _Names, link: bool) -> tuple[SplitWritten, int]:
    written = SplitWritten(split, 0, 0)
    dropped = 0
    for record in dataset.records:
        name = names(record.path)
        _place_image(record.path, out / "images" / split / (name + record.path.suffix), link)
        keep = ~(record.iscrowd | record.difficult)  # [N]
        written.left_out += int((~keep).sum())
        polygons = _polygon_lines(record, keep) if keep.any() else None
        lines = []
        for k, j in enumerate(np.flatnonzero(keep)):
            label = int(record.labels[j]) - 1
            if polygons is not None:
                values = [v / (record.width if i % 2 == 0 else record.height) for i, v in enumerate(polygons[k])]
            else:
                x1, y1, x2, y2 = (float(v) for v in record.boxes[j])
                values = [(x1 + x2) / 2 / record.width, (y1 + y2) / 2 / record.height,
                          (x2 - x1) / record.width, (y2 - y1) / record.height]  # fmt: skip
                if record.segmentations is not None and record.segmentations[j] is not None:
                    dropped += 1
            lines.append(" ".join([str(label), *map(_yolo_number, values)]))
        write_text(out / "labels" / split / f"{name}.txt", "".join(f"{line}\n" for line in lines))
        written.images += 1
        written.objects += len(lines)
        written.polygons += len(lines) if polygons is not None else 0
    return written, dropped


def _source_files(
    source: str | os.PathLike | Mapping[str, Any],
    datasets: Sequence[tuple[str, DetectionDataset]],
    raw: RawSet | None,
    *,
    images_dir: str | os.PathLike | None,
    val_fraction: float | None,
) -> Iterator[Path]:
    """Every file (and folder given as the source) that ``source`` is read from: the path given, the
    annotation and split files of each converted split, every image a layout lists, every image
    read. Folders among them count with everything inside them."""
    if isinstance(source, Mapping):
        yield from (Path(source[key]) for key in ("root", "annotations", "images", "splits") if source.get(key))
    else:
        yield Path(source)
    for split, dataset in datasets:
        found = resolve_dataset(source, split, images_dir, val_fraction=val_fraction)
        if found.format == "coco":
            yield found.ann_file  # type: ignore[misc]
        elif found.format == "voc":
            root = found.root
            yield from (root / "ImageSets" / "Main" / f"{split}.txt", root / "classes.txt")  # type: ignore[operator]
            yield from (root / "Annotations" / f"{name}.xml" for name in getattr(dataset, "image_names", []))  # type: ignore[operator]
        else:
            layout = raw = raw if raw is not None else read_raw(found)  # one parse serves every split
            yield layout.root
            if found.options.get("splits"):
                yield found.options["splits"]
            for image in layout.images:
                yield Path(image.file)
                if image.path is not None:
                    yield image.path
        yield from (record.path for record in dataset.records)


def _refuse_the_source_inside(out: Path, files: Iterable[Path]) -> None:
    """``ValueError`` when a file the source is read from lies in ``out`` (or is ``out``): writing
    there would replace the source's own files, or with ``link`` turn them into links to themselves.

    Paths are compared as written (made absolute) and with symbolic links resolved, either side:
    ``out`` may be a link to the source's folder, the source may be reached through one, and an
    image may be a link (a ``--link`` conversion's output converted back)."""
    sep = os.sep
    outs = {os.path.normcase(os.path.abspath(out)), os.path.normcase(os.path.realpath(out))}
    prefixes = tuple(o.rstrip(sep) + sep for o in outs)
    real_parents: dict[str, str] = {}
    seen: set[str] = set()
    for file in files:
        absolute = os.path.abspath(file)
        if absolute in seen:
            continue
        seen.add(absolute)
        parent, name = os.path.split(absolute)
        if parent not in real_parents:
            real_parents[parent] = os.path.realpath(parent)
        real = os.path.realpath(absolute) if os.path.islink(absolute) else os.path.join(real_parents[parent], name)
        for form in {os.path.normcase(absolute), os.path.normcase(real)}:
            if form in outs or form.startswith(prefixes):
                raise ValueError(
                    f"{out}: the output folder holds {file}, which the source is read from; converting into it would "
                    "overwrite the source's own files (with --link, turn them into links to themselves), even with "
                    "--force: choose an output folder outside the source"
                )


def convert_dataset(
    source: str | os.PathLike | Mapping[str, Any],
    out: str | os.PathLike,
    to: str,
    *,
    splits: Sequence[str] | None = None,
    link: bool = False,
    images_dir: str | os.PathLike | None = None,
    val_fraction: float | None = None,
    split_seed: int = 0,
    skip_broken: bool = False,
    force: bool = False,
) -> ConvertReport:
    """Write ``source`` (every split, or ``splits``) to ``out`` in the format ``to`` (module docstring).

    The source is read and validated as ``build_dataset`` reads it (``skip_broken`` likewise), every
    split before anything is written. ``out`` must be empty or new unless ``force``, and must never
    hold a file the source is read from (an annotation file, an image, the folder given): that is
    refused, ``force`` or not, before anything is written.
    """
    if to not in CONVERT_FORMATS:
        raise ValueError(f"unknown output format {to!r} (one of {', '.join(CONVERT_FORMATS)})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; choose a new folder for the output")
    if splits:
        chosen, raw = list(splits), None
    else:
        chosen, raw = dataset_splits(source, images_dir=images_dir, val_fraction=val_fraction)
    datasets = []
    for split in chosen:
        dataset = build_dataset(
            source, split, images_dir=images_dir, val_fraction=val_fraction, split_seed=split_seed, skip_broken=skip_broken
        )
        if datasets and dataset.class_names != datasets[0][1].class_names:
            raise ValueError(f"{source}: split {split!r} has other classes than the first split; convert it on its own")
        datasets.append((split, dataset))
    _refuse_the_source_inside(out, _source_files(source, datasets, raw, images_dir=images_dir, val_fraction=val_fraction))
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"{out}: exists and is not empty; choose a new folder, or pass --force to write into it")
    report = ConvertReport(out, to)
    names = _Names()
    written_splits = []
    for split, dataset in datasets:
        report.class_names = dataset.class_names[1:]
        split_name = split or "all"  # a COCO file's own split is "" when named after nothing
        if to == "coco":
            report.splits.append(_coco_split(dataset, out, split_name, names, link))
        elif to == "voc":
            written, dropped = _voc_split(dataset, out, split_name, names, link)
            report.splits.append(written)
            report.masks_dropped += dropped
        else:
            written, dropped = _yolo_split(dataset, out, split_name, names, link)
            report.splits.append(written)
            report.masks_dropped += dropped
        written_splits.append(split_name)
    if to == "voc":
        write_text(out / "classes.txt", "".join(f"{n}\n" for n in report.class_names))
    if to == "yolo":
        data: dict[str, Any] = {s: f"images/{s}" for s in written_splits if s in ("train", "val", "test")}
        data["nc"] = len(report.class_names)
        data["names"] = dict(enumerate(report.class_names))
        write_text(out / "data.yaml", yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return report
