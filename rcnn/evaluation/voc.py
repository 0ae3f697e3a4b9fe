"""Pascal VOC average precision per class and mAP (VOC2007 11-point and area metrics).

The VOC devkit's procedure: per class, detections over all images are sorted by score; each
is matched to the ground-truth box it overlaps most (IoU > ``iou_threshold``, 0.5 in VOC).
A match to an unmatched object is a true positive, to an already matched one a false positive
(duplicate), and to a ``difficult`` object neither: difficult objects are ignored, and they
do not count among the positives. COCO-format data sets have no difficult flag; their crowd
objects are ignored the same way. IoU uses the library's continuous coordinates
(``rcnn.core.boxes.box_iou``), not the devkit's ``+ 1`` pixel convention.

Shape shorthand:
    D: number of detections of one class
    G: number of ground-truth objects of one class in one image
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from rcnn.core.boxes import box_iou
from rcnn.data.records import DetectionDataset
from rcnn.evaluation.outputs import prepare_predictions

__all__ = ["evaluate_voc", "voc_ap"]


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """Average precision from a precision/recall curve ``[D]`` (detections in score order).

    ``use_07_metric``: the VOC2007 mean of the best precision at recall >= 0, 0.1, ..., 1
    (11 points). Otherwise (VOC2010 onwards) the exact area under the curve made monotone
    (each precision replaced by the best precision at any higher recall).
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        points = [precision[recall >= t].max() if np.any(recall >= t) else 0.0 for t in np.linspace(0, 1, 11)]
        return float(np.mean(points))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # monotone envelope, right to left
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def evaluate_voc(
    predictions: Mapping[int, Mapping[str, Any]],
    dataset: DetectionDataset,
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
    *,
    image_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """VOC AP of ``predictions`` (image_id -> model output, original coordinates) on ``dataset``.

    ``image_ids`` (default: every image) selects the images scored; an image without
    predictions has no detections. Returns ``{"mAP", "per_class_AP": {name: AP},
    "num_positives": {name: n}, "iou_threshold", "metric"}``; a class without (non-difficult)
    ground truth has AP NaN and is left out of the mean.
    """
    ids, detections = prepare_predictions(predictions, dataset, image_ids)
    ground_truth = [dataset.annotation(dataset.index_of(i)) for i in ids]
    per_class: dict[str, float] = {}
    positives: dict[str, int] = {}
    for label in range(1, dataset.num_classes):
        scores, matched_tp, matched_fp = [], [], []
        n_positive = 0
        for image_id, gt in zip(ids, ground_truth):
            is_class = gt["labels"] == label
            gt_boxes = gt["boxes"][is_class]  # [G, 4]
            ignore = (gt["difficult"] | gt["iscrowd"])[is_class].numpy()  # [G]
            n_positive += int((~ignore).sum())
            det = detections.get(image_id)
            if det is None:
                continue
            mine = det.labels == label
            if not mine.any():
                continue
            det_scores = det.scores[mine]  # [D]
            det_boxes = torch.from_numpy(det.boxes[mine]).to(torch.float64)  # [D, 4]
            ious = box_iou(det_boxes, gt_boxes.to(torch.float64)).numpy()  # [D, G]
            order = np.argsort(-det_scores, kind="stable")
            # Within one image, detections meet objects in score order; the global order only
            # matters for the precision/recall curve, so match here and sort the flags later.
            taken = np.zeros(len(gt_boxes), dtype=bool)
            tp = np.zeros(len(order), dtype=bool)
            fp = np.zeros(len(order), dtype=bool)
            for rank, d in enumerate(order):
                if len(gt_boxes) == 0 or ious[d].max() <= iou_threshold:
                    fp[rank] = True
                    continue
                g = int(ious[d].argmax())
                if ignore[g]:
                    continue
                if taken[g]:
                    fp[rank] = True  # a duplicate detection
                else:
                    tp[rank] = taken[g] = True
            scores.append(det_scores[order])
            matched_tp.append(tp)
            matched_fp.append(fp)
        name = dataset.class_names[label]
        positives[name] = n_positive
        if n_positive == 0:
            per_class[name] = float("nan")
            continue
        if not scores:
            per_class[name] = 0.0
            continue
        all_scores = np.concatenate(scores)
        order = np.argsort(-all_scores, kind="stable")
        tp_cum = np.cumsum(np.concatenate(matched_tp)[order])
        fp_cum = np.cumsum(np.concatenate(matched_fp)[order])
        recall = tp_cum / n_positive
        precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        per_class[name] = voc_ap(recall, precision, use_07_metric)
    valid = [ap for ap in per_class.values() if not np.isnan(ap)]
    return {
        "mAP": float(np.mean(valid)) if valid else float("nan"),
        "per_class_AP": per_class,
        "num_positives": positives,
        "iou_threshold": iou_threshold,
        "metric": "VOC07 11-point" if use_07_metric else "area",
    }
