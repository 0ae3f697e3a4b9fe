"""The annotation-tool layouts read to the same boxes, labels and masks as the equivalent COCO file.

Each set is written from one hand-written ground truth (tests/layout_sets.py) in a tool's own
format and as a COCO file; the readers' items and ground truth are compared.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from layout_sets import (
    CLASSES,
    mixed_set,
    polygon_set,
    write_coco,
    write_cvat,
    write_labelimg,
    write_labelme,
    write_via,
    write_yolo,
)
from rcnn.data import CocoDetection, DataWarning, build_dataset
from rcnn.data.reading import find_splits, resolve_dataset
from rcnn.data.layouts import LayoutDetection


def _coco(tmp_path: Path, images, masks: bool) -> CocoDetection:
    ann = write_coco(tmp_path / "coco", images, masks=masks)
    return CocoDetection(tmp_path / "coco" / "images", ann, with_masks=masks)


def _same_items(dataset, coco: CocoDetection, *, atol: float = 0.0, masks: bool = False) -> None:
    """Item by item (both sorted by image name): boxes, labels, masks, sizes, class names."""
    assert dataset.class_names == coco.class_names == ["__background__", *CLASSES]
    ours = sorted(range(len(dataset)), key=lambda i: dataset.image_path(i).name)
    theirs = sorted(range(len(coco)), key=lambda i: coco.image_path(i).name)
    assert [dataset.image_path(i).name for i in ours] == [coco.image_path(i).name for i in theirs]
    for i, j in zip(ours, theirs):
        image, target = dataset[i]
        image_coco, target_coco = coco[j]
        assert torch.equal(image, image_coco)
        torch.testing.assert_close(target["boxes"], target_coco["boxes"], atol=atol, rtol=0)
        assert target["labels"].tolist() == target_coco["labels"].tolist()
        assert target["orig_size"] == target_coco["orig_size"]
        if masks:
            assert torch.equal(target["masks"], target_coco["masks"])
        assert dataset.annotation(i)["boxes"].shape == target_coco["boxes"].shape


@pytest.mark.parametrize(
    "images_folder, xml_folder", [(None, None), ("images", "annotations"), ("Fotos", "labels_xml")],
    ids=["one folder", "images+annotations", "any names"],
)
def test_labelimg_folders_read_like_coco(tmp_path: Path, images_folder, xml_folder) -> None:
    truth = mixed_set()
    write_labelimg(tmp_path / "set", truth, images_folder=images_folder, xml_folder=xml_folder)
    dataset = build_dataset(tmp_path / "set", "all")
    assert isinstance(dataset, LayoutDetection) and dataset.format == "labelimg"
    assert dataset.image_names == ["a", "b", "c"] and dataset.image_ids == [1, 2, 3]
    _same_items(dataset, _coco(tmp_path, truth, masks=False))
    assert dataset[0][1]["difficult"].tolist() == [False, False]  # VOC's flag, as VOCDetection gives it
    # Pointing at the annotations folder itself finds the images beside it.
    if xml_folder:
        assert len(build_dataset(tmp_path / "set" / xml_folder, "all")) == 3


def test_labelimg_image_is_found_by_filename_never_by_path(tmp_path: Path) -> None:
    truth = mixed_set()
    write_labelimg(tmp_path, truth, images_folder="images", xml_folder="annotations")
    xml = tmp_path / "annotations" / "a.xml"
    # <path> points to the annotator's disk (ignored); a wrong <filename> falls back to the XML's stem.
    xml.write_text(xml.read_text().replace("<filename>a.jpg</filename>", "<filename>IMG_0001.JPG</filename>"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dataset = build_dataset(tmp_path, "all")
    messages = [str(w.message) for w in record if issubclass(w.category, DataWarning)]
    assert len(messages) == 1 and str(xml) in messages[0]
    assert "<filename> 'IMG_0001.JPG' is not found" in messages[0] and "a.jpg" in messages[0]
    assert dataset.image_path(0) == tmp_path / "images" / "a.jpg"


@pytest.mark.parametrize("polygons", [False, True], ids=["boxes", "polygons"])
def test_yolo_reads_like_coco(tmp_path: Path, polygons: bool) -> None:
    truth = mixed_set() if not polygons else polygon_set()
    write_yolo(tmp_path / "yolo", truth, polygons=polygons)
    dataset = build_dataset(tmp_path / "yolo", "all", with_masks=polygons)
    assert dataset.format == "yolo"
    # 6 decimals of a fraction of a 64-px side: within 1e-4 px
    _same_items(dataset, _coco(tmp_path, truth, masks=polygons), atol=1e-4, masks=False)
    if polygons:
        coco = _coco(tmp_path / "m", truth, masks=True)
        for i in range(len(dataset)):
            mine, theirs = dataset[i][1]["masks"], coco[i][1]["masks"]
            # the polygon vertices move by < 1e-4 px: at most a pixel or two on the outline may flip
            assert mine.shape == theirs.shape and int((mine != theirs).sum()) <= 2 * len(mine)
        assert dataset.coco_dict()["annotations"][0]["segmentation"][0][:2] == pytest.approx([4, 6], abs=1e-4)


def test_yolo_ultralytics_splits_and_names_mapping(tmp_path: Path) -> None:
    truth = mixed_set()
    write_yolo(tmp_path, truth, polygons=False, splits={"train": ["a.jpg", "c.jpg"], "val": ["b.png"]}, names_as_dict=True)
    assert find_splits(tmp_path) == ["train", "val"]
    train, val = build_dataset(tmp_path, "train"), build_dataset(tmp_path, "val")
    assert train.image_names == ["train/a", "train/c"] and val.image_names == ["val/b"]
    assert train.class_names[1:] == CLASSES
    assert val[0][1]["labels"].tolist() == [2, 2]
    assert len(train[1][1]["boxes"]) == 0  # c.jpg has no label file: an image without objects
    # The same layout without data.yaml, classes from classes.txt: the image folders are the splits.
    (tmp_path / "data.yaml").unlink()
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    assert build_dataset(tmp_path, "val").image_names == ["val/b"]


def test_labelme_reads_like_coco_with_masks(tmp_path: Path) -> None:
    truth = mixed_set()
    write_labelme(tmp_path / "lm", truth)
    dataset = build_dataset(tmp_path / "lm", "all")
    assert dataset.format == "labelme"
    _same_items(dataset, _coco(tmp_path, truth, masks=False))
    write_labelme(tmp_path / "lmp", polygon_set())
    _same_items(build_dataset(tmp_path / "lmp", "all", with_masks=True), _coco(tmp_path / "p", polygon_set(), masks=True),
                masks=True)


def test_labelme_group_id_joins_parts_and_ignores_points(tmp_path: Path) -> None:
    truth = polygon_set()[:1]
    write_labelme(tmp_path, truth)
    path = tmp_path / "a.json"
    data = json.loads(path.read_text())
    extra = {"label": "cat", "points": [[40, 30], [50, 30], [45, 45]], "group_id": 1, "shape_type": "polygon"}
    data["shapes"][0]["group_id"] = 1
    data["shapes"] += [extra, {"label": "dog", "points": [[5, 5]], "group_id": None, "shape_type": "point"}]
    path.write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dataset = build_dataset(tmp_path, "all", with_masks=True)
    assert "shape_type 'point' outlines no object" in str(record[0].message)
    _, target = dataset[0]
    assert target["labels"].tolist() == [1, 2]
    assert target["boxes"][0].tolist() == [4.0, 6.0, 50.0, 45.0]  # the bounds of both parts
    assert int(target["masks"][0][35:44, 43:47].sum()) > 0  # the second part is in the mask


def test_via_reads_like_coco_with_masks(tmp_path: Path) -> None:
    truth = mixed_set()
    project = write_via(tmp_path / "via", truth)
    dataset = build_dataset(tmp_path / "via", "all")  # the folder: its one VIA file is found
    assert dataset.format == "via" and "class attribute 'species'" in dataset.description
    _same_items(dataset, _coco(tmp_path, truth, masks=False))
    assert isinstance(build_dataset(project, "all"), LayoutDetection)
    write_via(tmp_path / "viap", polygon_set())
    _same_items(build_dataset(tmp_path / "viap", "all", with_masks=True), _coco(tmp_path / "p", polygon_set(), masks=True),
                masks=True)


def test_via_export_without_declarations_and_a_named_attribute(tmp_path: Path) -> None:
    truth = mixed_set()
    path = write_via(tmp_path, truth, attribute="type", extra_attribute=True)
    export = json.loads(path.read_text())["_via_img_metadata"]  # "export annotations as json"
    for entry in export.values():  # VIA 1 wrote regions as a mapping
        entry["regions"] = {str(k): r for k, r in enumerate(entry["regions"])}
    path.write_text(json.dumps(export))
    # 'note' comes first but its values are free text that changes per region (or a number, or
    # empty): 'type' holds the classes
    for note in (None, "3", ""):
        for entry in export.values():
            for region in entry["regions"].values():
                if note is not None:
                    region["region_attributes"]["note"] = note
        path.write_text(json.dumps(export))
        dataset = build_dataset(path, "all")
        assert dataset.class_names[1:] == CLASSES and "'type'" in dataset.description
    named = build_dataset({"format": "via", "root": path, "class_attribute": "type"}, "all")
    _same_items(named, _coco(tmp_path / "c", truth, masks=False))


def test_cvat_reads_like_coco_and_subsets_are_splits(tmp_path: Path) -> None:
    truth = mixed_set()
    write_cvat(tmp_path / "cvat", truth, subsets={"a.jpg": "Train", "b.png": "Validation", "c.jpg": "Train"})
    assert find_splits(tmp_path / "cvat") == ["train", "val"]
    dataset = build_dataset(tmp_path / "cvat", "all")
    assert dataset.format == "cvat"
    _same_items(dataset, _coco(tmp_path, truth, masks=False))
    assert build_dataset(tmp_path / "cvat" / "annotations.xml", "val").image_names == ["b"]
    write_cvat(tmp_path / "cvatp", polygon_set())
    _same_items(build_dataset(tmp_path / "cvatp", "all", with_masks=True), _coco(tmp_path / "p", polygon_set(), masks=True),
                masks=True)


def test_polygon_layouts_give_coco_ground_truth_for_evaluation(tmp_path: Path) -> None:
    write_labelme(tmp_path, polygon_set())
    dataset = build_dataset(tmp_path, "all", with_masks=True)
    gt = dataset.coco_dict()
    ann = gt["annotations"][0]
    assert ann["bbox"] == [4.0, 6.0, 26.0, 34.0] and ann["segmentation"] == [[4.0, 6.0, 30.0, 6.0, 30.0, 40.0, 10.0, 36.0]]
    assert ann["area"] == pytest.approx(float(dataset[0][1]["masks"][0].sum()), rel=0.05)
    assert len(dataset.coco.getAnnIds()) == 3


def test_spec_mapping_and_detection_errors(tmp_path: Path) -> None:
    write_labelimg(tmp_path / "set", mixed_set(), images_folder="pics", xml_folder="xml")
    spec = {"format": "labelimg", "root": tmp_path / "set", "annotations": tmp_path / "set" / "xml",
            "images": tmp_path / "set" / "pics"}
    assert len(build_dataset(spec, "all")) == 3
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        build_dataset({**spec, "colour": "red"}, "all")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as info:
        resolve_dataset(tmp_path / "empty", "train")
    for looked_for in ("COCO root", "VOC root", "CVAT", "YOLO", "VIA", "LabelMe", "LabelImg"):
        assert looked_for in str(info.value)
    with pytest.raises(FileNotFoundError, match="split file not found.*rcnn data split.*val_fraction"):
        build_dataset(tmp_path / "set", "train")
    with pytest.raises(ValueError, match="no instance masks"):
        build_dataset(tmp_path / "set", "all", with_masks=True)


def test_training_style_iteration_over_every_layout(tmp_path: Path) -> None:
    truth = polygon_set()
    write_yolo(tmp_path / "yolo", truth, polygons=True)
    write_labelme(tmp_path / "labelme", truth)
    write_via(tmp_path / "via", truth)
    write_cvat(tmp_path / "cvat", truth)
    for name in ("yolo", "labelme", "via", "cvat"):
        dataset = build_dataset(tmp_path / name, "all", with_masks=True, train=True)
        for i in range(len(dataset)):
            image, target = dataset[i]
            assert image.shape[0] == 3 and target["masks"].shape == (len(target["boxes"]), *image.shape[1:])
            assert target["masks"].dtype == torch.uint8 and target["labels"].min() >= 1
            assert np.all(target["boxes"][:, 2:].numpy() > target["boxes"][:, :2].numpy())
