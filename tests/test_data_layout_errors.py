"""Bad input to each annotation-tool reader: one clear error naming the file and the field.

Each case writes a good set (tests/layout_sets.py), breaks one thing, and builds the data set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from layout_sets import mixed_set, write_cvat, write_labelimg, write_labelme, write_via, write_yolo
from rcnn.cli import main
from rcnn.data import build_dataset


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (old, text[:300])
    path.write_text(text.replace(old, new, 1))


def _labelimg(root: Path) -> None:
    write_labelimg(root, mixed_set(), images_folder="images", xml_folder="annotations")


def _labelme(root: Path) -> None:
    write_labelme(root, mixed_set())


def _via(root: Path) -> None:
    write_via(root, mixed_set())


def _cvat(root: Path) -> None:
    write_cvat(root, mixed_set())


def _yolo(root: Path) -> None:
    write_yolo(root, mixed_set(), polygons=True)


def _json_edit(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _via_region(data: dict, k: int = 0) -> dict:
    entry = next(e for e in data["_via_img_metadata"].values() if e["filename"] == "a.jpg")
    return entry["regions"][k]


# (format, case, writer, break it, exception, the file named (relative), substrings)
CASES = [
    ("labelimg", "malformed", _labelimg, lambda r: (r / "annotations" / "a.xml").write_text("<annotation><size>"),
     ValueError, "annotations/a.xml", ["not valid XML"]),
    ("labelimg", "unknown class", _labelimg,
     lambda r: ((r / "classes.txt").write_text("cat\ndog\n"), _edit(r / "annotations" / "a.xml", "<name>cat", "<name>unicorn")),
     ValueError, "annotations/a.xml", ["object 0 (unicorn)", "unknown class 'unicorn'", "classes.txt"]),
    ("labelimg", "box outside", _labelimg, lambda r: _edit(r / "annotations" / "a.xml", "<xmax>30<", "<xmax>300<"),
     ValueError, "annotations/a.xml", ["object 0 (cat)", "outside the 64x48 image"]),
    ("labelimg", "missing image", _labelimg, lambda r: ((r / "images" / "a.jpg").unlink()),
     FileNotFoundError, "annotations/a.xml", ["image file not found", "<filename> 'a.jpg'"]),
    ("yolo", "malformed", _yolo, lambda r: (r / "labels" / "a.txt").write_text("0 0.5 half 0.1 0.1\n"),
     ValueError, "labels/a.txt", ["line 1", "is not numbers"]),
    ("yolo", "malformed yaml", _yolo, lambda r: (r / "data.yaml").write_text("names: [cat, dog\n"),
     ValueError, "data.yaml", ["not valid YAML at line"]),
    ("yolo", "unknown class", _yolo, lambda r: (r / "labels" / "a.txt").write_text("5 0.5 0.5 0.1 0.1\n"),
     ValueError, "labels/a.txt", ["line 1", "unknown class index 5", "0..1: cat, dog"]),
    ("yolo", "polygon < 3 points", _yolo, lambda r: (r / "labels" / "a.txt").write_text("1 0.5 0.5\n"),
     ValueError, "labels/a.txt", ["line 1 (dog)", "2 coordinates", "at least 6"]),
    ("yolo", "box outside", _yolo, lambda r: (r / "labels" / "a.txt").write_text("0 1.4 0.5 0.2 0.2\n"),
     ValueError, "labels/a.txt", ["line 1 (cat)", "outside the 64x48 image"]),
    ("yolo", "missing image", _yolo,
     lambda r: ((r / "list.txt").write_text("images/a.jpg\nimages/gone.jpg\n"), (r / "data.yaml").write_text(
         "names: [cat, dog]\ntrain: list.txt\n")),
     FileNotFoundError, "list.txt", ["line 2", "'images/gone.jpg' not found"]),
    ("labelme", "malformed", _labelme, lambda r: (r / "a.json").write_text('{"shapes": [}'),
     ValueError, "a.json", ["not valid JSON", "line 1"]),
    ("labelme", "unknown class", _labelme,
     lambda r: ((r / "classes.txt").write_text("cat\ndog\n"), _edit(r / "a.json", '"label": "cat"', '"label": "unicorn"')),
     ValueError, "a.json", ["shapes[0] (unicorn)", "unknown class 'unicorn'"]),
    ("labelme", "polygon < 3 points", _labelme,
     lambda r: _json_edit(r / "a.json", lambda d: d["shapes"][1].update(points=[[1, 2], [5, 6]])),
     ValueError, "a.json", ["shapes[1] (dog)", "polygon has 2 point(s)"]),
    ("labelme", "box outside", _labelme,
     lambda r: _json_edit(r / "a.json", lambda d: d["shapes"][0].update(points=[[100, 6], [130, 40]])),
     ValueError, "a.json", ["shapes[0] (cat)", "outside the 64x48 image"]),
    ("labelme", "missing image", _labelme, lambda r: (r / "a.jpg").unlink(),
     FileNotFoundError, "a.json", ["image file not found", "imagePath 'a.jpg'"]),
    ("via", "malformed", _via, lambda r: (r / "via_project.json").write_text('{"_via_img_metadata": {'),
     ValueError, "via_project.json", ["not valid JSON"]),
    ("via", "unknown class", _via,
     lambda r: _json_edit(r / "via_project.json", lambda d: _via_region(d)["region_attributes"].update(species="unicorn")),
     ValueError, "via_project.json", ["image 'a.jpg' region 0 (unicorn)", "unknown class 'unicorn'", "options"]),
    ("via", "polygon < 3 points", _via,
     lambda r: _json_edit(r / "via_project.json", lambda d: _via_region(d, 1)["shape_attributes"].update(
         all_points_x=[1, 5], all_points_y=[2, 6])),
     ValueError, "via_project.json", ["image 'a.jpg' region 1 (dog)", "polygon has 2 point(s)"]),
    ("via", "box outside", _via,
     lambda r: _json_edit(r / "via_project.json", lambda d: _via_region(d)["shape_attributes"].update(x=200)),
     ValueError, "via_project.json", ["image 'a.jpg' region 0 (cat)", "outside the 64x48 image"]),
    ("via", "missing image", _via, lambda r: (r / "a.jpg").unlink(),
     FileNotFoundError, "via_project.json", ["image 'a.jpg'", "image file not found", "filename 'a.jpg'"]),
    ("cvat", "malformed", _cvat, lambda r: _edit(r / "annotations.xml", "</annotations>", ""),
     ValueError, "annotations.xml", ["not valid XML"]),
    ("cvat", "unknown class", _cvat, lambda r: _edit(r / "annotations.xml", '<box label="cat"', '<box label="unicorn"'),
     ValueError, "annotations.xml", ["image 'a.jpg' box 0 (unicorn)", "unknown class 'unicorn'", "<meta>"]),
    ("cvat", "polygon < 3 points", _cvat,
     lambda r: _edit(r / "annotations.xml", 'points="34,4;60,8;50,40;38,30"', 'points="34,4;60,8"'),
     ValueError, "annotations.xml", ["image 'a.jpg' polygon 0 (dog)", "polygon has 2 point(s)"]),
    ("cvat", "box outside", _cvat, lambda r: _edit(r / "annotations.xml", 'xbr="30"', 'xbr="300"'),
     ValueError, "annotations.xml", ["image 'a.jpg' box 0 (cat)", "outside the 64x48 image"]),
    ("cvat", "missing image", _cvat, lambda r: (r / "images" / "a.jpg").unlink(),
     FileNotFoundError, "annotations.xml", ["image 'a.jpg'", "image file not found", "name 'a.jpg'"]),
]


@pytest.mark.parametrize("fmt, case, write, breaks, exc_type, file, parts", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_one_error_naming_file_and_field(tmp_path: Path, fmt, case, write, breaks, exc_type, file, parts) -> None:
    write(tmp_path)
    breaks(tmp_path)
    with pytest.raises(exc_type) as info:
        build_dataset(tmp_path, "all")
    message = str(info.value)
    assert str(tmp_path / file) in message
    assert not re.match(r"\d+ errors in the data set", message), message  # one error, not a list
    for part in parts:
        assert part in message, message


def test_every_reader_has_each_kind_of_bad_input() -> None:
    kinds = {"malformed", "unknown class", "polygon < 3 points", "box outside", "missing image"}
    for fmt in ("yolo", "labelme", "via", "cvat"):
        assert kinds <= {c[1] for c in CASES if c[0] == fmt}
    assert kinds - {"polygon < 3 points"} <= {c[1] for c in CASES if c[0] == "labelimg"}  # boxes only


def test_check_lists_each_reader_problem_without_stopping(tmp_path: Path, capsys) -> None:
    _labelme(tmp_path)
    _json_edit(tmp_path / "a.json", lambda d: d["shapes"][1].update(points=[[1, 2], [5, 6]]))
    (tmp_path / "b.json").write_text("not json")
    assert main(["data", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"error: {tmp_path / 'a.json'}: shapes[1] (dog): polygon has 2 point(s)" in out
    assert f"error: {tmp_path / 'b.json'}: not valid JSON" in out
    assert "split all: LabelMe JSON" in out and "FAILED: 1 split(s) checked, 2 error(s)" in out
