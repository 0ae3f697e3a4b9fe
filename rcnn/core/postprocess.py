"""From per-class scores to detections: the one per-class post-processing of the library.

Every generation ends the same way (the seed's "Non-Maximum Suppression"): each region has a
score per class; for each class separately, regions scoring above a threshold go through
greedy NMS, and the best detections over all classes are kept. R-CNN suppresses on its
proposal boxes (and moves the survivors by ridge regression afterwards); Fast / Faster / Mask
R-CNN on each class's own regressed box.

Shape shorthand:
    P: regions of one image;  K: foreground classes;  D: detections
"""

from __future__ import annotations

import torch
from torch import Tensor

from rcnn.core.boxes import remove_small_boxes
from rcnn.core.ops import batched_nms

__all__ = ["per_class_detections"]


def per_class_detections(
    boxes: Tensor,
    scores: Tensor,
    score_thresh: float,
    nms_thresh: float,
    max_detections: int,
    min_size: float | None = None,
) -> dict[str, Tensor]:
    """Threshold, per-class NMS and the top ``max_detections`` of one image's regions.

    Args:
        boxes: ``[P, K, 4]`` a box per region and class, or ``[P, 4]`` one box shared by the
            classes (R-CNN's proposals).
        scores: ``[P, K]`` the classes' scores (probabilities, or SVM values).
        score_thresh: candidates must score above this.
        nms_thresh: per-class NMS IoU.
        max_detections: at most this many detections, by decreasing score.
        min_size: drop candidate boxes narrower or lower than this (pixels) before NMS.

    Returns ``boxes [D, 4]``, ``labels [D]`` (1..K), ``scores [D]`` and ``rows [D]`` (the region
    each detection comes from), sorted by decreasing score.
    """
    num_regions, num_fg = scores.shape
    labels = torch.arange(1, num_fg + 1, device=scores.device).repeat(num_regions)  # [P*K]
    rows = torch.arange(num_regions, device=scores.device).repeat_interleave(num_fg)  # [P*K]
    flat = scores.reshape(-1)  # [P*K]
    keep = (flat > score_thresh).nonzero().flatten()
    candidates = boxes.reshape(-1, 4)[keep] if boxes.dim() == 3 else boxes[rows[keep]]
    if min_size is not None:
        small = remove_small_boxes(candidates, min_size)
        keep, candidates = keep[small], candidates[small]
    chosen = batched_nms(candidates, flat[keep], labels[keep], nms_thresh, max_kept=max_detections)
    keep = keep[chosen]
    return {"boxes": candidates[chosen], "labels": labels[keep], "scores": flat[keep], "rows": rows[keep]}
