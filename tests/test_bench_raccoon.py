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
    assert raccoon.result_name(None, 0.5) == "raccoon_0.5s"  # another budget than the default: its own file
    saved = json.loads((tmp_path / "results" / "raccoon_0.5s.json").read_text())
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
    assert "rcnn convert torchvision" in text and len([line for line in text.splitlines() if line.startswith("| rcnn")]) == 3


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


def test_the_page_gathers_the_budgets_and_the_equal_steps_ablation(tmp_path, monkeypatch):
    import benchmarks.harness
    from benchmarks import raccoon

    monkeypatch.setattr(benchmarks.harness, "RESULTS", tmp_path)
    assert [raccoon.result_name(), raccoon.result_name(budget=1800), raccoon.result_name(1), raccoon.result_name(iterations=260)] == [
        "raccoon", "raccoon_1800s", "raccoon_seed1", "raccoon_260steps"]  # fmt: skip
    assert raccoon.result_name(budget=1800, tag="jitter") == "raccoon_1800s_jitter"

    def accuracy(budget, ap):
        row = {"iterations": int(budget), "train_s": budget, "AP": ap, "AP50": ap + 0.3, "AP75": ap - 0.1, "ms_per_image": 9.0}
        return {"accuracy": {"budget_s": budget, "train_images": 160, "val_images": 40, "min_size": 320, "max_size": 640,
                             "batch": 4, "lr": 0.02, "ours": row}}  # fmt: skip

    for budget, ap in ((600, 0.31), (1800, 0.37)):
        benchmarks.harness.write_result(raccoon.result_name(budget=budget), accuracy(budget, ap), f"cmd {budget}")
    tagged = accuracy(1800, 0.4)
    tagged["accuracy"]["overrides"] = ["data.color_jitter=0.3"]
    benchmarks.harness.write_result(raccoon.result_name(budget=1800, tag="jitter"), tagged, "cmd tagged")
    steps = {"intro": "At equal steps.", "rows": [{"setting": "the recipe", "steps": 260, "cpu_s_per_step": 1.65, "AP": 0.273,
             "AP50": 0.648, "AP75": 0.184, "recipe": True}], "discussion": ["What it says."]}  # fmt: skip
    benchmarks.harness.write_result("raccoon_steps", steps, "cmd steps")
    text = raccoon.markdown(benchmarks.harness.read_result("raccoon"))
    curve = [line for line in text.splitlines() if line.startswith("| rcnn, photographs recipe") and "| author's |" in line]
    assert [line.split(" | ")[2:6] for line in curve] == [["600", "600", "0.310", "0.610"], ["1800", "1800", "0.370", "0.670"],
                                                         ["1800", "1800", "0.400", "0.700"]]  # fmt: skip
    assert "| rcnn, photographs recipe + `data.color_jitter=0.3` | author's | 1800 |" in text
    assert ("AP@0.5 >= 0.65 at 600 s: missed (0.610); AP@0.5 >= 0.75 at 1800 s: missed (0.670); AP >= 0.35 at 1800 s: "
            "met (0.370)") in text  # (the tagged run is not the recipe)
    assert "### The photographs recipe, ingredient by ingredient (equal steps)" in text
    assert "| **the recipe** | 260 | 1.650 | 0.273 | 0.648 | 0.184 |" in text and text.rstrip().endswith("What it says.")
