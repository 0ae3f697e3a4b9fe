"""``rcnn data convert``: round trips through COCO, VOC and YOLO keep boxes and classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from layout_sets import CLASSES, mixed_set, polygon_set, write_coco, write_labelimg, write_yolo
from rcnn.cli import main
from rcnn.data import CocoDetection, VOCDetection, build_dataset
from rcnn.data.writing import convert_dataset
from rcnn.data.layouts import LayoutDetection


def _by_name(dataset) -> dict[str, dict]:
    return {dataset.image_path(i).name: dataset.annotation(i) for i in range(len(dataset))}


def _same_ground_truth(a, b, atol: float) -> None:
    assert a.class_names == b.class_names
    gt_a, gt_b = _by_name(a), _by_name(b)
    assert sorted(gt_a) == sorted(gt_b)
    for name in gt_a:
        torch.testing.assert_close(gt_a[name]["boxes"], gt_b[name]["boxes"], atol=atol, rtol=0)
        assert gt_a[name]["labels"].tolist() == gt_b[name]["labels"].tolist()
        assert gt_a[name]["orig_size"] == gt_b[name]["orig_size"]


@pytest.fixture
def coco_source(tmp_path: Path) -> Path:
    """A hand-written COCO file with float boxes that no integer grid holds."""
    images = mixed_set()
    images[1].objects[0].box = (2.25, 3.5, 20.125, 31.75)
    return write_coco(tmp_path / "src", images, masks=True, name="instances_val.json")


def test_coco_to_voc_to_coco(coco_source: Path, tmp_path: Path) -> None:
    source = build_dataset(coco_source, "val")
    report = convert_dataset(coco_source, tmp_path / "voc", "voc")
    assert [(s.split, s.images, s.objects) for s in report.splits] == [("val", 3, 4)]
    assert report.masks_dropped == 1  # the polygon: VOC XML has no masks
    voc = build_dataset(tmp_path / "voc", "val")
    assert isinstance(voc, VOCDetection) and (tmp_path / "voc" / "classes.txt").read_text() == "cat\ndog\n"
    _same_ground_truth(source, voc, atol=0.0)
    convert_dataset(tmp_path / "voc", tmp_path / "back", "coco")
    back = build_dataset(tmp_path / "back", "val")
    assert isinstance(back, CocoDetection)
    _same_ground_truth(source, back, atol=0.0)


@pytest.mark.parametrize("polygons", [False, True], ids=["boxes", "polygons"])
def test_coco_to_yolo_to_coco(tmp_path: Path, polygons: bool) -> None:
    images = polygon_set() if polygons else mixed_set()
    ann = write_coco(tmp_path / "src", images, masks=True, name="instances_train.json")
    source = build_dataset(ann, "train", with_masks=polygons)
    report = convert_dataset(ann, tmp_path / "yolo", "yolo")
    assert report.splits[0].polygons == (3 if polygons else 0)
    assert "train: images/train" in (tmp_path / "yolo" / "data.yaml").read_text()
    yolo = build_dataset(tmp_path / "yolo", "train", with_masks=polygons)
    assert isinstance(yolo, LayoutDetection) and yolo.format == "yolo"
    _same_ground_truth(source, yolo, atol=1e-3)
    convert_dataset(tmp_path / "yolo", tmp_path / "back", "coco")
    back = build_dataset(tmp_path / "back", "train", with_masks=polygons)
    _same_ground_truth(source, back, atol=1e-3)
    if polygons:
        for i in range(len(back)):
            assert int((back[i][1]["masks"] != source[i][1]["masks"]).sum()) <= 2 * len(source[i][1]["masks"])


def test_yolo_to_coco_to_yolo(tmp_path: Path) -> None:
    write_yolo(tmp_path / "src", mixed_set(), polygons=True, splits={"train": ["a.jpg", "b.png"], "val": ["c.jpg"]})
    convert_dataset(tmp_path / "src", tmp_path / "coco", "coco")
    assert sorted(p.name for p in (tmp_path / "coco" / "annotations").iterdir()) == ["instances_train.json", "instances_val.json"]
    convert_dataset(tmp_path / "coco", tmp_path / "yolo", "yolo")
    for split in ("train", "val"):
        first, coco, again = (build_dataset(tmp_path / d, split) for d in ("src", "coco", "yolo"))
        _same_ground_truth(first, coco, atol=1e-3)
        _same_ground_truth(first, again, atol=1e-3)
    line = (tmp_path / "yolo" / "labels" / "train" / "a.txt").read_text().splitlines()[0]
    assert line.split()[0] == "0" and all(len(v.replace("0.", "").lstrip("0")) <= 8 for v in line.split()[1:])


def test_labelimg_to_coco_to_voc_and_the_command(tmp_path: Path, capsys) -> None:
    write_labelimg(tmp_path / "src", mixed_set(), images_folder="images", xml_folder="annotations")
    source = build_dataset(tmp_path / "src", "all")
    assert main(["data", "convert", str(tmp_path / "src"), str(tmp_path / "coco"), "--to", "coco", "--link"]) == 0
    out = capsys.readouterr().out
    assert "wrote COCO" in out and "all: 3 images, 4 objects" in out and "linked the images" in out
    linked = tmp_path / "coco" / "images" / "all" / "a.jpg"
    assert linked.is_symlink() and linked.resolve() == (tmp_path / "src" / "images" / "a.jpg").resolve()
    coco = build_dataset(tmp_path / "coco", "all")
    _same_ground_truth(source, coco, atol=0.0)
    assert main(["data", "convert", str(tmp_path / "coco"), str(tmp_path / "voc"), "--to", "voc"]) == 0
    copied = tmp_path / "voc" / "JPEGImages" / "a.jpg"
    assert not copied.is_symlink() and copied.read_bytes() == (tmp_path / "src" / "images" / "a.jpg").read_bytes()
    voc = build_dataset(tmp_path / "voc", "all")
    _same_ground_truth(source, voc, atol=0.0)
    # the VOC output is itself a LabelImg-readable set of XML files with their <filename>
    assert build_dataset({"format": "labelimg", "root": tmp_path / "voc", "annotations": tmp_path / "voc" / "Annotations",
                          "images": tmp_path / "voc" / "JPEGImages"}, "all").class_names[1:] == CLASSES
    assert main(["data", "convert", str(tmp_path / "src"), str(tmp_path / "voc"), "--to", "voc"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_convert_with_an_on_the_fly_split_and_crowds(tmp_path: Path) -> None:
    ann = write_coco(tmp_path / "src", mixed_set(), masks=False)
    data = json.loads(ann.read_text())
    data["annotations"][2]["iscrowd"] = 1  # b.png's first dog
    ann.write_text(json.dumps(data))
    report = convert_dataset(ann, tmp_path / "yolo", "yolo", val_fraction=0.34, split_seed=0)
    assert [s.split for s in report.splits] == ["train", "val"]
    assert sum(s.images for s in report.splits) == 3
    assert {p.name for p in (tmp_path / "yolo" / "images").rglob("*.*")} == {"a.jpg", "b.png", "c.jpg"}
    # YOLO has no crowd flag: the crowd region is left out, as Ultralytics' converter does
    assert sum(s.objects for s in report.splits) == 3 and sum(s.left_out for s in report.splits) == 1
    assert len((tmp_path / "yolo" / "labels").glob("*/b.txt").__next__().read_text().splitlines()) == 1
    # VOC: the crowd becomes difficult, which evaluation ignores the same way
    convert_dataset(ann, tmp_path / "voc", "voc")
    voc = build_dataset(tmp_path / "voc", "instances")
    b = voc.annotation(voc.image_names.index("b"))
    assert b["difficult"].tolist() == [True, False]
