"""The lineage benchmark: all four generations trained and measured, results well formed."""

import json

from rcnn.benchmark import MODELS, markdown, run_lineage


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
