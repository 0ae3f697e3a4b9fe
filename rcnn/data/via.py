"""VIA JSON: the VGG Image Annotator's (1.x and 2.x) project files and JSON exports.

One ``.json`` for all images: a project file holds ``_via_img_metadata`` (and the attribute
declarations ``_via_attributes``); the "export annotations as json" file is that mapping alone.
Each entry has ``filename`` and ``regions`` (a list; a mapping ``{"0": ..., "1": ...}`` in VIA 1),
each region ``shape_attributes`` and ``region_attributes``:

- ``polygon`` (``all_points_x``, ``all_points_y``): a polygon outline, kept as a COCO polygon
  segmentation (Mask R-CNN trains on it); its box is its bounds;
- ``rect`` (``x``, ``y``, ``width``, ``height``): a box;
- ``circle`` (``cx``, ``cy``, ``r``) and ``ellipse`` (``cx``, ``cy``, ``rx``, ``ry``, ``theta``): their
  bounds and a 36-point polygon outline;
- ``point`` and ``polyline`` regions outline no object: ignored, with a warning.

The class of a region is the value of one region attribute: the one named by
``class_attribute`` (spec key ``"class_attribute"``), else the first attribute whose values are
all text that is not a number (attributes declared with options, dropdown / radio / checkbox,
first, then in the order they appear; text that differs in every region, a note or an id,
only when nothing else qualifies). When that attribute is declared with options, the
options are the class list, in their order; otherwise the classes are the sorted values found.

Images are looked for, by ``filename``, beside the JSON file, in the project's default path
(``_via_settings.core.default_filepath``), in ``images_dir`` and in an ``images/`` folder beside
the JSON file; VIA stores no image size, so it is read from the image header. Image keys are
the file names without the extension. VIA 3 projects are a different format: export them as
COCO from VIA and read that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rcnn.data.records import Problem
from rcnn.data.labelme import circle_polygon
from rcnn.data.layouts import RawImage, RawObject, RawSet, find_image

__all__ = ["find_via_file", "is_via_file", "read_via"]

_OPTION_TYPES = ("dropdown", "radio", "checkbox")
_IGNORED_SHAPES = ("point", "polyline")


def is_via_file(path: Path) -> bool:
    """Whether ``path`` is a VIA 1/2 JSON file (by the keys near its start; the file is not parsed)."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if b'"_via_img_metadata"' in head or b'"_via_settings"' in head:
        return True
    return b'"regions"' in head and b'"filename"' in head and b'"shapes"' not in head


def find_via_file(folder: Path) -> Path | None:
    """The VIA JSON file of a folder (``ValueError`` when there are several)."""
    if not folder.is_dir():
        return None
    found = [p for p in sorted(folder.glob("*.json")) if is_via_file(p)]
    if len(found) > 1:
        raise ValueError(
            f"{folder}: several VIA JSON files ({', '.join(p.name for p in found)}); give the one to read as the path"
        )
    return found[0] if found else None


def _load(path: Path) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """``(entries, declared region attributes, default image path)`` of a VIA file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason}); is it really a VIA file?") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a VIA JSON object, got a {type(data).__name__}")
    if {"project", "file", "metadata"} <= data.keys():
        raise ValueError(f"{path}: a VIA 3 project, which is not read; export it as COCO from VIA and read that file")
    declared: dict[str, Any] = {}
    default_path = None
    if "_via_img_metadata" in data:
        entries = data["_via_img_metadata"]
        attributes = data.get("_via_attributes")
        if isinstance(attributes, dict) and isinstance(attributes.get("region"), dict):
            declared = attributes["region"]
        settings = data.get("_via_settings")
        if isinstance(settings, dict) and isinstance(settings.get("core"), dict):
            default_path = settings["core"].get("default_filepath") or None
    else:
        entries = data
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: '_via_img_metadata' must map image keys to entries, got a {type(entries).__name__}")
    return entries, declared, default_path if isinstance(default_path, str) else None


def _regions(entry: dict[str, Any]) -> list[Any] | None:
    regions = entry.get("regions")
    if isinstance(regions, dict):  # VIA 1: {"0": region, "1": region}
        return [regions[k] for k in sorted(regions, key=lambda k: (len(k), k))]
    return regions if isinstance(regions, list) else None


def _class_value(value: Any) -> str | None:
    """A region attribute's value as a class name, or ``None`` when it is not one."""
    if isinstance(value, dict):  # checkbox: {"option": true, ...}
        chosen = [k for k, v in value.items() if v]
        return chosen[0].strip() if len(chosen) == 1 and chosen[0].strip() else None
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        float(value)
    except ValueError:
        return value.strip()
    return None  # a number: a count, a score, an id; not a class


def _choose_attribute(file: Path, entries: dict[str, Any], declared: dict[str, Any]) -> str:
    """The region attribute that holds the class (module docstring)."""
    values: dict[str, list[Any]] = {}
    for entry in entries.values():
        for region in (_regions(entry) or []) if isinstance(entry, dict) else []:
            attributes = region.get("region_attributes") if isinstance(region, dict) else None
            for name, value in (attributes or {}).items() if isinstance(attributes, dict) else []:
                values.setdefault(name, []).append(value)
    with_options = [n for n, d in declared.items() if isinstance(d, dict) and d.get("type") in _OPTION_TYPES]
    order = list(dict.fromkeys([*with_options, *declared, *values]))
    candidates = []
    for position, name in enumerate(order):
        found = values.get(name, [])
        names = [_class_value(v) for v in found]
        if found and all(n is not None for n in names):
            # Text that differs in every region is a note or an id, not a class: it comes last.
            unique_per_region = len(found) > 1 and len(set(names)) == len(found)
            candidates.append((unique_per_region, position, name))
    if candidates:
        return min(candidates)[2]
    shown = ", ".join(order) or "none"
    raise ValueError(
        f"{file}: no region attribute holds class names (region attributes: {shown}); give the class to every "
        "region in one text, dropdown or radio attribute, or name it with class_attribute"
    )


def _shape(shape: Any, where: str, file: str, problems: list[Problem]) -> dict[str, Any] | None:
    """The shape's box or polygons (``RawObject`` keyword arguments), or ``None`` (a problem says why)."""
    if not isinstance(shape, dict):
        problems.append(Problem("error", file, "needs 'shape_attributes' with a 'name'", where))
        return None
    kind = shape.get("name")

    def numbers(*keys: str) -> list[float] | None:
        got = [shape.get(k) for k in keys]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in got):
            return [float(v) for v in got]
        problems.append(Problem("error", file, f"shape_attributes {', '.join(keys)} must be numbers, got {got}", where))
        return None

    if kind == "rect":
        values = numbers("x", "y", "width", "height")
        if values is None:
            return None
        x, y, w, h = values
        if w < 0 or h < 0:
            problems.append(Problem("error", file, f"rect has a negative width or height: {values}", where))
            return None
        return {"box": (x, y, x + w, y + h)}
    if kind == "polygon":
        xs, ys = shape.get("all_points_x"), shape.get("all_points_y")
        if not (isinstance(xs, list) and isinstance(ys, list) and len(xs) == len(ys)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in [*xs, *ys])):
            problems.append(Problem("error", file, "polygon all_points_x / all_points_y must be lists of numbers "
                                    "of the same length", where))
            return None
        return {"polygons": [[float(v) for xy in zip(xs, ys) for v in xy]]}
    if kind == "circle":
        values = numbers("cx", "cy", "r")
        return None if values is None else {"polygons": [circle_polygon(values[0], values[1], values[2], values[2])]}
    if kind == "ellipse":
        values = numbers("cx", "cy", "rx", "ry")
        if values is None:
            return None
        theta = shape.get("theta", 0.0)
        theta = float(theta) if isinstance(theta, (int, float)) and not isinstance(theta, bool) else 0.0
        return {"polygons": [circle_polygon(*values, theta=theta)]}
    if kind in _IGNORED_SHAPES:
        problems.append(Problem("warning", file, f"a {kind} region outlines no object; ignored", where))
        return None
    problems.append(Problem("error", file, f"unknown region shape {kind!r} (polygon, rect, circle, ellipse)", where))
    return None


def read_via(
    path: str | Path, *, class_attribute: str | None = None, images_dir: str | Path | None = None
) -> RawSet:
    """Parse a VIA 1/2 JSON file (or the folder that holds one); see the module docstring."""
    path = Path(path)
    json_file = path if path.is_file() else find_via_file(path)
    if json_file is None:
        raise FileNotFoundError(f"{path}: no VIA JSON file (with '_via_img_metadata', or entries with 'regions')")
    entries, declared, default_path = _load(json_file)
    file = str(json_file)
    attribute = class_attribute or _choose_attribute(json_file, entries, declared)
    class_names = None
    options = declared.get(attribute, {}).get("options") if isinstance(declared.get(attribute), dict) else None
    if isinstance(options, dict) and options:
        class_names = [str(k) for k in options]

    folders = [json_file.parent]
    if default_path and not default_path.startswith(("http://", "https://")):
        default = Path(default_path) if os.path.isabs(default_path) else json_file.parent / default_path
        if default.is_dir():
            folders.append(default)
    if images_dir:
        folders.append(Path(images_dir))
    if (json_file.parent / "images").is_dir():
        folders.append(json_file.parent / "images")

    images: list[RawImage] = []
    seen: set[str] = set()
    for entry_key, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) or not entry["filename"]:
            raise ValueError(f"{json_file}: entry {entry_key!r} needs a 'filename' and 'regions'")
        filename = entry["filename"]
        where = f"image {filename!r}"
        name = filename.replace("\\", "/")
        if os.path.isabs(name) or name[1:3] == ":/" or name.startswith(("http://", "https://")):
            name = name.rsplit("/", 1)[-1]  # another machine's path: the file name is what is left
        key = os.path.splitext(name)[0]
        if key in seen:
            raise ValueError(f"{json_file}: {where} appears twice (two entries for one image file)")
        seen.add(key)
        raw = RawImage(key=key, file=file, path=None, where=where)
        if filename.startswith(("http://", "https://")):
            raw.problems.append(Problem("error", file, f"the image is a web address ({filename}); download the images "
                                        "and give their file names", where, missing_file=True))
            images.append(raw)
            continue
        raw.path = find_image(folders, filename, Path(filename.replace("\\", "/")).stem, "filename", file, where,
                              raw.problems)
        regions = _regions(entry)
        if regions is None:
            raw.problems.append(Problem("error", file, "'regions' must be a list of regions", where))
            images.append(raw)
            continue
        for k, region in enumerate(regions):
            region_where = f"{where} region {k}"
            if not isinstance(region, dict):
                raw.problems.append(Problem("error", file, f"a region must be an object, got {region!r}", region_where))
                continue
            attributes = region.get("region_attributes")
            value = attributes.get(attribute) if isinstance(attributes, dict) else None
            name = _class_value(value)
            if name is None:
                message = (f"has no class: region attribute {attribute!r} is missing" if value is None
                           else f"region attribute {attribute!r} = {value!r} is not a class name")
                raw.problems.append(Problem("error", file, message, region_where))
                continue
            region_where = f"{region_where} ({name})"
            shape = _shape(region.get("shape_attributes"), region_where, file, raw.problems)
            if shape is not None:
                raw.objects.append(RawObject(name, region_where, **shape))
        images.append(raw)
    return RawSet(
        format="via",
        root=json_file.parent,
        images=images,
        description=f"VIA JSON ({json_file}, class attribute {attribute!r})",
        class_names=class_names,
        class_source=f"the options of region attribute {attribute!r} in {json_file}",
    )
