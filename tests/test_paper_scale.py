"""The paper-scale speed benchmark's code path, on two small images with the tiny backbone."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import paper_scale


def test_paper_scale_runs_and_writes_every_figure(shapes_root: Path, tmp_path: Path, one_thread) -> None:
    argv = ["--backbones", "tiny", "--data", str(shapes_root), "--split", "val", "--long-side", "64,1000",
            "--images", "2", "--rounds", "1", "--max-proposals", "40", "--min-size", "128", "--max-size", "128",
            "--svd-ranks", "64,32", "--rcnn-regions", "tiny=4,8", "--finetune-regions", "tiny=4,8",
            "--cache-images", "2", "--cache-regions", "tiny=all", "--results-dir", str(tmp_path), "--img-dir", str(tmp_path)]  # fmt: skip
    assert paper_scale.main(argv) == 0
    result = json.loads((tmp_path / "paper_scale.json").read_text())
    assert result["benchmark"] == "paper_scale" and result["command"].startswith("python -m benchmarks.paper_scale")
    assert [i["proposals"] for i in result["images"]] == [40, 40]
    test = result["test"]["tiny"]
    assert len(test["per_image"]) == 2
    for name in ("rcnn", "fast_rcnn", "fast_rcnn_svd", "faster_rcnn", "selective_search", "rpn"):
        assert test["median"][f"{name}_cpu_s"] > 0 and test["median"][f"{name}_wall_s"] > 0, name
    assert test["median"]["rpn_wall_s"] < test["median"]["faster_rcnn_wall_s"]  # the RPN is part of the model's time
    assert 0 < test["median"]["rpn_head_wall_s"] <= test["median"]["rpn_wall_s"]  # and its convolutions part of the RPN's
    assert test["gflops"]["rcnn"] > test["gflops"]["fast_rcnn"] > 0 and 0 < test["gflops"]["rpn"] < test["gflops"]["faster_rcnn"]
    assert test["rcnn_subsets"]["regions"] == [4, 8] and [r["rank"] for r in test["svd"]] == [64, 32]
    speed = result["speedups"]["tiny"]["cpu"]
    m = test["median"]
    assert speed["fast_over_rcnn"] == m["rcnn_cpu_s"] / m["fast_rcnn_cpu_s"]
    assert speed["selective_search_over_rpn"] == m["selective_search_cpu_s"] / m["rpn_cpu_s"]
    train = result["training"]["tiny"]
    per_image = train["per_image"]["cpu_s"]
    parts = ("rcnn_finetune", "rcnn_features", "rcnn_svms", "rcnn_box_regression")
    assert per_image["rcnn"] == sum(per_image[p] for p in parts) and all(per_image[p] >= 0 for p in parts)
    assert per_image["speedup"] == per_image["rcnn"] / per_image["fast_rcnn"]
    assert train["features"]["regions"] == train["features"]["regions_full"] == 80 and not train["features"]["scaled"]
    assert train["svms"]["classes"] >= 1 and train["svms"]["voc_cpu_s_per_image"] > 0
    assert (tmp_path / "paper_scale_lineage.png").stat().st_size > 10_000
    page = paper_scale.markdown(result)
    assert "Fast R-CNN, truncated SVD 64/32" in page and "was not run" in page


def test_time_rounds_interleaves_and_keeps_the_best_of_each_figure() -> None:
    from benchmarks.harness import time_rounds

    order, parts = [], iter([0.5, 0.2, 0.9])
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b") or {"rpn_wall_s": next(parts)}}
    best = time_rounds(calls, rounds=3, warmup=0)
    assert order == ["a", "b", "b", "a", "a", "b"]  # A B, B A, A B
    assert best["b"]["rpn_wall_s"] == 0.2 and set(best["a"]) == {"cpu_s", "wall_s"}
