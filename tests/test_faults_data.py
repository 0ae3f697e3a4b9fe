"""Mistakes a user makes with a data set, each refused with one clear message, the user's files intact.

- ``data convert`` into a folder that holds the source (its own root, a parent, a link to it,
  over its own annotation file, VOC / YOLO / LabelImg sources, copy or ``--link``);
- a COCO RLE whose run lengths do not cover its image, or of another size than its image;
- one image file under two image ids (COCO), or described by two entries (the layouts);
- a COCO ``file_name`` that is absolute or starts with ``../``;
- numeric options of ``data check / split / convert`` out of range.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from layout_sets import Img, Obj, mixed_set, voc_xml, write_cvat, write_labelimg, write_yolo
from rcnn.cli import main
from rcnn.data import DataWarning, build_dataset
from rcnn.data.coco import rle_string_totals
from rcnn.data.writing import convert_dataset
from user_files import assert_unchanged, snapshot


def _copy(shapes_root: Path, tmp_path: Path, name: str = "set") -> Path:
    root = tmp_path / name
    shutil.copytree(shapes_root, root)
    return root


def _error_line(capsys) -> str:
    """The one line a refused command writes on stderr."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _data_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DataWarning)]


# -- 3. converting into a folder that holds the source ---------------------------------------------


def test_convert_into_its_own_root_with_link_and_force_is_refused(shapes_root, tmp_path, capsys):
    root = _copy(shapes_root, tmp_path)
    ann = root / "annotations" / "instances_val.json"
    before = snapshot(root)
    assert main(["data", "convert", str(ann), str(root), "--to", "coco", "--link", "--force"]) == 2
    line = _error_line(capsys)
    assert f"error: {root}: the output folder holds {ann}" in line and "even with --force" in line
    assert_unchanged(before, root)
    assert not any(p.is_symlink() for p in (root / "images" / "val").iterdir())


@pytest.mark.parametrize("case", ["parent_copy", "images_folder_yolo", "through_a_link", "without_force", "root_folder"])
def test_convert_into_a_folder_around_the_source_is_refused(case, shapes_root, tmp_path, capsys):
    root = _copy(shapes_root, tmp_path / "parent")
    source, args = str(root), ["--to", "coco", "--force"]
    if case == "parent_copy":  # copy mode, OUT a parent of the source
        out = tmp_path / "parent"
    elif case == "images_folder_yolo":  # OUT the images folder itself
        out, args = root / "images" / "val", ["--to", "yolo", "--force", "--split", "val"]
    elif case == "through_a_link":  # OUT a symbolic link to the source's root
        out = tmp_path / "link"
        out.symlink_to(root, target_is_directory=True)
    elif case == "without_force":  # the reason is the source, not only that OUT is not empty
        out, args = root, ["--to", "voc"]
    else:  # the source given as its root, annotations written over its own annotation files
        out = root
    before = snapshot(tmp_path / "parent")
    assert main(["data", "convert", source, str(out), *args]) == 2
    line = _error_line(capsys)
    assert f"{out}: the output folder holds" in line and "which the source is read from" in line
    assert_unchanged(before, tmp_path / "parent")


def test_convert_of_a_source_reached_through_a_link_into_its_real_folder(shapes_root, tmp_path, capsys):
    root = _copy(shapes_root, tmp_path)
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)
    before = snapshot(root)
    with pytest.raises(ValueError, match="which the source is read from"):
        convert_dataset(tmp_path / "alias" / "annotations" / "instances_val.json", root, "coco", link=True, force=True)
    assert_unchanged(before, root)


def test_converting_linked_output_back_over_the_original_is_refused(shapes_root, tmp_path, capsys):
    """A ``--link`` conversion's images are links to the source's: converting them back into
    the source would link each image to itself."""
    root = _copy(shapes_root, tmp_path)
    assert main(["data", "convert", str(root), str(tmp_path / "linked"), "--to", "yolo", "--link", "--split", "val"]) == 0
    capsys.readouterr()
    before = snapshot(root)
    assert main(["data", "convert", str(tmp_path / "linked"), str(root), "--to", "coco", "--link", "--force"]) == 2
    assert f"{root}: the output folder holds" in _error_line(capsys)
    assert_unchanged(before, root)


def _voc_root(root: Path) -> Path:
    write_labelimg(root, mixed_set(), images_folder="JPEGImages", xml_folder="Annotations")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("a\nb\nc\n")
    return root


@pytest.mark.parametrize("layout", ["voc", "yolo", "labelimg"])
def test_layouts_converted_into_their_own_folder_are_refused(layout, tmp_path, capsys):
    root = tmp_path / layout
    if layout == "voc":
        _voc_root(root)
    elif layout == "yolo":
        write_yolo(root, mixed_set(), polygons=False, splits={"train": ["a.jpg", "b.png"], "val": ["c.jpg"]})
    else:
        write_labelimg(root, mixed_set(), images_folder=None, xml_folder=None)
    before = snapshot(root)
    for link in ([], ["--link"]):
        assert main(["data", "convert", str(root), str(root), "--to", layout if layout != "labelimg" else "voc",
                     "--force", *link]) == 2  # fmt: skip
        assert f"{root}: the output folder holds" in _error_line(capsys)
    assert_unchanged(before, root)


def test_a_new_folder_inside_the_source_is_fine(shapes_root, tmp_path, capsys):
    root = _copy(shapes_root, tmp_path)
    before = snapshot(root)
    assert main(["data", "convert", str(root), str(root / "as_yolo"), "--to", "yolo", "--split", "val"]) == 0
    after = snapshot(root)
    assert {k: after[k] for k in before} == before  # every file of the source as it was
    assert all(k.startswith("as_yolo") for k in after.keys() - before.keys())


# -- 5. RLE masks that do not cover their image ----------------------------------------------------


def _encode_counts(runs: list[int]) -> str:
    """COCO's compressed RLE string of the run lengths ``runs`` (written here from the format's
    description: 5-bit groups, 0x20 = more, 0x10 = sign, differences from the fourth run)."""
    text = []
    for i, value in enumerate(runs):
        value = value - runs[i - 2] if i > 2 else value
        while True:
            group = value & 0x1F
            value >>= 5
            done = (value == 0 and not group & 0x10) or (value == -1 and group & 0x10)
            text.append(chr(group + (0 if done else 0x20) + 48))
            if done:
                break
    return "".join(text)


def _runs(mask: np.ndarray) -> list[int]:
    """Run lengths of a ``[H, W]`` 0/1 mask in column-major order, starting with background."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(edges).tolist()
    return [0, *runs] if flat[0] else runs


def test_rle_totals_agree_with_pycocotools_and_name_corrupt_strings():
    rng = np.random.default_rng(0)
    strings, sizes = [], []
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(mask))
        strings.append(rle["counts"].decode())
        sizes.append(h * w)
        assert _encode_counts(_runs(mask)) == strings[-1]  # the test's encoder is pycocotools'
    assert rle_string_totals(strings) == sizes
    runs = [int(v) for v in rng.integers(0, 10**7, 40)]  # long numbers: 5 groups each
    assert rle_string_totals([_encode_counts(runs), "", _encode_counts([3, 0, 5])]) == [sum(runs), 0, 8]
    found = rle_string_totals(["1", "a", "p0", "é0", "oooooooo0", _encode_counts([4, 5, 6, -2])])
    assert found[0] == 1
    assert "cut short" in found[1] and "alphabet" in found[2] and "alphabet" in found[3]
    assert "longer than 35 bits" in found[4] and "negative run length" in found[5]


def _break_masks(root: Path) -> tuple[Path, dict[int, int]]:
    """Three val annotations with a broken RLE; returns the file and {annotation id: image id}."""
    ann_file = root / "annotations" / "instances_val.json"
    data = json.loads(ann_file.read_text())
    anns = data["annotations"]
    first, second, third = anns[0], next(a for a in anns if a["image_id"] != anns[0]["image_id"]), anns[-1]
    runs = _runs(mask_utils.decode(first["segmentation"]))
    runs[-1] += 40  # 40 pixels too many: pycocotools refuses to decode it
    first["segmentation"]["counts"] = _encode_counts(runs)
    runs = _runs(mask_utils.decode(second["segmentation"]))
    second["segmentation"] = {"size": [128, 128], "counts": runs[:-1]}  # uncompressed, too few pixels
    third["segmentation"]["size"] = [64, 128]  # another size than the image's
    ann_file.write_text(json.dumps(data))
    return ann_file, {a["id"]: a["image_id"] for a in (first, second, third)}


def test_rle_not_covering_its_image_is_found_by_check_reader_and_skip_broken(shapes_root, tmp_path, capsys):
    root = _copy(shapes_root, tmp_path)
    ann_file, broken = _break_masks(root)
    before = snapshot(root)
    assert main(["data", "check", str(root), "--split", "val", "--quick"]) == 1
    out = capsys.readouterr().out
    for ann_id, image_id in broken.items():
        assert f"error: {ann_file}: annotation id {ann_id} (image id {image_id}):" in out, out
    assert "the compressed RLE 'counts' cover" in out and "has 16384; the mask is corrupt" in out
    assert "the uncompressed RLE 'counts' cover" in out and "RLE size [64, 128] does not match" in out
    with pytest.raises(ValueError) as info:  # what Mask R-CNN training builds
        build_dataset(root, "val", with_masks=True)
    message = str(info.value)
    assert message.startswith("3 errors in the data set") and f"annotation id {next(iter(broken))} (image id" in message
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dataset = build_dataset(root, "val", with_masks=True, skip_broken=True)
    skipped = _data_warnings(record)
    assert len(skipped) == len(set(broken.values())) and all("skipped:" in w for w in skipped)
    assert set(dataset.image_ids).isdisjoint(broken.values()) and len(dataset) == 8 - len(set(broken.values()))
    for i in range(len(dataset)):  # what the first batches of training read: every mask decodes
        _, target = dataset[i]
        assert target["masks"].shape[0] == len(target["boxes"])
    assert_unchanged(before, root)


def test_rle_problems_with_check_skip_broken_and_a_split_on_the_fly(shapes_root, tmp_path, capsys):
    root = _copy(shapes_root, tmp_path)
    ann_file, broken = _break_masks(root)
    before = snapshot(root)
    assert main(["data", "check", str(ann_file), "--quick", "--skip-broken"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped: ") == len(set(broken.values())) and f"images:                 {8 - len(set(broken.values()))}" in out
    assert main(["data", "check", str(ann_file), "--quick", "--val-fraction", "0.5"]) == 1
    out = capsys.readouterr().out
    assert sum(f"annotation id {a} (image id" in out for a in broken) == 3  # each in the split of its image
    assert_unchanged(before, root)


# -- 6. one image file under two image ids ---------------------------------------------------------


def _split_image(root: Path, spelling: str | None = None) -> tuple[Path, int, int, str]:
    """Give half of the first val image's objects a second entry for the same file."""
    ann_file = root / "annotations" / "instances_val.json"
    data = json.loads(ann_file.read_text())
    image = data["images"][0]
    twin = {**image, "id": max(i["id"] for i in data["images"]) + 1, "file_name": spelling or image["file_name"]}
    data["images"].append(twin)
    own = [a for a in data["annotations"] if a["image_id"] == image["id"]]
    assert len(own) >= 2
    for ann in own[: len(own) // 2]:
        ann["image_id"] = twin["id"]
    ann_file.write_text(json.dumps(data))
    return ann_file, image["id"], twin["id"], image["file_name"]


def test_one_file_name_under_two_image_ids_is_refused_everywhere(shapes_root, tmp_path, capsys):
    root = _copy(shapes_root, tmp_path)
    ann_file, first, second, name = _split_image(root)
    before = snapshot(root)
    assert main(["data", "check", str(root), "--split", "val", "--quick"]) == 1
    out = capsys.readouterr().out
    assert f"error: {ann_file}: image ids {first} and {second}: file_name '{name}' appears in each" in out
    assert "merge them into one entry" in out and "FAILED" in out
    with pytest.raises(ValueError) as info:  # training and evaluate build this reader
        build_dataset(root, "val")
    message = str(info.value)
    assert str(ann_file) in message and name in message and f"image ids {first} and {second}" in message
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dataset = build_dataset(root, "val", skip_broken=True)
    (line,) = _data_warnings(record)
    assert f"image ids {first} and {second}: skipped: file_name '{name}'" in line
    assert first not in dataset.image_ids and second not in dataset.image_ids and len(dataset) == 7
    assert main(["data", "convert", str(root), str(tmp_path / "out"), "--to", "coco", "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert f"image ids {first} and {second}" in err.splitlines()[0] and not (tmp_path / "out").exists()
    assert_unchanged(before, root)


def test_two_spellings_of_one_file_name_are_one_image(shapes_root, tmp_path):
    root = _copy(shapes_root, tmp_path)
    ann_file, first, second, name = _split_image(root, spelling=None)
    data = json.loads(ann_file.read_text())
    data["images"][-1]["file_name"] = f"../val/./{name}"
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"file_names '{name}' and '\.\./val/\./{name}' name one image file"):
        build_dataset(root, "val")


def test_layouts_with_two_entries_for_one_image(tmp_path):
    # LabelImg: an XML file copied beside the original
    labelimg = tmp_path / "labelimg"
    write_labelimg(labelimg, mixed_set(), images_folder=None, xml_folder=None)
    shutil.copy(labelimg / "a.xml", labelimg / "a copy.xml")
    with pytest.raises(ValueError, match=r"a\.xml: describes the image .*a\.jpg, which .*a copy\.xml describes too"):
        build_dataset(labelimg, "all")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert build_dataset(labelimg, "all", skip_broken=True).image_names == ["b", "c"]
    assert len(_data_warnings(record)) == 1
    # CVAT: one image under two spellings of its name
    cvat = tmp_path / "cvat"
    xml = write_cvat(cvat, mixed_set())
    xml.write_text(xml.read_text().replace(
        "</annotations>", '<image id="9" name="./a.jpg" width="64" height="48"><box label="cat" source="manual" '
        'occluded="0" xtl="1" ytl="1" xbr="9" ybr="9" z_order="0"/></image></annotations>'))  # fmt: skip
    with pytest.raises(ValueError, match=r"image '\./a\.jpg': describes the image .*a\.jpg, which .*\(image 'a\.jpg'\)"):
        build_dataset(cvat, "all")
    # VOC: two XML files whose <filename> is one image
    voc = _voc_root(tmp_path / "voc")
    (voc / "Annotations" / "d.xml").write_text(voc_xml(Img("a.jpg", 48, 64, [Obj("dog", box=(1, 1, 9, 9))]), "JPEGImages"))
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("a\nb\nc\nd\n")
    with pytest.raises(ValueError, match=r"a\.xml: describes the image .*a\.jpg, which .*d\.xml describes too"):
        build_dataset(voc, "trainval")


# -- 13. file names outside the images folder ------------------------------------------------------


def _outside_names(root: Path, tmp_path: Path) -> tuple[Path, dict]:
    """val image 0 named by an absolute path, image 1 by ../, image 2 by a ../ name that does not exist;
    image 1's file has the same base name as image 3's (a clash for converted output)."""
    ann_file = root / "annotations" / "instances_val.json"
    data = json.loads(ann_file.read_text())
    images = data["images"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(root / "images" / "val" / images[0]["file_name"], elsewhere / "abs.png")
    images[0]["file_name"] = str(elsewhere / "abs.png")
    shutil.move(root / "images" / "val" / images[1]["file_name"], root / "images" / images[3]["file_name"])
    images[1]["file_name"] = f"../{images[3]['file_name']}"
    images[2]["file_name"] = "../nothere.png"
    ann_file.write_text(json.dumps(data))
    return ann_file, data


def _drop_missing(ann_file: Path, data: dict) -> None:
    """Remove the image entry that names no file (and its annotations)."""
    missing = data["images"].pop(2)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != missing["id"]]
    ann_file.write_text(json.dumps(data))


def test_file_names_outside_the_images_folder_are_read_and_checked_per_image(shapes_root, tmp_path, capsys):
    root = _copy(shapes_root, tmp_path)
    ann_file, data = _outside_names(root, tmp_path)
    before = snapshot(root)
    assert main(["data", "check", str(root), "--split", "val"]) == 1
    out = capsys.readouterr().out
    missing = data["images"][2]
    assert f"error: {ann_file}: image id {missing['id']} (../nothere.png): image file not found" in out
    assert "1 error(s)" in out and "images:                 7" in out  # the other images are checked
    assert main(["data", "check", str(ann_file), "--quick", "--val-fraction", "0.5"]) == 1  # keys of the split
    capsys.readouterr()
    _drop_missing(ann_file, data)  # the missing one removed: the set is fine
    before = snapshot(root)
    assert main(["data", "check", str(root), "--split", "val"]) == 0
    dataset = build_dataset(root, "val")  # training reads the same files
    image, target = dataset[dataset.index_of(data["images"][0]["id"])]
    assert image.shape[1:] == target["orig_size"]
    assert_unchanged(before, root)


@pytest.mark.parametrize("to", ["coco", "yolo"])
def test_converted_file_names_stay_inside_out(to, shapes_root, tmp_path, capsys):
    root = _copy(shapes_root, tmp_path)
    ann_file, data = _outside_names(root, tmp_path)
    _drop_missing(ann_file, data)
    before, outside = snapshot(root), snapshot(tmp_path / "elsewhere")
    out = tmp_path / "out"
    assert main(["data", "convert", str(ann_file), str(out), "--to", to]) == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(root)
               and not p.is_relative_to(tmp_path / "elsewhere")]  # fmt: skip
    assert written and all(p.is_relative_to(out) for p in written)
    names = sorted(p.name for p in (out / "images" / "val").iterdir())
    assert len(names) == 7 and "abs.png" in names and sum(n.endswith("_2.png") for n in names) == 1
    assert_unchanged(before, root)
    assert_unchanged(outside, tmp_path / "elsewhere")


# -- numeric options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, option, value",
    [("check", "--val-fraction", "nan"), ("check", "--val-fraction", "1"), ("check", "--seed", "-1"),
     ("check", "--min-size", "0"), ("check", "--max-size", "1e9"), ("check", "--levels", "0"),
     ("split", "--val-fraction", "0"), ("split", "--seed", "2.5"), ("convert", "--val-fraction", "-0.2"),
     ("convert", "--seed", "99999999999")],
)  # fmt: skip
def test_numeric_options_are_range_checked(command, option, value, shapes_root, tmp_path, capsys):
    root = _copy(shapes_root, tmp_path)
    before = snapshot(root)
    args = ["data", command, str(root)] + ([str(tmp_path / "out"), "--to", "coco"] if command == "convert" else [])
    with pytest.raises(SystemExit) as info:
        main([*args, f"{option}={value}"])
    assert info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"rcnn data {command}: error: argument {option}: expected ") and value in line
    assert_unchanged(before, root)
    assert not (tmp_path / "out").exists()
