"""Splits of data sets without them: ``rcnn data split`` and ``val_fraction`` on the fly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from layout_sets import Img, Obj, mixed_set, write_coco, write_labelimg
from rcnn.cli import main
from rcnn.data import DataWarning, build_dataset
from rcnn.data.reading import find_splits
from rcnn.data.check import check_dataset
from rcnn.data.splits import stratified_split


def _unequal_classes() -> list[Img]:
    """60 images: 40 with a cat, 10 with a dog, 5 with both, 5 without objects."""
    cat, dog = Obj("cat", box=(1, 1, 5, 5)), Obj("dog", box=(2, 2, 7, 7))
    objects = [[cat]] * 40 + [[dog]] * 10 + [[cat, dog]] * 5 + [[]] * 5
    return [Img(f"img_{i:03d}.png", 8, 8, list(objs)) for i, objs in enumerate(objects)]


@pytest.fixture(scope="module")
def unequal_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unequal")
    write_labelimg(root, _unequal_classes(), images_folder="images", xml_folder="annotations")
    return root


def _hashes(folder: Path, names: list[str]) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def test_stratified_split_spreads_each_class_and_is_seeded() -> None:
    images = _unequal_classes()
    keys = [im.stem for im in images]
    classes = [{o.name for o in im.objects} for im in images]
    split = stratified_split(keys, classes, 0.2, seed=0)
    assert set(split["train"]) | set(split["val"]) == set(keys) and not set(split["train"]) & set(split["val"])
    assert len(split["val"]) == 12
    with_class = {c: {k for k, names in zip(keys, classes) if c in names} for c in ("cat", "dog")}
    # every class, and the images without objects, keep the fraction (to the nearest image)
    assert len(with_class["cat"] & set(split["val"])) == pytest.approx(0.2 * 45, abs=1)
    assert len(with_class["dog"] & set(split["val"])) == pytest.approx(0.2 * 15, abs=1)
    empty = {k for k, names in zip(keys, classes) if not names}
    assert len(empty & set(split["val"])) == 1
    assert stratified_split(keys, classes, 0.2, seed=0) == split  # same seed, same split
    assert stratified_split(keys, classes, 0.2, seed=1) != split
    assert stratified_split(keys[::-1], classes[::-1], 0.2, seed=0) == split  # the input order does not matter
    with pytest.raises(ValueError, match="between 0 and 1"):
        stratified_split(keys, classes, 1.0)
    with pytest.raises(ValueError, match="at least 2 images"):
        stratified_split(keys[:1], classes[:1], 0.5)


def test_split_command_is_deterministic_and_matches_val_fraction(unequal_set: Path, tmp_path: Path, capsys) -> None:
    assert main(["data", "split", str(unequal_set), "--val-fraction", "0.2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "train 48 images, val 12 images" in out and "--set data.root=" in out
    first = _hashes(unequal_set, ["train.txt", "val.txt"])
    assert main(["data", "split", str(unequal_set), "--val-fraction", "0.2", "--seed", "3"]) == 0  # same files again
    assert _hashes(unequal_set, ["train.txt", "val.txt"]) == first
    val = (unequal_set / "val.txt").read_text().split()
    assert len(val) == 12 and all(k.startswith("img_") for k in val)
    assert find_splits(unequal_set) == ["train", "val"]
    from_files = build_dataset(unequal_set, "val")
    on_the_fly = build_dataset(unequal_set, "val", val_fraction=0.2, split_seed=3)
    assert from_files.image_names == on_the_fly.image_names == sorted(val)
    assert build_dataset(unequal_set, "train").image_ids == build_dataset(unequal_set, "train", val_fraction=0.2,
                                                                         split_seed=3).image_ids
    # Another seed would replace a split someone trained on: refused unless --force.
    assert main(["data", "split", str(unequal_set), "--seed", "4"]) == 2
    assert "exists with a different split" in capsys.readouterr().err
    assert main(["data", "split", str(unequal_set), "--seed", "4", "--force"]) == 0
    assert _hashes(unequal_set, ["train.txt", "val.txt"]) != first
    for name in ("train.txt", "val.txt"):
        (unequal_set / name).unlink()


def test_split_out_folder_for_read_only_data(unequal_set: Path, tmp_path: Path, capsys) -> None:
    unequal_set.chmod(0o555)
    try:
        assert main(["data", "split", str(unequal_set)]) == 2
        assert "read-only" in capsys.readouterr().err and not (unequal_set / "train.txt").exists()
        out = tmp_path / "splits"
        assert main(["data", "split", str(unequal_set), "--out", str(out)]) == 0
    finally:
        unequal_set.chmod(0o755)
    assert sorted(p.name for p in out.iterdir()) == ["rcnn_dataset.json", "train.txt", "val.txt"]
    spec = json.loads((out / "rcnn_dataset.json").read_text())
    assert spec == {"format": "labelimg", "root": str(unequal_set.resolve())}
    train, val = build_dataset(out, "train"), build_dataset(out, "val")  # the split folder is a data set path
    assert len(train) == 48 and len(val) == 12 and not set(train.image_names) & set(val.image_names)
    assert val.image_names == build_dataset(unequal_set, "val", val_fraction=0.2).image_names
    reports = check_dataset(out)
    assert [r.source.split for r in reports] == ["train", "val"] and all(r.errors == 0 for r in reports)


def test_split_file_lines_may_name_files_and_unknown_lines_are_errors(tmp_path: Path) -> None:
    write_labelimg(tmp_path, mixed_set(), images_folder="images", xml_folder="annotations")
    (tmp_path / "train.txt").write_text("a\nimages/b.png   # a comment\n\nc.jpg\na\n")
    assert build_dataset(tmp_path, "train").image_names == ["a", "b", "c"]
    (tmp_path / "val.txt").write_text("a\nzebra\n")
    with pytest.raises(FileNotFoundError) as info:
        build_dataset(tmp_path, "val")
    assert f"{tmp_path / 'val.txt'}: line 2: 'zebra' is not an image of the data set" in str(info.value)
    with pytest.warns(DataWarning, match="val.txt: line 2: skipped: 'zebra'"):
        assert build_dataset(tmp_path, "val", skip_broken=True).image_names == ["a"]


def test_val_fraction_splits_a_coco_file_and_refuses_other_names(tmp_path: Path, capsys) -> None:
    ann = write_coco(tmp_path, _unequal_classes(), masks=False)
    train = build_dataset(ann, "train", val_fraction=0.25, split_seed=1)
    val = build_dataset(ann, "val", val_fraction=0.25, split_seed=1)
    assert len(train) + len(val) == 60 and len(val) == 15
    assert not set(train.image_ids) & set(val.image_ids)
    assert len(val.coco.getImgIds()) == 15  # evaluation sees the val images only
    with pytest.raises(ValueError, match="'train' and 'val'"):
        build_dataset(ann, "test", val_fraction=0.25)
    assert main(["data", "split", str(ann)]) == 2  # split files are for the annotation-tool layouts
    assert "a COCO data set has its own splits (or split a COCO file on the fly with val_fraction" in capsys.readouterr().err


def test_split_refuses_a_layout_with_its_own_splits(tmp_path: Path, capsys) -> None:
    from layout_sets import write_yolo

    write_yolo(tmp_path, mixed_set(), polygons=False, splits={"train": ["a.jpg", "b.png"], "val": ["c.jpg"]})
    assert main(["data", "split", str(tmp_path)]) == 2
    assert "already has the splits train, val" in capsys.readouterr().err and not (tmp_path / "train.txt").exists()
    # drawing another split on the fly is still possible, over all three images
    assert len(build_dataset(tmp_path, "train", val_fraction=0.34)) + len(build_dataset(tmp_path, "val", val_fraction=0.34)) == 3
