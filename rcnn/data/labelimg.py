"""LabelImg folders: Pascal VOC XML files without VOC's folder names or split files.

LabelImg (and other tools that write VOC XML) saves one ``.xml`` per image, either beside the
images in one folder or in a folder of its own next to the images' folder, with any names::

    photos/IMG_0001.jpg  photos/IMG_0001.xml ...            (one folder)
    raccoon/images/raccoon-1.jpg  raccoon/annotations/raccoon-1.xml ...   (two sibling folders)

The XML is read as the VOC reader reads it (:func:`rcnn.data.voc.parse_voc_xml`: 1-based
inclusive pixel boxes, ``<difficult>``). The image is the XML's ``<filename>`` in the images
folder, never the annotator's absolute ``<path>``; when ``<filename>`` is missing or names no
file there, the image named like the XML file (any image extension) is used and a warning says
so. The images folder of the two-folder layout is, in order: the one given, the sibling folder
named by the XMLs' ``<folder>``, a sibling named ``images`` / ``JPEGImages`` / ``imgs`` /
``img``, or the only sibling folder with images. Classes: ``classes.txt`` in the root or the
annotations folder (one name per line, in label order) when there is one, else the sorted
object names of all the files. Image keys (what split files list) are the XML file stems.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from rcnn.data.records import Problem
from rcnn.data.layouts import RawImage, RawObject, RawSet, find_image, list_images, read_class_list
from rcnn.data.voc import parse_voc_xml

__all__ = ["find_labelimg_folders", "is_labelimg_folder", "read_labelimg"]

# Names of the images folder beside an annotations folder, in order of preference (lower case).
_IMAGE_FOLDER_NAMES = ("images", "jpegimages", "imgs", "img", "pictures", "photos")
_ANNOTATION_FOLDER_NAMES = ("annotations", "annotation", "xml", "xmls", "labels")
_PROBED_FILES = 5  # files looked into to recognise the layout


def _is_voc_xml(path: Path) -> bool:
    try:
        for _, element in ET.iterparse(path, events=("start",)):
            return element.tag == "annotation"
    except ET.ParseError:
        return b"<annotation" in path.read_bytes()[:4096]
    return False


def _voc_xml_files(folder: Path) -> list[Path]:
    """The ``.xml`` files of ``folder`` if one of the first few is a VOC ``<annotation>`` file (a
    broken first file does not hide the layout; it is reported when read)."""
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.glob("*.xml") if p.is_file() and not p.name.startswith("."))
    return files if any(_is_voc_xml(p) for p in files[:_PROBED_FILES]) else []


def is_labelimg_folder(path: Path) -> bool:
    """Whether ``path`` holds VOC XML files, or has one subfolder that does."""
    if not path.is_dir():
        return False
    return bool(_voc_xml_files(path)) or any(_voc_xml_files(sub) for sub in sorted(path.iterdir()) if sub.is_dir())


def _annotation_folder(path: Path) -> Path:
    if _voc_xml_files(path):
        return path
    found = [sub for sub in sorted(path.iterdir()) if sub.is_dir() and _voc_xml_files(sub)]
    if len(found) == 1:
        return found[0]
    preferred = [sub for sub in found if sub.name.lower() in _ANNOTATION_FOLDER_NAMES]
    if len(preferred) == 1:
        return preferred[0]
    if not found:
        raise FileNotFoundError(f"{path}: no VOC / LabelImg .xml annotation files in it or in a folder inside it")
    raise ValueError(
        f"{path}: several folders hold VOC XML files ({', '.join(s.name for s in found)}); name the one to read: "
        "{'format': 'labelimg', 'annotations': DIR, 'images': DIR}"
    )


def _images_folder(annotations: Path, xml_files: list[Path]) -> Path:
    if list_images(annotations):  # one folder
        return annotations
    parent = annotations.parent
    siblings = [s for s in sorted(parent.iterdir()) if s.is_dir() and s != annotations]
    folders: Counter[str] = Counter()
    for xml_path in xml_files[:20]:  # the tool writes the same <folder> into every file
        try:
            folder = ET.parse(xml_path).getroot().findtext("folder")
        except ET.ParseError:
            continue
        if folder and folder.strip():
            folders[folder.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]] += 1
    for name, _ in folders.most_common():
        for sibling in siblings:
            if sibling.name == name and list_images(sibling):
                return sibling
    for wanted in _IMAGE_FOLDER_NAMES:
        for sibling in siblings:
            if sibling.name.lower() == wanted and list_images(sibling):
                return sibling
    with_images = [s for s in siblings if list_images(s)]
    if len(with_images) == 1:
        return with_images[0]
    if with_images:
        raise ValueError(
            f"{parent}: several folders beside {annotations.name}/ hold images "
            f"({', '.join(s.name for s in with_images)}); name the one to read: "
            "{'format': 'labelimg', 'annotations': DIR, 'images': DIR}"
        )
    raise FileNotFoundError(
        f"{annotations}: no images beside the XML files, and no folder of images next to {annotations.name}/"
    )


def find_labelimg_folders(
    path: Path, annotations_dir: Path | None = None, images_dir: Path | None = None
) -> tuple[Path, Path, Path]:
    """``(root, annotations folder, images folder)`` of a LabelImg layout (module docstring).

    ``root`` is where split files go: the folder given, or the parent of the two folders when
    the annotations folder itself was given.
    """
    annotations = Path(annotations_dir) if annotations_dir else _annotation_folder(path)
    xml_files = _voc_xml_files(annotations)
    if not xml_files:
        raise FileNotFoundError(f"{annotations}: no VOC / LabelImg .xml annotation files")
    images = Path(images_dir) if images_dir else _images_folder(annotations, xml_files)
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: images folder not found (for {annotations})")
    root = annotations.parent if path == annotations and images != annotations else path
    return root, annotations, images


def read_labelimg(
    path: str | Path, *, annotations_dir: str | Path | None = None, images_dir: str | Path | None = None
) -> RawSet:
    """Parse a LabelImg folder (one folder, or two siblings; see the module docstring)."""
    root, annotations, images = find_labelimg_folders(
        Path(path), Path(annotations_dir) if annotations_dir else None, Path(images_dir) if images_dir else None
    )
    raw_images: list[RawImage] = []
    used: set[Path] = set()
    for xml_path in _voc_xml_files(annotations):
        found: list[Problem] = []
        parsed = parse_voc_xml(xml_path, found)
        file = str(xml_path)
        if parsed is None:
            raw_images.append(RawImage(xml_path.stem, file, None, problems=found))
            continue
        hw, filename, objects = parsed
        image_path = find_image([images], filename, xml_path.stem, "<filename>", file, None, found)
        if image_path is not None:
            used.add(image_path)
        raw_images.append(
            RawImage(
                key=xml_path.stem,
                file=file,
                path=image_path,
                size=hw,
                objects=[RawObject(o.name, o.where, box=o.box, difficult=o.difficult) for o in objects],
                problems=found,
            )
        )
    problems: list[Problem] = []
    stems = {image.key for image in raw_images}  # an image whose XML is broken is reported with it
    unused = [p.name for p in list_images(images) if p not in used and p.stem not in stems]
    if unused:
        shown = ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else "")
        problems.append(
            Problem("warning", str(images), f"{len(unused)} image(s) without an annotation file are not used "
                    f"({shown}); LabelImg writes an XML for each image you save, also one without boxes")
        )
    class_names = class_source = None
    for candidate in (root / "classes.txt", annotations / "classes.txt"):
        if candidate.is_file():
            class_names, class_source = read_class_list(candidate), str(candidate)
            break
    where = f"annotations {annotations}, images {images}" if annotations != images else f"folder {annotations}"
    return RawSet(
        format="labelimg",
        root=root,
        images=raw_images,
        description=f"LabelImg / VOC XML ({where})",
        class_names=class_names,
        class_source=class_source or "",
        problems=problems,
    )
