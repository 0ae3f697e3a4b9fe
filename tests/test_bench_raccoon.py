"""The raccoon benchmark's code path on a few real photographs, small images and one-second budgets."""

import json
from pathlib import Path

import pytest

RACCOON = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raccoon"  # ../shared/data/raccoon


def test_author_split_is_exactly_images_1_to_160_and_161_to_200(tmp_path):
    if not (RACCOON / "annotations").is_dir():
        pytest.skip(f"the raccoon photographs are not at {RACCOON}")
    from benchmarks.raccoon import author_split
    from rcnn.data import build_dataset

    folder = author_split(RACCOON, tmp_path / "split")
    train, val = build_dataset(folder, "train"), build_dataset(folder, "val")
    numbers = {name: sorted(int(r.path.stem.split("-")[1]) for r in ds.records) for name, ds in (("train", train), ("val", val))}
    assert numbers == {"train": list(range(1, 161)), "val": list(range(161, 201))}
    assert train.class_names == val.class_names == ["__background__", "raccoon"]


def test_raccoon_benchmark_writes_its_fields(tmp_path, monkeypatch):
    if not (RACCOON / "annotations").is_dir():
        pytest.skip(f"the raccoon photographs are not at {RACCOON}")
    import benchmarks.harness
    from benchmarks import raccoon

    monkeypatch.setattr(benchmarks.harness, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(raccoon, "MIN_SIZE", 64)  # a smoke run: small images
    monkeypatch.setattr(raccoon, "MAX_SIZE", 96)
    picture = tmp_path / "pred.png"
    raccoon.main(["--budget", "0.5", "--pretrain-budget", "0.5", "--first", "4", "--threads", "1", "--picture", str(picture),
                  "--models", *raccoon.MODELS])  # fmt: skip
    saved = json.loads((tmp_path / "results" / "raccoon.json").read_text())
    acc = saved["accuracy"]
    assert saved["command"].startswith("python -m benchmarks.raccoon") and saved["machine"]["cores"] >= 1
    assert acc["train_images"] == 4 and acc["val_images"] == 4 and acc["budget_s"] == 0.5
    for name in raccoon.MODELS:
        row = acc[name]
        assert row["iterations"] >= 1 and row["train_s"] > 0 and row["ms_per_image"] > 0, name
        assert 0.0 <= row["AP"] <= row["AP50"] <= 1.0 and 0.0 <= row["AP75"] <= row["AP50"], name
    assert acc["pretrain"]["iterations"] >= 1 and 0.0 <= acc["pretrain"]["val_accuracy"] <= 1.0
    assert picture.stat().st_size > 10_000
    text = raccoon.markdown(saved)
    assert "rcnn convert torchvision" in text and len([l for l in text.splitlines() if l.startswith("| rcnn")]) == 3


def test_the_ablation_turns_off_one_ingredient_at_a_time():
    from benchmarks import raccoon

    full = raccoon.recipe()
    previous = raccoon.model_recipe("previous")
    assert previous.data.scale_jitter is None and previous.data.color_jitter is None and previous.train.ema_decay is None
    assert previous.model.backbone == "mobilenet_v3_fpn" and previous.model.roi.box_loss in (None, "smooth_l1")
    for name in raccoon.INGREDIENTS:
        config = raccoon.model_recipe(f"ours -{name}")
        changed = {section for section in ("model", "data", "train")
                   if getattr(config, section) != getattr(full, section)}  # fmt: skip
        assert len(changed) <= 1, (name, changed)  # one ingredient, in one section
        assert raccoon.title(f"ours -{name}").endswith(f"without {name}")
    assert sorted(raccoon.random_split(1)[0] + raccoon.random_split(1)[1]) == list(range(1, 201))
    assert raccoon.random_split(1) != raccoon.random_split(2)
