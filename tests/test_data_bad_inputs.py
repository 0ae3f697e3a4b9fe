"""The bad-input corpus (tests/data/bad/): each case is handled as documented or fails clearly.

Errors must name the offending file (and the annotation where there is one); changes on load
(clipping, dropping) give one ``DataWarning`` per annotation file naming the annotations.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from rcnn.data import VOC_CLASSES, CocoDetection, DataWarning, VOCDetection, build_dataset
from rcnn.data.records import load_image

BAD = Path(__file__).parent / "data" / "bad"
IMAGES = BAD / "images"
VOC = BAD / "voc"


def _coco(name: str, **kwargs) -> CocoDetection:
    return CocoDetection(IMAGES, BAD / name, **kwargs)


# (annotation file, CocoDetection kwargs, exception type, substrings the message must contain)
COCO_ERRORS = [
    ("coco_truncated.json", {}, ValueError, ["not valid JSON", "line"]),
    ("coco_binary.json", {}, ValueError, ["not UTF-8"]),
    ("coco_not_object.json", {}, ValueError, ["expected a JSON object"]),
    ("coco_no_categories.json", {}, ValueError, ["'categories'"]),
    ("coco_missing_image.json", {}, FileNotFoundError, ["image file not found", "missing.png"]),
    ("coco_missing_size.json", {}, ValueError, ["image id 1", "'height'"]),
    ("coco_unknown_category.json", {}, ValueError, ["annotation id 1", "unknown category_id 99", "[3, 7]"]),
    ("coco_unknown_image_id.json", {}, ValueError, ["annotation id 1", "image_id 5"]),
    ("coco_nan_box.json", {}, ValueError, ["annotation id 1", "NaN"]),
    ("coco_negative_width.json", {}, ValueError, ["annotation id 1", "negative width"]),
    ("coco_bbox_three_numbers.json", {}, ValueError, ["annotation id 1", "must be 4 numbers"]),
    ("coco_outside.json", {}, ValueError, ["annotation id 4", "outside the 32x24 image"]),
    ("coco_duplicate_image_id.json", {}, ValueError, ["image id 1", "appears twice"]),
    ("coco_duplicate_ann_id.json", {}, ValueError, ["annotation id 1", "appears twice"]),
    ("coco_odd_polygon.json", {"with_masks": True}, ValueError, ["annotation id 1", "odd number"]),
    ("coco_rle_wrong_size.json", {"with_masks": True}, ValueError, ["annotation id 1", "RLE size"]),
]


@pytest.mark.parametrize("name, kwargs, exc_type, parts", COCO_ERRORS, ids=[c[0] for c in COCO_ERRORS])
def test_coco_errors_name_file_and_annotation(name: str, kwargs: dict, exc_type: type, parts: list[str]) -> None:
    with pytest.raises(exc_type) as info:
        _coco(name, **kwargs)
    message = str(info.value)
    assert name in message
    for part in parts:
        assert part in message


# Image problems are found when the image is read (construction does not decode images).
IMAGE_ERRORS = [
    ("coco_size_mismatch.json", "ok.png", ["32x24", "64x64"]),
    ("coco_corrupt_image.json", "corrupt.png", ["cannot decode"]),
    ("coco_not_an_image.json", "notanimage.png", ["cannot decode"]),
    ("coco_empty_image_file.json", "empty.png", ["cannot decode"]),
]


@pytest.mark.parametrize("name, image, parts", IMAGE_ERRORS, ids=[c[0] for c in IMAGE_ERRORS])
def test_unreadable_images_fail_at_getitem_naming_the_image(name: str, image: str, parts: list[str]) -> None:
    dataset = _coco(name)
    with pytest.raises(ValueError) as info:
        dataset[0]
    assert str(IMAGES / image) in str(info.value)
    for part in parts:
        assert part in str(info.value)


def _one_warning(record: list[warnings.WarningMessage]) -> str:
    data_warnings = [w for w in record if issubclass(w.category, DataWarning)]
    assert len(data_warnings) == 1, [str(w.message) for w in data_warnings]
    return str(data_warnings[0].message)


def test_zero_area_boxes_dropped_with_one_warning_naming_them() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dataset = _coco("coco_zero_area.json")
    message = _one_warning(record)
    assert "coco_zero_area.json" in message
    assert "annotation id 2" in message and "annotation id 3" in message and "zero-area" in message
    assert "annotation id 1:" not in message
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 11.0]]


def test_small_overhang_clipped_with_warning() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dataset = _coco("coco_overhang.json")
    message = _one_warning(record)
    assert "coco_overhang.json" in message and "annotation id 2" in message and "clipped" in message
    _, target = dataset[0]
    assert target["boxes"][1].tolist() == [25.0, 3.0, 32.0, 11.0]


def test_degenerate_polygon_dropped_only_when_masks_are_loaded() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with_masks = _coco("coco_degenerate_polygon.json", with_masks=True)
    message = _one_warning(record)
    assert "annotation id 2" in message and "fewer than 3 points" in message
    assert len(with_masks[0][1]["boxes"]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # boxes alone are fine: no warning at all
        boxes_only = _coco("coco_degenerate_polygon.json")
    assert len(boxes_only[0][1]["boxes"]) == 2


def test_image_modes_become_rgb() -> None:
    dataset = _coco("coco_image_modes.json")
    images = {dataset.image_path(i).name: dataset[i][0] for i in range(len(dataset))}
    for image in images.values():
        assert image.shape == (3, 24, 32) and image.dtype == torch.float32
    assert torch.allclose(images["gray.png"], torch.full((3, 24, 32), 128 / 255))
    assert torch.allclose(images["gray16.png"], torch.ones(3, 24, 32))
    assert images["rgba.png"][:, 0, 0].tolist() == [1.0, 0.0, 0.0]  # alpha discarded, colour kept
    assert images["rgba.png"][:, 0, 31].tolist() == [0.0, 0.0, 1.0]
    assert images["palette.png"][:, 0, 0].tolist() == [0.0, 1.0, 0.0]
    assert images["palette.png"][:, 0, 31].tolist() == [0.0, 0.0, 1.0]
    red = images["cmyk.jpg"].mean(dim=(1, 2))  # C=0, M=Y=255: red
    assert red[0] > 0.9 and red[1] < 0.1 and red[2] < 0.1
    for image, target in (dataset[i] for i in range(len(dataset))):
        assert target["boxes"].shape == (0, 4)  # images without objects are valid


def test_crowd_dropped_for_training_kept_and_flagged_for_evaluation() -> None:
    evaluation = _coco("coco_crowd.json", with_masks=True)
    _, target = evaluation[0]
    assert target["iscrowd"].tolist() == [False, True]
    assert target["masks"].shape == (2, 24, 32)
    assert int(target["masks"][1].sum()) == 16 * 20
    training = _coco("coco_crowd.json", with_masks=True, train=True)
    _, target = training[0]
    assert target["labels"].tolist() == [1]
    assert target["masks"].shape == (1, 24, 32)
    assert training.annotation(0)["iscrowd"].tolist() == [False, True]  # evaluation still sees it


def test_image_without_objects_is_a_valid_negative() -> None:
    dataset = _coco("coco_image_without_objects.json", with_masks=True)
    image, target = dataset[dataset.index_of(2)]
    assert image.shape == (3, 24, 32)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["masks"].shape == (0, 24, 32)


def test_load_image_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        load_image(IMAGES / "nothere.png")


# VOC: (split, VOCDetection kwargs, exception type, substrings besides the file name, file)
VOC_ERRORS = [
    ("corrupt_xml", {}, ValueError, ["not valid XML"], "Annotations/badxml.xml"),
    ("missing_xml", {}, FileNotFoundError, ["annotation file not found"], "Annotations/doesnotexist.xml"),
    ("missing_image", {}, FileNotFoundError, ["image file not found"], "Annotations/noimage.xml"),
    ("inverted_box", {}, ValueError, ["object 0 (cat)", "negative width"], "Annotations/inverted.xml"),
    ("not_a_number", {}, ValueError, ["object 0 (cat)", "must be numbers"], "Annotations/notnumber.xml"),
    ("missing_size", {}, ValueError, ["<size>"], "Annotations/nosize.xml"),
    ("unknown_class", {"class_names": VOC_CLASSES}, ValueError, ["unknown class 'unicorn'"], "Annotations/unicorn.xml"),
    ("no_such_split", {}, FileNotFoundError, ["split file not found", "available splits"], "ImageSets/Main/no_such_split.txt"),
]


@pytest.mark.parametrize("split, kwargs, exc_type, parts, file", VOC_ERRORS, ids=[c[0] for c in VOC_ERRORS])
def test_voc_errors_name_the_file(split: str, kwargs: dict, exc_type: type, parts: list[str], file: str) -> None:
    with pytest.raises(exc_type) as info:
        VOCDetection(VOC, split, **kwargs)
    message = str(info.value)
    assert str(VOC / file) in message
    for part in parts:
        assert part in message


def test_voc_zero_area_box_dropped_with_warning() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dataset = VOCDetection(VOC, "zero_area")
    message = _one_warning(record)
    assert "zeroarea.xml" in message and "object 1 (dog)" in message and "zero-area" in message
    assert dataset[0][1]["boxes"].tolist() == [[2.0, 3.0, 12.0, 11.0]]


def test_voc_unknown_names_are_discovered_without_class_names() -> None:
    dataset = VOCDetection(VOC, "unknown_class")
    # the sorted object names over every annotation file, so that all splits agree
    assert dataset.class_names == ["__background__", "cat", "dog", "unicorn"]
    assert dataset[0][1]["labels"].tolist() == [3]


def test_not_a_dataset_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=str(tmp_path)):
        build_dataset(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset(tmp_path / "nowhere", "val")
    with pytest.raises(FileNotFoundError, match="instances_test.json"):
        build_dataset(BAD / "broken_set", "test")


def test_corpus_has_at_least_fifteen_cases() -> None:
    assert len(COCO_ERRORS) + len(IMAGE_ERRORS) + len(VOC_ERRORS) >= 15
