"""``skip_broken``: unreadable images and annotations are listed and left out; the default is strict."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from layout_sets import Img, Obj, mixed_set, write_coco, write_labelimg
from rcnn.cli import main
from rcnn.data import DataWarning, build_dataset


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header survives: only decoding finds it


@pytest.fixture
def broken_set(tmp_path: Path) -> Path:
    """A LabelImg set of 6 images: one truncated JPEG, one missing image, one XML that is not XML,
    one box far outside its image; two good images."""
    images = mixed_set() + [Img("d.jpg", 48, 64, [Obj("cat", box=(1, 1, 9, 9))]), Img("e.jpg", 48, 64, []),
                            Img("f.jpg", 48, 64, [Obj("dog", box=(1, 1, 200, 9))])]
    write_labelimg(tmp_path, images, images_folder="images", xml_folder="annotations")
    _truncate(tmp_path / "images" / "a.jpg")
    (tmp_path / "images" / "d.jpg").unlink()
    (tmp_path / "annotations" / "e.xml").write_text("<annotation><size><width>64")
    return tmp_path


def _data_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DataWarning)]


def test_default_refuses_and_skip_broken_lists_each_and_keeps_the_rest(broken_set: Path) -> None:
    with pytest.raises(ValueError) as info:
        build_dataset(broken_set, "all")
    message = str(info.value)
    assert message.startswith("3 errors in the data set") and "e.xml: not valid XML" in message
    assert "d.jpg" in message and "f.xml: object 0 (dog)" in message
    assert "skip_broken=True" in message and "leaves the 3 image(s) out" in message
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dataset = build_dataset(broken_set, "all", skip_broken=True)
    lines = _data_warnings(record)
    assert len(lines) == 4, lines  # one line per skipped image
    assert any(str(broken_set / "images" / "a.jpg") in w and "skipped: cannot decode the image" in w for w in lines)
    assert any("d.jpg" in w and "skipped: image file not found" in w for w in lines)
    assert any("e.xml" in w and "skipped: not valid XML" in w for w in lines)
    assert any("f.xml: object 0 (dog): skipped:" in w and "outside" in w for w in lines)
    assert dataset.image_names == ["b", "c"]
    for i in range(len(dataset)):  # a training-style pass reads every kept image
        image, target = dataset[i]
        assert image.shape[1:] == target["orig_size"]


def test_a_truncated_image_alone_fails_at_getitem_by_default(tmp_path: Path) -> None:
    write_labelimg(tmp_path, mixed_set(), images_folder=None, xml_folder=None)
    _truncate(tmp_path / "a.jpg")
    dataset = build_dataset(tmp_path, "all")  # strict and fast: images are decoded when read
    with pytest.raises(ValueError, match=r"a\.jpg: cannot decode the image \(image file is truncated"):
        for i in range(len(dataset)):
            dataset[i]
    with pytest.warns(DataWarning, match="a.jpg: skipped: cannot decode"):
        kept = build_dataset(tmp_path, "all", skip_broken=True)
    assert [kept.image_path(i).name for i in range(len(kept))] == ["b.png", "c.jpg"]


def test_check_with_and_without_skip_broken(broken_set: Path, capsys) -> None:
    assert main(["data", "check", str(broken_set)]) == 1
    out = capsys.readouterr().out
    assert f"error: {broken_set / 'images' / 'a.jpg'}: cannot decode the image" in out
    assert "FAILED: 1 split(s) checked, 4 error(s)" in out
    assert main(["data", "check", str(broken_set), "--skip-broken"]) == 0
    out = capsys.readouterr().out
    assert f"warning: {broken_set / 'images' / 'a.jpg'}: skipped: cannot decode the image" in out
    assert "images:                 2" in out and "OK: 1 split(s) checked, 0 error(s), 4 warning(s)" in out


def test_skip_broken_in_coco_files(tmp_path: Path) -> None:
    images = mixed_set()
    ann = write_coco(tmp_path, images, masks=False)
    _truncate(tmp_path / "images" / "a.jpg")
    data = json.loads(ann.read_text())
    data["images"].append({"id": 9, "file_name": "lost.jpg", "height": 4, "width": 4})
    data["annotations"][2]["bbox"] = [float("nan"), 1, 2, 3]  # b.png
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="2 errors"):  # lost.jpg missing, b.png's NaN box (a.jpg is decoded later)
        build_dataset(ann, "x")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dataset = build_dataset(ann, "x", skip_broken=True)
    assert len(_data_warnings(record)) == 3
    assert [dataset.image_path(i).name for i in range(len(dataset))] == ["c.jpg"]
    assert dataset.coco_dict()["images"][0]["id"] == 3
