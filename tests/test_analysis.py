"""The error analysis of ``rcnn evaluate --analysis``: TIDE's breakdown and the confusion matrix on a
hand-computed case, the files written, and the command on a trained run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcnn.cli import main
from rcnn.data.coco import CocoDetection
from rcnn.evaluation import evaluate_coco
from rcnn.evaluation.analysis import analyse, confusion_matrix, tide_errors
from rcnn.evaluation.outputs import prepare_predictions
from tiny_runs import tiny_run

# One 200x200 image, classes a (label 1) and b (label 2): objects A, B, C of class a and E of class b.
A, B, C, E = [10, 10, 50, 50], [100, 10, 140, 50], [10, 100, 50, 140], [100, 100, 140, 140]
DETECTIONS = [  # (label, score, box, the error TIDE must call it)
    (1, 0.95, [160, 160, 190, 190], "background"),  # overlaps nothing
    (1, 0.90, A, "tp"),
    (1, 0.85, E, "classification"),  # E exactly, but E is a b
    (1, 0.80, [11, 11, 51, 51], "duplicate"),  # A again, IoU 0.91
    (1, 0.70, [100, 10, 200, 50], "localisation"),  # B at IoU 0.4
    (2, 0.60, [10, 100, 110, 140], "both"),  # C (an a) at IoU 0.4, E at 0.08
]  # C is found by none: missed


@pytest.fixture
def hand_case(tmp_path: Path) -> tuple[CocoDetection, dict[int, dict[str, torch.Tensor]]]:
    Image.new("RGB", (200, 200), (120, 120, 120)).save(tmp_path / "one.png")
    annotations = [
        {"id": i + 1, "image_id": 1, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
         "iscrowd": 0}
        for i, (cat, (x1, y1, x2, y2)) in enumerate([(1, A), (1, B), (1, C), (2, E)])
    ]  # fmt: skip
    coco = {"images": [{"id": 1, "file_name": "one.png", "height": 200, "width": 200}], "annotations": annotations,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    dataset = CocoDetection(tmp_path, tmp_path / "ann.json")
    output = {
        "labels": torch.tensor([d[0] for d in DETECTIONS]),
        "scores": torch.tensor([d[1] for d in DETECTIONS]),
        "boxes": torch.tensor([d[2] for d in DETECTIONS], dtype=torch.float32),
    }
    return dataset, {1: output}


def test_tide_matches_the_hand_computed_case(hand_case) -> None:
    dataset, predictions = hand_case
    ids, detections = prepare_predictions(predictions, dataset)
    tide = tide_errors(detections, dataset, ids)
    assert tide.counts == {"classification": 1, "localisation": 1, "both": 1, "duplicate": 1, "background": 1, "missed": 1}
    # COCO AP@0.5 reads precision at 101 recall thresholds; class a finds 1 of 3 objects at precision
    # 1/2 (thresholds 0.00..0.33: 34 points), class b nothing: mAP = (0.5 * 34 / 101 + 0) / 2
    base = 0.5 * 34 / 101 / 2
    assert tide.ap == pytest.approx(base)
    assert tide.ap == pytest.approx(evaluate_coco(predictions, dataset)["bbox"]["AP50"], abs=1e-6)  # pycocotools agrees
    expected = {
        "background": (34 / 101) / 2 - base,  # class a: T F F F -> precision 1 up to recall 1/3
        "classification": (0.5 * 34 / 101 + 1.0) / 2 - base,  # the E detection becomes b's, at precision 1
        "duplicate": 0.0,  # it scores below the only true positive it could spoil
        "localisation": (0.5 * 34 + 0.4 * 33) / 101 / 2 - base,  # F T F F T: recall 2/3 at precision 2/5
        "both": 0.0,  # class b has nothing right to gain from losing its false positive
        "missed": (0.5 * 51 / 101) / 2 - base,  # 2 objects to find: recall 1/2 at precision 1/2
    }
    for kind, value in expected.items():
        assert tide.delta_ap[kind] == pytest.approx(value, abs=1e-9), kind
    assert tide.dominant == "classification"


def test_confusion_matrix_has_background_row_and_column(hand_case) -> None:
    dataset, predictions = hand_case
    ids, detections = prepare_predictions(predictions, dataset)
    matrix, per_image = confusion_matrix(detections, dataset, ids, score_thresh=0.5)
    # rows: true background, a, b; columns: predicted background, a, b
    assert matrix.tolist() == [[0, 3, 1], [2, 1, 0], [0, 1, 0]]
    (errors,) = per_image
    assert errors.missed == 2 and errors.matched == 2
    assert errors.false_positive_mass == pytest.approx(0.95 + 0.80 + 0.70 + 0.60)
    high, _ = confusion_matrix(detections, dataset, ids, score_thresh=0.88)  # only the two best count
    assert high.tolist() == [[0, 1, 0], [2, 1, 0], [1, 0, 0]]


def test_analyse_writes_its_files(hand_case, tmp_path: Path) -> None:
    dataset, predictions = hand_case
    report = analyse(predictions, dataset, tmp_path / "analysis", worst=4)
    out = tmp_path / "analysis"
    for name in ("pr_curves.png", "confusion_matrix.png", "confusion_matrix.csv", "tide.png", "worst_images.png",
                 "analysis.json", "summary.txt"):  # fmt: skip
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.reader((out / "confusion_matrix.csv").open()))
    assert rows[0] == ["true \\ predicted", "a", "b", "background"]
    assert rows[1:] == [["a", "1", "0", "2"], ["b", "1", "0", "0"], ["background", "3", "1", "0"]]
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["tide"]["counts"]["missed"] == 1 and saved["worst_images"][0]["missed"] == 2
    assert report["pr_curve_AP"]["a"]["IoU 0.50"] == pytest.approx(0.5 * 34 / 101, abs=1e-6)
    assert "dominant: classification" in report["summary"]
    with Image.open(out / "worst_images.png") as im:  # ground truth beside predictions
        assert im.width > 2 * 400


def test_crowd_objects_are_neither_right_nor_wrong(tmp_path: Path) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "c.png")
    coco = {"images": [{"id": 1, "file_name": "c.png", "height": 100, "width": 100}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 1},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "a"}]}  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    dataset = CocoDetection(tmp_path, tmp_path / "ann.json")
    out = {"boxes": torch.tensor([[0.0, 0, 50, 50], [60, 60, 90, 90]]), "labels": torch.tensor([1, 1]),
           "scores": torch.tensor([0.9, 0.8])}  # fmt: skip
    ids, detections = prepare_predictions({1: out}, dataset)
    tide = tide_errors(detections, dataset, ids)
    assert tide.ap == pytest.approx(1.0) and sum(tide.counts.values()) == 0
    matrix, _ = confusion_matrix(detections, dataset, ids)
    assert matrix.tolist() == [[0, 0], [0, 1]]


def test_evaluate_analysis_command(shapes_root: Path, tmp_path_factory, tmp_path: Path, capsys) -> None:
    run = tiny_run("faster_rcnn", shapes_root, tmp_path_factory)
    code = main(["evaluate", "--weights", str(run), "--data", str(shapes_root), "--analysis", str(tmp_path / "a"),
                 "--score-thresh", "0.05", "--worst", "3", "--out", str(tmp_path / "m.json")])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "TIDE (AP@0.5" in printed and "dominant:" in printed
    saved = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert saved["images"] == 8 and len(saved["worst_images"]) <= 3
    counts = np.array(saved["confusion_matrix"]["counts"])
    objects = json.loads((shapes_root / "annotations" / "instances_val.json").read_text())["annotations"]
    assert counts.shape == (6, 6) and counts[1:, :].sum() == len(objects)  # every object of the split is in a row
    assert "tide" in json.loads((tmp_path / "m.json").read_text())["analysis"]
