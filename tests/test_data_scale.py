"""Annotations at scale: the columnar records, the checks made at once, the image-header probe.

The large-data paths must give exactly what the one-object-at-a-time paths gave: the same records,
the same problems in the same words and order, the same image sizes as PIL. Sizes here are small;
the costs at COCO size are measured by benchmarks/scaling.py.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools.coco import COCO

import rcnn.data.coco as coco_module
from benchmarks.coco_scale import COCO_BOXES, COCO_IMAGES, make_coco_scale
from layout_sets import Img, make_image
from rcnn.cli import main
from rcnn.data import build_dataset
from rcnn.data.check import check_dataset
from rcnn.data.coco import read_coco
from rcnn.data.records import ImageRecord, RecordTable, check_images
from rcnn.data.records import image_size as fast_image_size
from rcnn.io.headers import probe_image
from rcnn.io.images import image_size as pil_image_size

# ---------------------------------------------------------------------------------------------
# The header probe agrees with PIL.


def _jpeg_with_exif_after_frame(path: Path) -> None:
    """A JPEG whose EXIF block (orientation 6) comes after its frame header: PIL still reads it."""
    plain = path.with_name("plain.jpg")
    Image.new("RGB", (30, 20), (10, 200, 30)).save(plain, quality=90)
    data = plain.read_bytes()
    exif = Image.Exif()
    exif[0x0112] = 6
    block = exif.tobytes()  # with its "Exif\0\0" prefix
    assert block.startswith(b"Exif\x00\x00")
    app1 = b"\xff\xe1" + (len(block) + 2).to_bytes(2, "big") + block
    sof = data.find(b"\xff\xc0")
    end = sof + 2 + int.from_bytes(data[sof + 2 : sof + 4], "big")
    path.write_bytes(data[:end] + app1 + data[end:])


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_probe_reads_size_and_exif_orientation_as_pil(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / "x.jpg"
    make_image(path, Img("x.jpg", 48, 64, orientation=orientation))
    assert probe_image(path) == pil_image_size(path) == (48, 64)
    assert fast_image_size(path) == (48, 64)


def test_probe_agrees_with_pil_on_other_kinds_or_leaves_them_to_it(tmp_path: Path) -> None:
    made = {
        "gray.jpg": Image.new("L", (33, 17), 90),
        "progressive.jpg": Image.new("RGB", (40, 25), (1, 2, 3)),
        "cmyk.jpg": Image.new("CMYK", (12, 9)),
        "rgba.png": Image.new("RGBA", (21, 13)),
        "palette.png": Image.new("P", (8, 30)),
        "sixteen.png": Image.new("I;16", (19, 7)),
        "image.bmp": Image.new("RGB", (5, 6)),
    }
    for name, picture in made.items():
        picture.save(tmp_path / name, **({"progressive": True} if name == "progressive.jpg" else {}))
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (16, 10)).save(tmp_path / "exif.png", exif=exif)  # PIL reads a PNG's eXIf: left to it
    _jpeg_with_exif_after_frame(tmp_path / "late_exif.jpg")
    for path in sorted(tmp_path.iterdir()):
        found = probe_image(path)
        if path.suffix == ".bmp" or path.name == "exif.png":
            assert found is None, path.name
        else:
            assert found == pil_image_size(path), path.name
        assert fast_image_size(path) == pil_image_size(path), path.name
    assert probe_image(tmp_path / "late_exif.jpg") == (30, 20)  # turned: stored 30 wide, 20 high


def test_probe_end_marker_finds_a_cut_file_and_leaves_trailing_bytes_to_pil(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    make_image(path, Img("x.jpg", 20, 30))
    data = path.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "trailer.jpg").write_bytes(data + b"\x00" * 10)  # what some cameras append
    assert probe_image(tmp_path / "cut.jpg", check_end=False) == (20, 30)
    assert probe_image(tmp_path / "cut.jpg") is None and probe_image(tmp_path / "trailer.jpg") is None
    assert probe_image(tmp_path / "missing.jpg") is None and probe_image(tmp_path) is None
    records = [ImageRecord(1, tmp_path / name, 20, 30, **ImageRecord.empty_arrays()) for name in ("cut.jpg", "trailer.jpg")]
    # complete: the cut file is decoded (and refused), the file with a trailer decoded (and fine)
    problems = check_images(records, "complete")
    assert [p.file for p in problems] == [str(tmp_path / "cut.jpg")] and "cannot decode" in problems[0].message
    assert check_images(records, "header") == []


def test_default_check_finds_a_cut_png_and_decode_finds_corrupt_pixels(tmp_path: Path, capsys) -> None:
    root = tmp_path / "set"
    images = root / "images" / "val"
    images.mkdir(parents=True)
    for name in ("cut.png", "corrupt.png", "ok.png"):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(images / name)
    cut = (images / "cut.png").read_bytes()
    (images / "cut.png").write_bytes(cut[: len(cut) // 2])
    corrupt = bytearray((images / "corrupt.png").read_bytes())
    start = corrupt.find(b"IDAT") + 40
    corrupt[start : start + 200] = bytes(200)  # pixels gone, the end intact
    (images / "corrupt.png").write_bytes(bytes(corrupt))
    ann = {"images": [{"id": k, "file_name": n, "height": 24, "width": 32} for k, n in enumerate(("cut.png", "corrupt.png", "ok.png"), 1)],
           "annotations": [], "categories": [{"id": 1, "name": "thing"}]}  # fmt: skip
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val.json").write_text(json.dumps(ann))
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "cut.png: cannot decode the image" in out and "corrupt.png: cannot" not in out and "1 error(s)" in out
    assert main(["data", "check", str(root), "--decode"]) == 1
    out = capsys.readouterr().out
    assert "cut.png: cannot decode" in out and "corrupt.png: cannot decode" in out and "2 error(s)" in out
    assert main(["data", "check", str(root), "--quick"]) == 0
    with pytest.raises(SystemExit) as info:  # one or the other
        main(["data", "check", str(root), "--quick", "--decode"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The columnar records.


def _records() -> list[ImageRecord]:
    rle = {"size": [4, 5], "counts": [3, 4, 13]}
    return [
        ImageRecord(7, Path("/d/a b.jpg"), 40, 50, np.array([[1, 2, 3, 4], [5, 6, 7, 9]], np.float32),
                    np.array([1, 2]), np.array([False, True]), np.zeros(2, bool), ann_ids=[11, 12],
                    areas=[4.0, 8.5], segmentations=[[[1.5, 2, 3, 4, 5, 6]], rle]),
        ImageRecord(3, Path("é/ü.png"), 10, 20, **ImageRecord.empty_arrays()),
        ImageRecord(9, Path("c.jpg"), 30, 30, np.array([[0, 0, 5, 5]], np.float32), np.array([3]),
                    np.zeros(1, bool), np.array([True])),
        ImageRecord(2, Path("d.jpg"), 8, 8, np.array([[0, 0, 1, 1]], np.float32), np.array([1]), np.zeros(1, bool),
                    np.zeros(1, bool), segmentations=[None]),
    ]  # fmt: skip


def _same(a: ImageRecord, b: ImageRecord) -> None:
    assert (a.image_id, a.path, a.height, a.width) == (b.image_id, b.path, b.height, b.width)
    for name in ("boxes", "labels", "iscrowd", "difficult"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
    assert (a.ann_ids, a.areas, a.segmentations) == (b.ann_ids, b.areas, b.segmentations)


def test_record_table_gives_back_each_record_and_takes_rows() -> None:
    records = _records()
    table = RecordTable.from_records(records)
    assert len(table) == 4 and RecordTable.from_records(table) is table
    for record, row in zip(records, table):
        _same(record, row)
    assert table.counts().tolist() == [2, 0, 1, 1] and table.segmentation_count() == 2
    assert table.path_strings() == ["/d/a b.jpg", "é/ü.png", "c.jpg", "d.jpg"]
    _same(table[-1], records[-1])
    with pytest.raises(IndexError):
        table[4]
    part = table.take([2, 0])
    _same(part[0], records[2])
    _same(part[1], records[0])
    assert [r.image_id for r in table[1:3]] == [3, 9]
    row = table[0]
    row.boxes[:] = 0  # a record's arrays are its own
    assert table.boxes[0].tolist() == [1, 2, 3, 4]
    again = pickle.loads(pickle.dumps(table))  # what a worker process started by spawn receives
    _same(again[0], records[0])


# ---------------------------------------------------------------------------------------------
# The annotations checked at once give what checking them one by one gives.

_GOOD = {"bbox": [2, 3, 10, 12], "category_id": 1, "iscrowd": 0, "area": 50.5}
_VARIANTS = [
    {},
    {"bbox": [2.25, 3.5, 10, 12.75], "area": "big"},
    {"bbox": [30, 30, 10.0005, 10]},  # overhangs by rounding: clipped without a word
    {"bbox": [30, 30, 11, 10]},  # overhangs by 1 px: clipped, a warning
    {"bbox": [50, 3, 10, 12]},  # far outside: an error
    {"bbox": [2, 3, 0, 12]},  # zero area: dropped, a warning
    {"bbox": [2, 3, -1, 12]},
    {"bbox": [2, 3, float("nan"), 12]},
    {"bbox": [2, 3, 10]},
    {"bbox": [2, True, 10, 12]},
    {"bbox": "2 3 10 12"},
    {"category_id": 99},
    {"category_id": 2},
    {"category_id": 2.0},
    {"iscrowd": 1},
    {"iscrowd": 2},
    {"iscrowd": True},
    {"area": float("inf")},
    {"segmentation": [[2, 3, 12, 3, 12, 15, 2, 15]]},
    {"segmentation": [[2, 3, 12, 3, 12, 15, 2, 15], [4, 4, 5, 5]]},  # a degenerate part: dropped, a warning
    {"segmentation": [[2, 3, 12, 3, 12]]},
    {"segmentation": [[2, 3, 12, 3, 12, "x"]]},
    {"segmentation": [[2, 3, 80, 3, 12, 15]]},  # a point far outside
    {"segmentation": [[20, 25, 28, 25, 28, 30]]},  # not the box's object
    {"segmentation": [[4, 4, 5, 5]]},
    {"segmentation": []},
    {"segmentation": None},
    {"segmentation": {"size": [40, 32], "counts": [100, 20, 1160]}},
    {"segmentation": {"size": [40, 32], "counts": "PPYo0"}},
    {"image_id": 99},
    {"image_id": 3},  # an image with a problem: left out without a word
    {"image_id": [1]},
    {"id": "seven"},
    {"id": 2**70},
]


def _coco_file(folder: Path, picks: list[tuple[int, int, int]]) -> Path:
    """A file with two good images, one missing, and an annotation per pick (variant, id, image)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 40)).save(folder / "images" / name)
    annotations = []
    for variant, ann_id, image_id in picks:
        annotation = {"id": ann_id, "image_id": image_id, **_GOOD, **_VARIANTS[variant]}
        annotations.append(annotation)
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 32},
                       {"id": 2, "file_name": "b.png", "height": 40, "width": 32},
                       {"id": 3, "file_name": "lost.png", "height": 40, "width": 32}],
            "annotations": annotations + ["not an annotation"],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}  # fmt: skip
    path = folder / "instances_x.json"
    path.write_text(json.dumps(data))
    return path


def _read_both_ways(path: Path, monkeypatch, **kwargs) -> tuple:
    monkeypatch.setattr(coco_module, "_CHUNK", 3)  # chunks end inside the file: ids repeat across them
    at_once = read_coco(path.parent / "images", path, **kwargs)
    monkeypatch.setattr(coco_module, "_AT_ONCE", False)
    one_by_one = read_coco(path.parent / "images", path, **kwargs)
    monkeypatch.setattr(coco_module, "_AT_ONCE", True)
    return at_once, one_by_one


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_VARIANTS) - 1), st.integers(1, 12), st.integers(1, 2)), max_size=25),
       st.sampled_from([{}, {"check_masks": True}, {"require_masks": True}]))  # fmt: skip
def test_annotations_checked_at_once_equal_one_by_one(tmp_path_factory, monkeypatch_module, picks, kwargs) -> None:
    path = _coco_file(tmp_path_factory.mktemp("coco"), picks)
    at_once, one_by_one = _read_both_ways(path, monkeypatch_module, **kwargs)
    assert at_once.problems == one_by_one.problems
    assert len(at_once.records) == len(one_by_one.records) == 2
    for a, b in zip(at_once.records, one_by_one.records):
        _same(a, b)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_every_variant_alone_and_all_together(tmp_path: Path, monkeypatch) -> None:
    picks = [(v, 100 + v, 1 + v % 2) for v in range(len(_VARIANTS))] + [(0, 100, 1)]  # the last id repeats
    path = _coco_file(tmp_path, picks)
    for kwargs in ({}, {"check_masks": True}, {"require_masks": True}):
        at_once, one_by_one = _read_both_ways(path, monkeypatch, **kwargs)
        assert at_once.problems == one_by_one.problems and at_once.problems
        for a, b in zip(at_once.records, one_by_one.records):
            _same(a, b)
    messages = [p.describe() for p in at_once.problems]
    assert any("annotation id 104: box [50.0, 3.0, 60.0, 15.0]" in m for m in messages)
    assert any(f"annotations[{len(picks)}]: not an annotation needs an integer 'id'" in m for m in messages)
    assert any("annotation id 100: annotation id appears twice" in m for m in messages)
    assert any("the id is beyond 64-bit integers" in m for m in messages)


# ---------------------------------------------------------------------------------------------
# The generator of COCO-sized files, and the readers on what it writes.


def test_coco_scale_file_reads_checks_and_matches_pycocotools(tmp_path: Path, capsys) -> None:
    ann_file = make_coco_scale(tmp_path / "coco", 400)
    boxes = round(400 * COCO_BOXES / COCO_IMAGES)
    coco = COCO(str(ann_file))
    assert len(coco.imgs) == 400 and len(coco.anns) == boxes and len(coco.cats) == 80
    assert main(["data", "check", str(ann_file)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"images:\s+400\b", out) and re.search(rf"instances:\s+{boxes}\b", out)
    assert "OK: 1 split(s) checked, 0 error(s), 0 warning(s)" in out
    dataset = build_dataset(ann_file, "train2017")
    assert len(dataset) == 400 and len(dataset.records.labels) == boxes
    for k in (0, 57, 399):
        image, target = dataset[k]
        image_id = dataset.image_ids[k]
        theirs = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert image.shape[1:] == (coco.imgs[image_id]["height"], coco.imgs[image_id]["width"])
        assert target["boxes"].shape[0] == len(theirs)
        xywh = np.array([a["bbox"] for a in theirs], dtype=np.float64).reshape(-1, 4)
        expected = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
        assert sorted(target["boxes"].tolist()) == sorted(expected.tolist())
    reports = check_dataset(ann_file, headers_only=True)
    assert reports[0].records.segmentation_count() == sum("segmentation" in a for a in coco.anns.values())
    with pytest.raises(SystemExit, match="not written by benchmarks.coco_scale"):
        make_coco_scale(tmp_path, 10)  # a folder holding other things is refused
    assert make_coco_scale(tmp_path / "coco", 10).is_file()  # its own folder is replaced


def test_coco_scale_yolo_folder_reads_with_the_same_boxes(tmp_path: Path) -> None:
    make_coco_scale(tmp_path / "yolo", 30, fmt="yolo")
    dataset = build_dataset(tmp_path / "yolo", "train")
    assert len(dataset) == 30 and len(dataset.records.labels) == round(30 * COCO_BOXES / COCO_IMAGES)


def test_a_file_the_streaming_reader_leaves_to_the_standard_parser_reads_the_same(tmp_path: Path, monkeypatch) -> None:
    picks = [(v, 100 + v, 1 + v % 2) for v in range(len(_VARIANTS))]
    path = _coco_file(tmp_path, picks)
    streamed = read_coco(tmp_path / "images", path, check_masks=True)
    text = path.read_text()
    # a repeated key: json keeps the last "annotations"; the first is not read
    path.write_text('{"annotations": [{"id": 1}],' + text[1:])
    whole = read_coco(tmp_path / "images", path, check_masks=True)
    assert whole.problems == streamed.problems
    for a, b in zip(whole.records, streamed.records):
        _same(a, b)
    path.write_text(text[:-5])
    with pytest.raises(json.JSONDecodeError) as theirs:
        json.loads(text[:-5])
    with pytest.raises(ValueError) as ours:
        read_coco(tmp_path / "images", path)
    error = theirs.value
    assert str(ours.value) == f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"


def test_data_check_imports_no_model(tmp_path: Path) -> None:
    """`rcnn data check` imports the data modules only: the models' imports (torchvision) cost
    seconds and hundreds of megabytes that a check of a large data set would pay on top."""
    ann_file = make_coco_scale(tmp_path / "coco", 5)
    code = ("import sys; from rcnn.cli import main; status = main(['data', 'check', sys.argv[1]]); "
            "print('models' if 'torchvision' in sys.modules or 'rcnn.models' in sys.modules else 'none'); sys.exit(status)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(ann_file)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("none")
