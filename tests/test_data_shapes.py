"""The synthetic shapes generator: determinism, valid COCO output, tight boxes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from rcnn.data.shapes import SHAPES_CLASSES, make_shapes, shapes_paths


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    first = _digest(make_shapes(tmp_path / "a", n_train=4, n_val=3, seed=7, image_size=64))
    second = _digest(make_shapes(tmp_path / "b", n_train=4, n_val=3, seed=7, image_size=64))
    other = _digest(make_shapes(tmp_path / "c", n_train=4, n_val=3, seed=8, image_size=64))
    assert len(first) == 4 + 3 + 2 + 1  # images, annotation files, the folder's marker
    assert first == second
    assert set(first) == set(other)
    assert all(first[name] != other[name] for name in first if name != ".rcnn-shapes")


def test_val_images_do_not_depend_on_train_count(tmp_path: Path) -> None:
    small = make_shapes(tmp_path / "small", n_train=1, n_val=2, seed=3, image_size=64)
    large = make_shapes(tmp_path / "large", n_train=5, n_val=2, seed=3, image_size=64)
    assert _digest(small / "images" / "val") == _digest(large / "images" / "val")


def test_regenerating_smaller_removes_stale_images(tmp_path: Path) -> None:
    make_shapes(tmp_path, n_train=5, n_val=1, seed=0, image_size=32)
    make_shapes(tmp_path, n_train=2, n_val=1, seed=0, image_size=32)
    assert sorted(p.name for p in (tmp_path / "images" / "train").iterdir()) == ["000000.png", "000001.png"]


def test_coco_files_load_with_pycocotools(shapes_root: Path) -> None:
    for split, n_images in (("train", 12), ("val", 8)):
        images_dir, ann_file = shapes_paths(shapes_root, split)
        coco = COCO(str(ann_file))
        assert len(coco.getImgIds()) == n_images
        cats = coco.loadCats(coco.getCatIds())
        assert [c["id"] for c in cats] == [1, 2, 3, 4, 5]
        assert [c["name"] for c in cats] == list(SHAPES_CLASSES)
        for img in coco.loadImgs(coco.getImgIds()):
            assert (images_dir / img["file_name"]).is_file()
            assert (img["height"], img["width"]) == (128, 128)
            # 1..max_objects objects per image (some may be skipped when they do not fit)
            assert 1 <= len(coco.getAnnIds(imgIds=img["id"])) <= 5


def test_boxes_tightly_enclose_masks(shapes_root: Path) -> None:
    _, ann_file = shapes_paths(shapes_root, "train")
    coco = COCO(str(ann_file))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) > 12
    for ann in anns:
        mask = coco.annToMask(ann)  # [H, W]
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        x, y, w, h = ann["bbox"]
        assert (x, y, x + w, y + h) == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        assert ann["area"] == int(mask.sum())
        assert ann["iscrowd"] == 0


def test_object_sizes_span_small_to_half_image(tmp_path: Path) -> None:
    root = make_shapes(tmp_path, n_train=40, n_val=0, seed=1, image_size=128)
    coco = COCO(str(shapes_paths(root, "train")[1]))
    sides = np.array([max(a["bbox"][2:]) for a in coco.loadAnns(coco.getAnnIds())])
    assert sides.min() <= 12  # small objects (~8 px) are present
    assert sides.max() >= 40  # and large ones
    assert sides.max() <= 64  # never more than half the image


def test_empty_images_and_non_square_size(tmp_path: Path) -> None:
    root = make_shapes(tmp_path, n_train=3, n_val=0, seed=0, image_size=(48, 80), empty_fraction=1.0)
    coco = COCO(str(shapes_paths(root, "train")[1]))
    assert len(coco.getImgIds()) == 3
    assert coco.getAnnIds() == []
    assert {(i["height"], i["width"]) for i in coco.loadImgs(coco.getImgIds())} == {(48, 80)}


@pytest.mark.parametrize(
    "kwargs",
    [{"image_size": 8}, {"n_train": -1}, {"max_objects": 0}, {"max_occlusion": 1.0}, {"min_object_size": 100}],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_shapes(tmp_path, **{"n_train": 1, "n_val": 0, **kwargs})
