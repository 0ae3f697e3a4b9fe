"""YOLO txt labels (Ultralytics / Darknet layouts).

One ``.txt`` per image, one object per line, coordinates normalised to 0..1 by the image's
width and height (after EXIF orientation, as the tools that draw them see the image):

- ``class cx cy w h``: a box, centre and size -> pixels ``x1, y1, x2, y2``;
- ``class x1 y1 x2 y2 x3 y3 ...`` (3 or more points): a polygon (Ultralytics' segmentation
  format), kept as a COCO polygon segmentation; its box is the polygon's bounds.

``class`` is an index 0..K-1 into the class names; the library's labels are 1..K.

Layouts (the label file of ``.../images/.../x.jpg`` is ``.../labels/.../x.txt``, Ultralytics' rule;
an image without a label file is an image without objects):

- ``data.yaml`` (or ``dataset.yaml``, or the one ``.yaml`` with ``names``) with ``names`` (a list,
  or a mapping ``{0: name, ...}``) and optional ``path``, ``train``, ``val``, ``test`` (folders of
  images or ``.txt`` lists of image paths): the splits are those entries;
- ``images/`` + ``labels/`` without a YAML: ``images/train``, ``images/val``, ... are the splits
  when present; classes from ``classes.txt`` (or ``obj.names``) in the root or ``labels/``;
- one flat folder of images and ``.txt`` files with ``classes.txt`` (LabelImg's YOLO mode,
  Darknet).

Image keys are image paths below the data set folder (``images/`` left out) without the
extension: ``train/0001`` in the Ultralytics layout, the stem in a flat one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from rcnn.data.records import Problem, image_size
from rcnn.data.layouts import RawImage, RawObject, RawSet, list_images, read_class_list

__all__ = ["find_yolo_yaml", "is_yolo_folder", "read_yolo", "yolo_label_path"]

_YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml", "dataset.yml")
_CLASS_FILES = ("classes.txt", "obj.names", "classes.names")
# Normalised coordinates beyond this are pixels written by mistake, not a slight overhang.
_NORMALISED_LIMIT = 1.5


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML{where} ({getattr(exc, 'problem', None) or exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with 'names' (and 'train', 'val'), got {type(data).__name__}")
    return data


def find_yolo_yaml(folder: Path) -> Path | None:
    """The data set YAML of a YOLO folder: ``data.yaml`` or the like, or the one YAML with ``names``."""
    for name in _YAML_NAMES:
        if (folder / name).is_file():
            return folder / name
    with_names = []
    for candidate in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            text = candidate.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if any(line.startswith("names:") for line in text.splitlines()):
            with_names.append(candidate)
    return with_names[0] if len(with_names) == 1 else None


def _flat_labels(folder: Path) -> bool:
    """A flat folder: images and at least one ``.txt`` named like one of them, and a class list."""
    if not any((folder / name).is_file() for name in _CLASS_FILES):
        return False
    stems = {p.stem for p in list_images(folder)}
    return any(p.stem in stems for p in folder.glob("*.txt"))


def is_yolo_folder(path: Path) -> bool:
    """Whether ``path`` looks like one of the YOLO layouts of the module docstring."""
    if not path.is_dir():
        return False
    if find_yolo_yaml(path) is not None:
        return True
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return True
    return _flat_labels(path)


def yolo_label_path(image: Path) -> Path:
    """The label file of an image: the last ``images`` folder of its path becomes ``labels``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def _names(value: Any, file: Path) -> list[str]:
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        names = [str(v) for v in value]
    elif isinstance(value, dict):
        try:
            by_index = {int(k): str(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{file}: 'names' keys must be class indices 0, 1, ...; got {sorted(map(str, value))}") from None
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"{file}: 'names' indices must be 0..{len(by_index) - 1} without gaps, got {sorted(by_index)}")
        names = [by_index[i] for i in range(len(by_index))]
    else:
        raise ValueError(f"{file}: 'names' must be a list of class names or a mapping {{0: name, ...}}, got {value!r}")
    if not names:
        raise ValueError(f"{file}: 'names' is empty")
    if len(set(names)) != len(names):
        raise ValueError(f"{file}: class names {sorted({n for n in names if names.count(n) > 1})} appear twice in 'names'")
    return names


def _resolve(base: Path, entry: str) -> Path | None:
    """A ``train:`` / ``val:`` entry as a path; entries written for another folder (``../train/images``,
    as some exports write them) are tried below ``base`` too."""
    text = entry.replace("\\", "/")
    path = Path(text) if os.path.isabs(text) else base / text
    if path.exists():
        return path
    parts = [p for p in Path(text).parts if p not in ("..", ".", "/")]
    while parts:
        candidate = base.joinpath(*parts)
        if candidate.exists():
            return candidate
        parts = parts[1:]
    return None


def _split_images(base: Path, entry: Any, yaml_file: Path, split: str) -> list[Path]:
    """The images of one ``train`` / ``val`` / ``test`` entry: folders and ``.txt`` lists."""
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for item in entries:
        if not isinstance(item, str):
            raise ValueError(f"{yaml_file}: '{split}' must be a folder, a .txt list of images, or a list of them")
        path = _resolve(base, item)
        if path is None:
            raise FileNotFoundError(f"{yaml_file}: '{split}: {item}' not found (looked below {base})")
        if path.is_dir():
            images += list_images(path, recursive=True)
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            text = line.replace("\\", "/")
            image = path.parent / text.removeprefix("./") if text.startswith("./") else _resolve(base, text)
            if image is None or not image.is_file():
                raise FileNotFoundError(f"{path}: line {number}: image {line!r} not found")
            images.append(image)
    return images


def _key(image: Path, base: Path) -> str:
    try:
        relative = image.relative_to(base).with_suffix("")
    except ValueError:
        relative = Path(image.stem)
    parts = relative.parts
    if len(parts) > 1 and parts[0] == "images":
        parts = parts[1:]
    return "/".join(parts)


def _parse_labels(label_file: Path, image: Path, names: list[str], class_source: str) -> RawImage:
    """One image's label file -> its objects in pixels (the image header gives the size)."""
    file = str(label_file)
    raw = RawImage(key="", file=file, path=image)
    if not label_file.is_file():
        return raw  # no label file: an image without objects (Ultralytics' rule)
    try:
        text = label_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raw.problems.append(Problem("error", file, f"not UTF-8 text ({exc.reason}); is it really a YOLO label file?"))
        return raw
    lines = [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        return raw
    try:
        height, width = image_size(image)
    except (FileNotFoundError, ValueError) as exc:
        raw.problems.append(Problem("error", str(image), str(exc).removeprefix(f"{image}: ")))
        return raw
    raw.size = (height, width)
    for number, tokens in lines:
        where = f"line {number}"
        try:
            index = float(tokens[0])
            values = [float(v) for v in tokens[1:]]
        except ValueError:
            raw.problems.append(Problem("error", file, f"{' '.join(tokens)!r} is not numbers "
                                        "('class cx cy w h' or 'class x1 y1 x2 y2 ...')", where))
            continue
        if not (math.isfinite(index) and index == int(index) and 0 <= index < len(names)):
            raw.problems.append(
                Problem("error", file, f"unknown class index {tokens[0]} (the classes of {class_source} are "
                        f"0..{len(names) - 1}: {', '.join(names)})", where)
            )
            continue
        name = names[int(index)]
        where = f"line {number} ({name})"
        if not all(math.isfinite(v) for v in values):
            raw.problems.append(Problem("error", file, "has a NaN or infinite coordinate", where))
            continue
        if len(values) < 4 or len(values) % 2:
            raw.problems.append(
                Problem("error", file, f"{len(values)} coordinates: expected 'class cx cy w h' (4) or a polygon "
                        "'class x1 y1 x2 y2 x3 y3 ...' (an even number, at least 6)", where)
            )
            continue
        if max(abs(v) for v in values) > _NORMALISED_LIMIT:
            raw.problems.append(
                Problem("error", file, f"coordinate {max(values, key=abs)} is not normalised: YOLO labels give "
                        "positions as fractions 0..1 of the image width and height", where)
            )
            continue
        if len(values) == 4:
            cx, cy, w, h = values
            if w < 0 or h < 0:
                raw.problems.append(Problem("error", file, f"negative width or height in 'class cx cy w h' {values}", where))
                continue
            # Pixels rounded to 1e-6: below what the normalised decimals hold, and messages stay readable.
            box = (round((cx - w / 2) * width, 6), round((cy - h / 2) * height, 6),
                   round((cx + w / 2) * width, 6), round((cy + h / 2) * height, 6))
            raw.objects.append(RawObject(name, where, box=box))
        else:
            polygon = [round(v * (width if k % 2 == 0 else height), 6) for k, v in enumerate(values)]
            raw.objects.append(RawObject(name, where, polygons=[polygon]))
    return raw


def read_yolo(path: str | Path, *, class_names: list[str] | None = None) -> RawSet:
    """Parse a YOLO data set: a folder (or its ``data.yaml``) in one of the module's layouts."""
    path = Path(path)
    yaml_file = path if path.is_file() else find_yolo_yaml(path)
    folder = path.parent if path.is_file() else path
    problems: list[Problem] = []
    splits: dict[str, list[Path]] = {}
    names: list[str] | None = None
    class_source = ""
    base = folder
    if yaml_file is not None:
        data = _read_yaml(yaml_file)
        if "path" in data and data["path"]:
            given = Path(str(data["path"]))
            candidate = given if given.is_absolute() else yaml_file.parent / given
            if candidate.is_dir():
                base = candidate
            else:
                problems.append(
                    Problem("warning", str(yaml_file), f"'path: {data['path']}' is not a folder here; using "
                            f"{yaml_file.parent}, the folder of the file")
                )
        if "names" in data:
            names, class_source = _names(data["names"], yaml_file), f"{yaml_file} names"
            if "nc" in data and data["nc"] != len(names):
                raise ValueError(f"{yaml_file}: 'nc: {data['nc']}' but 'names' has {len(names)} classes")
        for split in ("train", "val", "test"):
            if data.get(split):
                splits[split] = _split_images(base, data[split], yaml_file, split)
    images_root = base / "images" if (base / "images").is_dir() else base
    if not splits and images_root != base:
        for sub in sorted(images_root.iterdir()):
            if sub.is_dir() and list_images(sub, recursive=True):
                splits[sub.name] = list_images(sub, recursive=True)
    if names is None:
        for candidate in [base / n for n in _CLASS_FILES] + [base / "labels" / n for n in _CLASS_FILES]:
            if candidate.is_file():
                names, class_source = read_class_list(candidate), str(candidate)
                break
    if class_names is not None:
        names, class_source = list(class_names), "class_names"
    if names is None:
        raise FileNotFoundError(
            f"{folder}: no YOLO class names: looked for data.yaml with 'names:', and for "
            f"{' / '.join(_CLASS_FILES)} in {base} and {base / 'labels'}; write one of them (one name per line, "
            "in class index order)"
        )

    if splits:
        all_images = sorted({p for images in splits.values() for p in images})
    else:
        all_images = list_images(images_root, recursive=images_root != base)
    if not all_images:
        raise FileNotFoundError(f"{images_root}: no images found for the YOLO labels")
    raw_images = []
    keys: dict[Path, str] = {}
    for image in all_images:
        raw = _parse_labels(yolo_label_path(image), image, names, class_source)
        raw.key = keys[image] = _key(image, base)
        raw_images.append(raw)
    seen: dict[str, Path] = {}
    for raw in raw_images:
        if raw.key in seen:
            raise ValueError(
                f"{raw.path}: has the same name as {seen[raw.key]} apart from the extension; rename one of them"
            )
        seen[raw.key] = raw.path  # type: ignore[assignment]
    labels_root = base / "labels"
    if labels_root.is_dir() and images_root != base:
        wanted = {yolo_label_path(image) for image in all_images}
        orphans = sorted(p for p in labels_root.rglob("*.txt") if p not in wanted and p.name not in _CLASS_FILES)
        if orphans:
            shown = ", ".join(str(p.relative_to(labels_root)) for p in orphans[:5]) + (" ..." if len(orphans) > 5 else "")
            problems.append(
                Problem("warning", str(labels_root), f"{len(orphans)} label file(s) without an image are not used ({shown})")
            )
    where = f"data.yaml {yaml_file}" if yaml_file else f"folder {folder}"
    return RawSet(
        format="yolo",
        root=folder,
        images=raw_images,
        description=f"YOLO txt ({where})",
        class_names=names,
        class_source=class_source,
        splits={split: [keys[p] for p in images] for split, images in splits.items()},
        problems=problems,
    )
