"""CVAT for images XML (``annotations.xml``, format 1.1, task / project / job exports).

::

    <annotations>
      <meta><task><labels><label><name>cat</name>...</label>...</labels></task></meta>
      <image id="0" name="IMG_1.jpg" width="640" height="480" subset="Train">
        <box label="cat" xtl="10.5" ytl="20" xbr="110" ybr="95.2" rotation="0" .../>
        <polygon label="dog" points="12.0,30.5;80,31;60,90" .../>
      </image>
    </annotations>

- ``box``: a box in continuous pixel coordinates (as CVAT's own COCO export writes it); a box with
  a ``rotation`` gives the axis-aligned bounds of the turned box, with a warning;
- ``polygon``: a polygon outline, kept as a COCO polygon segmentation (Mask R-CNN trains on
  it); its box is its bounds;
- ``ellipse`` (``cx``, ``cy``, ``rx``, ``ry``): its bounds and a 36-point polygon outline;
- ``polyline``, ``points``, ``mask``, ``cuboid`` and ``skeleton`` shapes: ignored, with a warning
  (``tag`` is a label of the whole image and is ignored silently).

Classes are the labels declared in ``<meta>`` (the task's, the project's or the job's), in that
order; a shape with another label is an error. Without declared labels, the sorted labels found.
Images (``name``, relative, may contain folders) are looked for in ``images/`` beside the XML
file (where CVAT's export puts them), beside it, and in ``images_dir``; ``width`` / ``height``
are the image size. The ``subset`` attribute of project exports gives the splits (lower case;
``Validation`` is ``val``). Image keys are the names without the extension.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from rcnn.data.records import Problem
from rcnn.data.labelme import circle_polygon
from rcnn.data.layouts import RawImage, RawObject, RawSet, find_image

__all__ = ["find_cvat_file", "is_cvat_file", "read_cvat"]

_IGNORED_SHAPES = ("polyline", "points", "mask", "cuboid", "skeleton")
_SUBSET_NAMES = {"validation": "val", "valid": "val"}


def is_cvat_file(path: Path) -> bool:
    """Whether ``path`` is an XML file whose root element is CVAT's ``<annotations>``."""
    if path.suffix.lower() != ".xml" or not path.is_file():
        return False
    try:
        for _, element in ET.iterparse(path, events=("start",)):
            return element.tag == "annotations"
    except ET.ParseError:
        with open(path, "rb") as f:
            return b"<annotations" in f.read(4096)
    return False


def find_cvat_file(folder: Path) -> Path | None:
    """``annotations.xml`` of a folder (or its one other CVAT XML file)."""
    if not folder.is_dir():
        return None
    if is_cvat_file(folder / "annotations.xml"):
        return folder / "annotations.xml"
    found = [p for p in sorted(folder.glob("*.xml")) if is_cvat_file(p)]
    return found[0] if len(found) == 1 else None


def _declared_labels(root: ET.Element) -> list[str] | None:
    meta = root.find("meta")
    if meta is None:
        return None
    names: list[str] = []
    for labels in meta.iter("labels"):
        for label in labels.findall("label"):
            name = (label.findtext("name") or "").strip()
            if name and label.findtext("type") != "tag" and name not in names:
                names.append(name)
    return names or None


def _number(element: ET.Element, key: str, where: str, file: str, problems: list[Problem]) -> float | None:
    try:
        value = float(element.get(key, ""))
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        problems.append(Problem("error", file, f"attribute {key}={element.get(key)!r} must be a number", where))
        return None
    return value


def _parse_shape(element: ET.Element, where: str, file: str, problems: list[Problem]) -> RawObject | None:
    label = (element.get("label") or "").strip()
    if not label:
        problems.append(Problem("error", file, "has no 'label' attribute", where))
        return None
    where = f"{where} ({label})"
    if element.tag == "box":
        values = [_number(element, k, where, file, problems) for k in ("xtl", "ytl", "xbr", "ybr")]
        if any(v is None for v in values):
            return None
        x1, y1, x2, y2 = values  # type: ignore[misc]
        angle = _number(element, "rotation", where, file, problems) if element.get("rotation") else 0.0
        if angle is None:
            return None
        if angle % 360:
            cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
            ex, ey = hw * c + hh * s, hw * s + hh * c
            x1, y1, x2, y2 = cx - ex, cy - ey, cx + ex, cy + ey
            problems.append(Problem("warning", file, f"box rotated by {angle:g}°: its axis-aligned bounds are used", where))
        return RawObject(label, where, box=(x1, y1, x2, y2))
    if element.tag == "polygon":
        text = element.get("points") or ""
        try:
            polygon = [float(v) for point in text.split(";") if point.strip() for v in point.split(",", 1)]
        except ValueError:
            polygon = None
        if polygon is None or len(polygon) % 2 or not all(math.isfinite(v) for v in polygon):
            problems.append(Problem("error", file, f"points {text[:60]!r} must be 'x,y;x,y;...'", where))
            return None
        return RawObject(label, where, polygons=[polygon])
    values = [_number(element, k, where, file, problems) for k in ("cx", "cy", "rx", "ry")]
    if any(v is None for v in values):
        return None
    cx, cy, rx, ry = values  # type: ignore[misc]
    angle = _number(element, "rotation", where, file, problems) if element.get("rotation") else 0.0
    if angle is None:
        return None
    return RawObject(label, where, polygons=[circle_polygon(cx, cy, rx, ry, math.radians(angle))])


def read_cvat(path: str | Path, *, images_dir: str | Path | None = None) -> RawSet:
    """Parse a CVAT for images XML file (or the folder with ``annotations.xml``)."""
    path = Path(path)
    xml_file = path if path.is_file() else find_cvat_file(path)
    if xml_file is None:
        raise FileNotFoundError(f"{path}: no CVAT annotations.xml (an XML file with <annotations> and <image> elements)")
    file = str(xml_file)
    try:
        root = ET.parse(xml_file).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{xml_file}: not valid XML ({exc})") from None
    if root.tag != "annotations":
        raise ValueError(f"{xml_file}: the root element is <{root.tag}>, not CVAT's <annotations>")
    if root.find("image") is None and root.find("track") is not None:
        raise ValueError(f"{xml_file}: a 'CVAT for video' export (<track> elements); export as 'CVAT for images'")
    class_names = _declared_labels(root)
    folders = [xml_file.parent / "images", xml_file.parent] + ([Path(images_dir)] if images_dir else [])
    folders = [f for f in folders if f.is_dir()] or [xml_file.parent]

    images: list[RawImage] = []
    splits: dict[str, list[str]] = {}
    seen: set[str] = set()
    for i, element in enumerate(root.findall("image")):
        name = element.get("name")
        if not name:
            raise ValueError(f"{xml_file}: <image> number {i} has no 'name' attribute")
        where = f"image {name!r}"
        key = os.path.splitext(name.replace("\\", "/"))[0]
        if key in seen:
            raise ValueError(f"{xml_file}: {where} appears twice")
        seen.add(key)
        raw = RawImage(key=key, file=file, path=None, where=where)
        raw.path = find_image(folders, name, Path(name.replace("\\", "/")).stem, "name", file, where, raw.problems)
        try:
            height, width = int(element.get("height", "")), int(element.get("width", ""))
        except ValueError:
            height = width = 0
        if height <= 0 or width <= 0:
            raw.problems.append(Problem("error", file, f"needs positive integer width and height, got "
                                        f"{element.get('width')!r} x {element.get('height')!r}", where))
        else:
            raw.size = (height, width)
        counts: dict[str, int] = {}
        for shape in element:
            if shape.tag == "tag":
                continue
            k = counts[shape.tag] = counts.get(shape.tag, -1) + 1
            shape_where = f"{where} {shape.tag} {k}"
            if shape.tag in _IGNORED_SHAPES:
                raw.problems.append(Problem("warning", file, f"a {shape.tag} outlines no box or polygon; ignored", shape_where))
                continue
            if shape.tag not in ("box", "polygon", "ellipse"):
                raw.problems.append(Problem("warning", file, f"unknown shape <{shape.tag}>; ignored", shape_where))
                continue
            obj = _parse_shape(shape, shape_where, file, raw.problems)
            if obj is not None:
                raw.objects.append(obj)
        subset = (element.get("subset") or "").strip().lower()
        if subset:
            splits.setdefault(_SUBSET_NAMES.get(subset, subset), []).append(key)
        images.append(raw)
    return RawSet(
        format="cvat",
        root=xml_file.parent,
        images=images,
        description=f"CVAT for images XML ({xml_file})",
        class_names=class_names,
        class_source=f"the labels of {xml_file} <meta>",
        splits=splits,
    )
