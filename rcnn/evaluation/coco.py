"""COCO box and mask AP through pycocotools, and COCO results files.

``evaluate_coco`` returns, per IoU type, the 12 standard COCO numbers (in 0..1)::

    AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl

plus ``per_class_AP`` (class name -> AP over IoU 0.50:0.95, NaN for a class without ground
truth), and under ``"summary"`` the text pycocotools prints (captured, not printed).
The ground truth is ``dataset.coco``: the validated annotations (clipped boxes; crowd
objects, and VOC difficult objects, are ignored as COCO does for crowds).

Shape shorthand:
    D: number of detections in an image
    H, W: original image height and width
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rcnn.data.records import DetectionDataset
from rcnn.evaluation.outputs import Detections, prepare_predictions
from rcnn.io.files import write_json

__all__ = ["COCO_STAT_NAMES", "coco_results", "evaluate_coco", "result_entries", "write_coco_results"]

# The order of COCOeval.stats (pycocotools' summarize()).
COCO_STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip
IOU_TYPES = ("bbox", "segm")


def result_entries(
    image_id: int,
    boxes: np.ndarray | None,
    labels: np.ndarray,
    scores: np.ndarray,
    category_ids: Mapping[int, int],
    masks: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """COCO results entries of one image: ``boxes [D, 4]`` (x1, y1, x2, y2; ``None``: none written),
    ``labels [D]`` mapped to category ids by ``category_ids``, ``scores [D]`` and optional binary
    ``masks [D, H, W]`` (written as compressed RLE)."""
    rles = []
    if masks is not None and len(labels):
        rles = mask_utils.encode(np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0)))  # [H, W, D] -> D RLEs
    results = []
    for j in range(len(labels)):
        result: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": int(category_ids[int(labels[j])]),
            "score": float(scores[j]),
        }
        if boxes is not None:
            x1, y1, x2, y2 = (float(v) for v in boxes[j])
            result["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        if masks is not None:
            result["segmentation"] = {"size": rles[j]["size"], "counts": rles[j]["counts"].decode("ascii")}
        results.append(result)
    return results


def _results_for_image(
    image_id: int, det: Detections, dataset: DetectionDataset, with_boxes: bool, with_masks: bool
) -> list[dict[str, Any]]:
    return result_entries(
        image_id, det.boxes if with_boxes else None, det.labels, det.scores, dataset.label_to_cat_id,
        det.masks if with_masks else None,
    )  # fmt: skip


def coco_results(
    detections: Mapping[int, Detections], dataset: DetectionDataset, iou_type: str | None = None
) -> list[dict[str, Any]]:
    """COCO results entries (category ids mapped back) for checked ``detections``.

    ``iou_type`` ``"bbox"`` gives boxes only, ``"segm"`` masks only, ``None`` both (masks when
    the detections have them).
    """
    results = []
    for image_id, det in detections.items():
        with_masks = iou_type == "segm" or (iou_type is None and det.masks is not None)
        if with_masks and det.masks is None:
            raise ValueError(f"predictions[{image_id}]: 'segm' evaluation needs 'masks' in every output")
        results += _results_for_image(image_id, det, dataset, iou_type != "segm", with_masks)
    return results


def _results_coco(gt: COCO, results: list[dict[str, Any]]) -> COCO:
    """A pycocotools results object; an empty one when there are no detections at all."""
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            return gt.loadRes(results)
        empty = COCO()
        empty.dataset = {"images": list(gt.dataset["images"]), "categories": gt.dataset["categories"], "annotations": []}
        empty.createIndex()
        return empty


def evaluate_coco(
    predictions: Mapping[int, Mapping[str, Any]],
    dataset: DetectionDataset,
    iou_type: str | Sequence[str] = ("bbox",),
    *,
    image_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """COCO AP of ``predictions`` (image_id -> model output, original coordinates) on ``dataset``.

    ``iou_type`` is ``"bbox"``, ``"segm"`` or both. ``image_ids`` (default: every image of the
    data set) selects the images scored; an image without predictions has no detections.
    Returns ``{iou_type: {"AP": ..., ..., "ARl": ..., "per_class_AP": {name: AP}}, "summary": str}``.
    """
    iou_types = (iou_type,) if isinstance(iou_type, str) else tuple(iou_type)
    if not iou_types or any(t not in IOU_TYPES for t in iou_types):
        raise ValueError(f"iou_type must be 'bbox', 'segm' or both, got {iou_type!r}")
    if "segm" in iou_types and not dataset.with_masks:
        raise ValueError("'segm' evaluation needs a data set built with with_masks=True (ground-truth masks)")
    ids, detections = prepare_predictions(predictions, dataset, image_ids)
    gt = dataset.coco
    output: dict[str, Any] = {}
    summaries = []
    for kind in iou_types:
        coco_eval = COCOeval(gt, _results_coco(gt, coco_results(detections, dataset, kind)), kind)
        coco_eval.params.imgIds = ids
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        numbers: dict[str, Any] = {name: float(v) for name, v in zip(COCO_STAT_NAMES, coco_eval.stats)}
        precision = coco_eval.eval["precision"]  # [T IoUs, R recalls, K classes, A areas, M max dets]
        per_class = {}
        for k, cat_id in enumerate(coco_eval.params.catIds):
            p = precision[:, :, k, 0, -1]  # area "all", 100 detections
            p = p[p > -1]
            per_class[dataset.class_names[dataset.cat_id_to_label[cat_id]]] = float(p.mean()) if p.size else float("nan")
        numbers["per_class_AP"] = per_class
        output[kind] = numbers
        summaries.append(f"{kind}:\n" + "\n".join(line for line in text.getvalue().splitlines() if "Average" in line))
    output["summary"] = "\n".join(summaries)
    return output


def write_coco_results(
    predictions: Mapping[int, Mapping[str, Any]], dataset: DetectionDataset, path: str | os.PathLike
) -> Path:
    """Write ``predictions`` as a COCO results JSON file (atomically) and return its path.

    Each entry has ``image_id``, ``category_id`` (the data set's own ids), ``score``,
    ``bbox`` ``[x, y, width, height]`` and, when the outputs have masks, ``segmentation`` (RLE).
    """
    _, detections = prepare_predictions(predictions, dataset)
    return write_json(path, coco_results(detections, dataset), indent=None)
