"""Checking model outputs before they are scored.

``predictions`` everywhere in ``rcnn.evaluation`` maps a data set's ``image_id`` to the model
output for that image, in original image coordinates: ``boxes [D, 4]`` (x1, y1, x2, y2),
``labels [D]`` (contiguous 1..K), ``scores [D]`` and optionally ``masks [D, 1, H, W]`` (float
probabilities, binarised at 0.5 as in Mask R-CNN) or ``[D, H, W]`` / uint8 / bool.

Shape shorthand:
    D: number of detections in an image
    H, W: original image height and width
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rcnn.data.records import DetectionDataset
from rcnn.core.masks import MASK_THRESHOLD

__all__ = ["Detections", "prepare_predictions"]



@dataclass
class Detections:
    """One image's checked detections as numpy arrays."""

    boxes: np.ndarray  # [D, 4] float64
    labels: np.ndarray  # [D] int64
    scores: np.ndarray  # [D] float64
    masks: np.ndarray | None = None  # [D, H, W] uint8 (binary), when given


def _array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _check_one(image_id: int, output: Mapping[str, Any], num_classes: int, size: tuple[int, int]) -> Detections:
    where = f"predictions[{image_id}]"
    for key in ("boxes", "labels", "scores"):
        if key not in output:
            raise ValueError(f"{where}: missing '{key}' (found keys: {sorted(output)})")
    boxes = _array(output["boxes"]).astype(np.float64)
    labels = _array(output["labels"])
    scores = _array(output["scores"]).astype(np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes must be [D, 4], got {list(boxes.shape)}")
    count = boxes.shape[0]
    if labels.shape != (count,) or scores.shape != (count,):
        raise ValueError(
            f"{where}: boxes {list(boxes.shape)}, labels {list(labels.shape)} and scores "
            f"{list(scores.shape)} must agree on the number of detections"
        )
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise ValueError(f"{where}: boxes or scores contain NaN or infinite values")
    if count and (labels.min() < 1 or labels.max() >= num_classes or not np.all(labels == np.round(labels))):
        raise ValueError(
            f"{where}: labels must be integers in 1..{num_classes - 1} (0 is background), "
            f"got values from {labels.min()} to {labels.max()}"
        )
    masks = None
    if output.get("masks") is not None:
        masks = _array(output["masks"])
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.shape != (count, *size):
            raise ValueError(
                f"{where}: masks must be [D, 1, H, W] with D = {count} and (H, W) = {size} "
                f"(the original image size), got {list(_array(output['masks']).shape)}"
            )
        if masks.dtype.kind == "f":
            masks = masks >= MASK_THRESHOLD
        masks = (masks > 0).astype(np.uint8)
    return Detections(boxes, labels.astype(np.int64), scores, masks)


def prepare_predictions(
    predictions: Mapping[int, Mapping[str, Any]],
    dataset: DetectionDataset,
    image_ids: Iterable[int] | None = None,
) -> tuple[list[int], dict[int, Detections]]:
    """Check ``predictions`` against ``dataset``: ``(image ids to evaluate, checked detections)``.

    ``image_ids`` defaults to every image of the data set; an image without an entry in
    ``predictions`` has no detections. Unknown image ids and malformed outputs raise
    ``ValueError`` naming the image id.
    """
    known = set(dataset.image_ids)
    unknown = [i for i in predictions if int(i) not in known]
    if unknown:
        raise ValueError(
            f"predictions for image ids not in the data set: {sorted(unknown)[:10]}"
            f"{' ...' if len(unknown) > 10 else ''} (keys must be the data set's image_id)"
        )
    ids = list(dataset.image_ids) if image_ids is None else [int(i) for i in image_ids]
    missing = [i for i in ids if i not in known]
    if missing:
        raise ValueError(f"image_ids not in the data set: {missing[:10]}")
    checked = {}
    for image_id, output in predictions.items():
        record = dataset.records[dataset.index_of(image_id)]
        checked[int(image_id)] = _check_one(int(image_id), output, dataset.num_classes, (record.height, record.width))
    return ids, checked
