"""``rcnn train --data FOLDER`` without a config: the split drawn into the run, the input size and
anchors fitted to the boxes, the final val AP and picture, on each annotation layout.

The folders are small: 10 images of 64x64 px (5 with a cat, 5 with a dog, each box 16x16), written
by the tools' own file formats (tests/layout_sets.py). The photographs' config trains with the
tiny backbone here and a few steps, so that each run takes seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from layout_sets import Img, Obj, make_image, voc_xml, write_coco, write_labelimg, write_yolo
from fault_run import one_error_line
from rcnn.cli import main
from rcnn.config import load_config
from rcnn.data import build_dataset
from rcnn.data.anchors import suggest_anchors, suggest_input_size
from rcnn.data.records import ImageRecord
from rcnn.training.folder import PHOTOS_CONFIG, folder_config
from rcnn.training.run import train_folder
from rcnn.viz import is_rcnn_png

QUIET = dict(progress=False, log=lambda s: None)
# The photographs' config with the tiny backbone, a few steps and small RPN / RoI samples.
TINY = ["model.backbone=tiny", "model.rpn.pre_nms_top_n_train=200", "model.rpn.post_nms_top_n_train=50",
        "model.rpn.pre_nms_top_n_test=200", "model.rpn.post_nms_top_n_test=50", "model.roi.batch_size_per_image=16",
        "train.batch_size=2", "train.iterations=2", "train.warmup_iterations=1", "train.log_every=1",
        "train.checkpoint_every=100", "data.workers=0"]  # fmt: skip


def images(n: int = 10, side: int = 64, box: int = 16) -> list[Img]:
    """``n`` images ``side`` px square, alternately a cat and a dog, one ``box`` px square box each."""
    out = []
    for i in range(n):
        x, y = 4 + 3 * i, 6 + 2 * i
        name = "cat" if i % 2 == 0 else "dog"
        out.append(Img(f"img{i:02d}.jpg", side, side, [Obj(name, box=(x, y, x + box, y + box))]))
    return out


def write_layout(kind: str, root: Path, pictures: list[Img]) -> Path:
    """``pictures`` in layout ``kind`` under ``root``, without split files; the data set path."""
    if kind == "labelimg":
        write_labelimg(root, pictures, images_folder="images", xml_folder="annotations")
    elif kind == "voc":  # a VOC root without ImageSets/: a LabelImg folder pair, as the tool leaves it
        write_labelimg(root, pictures, images_folder="JPEGImages", xml_folder="Annotations")
    elif kind == "yolo":
        write_yolo(root, pictures, polygons=False)
    elif kind == "coco":
        (root / "annotations").mkdir(parents=True)
        write_coco(root, pictures, masks=False, name="annotations/instances_default.json")
    return root


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(run), *(a for s in [*TINY, *extra] for a in ("--set", s))]


def recorded(run: Path) -> dict:
    return yaml.safe_load((run / "last" / "config.yaml").read_text())


def test_labelimg_folder_is_split_fitted_trained_and_drawn(tmp_path: Path, capsys) -> None:
    data = write_layout("labelimg", tmp_path / "pets", images())
    before = listing(data)
    run = tmp_path / "run"
    # a time budget bounds the run: far fewer steps than the iterations allow
    assert main(train_args(data, run, "train.iterations=100000", "train.time_budget_s=2")) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()

    # the split: said in one line, written into the run only, and the run's data set path
    said = [line for line in lines if "split" in line and "has no split files" in line]
    assert said == [f"{data} has no split files: split 8 train / 2 val by seed 0 (stratified by class, "
                    f"val_fraction 0.2); recorded in {run / 'split'}"]  # fmt: skip
    assert listing(data) == before
    assert sorted(p.name for p in (run / "split").iterdir()) == ["rcnn_dataset.json", "train.txt", "val.txt"]
    config = recorded(run)
    assert Path(config["data"]["root"]) == (run / "split").resolve() and config["data"]["val_fraction"] is None
    train, val = build_dataset(run / "split", "train"), build_dataset(run / "split", "val")
    assert (len(train), len(val)) == (8, 2) and not set(train.image_names) & set(val.image_names)
    assert sorted({val.class_names[int(r.labels[0])] for r in val.records}) == ["cat", "dog"]  # stratified

    # the input size and anchors: fitted to the 16 px boxes of 64 px images, recorded in config.yaml
    # 16 / 64 = 1/4 of the shorter side; 32 px objects need 128 px; 640 scaled alike: 256
    model = config["model"]
    assert (model["min_size"], model["max_size"]) == (128, 256)
    anchors = suggest_anchors(train.records, min_size=128, max_size=256, levels=1)
    assert model["anchor_sizes"] == anchors.anchor_sizes == [[23.0, 32.0, 45.0]]  # 16 px boxes scaled 2x: 32 px
    assert model["aspect_ratios"] == anchors.aspect_ratios == [0.71, 1.0, 1.41]
    (fitted,) = [line for line in lines if line.startswith("fitted to the boxes of 8 training images: ")]
    assert "input size 128 / 256" in fitted and "anchors [[23, 32, 45]] x ratios [0.71, 1, 1.41]" in fitted

    # the time budget, then the val AP and the picture
    summary = json.loads(out[out.index("\n{") + 1 :])
    assert 1 <= summary["iterations"] < 100000 and summary["train_seconds"] < 60
    assert any(line.startswith("val (2 images): box AP ") for line in lines)
    picture = run / "val_predictions.png"
    assert summary["picture"] == str(picture) and f"beside the ground truth (left): {picture}" in out
    with Image.open(picture) as image:
        image.verify()
    with Image.open(picture) as image:  # 2 val images, each twice (ground truth, predictions): one row of 4 tiles
        assert image.format == "PNG" and image.size == (4 * 128 + 5 * 4, 128 + 2 * 4)
        pixels = np.asarray(image.convert("RGB"))
    assert is_rcnn_png(picture) and pixels.std() > 10  # drawn photographs, not a blank page


def test_sizes_and_anchors_set_by_the_user_are_kept(tmp_path: Path, capsys) -> None:
    data = write_layout("labelimg", tmp_path / "pets", images())
    run = tmp_path / "run"
    sets = ["model.min_size=96", "model.max_size=96", "model.anchor_sizes=[[16, 48, 80]]", "--no-eval"]
    assert main([*train_args(data, run, *sets[:3]), sets[3]]) == 0
    (fitted,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fitted to the boxes")]
    assert "input size 96 / 96 as set" in fitted and "anchors [[16, 48, 80]] x ratios [0.5, 1, 2] as set" in fitted
    model = recorded(run)["model"]
    assert (model["min_size"], model["max_size"], model["anchor_sizes"]) == (96, 96, [[16.0, 48.0, 80.0]])
    assert model["aspect_ratios"] == [0.5, 1.0, 2.0]


def test_own_config_states_the_size_and_the_suggestion_leaves_it(tmp_path: Path) -> None:
    """A config of the user's that states the input size (or the anchors) keeps it: only the
    packaged photographs' config is a starting point to fit."""
    data = write_layout("labelimg", tmp_path / "pets", images())
    mine = tmp_path / "mine.yaml"
    mine.write_text("model: {name: faster_rcnn, backbone: tiny, min_size: 96, max_size: 160}\n")
    config, fit = folder_config(data, mine, ["model.aspect_ratios=[1.0]"])
    assert fit.keep == {"min_size", "max_size", "aspect_ratios"} and config.data.root == str(data)
    config, fit = folder_config(data, None, ["model.backbone=tiny"])
    assert fit.keep == frozenset() and config.model.min_size == load_config(PHOTOS_CONFIG).model.min_size


def test_resume_reads_the_recorded_split(tmp_path: Path, capsys) -> None:
    data = write_layout("labelimg", tmp_path / "pets", images())
    run = tmp_path / "run"
    assert main(train_args(data, run, "train.checkpoint_every=2") + ["--no-eval"]) == 0
    first = (run / "split" / "train.txt").read_text(), (run / "split" / "val.txt").read_text()
    capsys.readouterr()
    # the folder gains photographs, and another seed is asked for: the run keeps its split
    extra = Img("img99.jpg", 64, 64, [Obj("cat", box=(8, 8, 24, 24))])
    make_image(data / "images" / extra.file, extra)
    (data / "annotations" / "img99.xml").write_text(voc_xml(extra, "images"))
    args = train_args(data, run, "train.checkpoint_every=2", "train.iterations=4", "data.split_seed=7")
    assert main([*args, "--no-eval", "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"{data}: continuing with the split recorded in {run / 'split'} (8 train / 2 val)" in out.splitlines()
    assert ((run / "split" / "train.txt").read_text(), (run / "split" / "val.txt").read_text()) == first
    assert "img99" not in first[0] + first[1]
    assert json.loads(out[out.index("\n{") + 1 :])["iterations"] == 4


def test_resume_of_another_folder_is_refused(tmp_path: Path, capsys) -> None:
    data = write_layout("labelimg", tmp_path / "pets", images())
    run = tmp_path / "run"
    assert main(train_args(data, run) + ["--no-eval"]) == 0
    other = tmp_path / "others"
    shutil.copytree(data, other)
    capsys.readouterr()
    assert main(train_args(other, run, "train.iterations=4") + ["--no-eval", "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"this run was split from {data.resolve()}, not {other}" in line


@pytest.mark.parametrize("kind", ["labelimg", "voc", "coco", "yolo"])
def test_each_layout_without_split_files(kind: str, tmp_path: Path, capsys) -> None:
    data = write_layout(kind, tmp_path / kind, images())
    before = listing(data)
    run = tmp_path / "run"
    assert main(train_args(data, run)) == 0
    out = capsys.readouterr().out
    assert f"{data} has no split files: split 8 train / 2 val by seed 0" in out
    assert listing(data) == before  # nothing written beside the data
    assert (run / "split" / "train.txt").read_text().count("\n") == 8
    assert (run / "split" / "val.txt").read_text().count("\n") == 2
    config = recorded(run)
    if kind == "coco":  # one COCO file: split on the fly by the same rule, the lists recorded
        assert config["data"]["root"] == str(data) and config["data"]["val_fraction"] == 0.2
        val = build_dataset(data, "val", val_fraction=0.2)
        assert sorted(r.path.stem for r in val.records) == (run / "split" / "val.txt").read_text().split()
    else:
        assert Path(config["data"]["root"]) == (run / "split").resolve()
    assert (config["model"]["min_size"], config["model"]["max_size"]) == (128, 256)
    with Image.open(run / "val_predictions.png") as image:
        assert image.format == "PNG" and image.size[0] > 0


def test_coco_resume_refuses_a_changed_split(tmp_path: Path, capsys) -> None:
    data = write_layout("coco", tmp_path / "coco", images())
    run = tmp_path / "run"
    assert main(train_args(data, run) + ["--no-eval"]) == 0
    capsys.readouterr()
    extra = Img("img99.jpg", 64, 64, [Obj("dog", box=(8, 8, 24, 24))])  # the COCO file gains an image
    write_coco(data, [*images(), extra], masks=False, name="annotations/instances_default.json")
    assert main(train_args(data, run, "train.iterations=4") + ["--no-eval", "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{run / 'split' / 'train.txt'}: the train images this run was trained with are no longer" in line


def test_the_photographs_config_trains_from_python(tmp_path: Path) -> None:
    """The packaged config as it is (MobileNetV3-FPN), a step, from the Python API."""
    data = write_layout("labelimg", tmp_path / "pets", images(side=96, box=40))
    sets = ["train.iterations=1", "train.batch_size=2", "data.workers=0", "model.rpn.post_nms_top_n_train=50",
            "model.rpn.post_nms_top_n_test=20"]  # fmt: skip
    summary = train_folder(data, tmp_path / "run", overrides=sets, **QUIET)
    model = recorded(tmp_path / "run")["model"]
    assert model["backbone"] == "mobilenet_v3_fpn" and summary["iterations"] == 1
    # 40 px boxes of 96 px images need no enlargement: the images' own 96 px (no upscaling to 320)
    train = build_dataset(tmp_path / "run" / "split", "train")
    expected = suggest_input_size(train.records, 320, 640)
    assert (model["min_size"], model["max_size"]) == (expected.min_size, expected.max_size) == (96, 192)
    # MobileNetV3-FPN gives each of its 3 levels the same sizes: so do the fitted anchors
    assert len(model["anchor_sizes"]) == 3 and all(level == model["anchor_sizes"][0] for level in model["anchor_sizes"])
    assert Path(summary["picture"]).is_file() and "bbox" in summary["metrics"]


def test_folder_with_other_splits_and_no_arguments_are_refused(tmp_path: Path, capsys) -> None:
    data = tmp_path / "yolo"
    pictures = images()
    write_yolo(data, pictures, polygons=False, splits={"train": [p.file for p in pictures]})
    assert main(train_args(data, tmp_path / "run")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "has the split train but not both train and val" in line and "--set data.val_fraction=0.2" in line
    assert main(["train", "--out", str(tmp_path / "run")]) == 2
    assert "give --data FOLDER" in one_error_line(capsys.readouterr().err)
    assert main(train_args(tmp_path / "absent", tmp_path / "run2")) == 2
    assert f"{tmp_path / 'absent'}: data folder not found" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run2").exists()  # refused before the run folder was made


def record(height: int, width: int, *sides: float) -> ImageRecord:
    """An image ``height x width`` with square boxes of the given sides."""
    arrays = ImageRecord.empty_arrays(len(sides))
    arrays["boxes"] = np.array([[0.0, 0.0, s, s] for s in sides], dtype=np.float32).reshape(-1, 4)
    arrays["labels"][:] = 1
    return ImageRecord(0, Path("x.jpg"), height, width, **arrays)


def test_input_size_suggestion_by_hand() -> None:
    # large objects in photographs larger than 320 px: the config's 320 / 640 stays
    big = [record(480, 640, 200.0, 300.0)] * 10
    assert (suggest_input_size(big, 320, 640).min_size, suggest_input_size(big, 320, 640).max_size) == (320, 640)
    # objects 1/20 of the shorter side: 32 px need 640; the cap at 2x is scaled alike
    small = [record(400, 600, 20.0)] * 10
    found = suggest_input_size(small, 320, 640)
    assert (found.min_size, found.max_size, found.needed) == (640, 1280, 640)
    assert found.small_object_fraction == pytest.approx(0.05) and found.small_object_px == pytest.approx(32.0)
    # tiny objects: at most 800 px; a list of sizes (multi-scale) keeps its spread, in multiples of 32
    tiny = [record(400, 600, 4.0)] * 10
    assert suggest_input_size(tiny, 320, 640).min_size == 800
    assert suggest_input_size(tiny, [256, 320], 640).min_size == [640, 800]
    assert suggest_input_size(tiny, 1024, 1333).min_size == 1024  # a larger config's own size is not cut
    # small images with large objects keep their own size (rounded up to 32): 100 -> 128
    icons = [record(100, 100, 50.0)] * 10
    assert (suggest_input_size(icons, 320, 640).min_size, suggest_input_size(icons, 320, 640).max_size) == (128, 256)
    with pytest.raises(ValueError, match="no boxes"):
        suggest_input_size([record(100, 100)], 320, 640)


RACCOON = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raccoon"  # ../shared/data/raccoon


@pytest.mark.skipif(not (RACCOON / "annotations").is_dir(), reason=f"the raccoon photographs are not at {RACCOON}")
def test_raccoon_photographs_lines_of_docs_own_data(tmp_path: Path, capsys) -> None:
    """The one command on 200 real photographs (read in place, one training step): the split and
    the fit that docs/own_data.md shows, and a picture of val photographs."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "own_data.md").read_text(encoding="utf-8")
    run = tmp_path / "raccoon"
    sets = ["train.iterations=1", "train.batch_size=2", "data.workers=0"]
    assert main([*train_args(RACCOON, run)[:5], "--no-eval", *(a for s in sets for a in ("--set", s))]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = [line.replace(str(RACCOON), "../shared/data/raccoon").replace(str(run), "runs/raccoon")
             for line in lines[:2]]  # fmt: skip
    assert shown[0].endswith("split 160 train / 40 val by seed 0 (stratified by class, val_fraction 0.2); "
                             "recorded in runs/raccoon/split")  # fmt: skip
    for line in shown:
        assert line in doc.splitlines(), line
    assert recorded(run)["model"]["anchor_sizes"] == [[187.0, 265.0, 375.0]] * 3
    with Image.open(run / "val_predictions.png") as image:  # 8 val photographs, each twice, at most 384 px a side
        assert image.format == "PNG" and image.size[0] <= 4 * 384 + 5 * 4 and image.size[1] > 384


def test_folder_with_its_own_splits_uses_them(tmp_path: Path, capsys) -> None:
    data = tmp_path / "yolo"
    pictures = images()
    write_yolo(data, pictures, polygons=False, splits={"train": [p.file for p in pictures[:7]],
                                                       "val": [p.file for p in pictures[7:]]})  # fmt: skip
    run = tmp_path / "run"
    assert main(train_args(data, run) + ["--no-eval"]) == 0
    assert "split" not in capsys.readouterr().out.split("fitted to the boxes")[0]  # nothing drawn, nothing said
    assert not (run / "split").exists() and recorded(run)["data"]["root"] == str(data)
    assert recorded(run)["model"]["min_size"] == 128  # fitted all the same
