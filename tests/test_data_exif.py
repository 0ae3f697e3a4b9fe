"""EXIF orientation: images are read turned as annotation tools show them, in every reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from layout_sets import Img, Obj, make_image, write_coco, write_cvat, write_labelimg, write_labelme, write_via, write_yolo
from rcnn.data import build_dataset
from rcnn.data.check import check_dataset
from rcnn.io.images import exif_orientation, image_size, load_image


def _turned() -> list[Img]:
    """A photograph stored 64 wide x 48 high with orientation 6: shown (and annotated) 48 x 64."""
    return [Img("phone.jpg", 64, 48, [Obj("cat", box=(3, 5, 20, 50)), Obj("dog", polygon=[25, 10, 45, 12, 40, 60])],
                orientation=6)]


@pytest.mark.parametrize("orientation", [3, 6, 8, 5])
def test_load_image_and_image_size_apply_the_orientation(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / "x.jpg"
    make_image(path, Img("x.jpg", 64, 48, orientation=orientation))  # displayed 48 wide, 64 high
    with Image.open(path) as stored:
        assert stored.size == ((64, 48) if orientation >= 5 else (48, 64))
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"), dtype=np.float32) / 255
    image = load_image(path)
    assert image.shape == (3, 64, 48) and image_size(path) == (64, 48) and image_size(path, decode=True) == (64, 48)
    assert torch.equal(image, torch.from_numpy(expected.transpose(2, 0, 1)))
    assert exif_orientation(path) == orientation


def test_every_reader_gives_the_boxes_of_the_displayed_image(tmp_path: Path) -> None:
    truth = _turned()
    ann = write_coco(tmp_path / "coco", truth, masks=True)
    write_labelimg(tmp_path / "labelimg", truth, images_folder="images", xml_folder="annotations")
    write_yolo(tmp_path / "yolo", truth, polygons=True)
    write_labelme(tmp_path / "labelme", truth)
    write_via(tmp_path / "via", truth)
    write_cvat(tmp_path / "cvat", truth)
    coco = build_dataset(ann, "x")
    image, target = coco[0]
    assert image.shape == (3, 64, 48) and target["boxes"][0].tolist() == [3.0, 5.0, 20.0, 50.0]
    for name in ("labelimg", "yolo", "labelme", "via", "cvat"):
        dataset = build_dataset(tmp_path / name, "all")
        mine, theirs = dataset[0], coco[0]
        assert torch.equal(mine[0], theirs[0]), name
        torch.testing.assert_close(mine[1]["boxes"], theirs[1]["boxes"], atol=1e-4, rtol=0)
        assert mine[1]["labels"].tolist() == [1, 2] and mine[1]["orig_size"] == (64, 48), name


def test_an_annotation_of_the_stored_pixels_names_the_orientation(tmp_path: Path) -> None:
    truth = _turned()
    ann = write_coco(tmp_path, truth, masks=False)
    data = json.loads(ann.read_text())
    data["images"][0].update(width=64, height=48)  # written by a tool that ignored the tag
    data["annotations"] = []
    ann.write_text(json.dumps(data))
    dataset = build_dataset(ann, "x")
    with pytest.raises(ValueError) as info:
        dataset[0]
    message = str(info.value)
    assert "phone.jpg: the image is 48x64 (WxH) but its annotations say 64x48" in message
    assert "the JPEG's EXIF orientation (6: rotated 90°) turns the 64x48 pixels into 48x64" in message
    assert "rcnn applies EXIF orientation as annotation tools do" in message
    report = check_dataset(ann)[0]
    assert report.errors == 1 and "EXIF orientation (6: rotated 90°)" in report.problems[0].message
