"""LabelMe JSON: one ``.json`` file per image, beside the images or in a folder of its own.

Each file has ``imagePath`` (the image, relative to the JSON file), ``imageHeight`` /
``imageWidth`` and ``shapes``: ``{"label", "points": [[x, y], ...], "shape_type", "group_id"}``.

- ``polygon`` (the default when ``shape_type`` is missing, as in old files): a polygon outline,
  kept as a COCO polygon segmentation (Mask R-CNN trains on it); its box is its bounds;
- ``rectangle``: a box from its two corners (any order);
- ``circle`` (centre and a point on the circle): its box, and a 36-point polygon outline;
- shapes with the same ``label`` and ``group_id`` are one object (LabelMe's way to outline an
  object in several parts), as ``labelme2coco`` reads them;
- ``point``, ``line``, ``linestrip``, ``points`` and ``mask`` shapes outline no object here:
  ignored, with a warning.

The image is ``imagePath`` (backslashes read as folder separators; an absolute path is the
annotator's machine, so only its file name is looked for beside the JSON), else the image named
like the JSON file (a warning says so). A file whose image exists only as the embedded
``imageData`` is an error: save the image beside it. Classes: ``classes.txt`` in the folder when
there is one, else the sorted labels of all files. Image keys are the JSON file stems.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rcnn.data.records import Problem
from rcnn.data.layouts import RawImage, RawObject, RawSet, find_image, read_class_list

__all__ = ["circle_polygon", "is_labelme_folder", "read_labelme"]

_IGNORED_SHAPES = ("point", "line", "linestrip", "points", "mask")
_CIRCLE_POINTS = 36
_PROBED_FILES = 5  # files looked into to recognise the layout


def circle_polygon(cx: float, cy: float, rx: float, ry: float, theta: float = 0.0) -> list[float]:
    """A closed polygon ``[x1, y1, ...]`` of 36 points on an ellipse (a circle when ``rx == ry``);
    with ``theta == 0`` its bounds are exactly the ellipse's."""
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    polygon = []
    for k in range(_CIRCLE_POINTS):
        a = 2 * math.pi * k / _CIRCLE_POINTS
        x, y = rx * math.cos(a), ry * math.sin(a)
        polygon += [cx + x * cos_t - y * sin_t, cy + x * sin_t + y * cos_t]
    return polygon


def _labelme_files(folder: Path) -> list[Path]:
    """The ``.json`` files of ``folder`` if one of the first few is a LabelMe file (a broken first
    file does not hide the layout; it is reported when read)."""
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.glob("*.json") if p.is_file() and not p.name.startswith("."))
    for candidate in files[:_PROBED_FILES]:
        try:
            head = candidate.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if '"shapes"' in head and '"imagePath"' in head:
            return files
    return []


def is_labelme_folder(path: Path) -> bool:
    """Whether ``path`` (or one folder inside it) holds LabelMe JSON files."""
    if not path.is_dir():
        return False
    return bool(_labelme_files(path)) or any(_labelme_files(s) for s in sorted(path.iterdir()) if s.is_dir())


def _points(value: Any) -> list[tuple[float, float]] | None:
    if not isinstance(value, list):
        return None
    points = []
    for point in value:
        if not (isinstance(point, list) and len(point) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point)):
            return None
        points.append((float(point[0]), float(point[1])))
    return points


def _parse_file(json_path: Path, folders: list[Path]) -> RawImage:
    file = str(json_path)
    raw = RawImage(key=json_path.stem, file=file, path=None)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raw.problems.append(Problem("error", file, f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"))
        return raw
    except UnicodeDecodeError as exc:
        raw.problems.append(Problem("error", file, f"not UTF-8 text ({exc.reason}); is it really a LabelMe file?"))
        return raw
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raw.problems.append(Problem("error", file, f"a LabelMe file needs a 'shapes' list (found: {found})"))
        return raw
    image_path = data.get("imagePath")
    if not isinstance(image_path, str) or not image_path:
        image_path = None
    found: list[Problem] = []
    raw.path = find_image(folders, image_path, json_path.stem, "imagePath", file, None, found)
    if raw.path is None and data.get("imageData"):
        found = [
            Problem("error", file, "the image is only embedded in 'imageData' (imagePath "
                    f"{image_path!r} names no file); save the image beside the JSON file", "imagePath",
                    missing_file=True)
        ]
    raw.problems += found
    height, width = data.get("imageHeight"), data.get("imageWidth")
    if height is not None or width is not None:
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
            raw.problems.append(
                Problem("error", file, f"imageHeight / imageWidth must be positive integers, got {height!r} x {width!r}",
                        "imageHeight")
            )
            return raw
        raw.size = (height, width)

    groups: dict[tuple[str, Any], RawObject] = {}
    for k, shape in enumerate(data["shapes"]):
        where = f"shapes[{k}]"
        if not isinstance(shape, dict):
            raw.problems.append(Problem("error", file, f"a shape must be an object, got {shape!r}", where))
            continue
        label = shape.get("label")
        if not isinstance(label, str) or not label.strip():
            raw.problems.append(Problem("error", file, f"needs a 'label' (the class name), got {label!r}", where))
            continue
        label = label.strip()
        where = f"shapes[{k}] ({label})"
        kind = shape.get("shape_type") or "polygon"
        if kind in _IGNORED_SHAPES:
            raw.problems.append(Problem("warning", file, f"shape_type {kind!r} outlines no object; ignored", where))
            continue
        points = _points(shape.get("points"))
        if points is None:
            raw.problems.append(Problem("error", file, "'points' must be a list of [x, y] numbers", where))
            continue
        if kind == "rectangle":
            if len(points) < 2:
                raw.problems.append(Problem("error", file, f"a rectangle needs 2 corner points, got {len(points)}", where))
                continue
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            obj = RawObject(label, where, box=(min(xs), min(ys), max(xs), max(ys)))
        elif kind == "circle":
            if len(points) != 2:
                raw.problems.append(Problem("error", file, f"a circle needs 2 points (centre, edge), got {len(points)}", where))
                continue
            (cx, cy), (ex, ey) = points
            r = math.hypot(ex - cx, ey - cy)
            obj = RawObject(label, where, polygons=[circle_polygon(cx, cy, r, r)])
        elif kind == "polygon":
            obj = RawObject(label, where, polygons=[[v for p in points for v in p]])
        else:
            raw.problems.append(Problem("error", file, f"unknown shape_type {kind!r} (polygon, rectangle, circle)", where))
            continue
        group = shape.get("group_id")
        if group is None:
            raw.objects.append(obj)
            continue
        if (label, group) not in groups:  # the parts of one object
            groups[(label, group)] = obj
            raw.objects.append(obj)
            continue
        whole = groups[(label, group)]
        parts = [_outline(whole), _outline(obj)]
        whole.polygons, whole.box = [p for part in parts for p in part], None
    return raw


def _outline(obj: RawObject) -> list[list[float]]:
    """An object's polygons; a box becomes its 4-corner polygon (to join a group of parts)."""
    if obj.polygons:
        return obj.polygons
    x1, y1, x2, y2 = obj.box  # type: ignore[misc]
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def read_labelme(path: str | Path, *, images_dir: str | Path | None = None) -> RawSet:
    """Parse a folder of LabelMe JSON files (or the folder with one such folder inside)."""
    path = Path(path)
    folder = path if _labelme_files(path) else next(
        (s for s in sorted(path.iterdir()) if s.is_dir() and _labelme_files(s)), None
    ) if path.is_dir() else None
    if folder is None:
        raise FileNotFoundError(f"{path}: no LabelMe .json files (with 'shapes' and 'imagePath') in it or in a folder inside it")
    folders = [folder] + ([Path(images_dir)] if images_dir else [])
    if (path / "images").is_dir() and path / "images" not in folders:
        folders.append(path / "images")  # json files in a folder of their own beside images/
    images = [_parse_file(json_path, folders) for json_path in _labelme_files(folder)]
    class_names = class_source = None
    for candidate in (path / "classes.txt", folder / "classes.txt"):
        if candidate.is_file():
            class_names, class_source = read_class_list(candidate), str(candidate)
            break
    return RawSet(
        format="labelme",
        root=path,
        images=images,
        description=f"LabelMe JSON (folder {folder})",
        class_names=class_names,
        class_source=class_source or "",
    )
