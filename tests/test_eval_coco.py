"""COCO evaluation through pycocotools: perfect predictions, empty predictions, results files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pycocotools import mask as mask_utils

from rcnn.data import CocoDetection, VOCDetection, shapes_paths
from rcnn.evaluation import COCO_STAT_NAMES, evaluate_coco, write_coco_results

BAD = Path(__file__).parent / "data" / "bad"


@pytest.fixture(scope="module")
def shapes_val(shapes_root: Path) -> CocoDetection:
    return CocoDetection(*shapes_paths(shapes_root, "val"), with_masks=True)


def _perfect(dataset: CocoDetection, mask_format: str = "prob") -> dict[int, dict[str, torch.Tensor]]:
    preds = {}
    for i in range(len(dataset)):
        _, target = dataset[i]
        masks = target["masks"]  # [N, H, W] uint8
        preds[target["image_id"]] = {
            "boxes": target["boxes"],
            "labels": target["labels"],
            "scores": torch.linspace(1.0, 0.5, len(target["labels"])),
            "masks": masks[:, None].float() * 0.9 if mask_format == "prob" else masks.bool(),
        }
    return preds


@pytest.mark.parametrize("mask_format", ["prob", "bool"])
def test_perfect_predictions_score_one(shapes_val: CocoDetection, mask_format: str, capsys) -> None:
    result = evaluate_coco(_perfect(shapes_val, mask_format), shapes_val, ("bbox", "segm"))
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured
    for kind in ("bbox", "segm"):
        assert set(COCO_STAT_NAMES) <= set(result[kind])
        for name in ("AP", "AP50", "AP75", "AR100"):
            assert result[kind][name] == 1.0
        assert set(result[kind]["per_class_AP"]) == {"circle", "square", "triangle", "star", "hexagon"}
        assert all(ap == 1.0 for ap in result[kind]["per_class_AP"].values())
    assert "Average Precision" in result["summary"] and "segm:" in result["summary"]


def test_images_without_predictions_count_as_misses(shapes_val: CocoDetection) -> None:
    preds = _perfect(shapes_val)
    first_half = dict(list(preds.items())[:4])
    partial = evaluate_coco(first_half, shapes_val)["bbox"]
    assert 0.0 < partial["AR100"] < 1.0 and partial["AP"] < 1.0
    subset = evaluate_coco(first_half, shapes_val, image_ids=list(first_half))["bbox"]
    assert subset["AP"] == 1.0


def test_a_model_that_predicts_nothing_scores_zero(shapes_val: CocoDetection) -> None:
    empty = {
        image_id: {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "scores": torch.zeros(0),
            "masks": torch.zeros(0, 1, 128, 128),
        }
        for image_id in shapes_val.image_ids
    }
    for preds in (empty, {}):
        result = evaluate_coco(preds, shapes_val, ("bbox", "segm") if preds else "bbox")
        assert result["bbox"]["AP"] == 0.0 and result["bbox"]["AR100"] == 0.0
        assert all(ap == 0.0 for ap in result["bbox"]["per_class_AP"].values())


def test_write_coco_results_maps_category_ids_back(tmp_path: Path) -> None:
    dataset = CocoDetection(BAD / "images", BAD / "coco_crowd.json", with_masks=True)  # categories 3 and 7
    mask = torch.zeros(2, 1, 24, 32)
    mask[0, 0, 3:11, 2:12] = 0.8
    mask[1, 0, 0:5, 0:5] = 0.4  # below 0.5: empty after binarising
    preds = {
        1: {
            "boxes": torch.tensor([[2.0, 3.0, 12.0, 11.0], [0.0, 0.0, 5.0, 5.0]]),
            "labels": torch.tensor([1, 2]),
            "scores": torch.tensor([0.9, 0.3]),
            "masks": mask,
        }
    }
    path = write_coco_results(preds, dataset, tmp_path / "out" / "results.json")
    results = json.loads(path.read_text())
    assert [r["category_id"] for r in results] == [3, 7]
    assert results[0]["bbox"] == [2.0, 3.0, 10.0, 8.0] and results[0]["image_id"] == 1
    assert results[0]["score"] == pytest.approx(0.9)
    assert int(mask_utils.area(results[0]["segmentation"])) == 80
    assert int(mask_utils.area(results[1]["segmentation"])) == 0
    assert len(dataset.coco.loadRes(str(path)).getAnnIds()) == 2
    # the crowd object is ignored: the one real cat found exactly gives AP 1
    result = evaluate_coco(preds, dataset, ("bbox", "segm"))
    assert result["bbox"]["per_class_AP"]["cat"] == pytest.approx(1.0)
    assert result["segm"]["per_class_AP"]["cat"] == pytest.approx(1.0)
    assert math.isnan(result["bbox"]["per_class_AP"]["dog"])  # no dog in the ground truth


def test_voc_difficult_objects_are_crowds_for_coco_evaluation() -> None:
    dataset = VOCDetection(BAD / "voc", "good")
    preds = {0: {"boxes": torch.tensor([[2.0, 3.0, 12.0, 11.0]]), "labels": torch.tensor([8]), "scores": torch.ones(1)}}
    result = evaluate_coco(preds, dataset)
    assert result["bbox"]["per_class_AP"]["cat"] == pytest.approx(1.0)
    assert math.isnan(result["bbox"]["per_class_AP"]["dog"])


def test_bad_requests_fail_clearly(shapes_val: CocoDetection, shapes_root: Path) -> None:
    preds = _perfect(shapes_val)
    with pytest.raises(ValueError, match="iou_type"):
        evaluate_coco(preds, shapes_val, "keypoints")
    boxes_only = CocoDetection(*shapes_paths(shapes_root, "val"))
    with pytest.raises(ValueError, match="with_masks=True"):
        evaluate_coco(preds, boxes_only, "segm")
    image_id = shapes_val.image_ids[0]
    preds[image_id]["masks"] = preds[image_id]["masks"][:, :, :64]
    with pytest.raises(ValueError, match=rf"predictions\[{image_id}\]: masks"):
        evaluate_coco(preds, shapes_val, "segm")
    del preds[image_id]["masks"]
    with pytest.raises(ValueError, match="needs 'masks'"):
        evaluate_coco(preds, shapes_val, "segm")
