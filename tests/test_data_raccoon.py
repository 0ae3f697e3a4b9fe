"""Real data: 200 LabelImg-annotated photographs (../shared/data/raccoon), read in place.

The folder is read-only and third-party: it is never copied into the repository, and split
files go to a temporary folder (``--out``).
"""

from __future__ import annotations

import re
import shlex
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
    assert val.image_path(0).parent.resolve() == (RACCOON / "images").resolve()  # ../shared may be a symbolic link


def test_the_data_commands_of_docs_own_data_run_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    """docs/own_data.md leads with this folder: its `rcnn data` commands run (from a temporary
    folder, so that --out lands there), and print what the page shows."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "own_data.md").read_text(encoding="utf-8")
    lead = doc[: doc.index("# A worked example")]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", lead, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["rcnn", "data"]:
                commands.append([str(RACCOON) if w == "../shared/data/raccoon" else w for w in words])
    assert [c[2] for c in commands] == ["check", "split", "check"]
    monkeypatch.chdir(tmp_path)
    shown = {"check": "OK: 1 split(s) checked, 0 error(s), 0 warning(s)", "split": "train 160 images, val 40 images"}
    for words in commands:
        assert main(words[1:]) == 0, words
        out = capsys.readouterr().out
        assert shown[words[2]] in out
        if "--suggest-anchors" in words:
            assert "anchor_sizes [[91], [181], [362], [724], [1448]], aspect_ratios [0.66, 1, 1.46]" in out
            assert "72 of 217 with the suggested anchors; 153 of 217 with the defaults" in out
    assert sorted(p.name for p in (tmp_path / "splits" / "raccoon").iterdir()) == [
        "rcnn_dataset.json", "train.txt", "val.txt"]
