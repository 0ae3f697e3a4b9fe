"""Hand-written ground truth, written out in each annotation-tool layout and as COCO.

The writers here follow each tool's own file format (as the tools write them), without using
the library, so that the readers can be compared with the COCO reader on the same objects.
Coordinates are continuous pixels ``x1, y1, x2, y2`` of the image *as displayed* (after EXIF
orientation), which is what every tool stores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["cat", "dog"]  # label 1, 2: also the sorted order, so discovered and declared agree


@dataclass
class Obj:
    name: str
    box: tuple[float, float, float, float] | None = None
    polygon: list[float] | None = None  # [x1, y1, x2, y2, ...]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        if self.polygon is None:
            return self.box  # type: ignore[return-value]
        xs, ys = self.polygon[0::2], self.polygon[1::2]
        return (min(xs), min(ys), max(xs), max(ys))


@dataclass
class Img:
    file: str  # file name, e.g. "a.jpg"
    height: int  # as displayed
    width: int
    objects: list[Obj] = field(default_factory=list)
    orientation: int = 1  # EXIF orientation tag written into the file

    @property
    def stem(self) -> str:
        return Path(self.file).stem


def mixed_set() -> list[Img]:
    """Boxes and polygons, two classes, an image without objects, a JPEG and a PNG."""
    return [
        Img("a.jpg", 48, 64, [Obj("cat", box=(4, 6, 30, 40)), Obj("dog", polygon=[34, 4, 60, 8, 50, 40, 38, 30])]),
        Img("b.png", 56, 40, [Obj("dog", box=(2, 3, 20, 31)), Obj("dog", box=(21, 10, 39, 50))]),
        Img("c.jpg", 48, 64, []),
    ]


def polygon_set() -> list[Img]:
    """Every object outlined (what Mask R-CNN needs)."""
    return [
        Img("a.jpg", 48, 64, [Obj("cat", polygon=[4, 6, 30, 6, 30, 40, 10, 36]), Obj("dog", polygon=[34, 4, 60, 8, 50, 40])]),
        Img("b.png", 56, 40, [Obj("dog", polygon=[2, 3, 20, 3, 12, 31])]),
    ]


def make_image(path: Path, image: Img) -> None:
    """Write a noisy RGB image whose *displayed* size is ``image.height x image.width``; with an
    orientation of 5..8 the stored pixels are ``width x height`` and the tag turns them."""
    rng = np.random.default_rng(len(image.file) * 7919 + image.height)
    stored = (image.width, image.height) if image.orientation >= 5 else (image.height, image.width)
    pixels = rng.integers(0, 256, size=(*stored, 3), dtype=np.uint8)
    pixels[: stored[0] // 3, : stored[1] // 4] = (250, 20, 20)  # a red corner: shows which way is up
    picture = Image.fromarray(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = image.orientation
        picture.save(path, exif=exif, quality=95)
    else:
        picture.save(path, quality=95)  # (PNG ignores the quality)


def write_images(folder: Path, images: list[Img]) -> None:
    for image in images:
        make_image(folder / image.file, image)


def write_coco(root: Path, images: list[Img], *, masks: bool, copy_images: bool = True,
               name: str = "instances.json") -> Path:
    """``root/{name}`` + ``root/images/``: polygons as segmentations when ``masks``."""
    if copy_images:
        write_images(root / "images", images)
    coco_images, anns = [], []
    for i, image in enumerate(images, start=1):
        coco_images.append({"id": i, "file_name": image.file, "height": image.height, "width": image.width})
        for obj in image.objects:
            x1, y1, x2, y2 = obj.bounds
            ann = {"id": len(anns) + 1, "image_id": i, "category_id": CLASSES.index(obj.name) + 1,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0}
            if masks and obj.polygon is not None:
                ann["segmentation"] = [list(map(float, obj.polygon))]
            anns.append(ann)
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]
    path = root / name
    path.write_text(json.dumps({"images": coco_images, "annotations": anns, "categories": categories}))
    return path


def voc_xml(image: Img, folder: str) -> str:
    """A LabelImg XML file (VOC boxes: 1-based inclusive, so xmin = x1 + 1); polygons as boxes."""
    objects = ""
    for obj in image.objects:
        x1, y1, x2, y2 = obj.bounds
        objects += (
            f"<object><name>{obj.name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
            f"<bndbox><xmin>{x1 + 1:g}</xmin><ymin>{y1 + 1:g}</ymin><xmax>{x2:g}</xmax><ymax>{y2:g}</ymax></bndbox>"
            "</object>"
        )
    return (
        f'<annotation verified="yes"><folder>{folder}</folder><filename>{image.file}</filename>'
        f"<path>C:\\Users\\someone\\Desktop\\{folder}\\{image.file}</path><source><database>Unknown</database></source>"
        f"<size><width>{image.width}</width><height>{image.height}</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{objects}</annotation>"
    )


def write_labelimg(root: Path, images: list[Img], *, images_folder: str | None, xml_folder: str | None) -> None:
    """One folder (both ``None``) or two sibling folders of the given names."""
    image_dir = root / images_folder if images_folder else root
    xml_dir = root / xml_folder if xml_folder else root
    write_images(image_dir, images)
    xml_dir.mkdir(parents=True, exist_ok=True)
    for image in images:
        (xml_dir / f"{image.stem}.xml").write_text(voc_xml(image, image_dir.name))


def yolo_lines(image: Img, *, polygons: bool) -> str:
    lines = []
    for obj in image.objects:
        k = CLASSES.index(obj.name)
        if polygons and obj.polygon is not None:
            values = [v / (image.width if i % 2 == 0 else image.height) for i, v in enumerate(obj.polygon)]
        else:
            x1, y1, x2, y2 = obj.bounds
            values = [(x1 + x2) / 2 / image.width, (y1 + y2) / 2 / image.height,
                      (x2 - x1) / image.width, (y2 - y1) / image.height]  # fmt: skip
        lines.append(" ".join([str(k), *(f"{v:.6f}" for v in values)]))
    return "".join(f"{line}\n" for line in lines)


def write_yolo(root: Path, images: list[Img], *, polygons: bool, splits: dict[str, list[str]] | None = None,
               names_as_dict: bool = False) -> None:
    """Ultralytics layout: ``images/[split/]``, ``labels/[split/]``, ``data.yaml`` with ``names``."""
    where = {image.file: "" for image in images}
    for split, files in (splits or {}).items():
        for f in files:
            where[f] = split
    for image in images:
        sub = where[image.file]
        make_image(root / "images" / sub / image.file, image)
        label = root / "labels" / sub / f"{image.stem}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        if image.objects:  # an image without objects has no label file (Ultralytics' convention)
            label.write_text(yolo_lines(image, polygons=polygons))
    names = "\n".join(f"  {k}: {n}" for k, n in enumerate(CLASSES)) if names_as_dict else "\n".join(f"  - {n}" for n in CLASSES)
    text = f"names:\n{names}\n"
    for split in splits or {}:
        text += f"{split}: images/{split}\n"
    (root / "data.yaml").write_text(text)


def write_labelme(root: Path, images: list[Img]) -> None:
    """One LabelMe JSON per image, beside the images; boxes as rectangles."""
    write_images(root, images)
    for image in images:
        shapes = []
        for obj in image.objects:
            if obj.polygon is not None:
                points = [[obj.polygon[i], obj.polygon[i + 1]] for i in range(0, len(obj.polygon), 2)]
                shapes.append({"label": obj.name, "points": points, "group_id": None, "shape_type": "polygon", "flags": {}})
            else:
                x1, y1, x2, y2 = obj.box  # type: ignore[misc]
                shapes.append({"label": obj.name, "points": [[x2, y2], [x1, y1]], "group_id": None,
                               "shape_type": "rectangle", "flags": {}})
        data = {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image.file, "imageData": None,
                "imageHeight": image.height, "imageWidth": image.width}
        (root / f"{image.stem}.json").write_text(json.dumps(data, indent=2))


def via_project(images: list[Img], root: Path, *, attribute: str = "species", extra_attribute: bool = True) -> dict:
    """A VIA 2 project: rect / polygon regions, the class in a dropdown region attribute."""
    metadata = {}
    for image in images:
        size = (root / image.file).stat().st_size
        regions = []
        for obj in image.objects:
            if obj.polygon is not None:
                shape = {"name": "polygon", "all_points_x": obj.polygon[0::2], "all_points_y": obj.polygon[1::2]}
            else:
                x1, y1, x2, y2 = obj.box  # type: ignore[misc]
                shape = {"name": "rect", "x": x1, "y": y1, "width": x2 - x1, "height": y2 - y1}
            attributes = {"note": f"seen on {image.file}, region {len(regions)}"} if extra_attribute else {}
            attributes[attribute] = obj.name
            regions.append({"shape_attributes": shape, "region_attributes": attributes})
        metadata[f"{image.file}{size}"] = {"filename": image.file, "size": size, "regions": regions, "file_attributes": {}}
    declared = {attribute: {"type": "dropdown", "description": "", "options": {n: "" for n in CLASSES},
                            "default_options": {}}}
    if extra_attribute:
        declared = {"note": {"type": "text", "description": "", "default_value": ""}, **declared}
    return {
        "_via_settings": {"core": {"default_filepath": ""}},
        "_via_img_metadata": metadata,
        "_via_attributes": {"region": declared, "file": {}},
    }


def write_via(root: Path, images: list[Img], **kwargs) -> Path:
    write_images(root, images)
    path = root / "via_project.json"
    path.write_text(json.dumps(via_project(images, root, **kwargs)))
    return path


def cvat_xml(images: list[Img], subsets: dict[str, str] | None = None) -> str:
    labels = "".join(f"<label><name>{n}</name><color>#ff0000</color><type>any</type><attributes/></label>" for n in CLASSES)
    body = ""
    for i, image in enumerate(images):
        subset = f' subset="{subsets[image.file]}"' if subsets and image.file in subsets else ""
        shapes = ""
        for obj in image.objects:
            if obj.polygon is not None:
                points = ";".join(f"{obj.polygon[k]:g},{obj.polygon[k + 1]:g}" for k in range(0, len(obj.polygon), 2))
                shapes += f'<polygon label="{obj.name}" source="manual" occluded="0" points="{points}" z_order="0"/>'
            else:
                x1, y1, x2, y2 = obj.box  # type: ignore[misc]
                shapes += (f'<box label="{obj.name}" source="manual" occluded="0" xtl="{x1:g}" ytl="{y1:g}" '
                           f'xbr="{x2:g}" ybr="{y2:g}" z_order="0"/>')
        body += f'<image id="{i}" name="{image.file}" width="{image.width}" height="{image.height}"{subset}>{shapes}</image>'
    return (f'<?xml version="1.0" encoding="utf-8"?><annotations><version>1.1</version><meta><task><id>1</id>'
            f"<name>t</name><labels>{labels}</labels></task></meta>{body}</annotations>")


def write_cvat(root: Path, images: list[Img], subsets: dict[str, str] | None = None) -> Path:
    """CVAT's export: ``annotations.xml`` with the images in ``images/``."""
    write_images(root / "images", images)
    path = root / "annotations.xml"
    path.write_text(cvat_xml(images, subsets))
    return path
