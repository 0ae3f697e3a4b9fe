"""VOC AP on hand-built cases, and against pycocotools' AP@0.5 on perturbed predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rcnn.data import CocoDetection, VOCDetection, make_shapes, shapes_paths
from rcnn.evaluation import evaluate_coco, evaluate_voc, voc_ap

BAD = Path(__file__).parent / "data" / "bad"
VOC = BAD / "voc"
IMAGES = BAD / "images"


def test_voc_ap_by_hand() -> None:
    # two objects; detections: hit A, duplicate of A, hit B
    recall = np.array([0.5, 0.5, 1.0])
    precision = np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(recall, precision) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    # 11-point: recall >= 0 .. 0.5 (6 points) -> 1, recall >= 0.6 .. 1.0 (5 points) -> 2/3
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert voc_ap(np.array([1.0]), np.array([1.0])) == 1.0
    assert voc_ap(np.array([1.0]), np.array([1.0]), use_07_metric=True) == 1.0
    assert voc_ap(np.array([0.0]), np.array([0.0])) == 0.0


def _output(boxes: list[list[float]], scores: list[float], label: int = 1) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.full((len(scores),), label, dtype=torch.int64),
        "scores": torch.tensor(scores, dtype=torch.float32),
    }


@pytest.fixture(scope="module")
def voc_good() -> VOCDetection:
    """One 32x24 image: a cat (2, 3, 12, 11) and a difficult dog (13, 1, 30, 22)."""
    return VOCDetection(VOC, "good")


CAT, DOG = 8, 12  # labels of cat and dog among the 20 VOC classes


def test_perfect_detections_give_ap_one(voc_good: VOCDetection) -> None:
    preds = {0: _output([[2, 3, 12, 11]], [0.9], CAT)}
    result = evaluate_voc(preds, voc_good)
    assert result["per_class_AP"]["cat"] == 1.0
    assert result["mAP"] == 1.0  # the dog is difficult: no positives, left out of the mean
    assert np.isnan(result["per_class_AP"]["dog"]) and result["num_positives"]["dog"] == 0
    assert result["num_positives"]["cat"] == 1
    assert evaluate_voc(preds, voc_good, use_07_metric=True)["mAP"] == 1.0


def _two_cats(tmp_path: Path) -> CocoDetection:
    """A COCO set of one 32x24 image with two cats: A = (1, 1, 11, 9), B = (16, 10, 30, 22)."""
    ann_file = tmp_path / "two_cats.json"
    ann_file.write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "ok.png", "width": 32, "height": 24}],
                "annotations": [
                    {"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 10, 8], "iscrowd": 0},
                    {"id": 2, "image_id": 7, "category_id": 1, "bbox": [16, 10, 14, 12], "iscrowd": 0},
                ],
                "categories": [{"id": 1, "name": "cat"}],
            }
        )
    )
    return CocoDetection(IMAGES, ann_file)


def test_duplicate_detection_gives_known_precision_and_metrics_differ(tmp_path: Path) -> None:
    dataset = _two_cats(tmp_path)
    a, b = [1, 1, 11, 9], [16, 10, 30, 22]
    assert evaluate_voc({7: _output([a, b], [0.9, 0.8])}, dataset)["mAP"] == 1.0
    # hit A, duplicate of A, hit B: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    preds = {7: _output([a, [1.5, 1, 11, 9], b], [0.9, 0.8, 0.7])}
    assert evaluate_voc(preds, dataset)["mAP"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # 11-point: recall >= 0 .. 0.5 (6 points) -> 1, recall >= 0.6 .. 1.0 (5 points) -> 2/3
    assert evaluate_voc(preds, dataset, use_07_metric=True)["mAP"] == pytest.approx((6 + 5 * 2 / 3) / 11)
    # IoU must exceed the threshold: a box half over A (IoU 1/3) is a miss
    half = {7: _output([[6, 1, 16, 9], b], [0.9, 0.8])}
    assert evaluate_voc(half, dataset)["mAP"] == pytest.approx(0.5 * 1 / 2)
    assert evaluate_voc(half, dataset, iou_threshold=0.3)["mAP"] == 1.0


def test_difficult_objects_are_ignored(voc_good: VOCDetection) -> None:
    cat = _output([[2, 3, 12, 11]], [0.5], CAT)
    dog_hit = _output([[13, 1, 30, 22]], [0.9], DOG)
    both = {k: torch.cat([cat[k], dog_hit[k]]) for k in cat}
    result = evaluate_voc({0: both}, voc_good)
    assert result["per_class_AP"]["cat"] == 1.0  # the dog detection is neither right nor wrong
    assert np.isnan(result["per_class_AP"]["dog"])
    # a cat detection on the difficult dog's box is a false positive for "cat" (different class)
    wrong = _output([[13, 1, 30, 22], [2, 3, 12, 11]], [0.9, 0.5], CAT)
    assert evaluate_voc({0: wrong}, voc_good)["per_class_AP"]["cat"] == pytest.approx(0.5)


def test_no_predictions_at_all(voc_good: VOCDetection) -> None:
    result = evaluate_voc({}, voc_good)
    assert result["per_class_AP"]["cat"] == 0.0 and result["mAP"] == 0.0
    result = evaluate_voc({0: _output([], [], CAT)}, voc_good)
    assert result["mAP"] == 0.0


def test_bad_predictions_name_the_image(voc_good: VOCDetection) -> None:
    with pytest.raises(ValueError, match="not in the data set"):
        evaluate_voc({5: _output([[0, 0, 1, 1]], [0.5])}, voc_good)
    with pytest.raises(ValueError, match=r"predictions\[0\].*labels"):
        evaluate_voc({0: _output([[0, 0, 1, 1]], [0.5], label=0)}, voc_good)
    bad = _output([[0, 0, 1, 1]], [0.5])
    bad["scores"] = torch.tensor([float("nan")])
    with pytest.raises(ValueError, match=r"predictions\[0\].*NaN"):
        evaluate_voc({0: bad}, voc_good)


def test_voc_area_map_agrees_with_pycocotools_ap50(tmp_path: Path) -> None:
    root = make_shapes(tmp_path, n_train=0, n_val=30, seed=5, image_size=96)
    dataset = CocoDetection(*shapes_paths(root, "val"))
    rng = np.random.default_rng(0)
    preds = {}
    for i in range(len(dataset)):
        gt = dataset.annotation(i)
        boxes, labels, scores = [], [], []
        for box, label in zip(gt["boxes"].tolist(), gt["labels"].tolist()):
            if rng.uniform() < 0.15:
                continue  # missed object
            w, h = box[2] - box[0], box[3] - box[1]
            jitter = rng.normal(0.0, 0.12, size=4) * [w, h, w, h]
            boxes.append(np.array(box) + jitter)
            labels.append(label if rng.uniform() > 0.1 else int(rng.integers(1, 6)))
            scores.append(rng.uniform())
        for _ in range(int(rng.integers(0, 3))):  # false positives
            x, y = rng.uniform(0, 70, size=2)
            s = rng.uniform(8, 26)
            boxes.append(np.array([x, y, x + s, y + s]))
            labels.append(int(rng.integers(1, 6)))
            scores.append(rng.uniform())
        preds[gt["image_id"]] = _output([list(b) for b in boxes], scores)
        preds[gt["image_id"]]["labels"] = torch.tensor(labels, dtype=torch.int64)
    voc = evaluate_voc(preds, dataset)
    coco = evaluate_coco(preds, dataset)
    assert 0.3 < voc["mAP"] < 0.95  # a non-trivial case
    print(f"VOC area mAP {voc['mAP']:.4f}  pycocotools AP50 {coco['bbox']['AP50']:.4f}")
    assert abs(voc["mAP"] - coco["bbox"]["AP50"]) < 0.02
