"""Real data: 200 LabelImg-annotated photographs (../shared/data/raccoon), read in place.

The folder is read-only and third-party: it is never copied into the repository, and split
files go to a temporary folder (``--out``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rcnn.cli import main
from rcnn.data import build_dataset

RACCOON = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raccoon"  # ../shared/data/raccoon

pytestmark = pytest.mark.skipif(
    not (RACCOON / "annotations").is_dir(), reason=f"the raccoon photographs are not at {RACCOON}"
)


def test_check_with_an_on_the_fly_split(capsys) -> None:
    assert main(["data", "check", str(RACCOON), "--val-fraction", "0.2", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "split train: LabelImg / VOC XML" in out and "split val: LabelImg / VOC XML" in out
    assert re.search(r"images:\s+160\b", out) and re.search(r"images:\s+40\b", out)
    assert "all splits: 200 images, 217 instances, 1 class(es)" in out
    assert re.search(r"^\s+raccoon\s+\d+$", out, re.MULTILINE)
    assert "OK: 2 split(s) checked, 0 error(s), 0 warning(s)" in out


def test_split_to_a_folder_and_build(tmp_path: Path, capsys) -> None:
    before = sorted(p.name for p in RACCOON.iterdir())
    assert main(["data", "split", str(RACCOON), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in RACCOON.iterdir()) == before  # nothing written beside the data
    train, val = build_dataset(tmp_path, "train", train=True), build_dataset(tmp_path, "val")
    assert (len(train), len(val)) == (160, 40) and not set(train.image_names) & set(val.image_names)
    assert train.class_names == ["__background__", "raccoon"]
    assert sum(len(r.labels) for d in (train, val) for r in d.records) == 217
    assert val.image_names == build_dataset(RACCOON, "val", val_fraction=0.2).image_names
    image, target = val[0]  # a real photograph, read by its <filename>, not its <path>
    assert image.shape[1:] == target["orig_size"] and len(target["boxes"]) >= 1
    assert val.image_path(0).parent == RACCOON / "images"
