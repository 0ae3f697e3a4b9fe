"""The ``rcnn data`` command: ``shapes`` writes the data set, ``check`` reports on it."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from rcnn.cli import main
from rcnn.data import make_shapes

BAD = Path(__file__).parent / "data" / "bad"


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_data_shapes_command_matches_make_shapes(tmp_path: Path, capsys) -> None:
    assert main(["data", "shapes", str(tmp_path / "cli"), "--train", "3", "--val", "2", "--seed", "4", "--size", "64"]) == 0
    assert "train: 3 images" in capsys.readouterr().out
    make_shapes(tmp_path / "api", n_train=3, n_val=2, seed=4, image_size=64)
    assert _files(tmp_path / "cli") == _files(tmp_path / "api")


def test_check_on_shapes_reports_classes_sizes_and_no_problems(shapes_root: Path, capsys) -> None:
    assert main(["data", "check", str(shapes_root)]) == 0
    out = capsys.readouterr().out
    assert "split train: COCO" in out and "split val: COCO" in out
    raw = json.loads((shapes_root / "annotations" / "instances_train.json").read_text())
    train = out.split("split val")[0]
    assert re.search(r"images:\s+12\b", train)
    assert re.search(rf"instances:\s+{len(raw['annotations'])}\b", train)
    for cat in raw["categories"]:
        count = sum(a["category_id"] == cat["id"] for a in raw["annotations"])
        assert re.search(rf"^\s+{cat['name']}\s+{count}$", train, re.MULTILINE)
    histogram = re.findall(r"^\s+\[\s*\d+,\s+(?:\d+|inf)\)\s+(\d+)", train, re.MULTILINE)
    assert len(histogram) == 8 and sum(map(int, histogram)) == len(raw["annotations"])
    assert "problems: none" in train
    assert out.rstrip().endswith("OK: 2 split(s) checked, 0 error(s), 0 warning(s)")


def test_check_on_a_broken_set_names_every_problem(capsys) -> None:
    assert main(["data", "check", str(BAD / "broken_set")]) == 1
    out = capsys.readouterr().out
    ann_file = str(BAD / "broken_set" / "annotations" / "instances_val.json")
    expected = [
        f"error: {ann_file}: image id 4 (lost.png): image file not found",
        f"warning: {ann_file}: annotation id 2: box [25.0, 3.0, 33.0, 11.0] overhangs",
        f"warning: {ann_file}: annotation id 3: zero-area box",
        f"error: {ann_file}: annotation id 4: unknown category_id 99",
        f"error: {ann_file}: annotation id 5: box [nan, 1.0, nan, 3.0] has a NaN",
        f"error: {ann_file}: annotation id 6: box [40.0, 3.0, 50.0, 11.0] lies outside",
        f"error: {BAD / 'broken_set' / 'images' / 'val' / 'corrupt.png'}: cannot decode the image",
    ]
    for line in expected:
        assert line in out
    assert "images without objects: 1  (gray.png)" in out
    assert "FAILED: 1 split(s) checked, 5 error(s), 2 warning(s)" in out
    # --quick reads headers only: the truncated image is not caught
    assert main(["data", "check", str(BAD / "broken_set"), "--quick"]) == 1
    assert "corrupt.png" not in capsys.readouterr().out


def test_check_voc_and_coco_json(capsys) -> None:
    assert main(["data", "check", str(BAD / "voc"), "--split", "good"]) == 0
    out = capsys.readouterr().out
    assert "Pascal VOC" in out and "(crowd 0, difficult 1)" in out
    assert main(["data", "check", str(BAD / "coco_zero_area.json"), "--images", str(BAD / "images")]) == 0
    out = capsys.readouterr().out
    assert "annotation id 2: zero-area box" in out and "0 error(s), 2 warning(s)" in out
    assert main(["data", "check", str(BAD / "coco_truncated.json")]) == 1
    assert f"error: {BAD / 'coco_truncated.json'}: not valid JSON" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["nowhere"], ["."]])
def test_check_on_something_else_is_one_clean_error(tmp_path: Path, args: list[str], capsys) -> None:
    path = str(tmp_path / args[0])
    assert main(["data", "check", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rcnn data: error:") and path in err and "Traceback" not in err
