"""The lineage benchmark: all four generations trained and measured, results well formed."""

import json

import pytest

from rcnn.training.lineage import MODELS, markdown, run_lineage


def test_lineage_runs_all_four_generations(shapes_root, tmp_path):
    result = run_lineage(
        tmp_path / "runs", shapes_root, budget_s=3.0, pretrain_iterations=3, timing_images=2, threads=1,
        results_dir=tmp_path / "results", img_dir=tmp_path / "img", log=lambda s: None,
    )  # fmt: skip
    saved = json.loads((tmp_path / "results" / "lineage.json").read_text())
    assert set(saved["models"]) == set(MODELS) and "faster_rcnn_random_init" in saved
    for name, row in saved["models"].items():
        assert 0.0 <= row["AP"] <= row["AP50"] <= 1.0, name
        assert row["ms_per_image"] > 0 and row["ms_proposals"] >= 0 and row["ms_rest"] > 0, name
        assert row["peak_memory_mb"] > 50 and row["iterations"] >= 1, name
    assert "mask_AP" in saved["models"]["mask_rcnn"]
    # selective search is on the proposals side for the first two generations, the RPN for the others
    assert saved["models"]["fast_rcnn"]["ms_proposals"] > saved["models"]["faster_rcnn"]["ms_proposals"]
    assert saved["pretrain"]["weights"].endswith("backbone.safetensors")
    assert {"rcnn_over_fast_rcnn", "fast_rcnn_over_faster_rcnn", "selective_search_over_rpn"} <= set(saved["speedups"])
    assert all((tmp_path / "img" / n).stat().st_size > 1000 for n in ("lineage_speed_accuracy.png", "lineage_training_curves.png"))
    table = markdown(result)
    assert len(table.splitlines()) == 2 + len(MODELS) + 1 and "Mask R-CNN" in table


def test_faster_rcnn_peer_pair_is_like_for_like():
    # the accuracy comparison's premise: with torchvision's weights copied in, ours computes exactly
    # what torchvision's Faster R-CNN computes (same proposals, scores and boxes)
    import torch

    from benchmarks.faster_rcnn import copy_weights, tiny_pair

    ours, peer = tiny_pair(4)
    peer.train()
    opt = torch.optim.SGD(peer.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0]]), "labels": torch.tensor([k + 1])} for k in range(2)]
    for _ in range(5):  # away from the initial weights, where every score is about equal
        loss = sum(peer(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    copy_weights(peer, ours)
    ours.eval()
    peer.eval()
    with torch.no_grad():
        a, b = ours(images[:1])[0], peer(images[:1])[0]
    assert len(a["boxes"]) > 0
    torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)
    assert torch.equal(a["labels"], b["labels"])


def test_timing_pair_has_working_random_weights():
    # randomly initialised MobileNetV3 with BatchNorm at its initial statistics gives FPN features
    # of ~1e-8, so every anchor scores 0.5 and the proposals are down to top-k tie-breaking; the
    # timing pair calibrates the statistics first, so that both libraries do the same work
    import torch

    from benchmarks.faster_rcnn import build_pair

    ours, peer = build_pair("mobilenet_v3_fpn", 160, 160)
    ours.eval()
    peer.eval()
    image = torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = list(peer.backbone(peer.transform([image])[0].tensors).values())
        logits = peer.rpn.head(features)[0][0]
        a, b = ours([image])[0], peer([image])[0]
    assert min(float(f.std()) for f in features) > 1e-2
    assert logits.unique().numel() == logits.numel()
    assert len(a["scores"]) == len(b["scores"]) == 100


@pytest.fixture
def small_shapes_data(shapes_root):
    """Stands in for the benchmarks' ``shapes_data``: the tests' small shapes set instead of 1600 images."""
    from rcnn.config import load_config
    from rcnn.training.run import prepare_data

    def small_data(config, root):
        return prepare_data(load_config(config, [f"data.root={shapes_root}", "data.shapes=null"]))

    return small_data


def test_mask_benchmark_trains_the_equal_steps_pair(shapes_root, small_shapes_data, monkeypatch):
    # box AP with and without the mask branch after the same number of steps: both models make
    # exactly that many, only the one with masks reports mask AP, and the page says so
    import benchmarks.mask_rcnn as bm
    monkeypatch.setattr(bm, "shapes_data", small_shapes_data)
    out = bm.equal_steps(2, shapes_root)
    assert out["iterations"] == 2 and out["ours_align"]["iterations"] == 2 and out["faster"]["iterations"] == 2
    assert "mask_AP" in out["ours_align"] and "mask_AP" not in out["faster"]
    accuracy = {"budget_s": 1.0, "train_images": 12, "val_images": 8}
    text = bm.markdown({"inference": [], "accuracy": accuracy, "equal_steps": out})
    assert "At an equal number of steps instead (2 each" in text


def test_mask_benchmark_seed_repeats(shapes_root, small_shapes_data, monkeypatch):
    # the pair with and without masks trained again from other seeds: other weights, both rows per
    # seed, and the page gives each seed's box AP, the means and the differences
    import torch

    import benchmarks.mask_rcnn as bm
    first, other = bm.tiny_models(4, 0)["ours_align"], bm.tiny_models(4, 1)["ours_align"]
    assert not torch.equal(first.rpn.head.conv.weight, other.rpn.head.conv.weight)
    monkeypatch.setattr(bm, "shapes_data", small_shapes_data)
    out = bm.seed_repeats(0.5, shapes_root, [3])
    assert out["seeds"] == [3] and len(out["ours_align"]) == len(out["faster"]) == 1
    assert "mask_AP" in out["ours_align"][0] and "mask_AP" not in out["faster"][0]
    row = {"iterations": 10, "train_s": 1.0, "AP": 0.5, "AP50": 0.7}
    accuracy = {"budget_s": 1.0, "train_images": 12, "val_images": 8, "faster": row,
                "ours_align": {**row, "AP": 0.6, "mask_AP": 0.4}, "repeats": out}  # fmt: skip
    text = bm.markdown({"inference": [], "accuracy": accuracy})
    assert "Box AP over 2 seeds" in text and "| seed 0 | seed 3 | mean |" in text
    assert f"seed by seed: +0.100, {out['ours_align'][0]['AP'] - out['faster'][0]['AP']:+.3f}" in text


def test_mask_benchmark_seed_list_is_checked():
    import argparse

    from benchmarks.mask_rcnn import _seed_list

    assert _seed_list("1, 2") == [1, 2]
    for bad in ("1,x", "0,1", "2,2"):
        with pytest.raises(argparse.ArgumentTypeError):
            _seed_list(bad)


def test_lineage_mask_note_follows_the_figures(monkeypatch):
    # the page explains a Mask R-CNN box AP below Faster R-CNN's from what actually differed: fewer
    # steps when it made fewer, not when both made the same number; the controlled comparison's
    # per-seed differences come from the Mask R-CNN benchmark's results
    import benchmarks.lineage as br

    row = {"AP": 0.83, "AP50": 0.96, "iterations": 3000, "train_wall_s": 320.0}
    mask_results = {"accuracy": {"budget_s": 600.0, "ours_align": {"AP": 0.85}, "faster": {"AP": 0.86},
                                 "repeats": {"seeds": [1], "ours_align": [{"AP": 0.80}], "faster": [{"AP": 0.82}]}}}  # fmt: skip
    monkeypatch.setattr(br, "read_result", lambda name: mask_results if name == "mask_rcnn" else None)
    equal = br._mask_note({**row, "AP": 0.82, "train_wall_s": 360.0}, row, 600.0)
    assert "Both made 3000 steps" in equal and "steps against" not in equal
    assert "over 2 seeds the branch changes box AP by -0.015 on average (-0.010, -0.020)" in equal
    fewer = br._mask_note({**row, "AP": 0.82, "iterations": 2500, "train_wall_s": 500.0}, row, 600.0)
    assert "made 2500 steps against 3000" in fewer and "about 1.9x as much" in fewer
    assert br._disagreements({"budget_s": 600.0, "models": {"faster_rcnn": row, "mask_rcnn": {**row, "AP": 0.9}}}) == []


def test_eager_profile_stages_add_up_to_the_call():
    import torch

    from benchmarks.eager_profile import markdown, matmul_peak_gflops, model_gflop, options, stage_split, top_operators
    from rcnn.models import faster_rcnn

    torch.manual_seed(0)
    model = faster_rcnn("tiny", 3, min_size=96, max_size=128, pooler="align", roi={"score_thresh": 0.0}).eval().optimize_for_inference()
    image = torch.rand(3, 96, 128)
    stages = stage_split(model, image, rounds=2)
    assert list(stages)[-1] == "whole call" and "FPN" not in stages and len(stages) == 10  # the tiny backbone has no FPN
    whole = stages.pop("whole call")
    parts = sum(s["wall_ms"] for s in stages.values())
    assert all(s["wall_ms"] >= 0 for name, s in stages.items() if not name.startswith(("RPN anchors", "RoI heads post", "the rest")))
    # each stage's best round and the whole call's best round need not be the same round: a loose sum
    assert 0.5 * whole["wall_ms"] <= parts <= 1.5 * whole["wall_ms"], (parts, whole)
    assert stages["backbone trunk"]["cpu_ms"] > 0 and stages["RoIAlign"]["wall_ms"] > 0
    ops = top_operators(model, image, count=5)
    assert len(ops) == 5 and ops[0]["self_cpu_ms"] >= ops[-1]["self_cpu_ms"] and 0 < sum(o["share"] for o in ops) <= 1
    torch.manual_seed(0)  # the same weights, contiguous
    contiguous = faster_rcnn("tiny", 3, min_size=96, max_size=128, pooler="align", roi={"score_thresh": 0.0})
    opt = options(contiguous.eval().optimize_for_inference(channels_last=False), model, image, rounds=1)
    assert set(opt) == {"plain", "channels_last", "bf16_autocast"} and 0 <= opt["channels_last"]["agreement"] <= 1
    text = markdown({"arch": "tiny", "size": [96, 128], "threads": 1, "rounds": 2, "cpu_flags": [],
                     "stages": {**stages, "whole call": whole}, "operators": ops, "options": opt})  # fmt: skip
    assert "backbone trunk" in text and "channels_last" in text
    # the FLOP count of a known layer, and a peak that is a rate
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert model_gflop(lambda xs: conv(xs[0][None]), torch.rand(3, 10, 10)) == pytest.approx(2 * 8 * 3 * 9 * 100 / 1e9)
    peak = matmul_peak_gflops(1, n=128, rounds=2)
    assert peak["pytorch"] > 0 and peak["onnxruntime"] > 0 and peak["peak"] == max(peak["pytorch"], peak["onnxruntime"])


def test_int8_accuracy_measures_each_recipe(shapes_root, tmp_path):
    import torch

    from benchmarks.backends import accuracy_markdown, int8_accuracy, parse_recipe
    from rcnn.data import build_dataset
    from rcnn.models import faster_rcnn

    assert parse_recipe("entropy+keep=backbone.fpn;rpn.*") == {"method": "entropy", "keep_float": ["backbone.fpn", "rpn.*"]}
    assert parse_recipe("percentile+p=99.9+fc+keep=") == {"method": "percentile", "percentile": 99.9, "fc": True, "keep_float": []}
    with pytest.raises(ValueError, match="unknown part 'x'"):
        parse_recipe("minmax+x")
    with pytest.raises(ValueError, match="the method must be one of"):
        parse_recipe("kl")
    train, val = build_dataset(shapes_root, "train"), build_dataset(shapes_root, "val")
    torch.manual_seed(0)
    model = faster_rcnn("tiny", train.num_classes, min_size=128, max_size=128)
    out = int8_accuracy(model, list(train.class_names), train, val, tmp_path, threads=1, calibrate_images=2,
                        recipes=["minmax+keep=rpn.head"])  # fmt: skip
    assert {"eager", "onnxruntime", "onnxruntime_int8", "onnxruntime_int8_fc", "int8 minmax+keep=rpn.head"} <= set(out)
    assert out["calibration_images"] == 2 and out["val_images"] == len(val)
    assert abs(out["eager"]["AP"] - out["onnxruntime"]["AP"]) < 1e-3  # the exact backend scores the same
    text = accuracy_markdown({"tiny": out})
    assert "ONNX Runtime int8 minmax+keep=rpn.head" in text and "entropy calibration, the FPN float" in text


def test_int8_accuracy_table_shows_mask_ap_where_measured():
    from benchmarks.backends import accuracy_markdown

    box = {"AP": 0.5, "AP50": 0.8, "ms_per_image": 10.0}
    entries = {"boxes": {k: dict(box) for k in ("eager", "onnxruntime", "onnxruntime_int8")},
               "masks": {k: {**box, "mask_AP": 0.4 - 0.05 * (k == "onnxruntime_int8")} for k in ("onnxruntime", "onnxruntime_int8")}}  # fmt: skip
    text = accuracy_markdown(entries)
    assert "| mask AP | mask AP vs fp32 |" in text and "-0.050" in text
    assert "mask AP" not in accuracy_markdown({"boxes": entries["boxes"]}).split("\n")[2]
