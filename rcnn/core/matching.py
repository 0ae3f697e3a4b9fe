"""Assigning proposals (or anchors) to ground truth, sampling mini-batches, mining hard negatives.

Every generation labels its candidate boxes by IoU with the ground truth, with its own
thresholds (all configurable, defaults from the papers):

    R-CNN fine-tuning  positive IoU >= 0.5, else background          (R-CNN §2.3)
    R-CNN SVMs         negatives IoU < 0.3, positives the gt boxes    (R-CNN §2.3)
    Fast R-CNN RoIs    foreground IoU >= 0.5, background [0.1, 0.5)   (Fast R-CNN §2.3)
    RPN anchors        positive IoU > 0.7 or best for a gt, negative < 0.3 (Faster R-CNN §3.1.2)

Shape shorthand:
    G: ground-truth boxes of one image
    P: proposals / anchors of one image
"""

from __future__ import annotations

import torch
from torch import Tensor

from rcnn.core.boxes import box_iou

__all__ = ["BalancedSampler", "Matcher", "hard_negatives", "label_proposals"]


class Matcher:
    """Match each proposal to its highest-IoU ground-truth box, or mark it negative / ignored.

    For a proposal whose best IoU with any gt is ``iou``:

    - ``iou >= high``: matched, the result is that gt's index (a positive / foreground);
    - ``low <= iou < high``: ``BETWEEN_THRESHOLDS`` (ignored in training);
    - ``min_negative <= iou < low``: ``BELOW_LOW_THRESHOLD`` (a negative / background);
    - ``iou < min_negative``: ``BETWEEN_THRESHOLDS`` too — Fast R-CNN's background interval
      ``[0.1, 0.5)`` leaves RoIs that hardly touch any object out (§2.3, "a heuristic for hard
      example mining"). The default 0.0 makes every low-IoU proposal a negative.

    ``allow_low_quality_matches`` adds the RPN's second positive rule (Faster R-CNN §3.1.2):
    for each gt, the proposal(s) with the highest IoU with it are positives even below ``high``
    (ties included, as py-faster-rcnn does), so that every object gets at least one anchor.
    A gt that overlaps no proposal at all is skipped by this rule instead of marking every
    proposal positive.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(
        self,
        high: float,
        low: float,
        allow_low_quality_matches: bool = False,
        min_negative: float = 0.0,
    ) -> None:
        if not 0.0 <= min_negative <= low <= high <= 1.0:
            raise ValueError(
                "Matcher thresholds must satisfy 0 <= min_negative <= low <= high <= 1, got "
                f"min_negative={min_negative}, low={low}, high={high}"
            )
        self.high = float(high)
        self.low = float(low)
        self.min_negative = float(min_negative)
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """``iou [G, P]`` -> ``[P]`` int64: gt index, ``BELOW_LOW_THRESHOLD`` or ``BETWEEN_THRESHOLDS``."""
        if iou.dim() != 2:
            raise ValueError(f"Matcher expects an IoU matrix [G, P], got shape {list(iou.shape)}")
        num_gt, num_proposals = iou.shape
        if num_gt == 0:  # an image without objects: everything is background
            return torch.full((num_proposals,), self.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=iou.device)
        if num_proposals == 0:
            return torch.empty((0,), dtype=torch.int64, device=iou.device)
        best_iou, matches = iou.max(dim=0)  # [P], [P]
        result = matches.clone()
        result[best_iou < self.high] = self.BETWEEN_THRESHOLDS
        result[(best_iou >= self.min_negative) & (best_iou < self.low)] = self.BELOW_LOW_THRESHOLD
        if self.allow_low_quality_matches:
            best_for_gt = iou.max(dim=1, keepdim=True).values  # [G, 1]
            is_best = (iou == best_for_gt) & (best_for_gt > 0)  # [G, P]
            prop_idx = is_best.any(dim=0).nonzero().flatten()
            # a proposal that is the best for several gts keeps its own highest-IoU gt
            result[prop_idx] = matches[prop_idx]
        return result


def label_proposals(matcher: Matcher, gt_boxes: Tensor, gt_labels: Tensor, proposals: Tensor) -> tuple[Tensor, Tensor]:
    """Label proposals (or anchors) by IoU with the ground truth: the rule every generation shares.

    Args:
        matcher: the generation's thresholds (see the module docstring).
        gt_boxes: ``[G, 4]``; gt_labels: ``[G]`` int64 in 1..K (all ones for the RPN's
            object / not-object labels).
        proposals: ``[P, 4]``.

    Returns ``labels [P]`` int64 — the matched gt's class (>= 1), 0 for background, -1 for
    ignored — and ``matched [P]``, the index of the matched gt (0 where there is none).
    """
    matches = matcher(box_iou(gt_boxes.to(proposals.dtype), proposals))  # [P]
    if gt_boxes.numel():
        labels = gt_labels[matches.clamp(min=0)].clone()
    else:
        labels = torch.zeros_like(matches)
    labels[matches == Matcher.BELOW_LOW_THRESHOLD] = 0
    labels[matches == Matcher.BETWEEN_THRESHOLDS] = -1
    return labels, matches.clamp(min=0)


class BalancedSampler:
    """Sample a mini-batch with at most ``positive_fraction`` positives, the rest negatives.

    The RPN samples 256 anchors per image at up to 1:1 (Faster R-CNN §3.1.3); Fast R-CNN
    samples 64 RoIs per image with 25% foreground (§2.3); R-CNN's fine-tuning batches hold
    32 positives and 96 background windows (§2.3). When there are too few positives the
    batch is filled up with negatives.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        if batch_size_per_image <= 0:
            raise ValueError(f"batch_size_per_image must be positive, got {batch_size_per_image}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must lie in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)

    def __call__(self, labels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``labels [P]`` (>= 1 positive, 0 negative, -1 ignored) -> indices of sampled positives and negatives.

        The random choice uses ``generator`` (or the global generator), on the CPU, so a seeded
        run is reproducible on any device.
        """
        positive = (labels >= 1).nonzero().flatten()
        negative = (labels == 0).nonzero().flatten()
        num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
        pos_perm = torch.randperm(positive.numel(), generator=generator)[:num_pos].to(labels.device)
        neg_perm = torch.randperm(negative.numel(), generator=generator)[:num_neg].to(labels.device)
        return positive[pos_perm], negative[neg_perm]


def hard_negatives(scores: Tensor, negative_mask: Tensor, margin: float = -1.0, max_count: int | None = None) -> Tensor:
    """Indices of the hard negatives: negatives scored above ``margin``, highest score first.

    For a linear SVM trained with hinge loss, a negative that scores above -1 lies inside the
    margin or on the wrong side and so still contributes to the loss; these are the examples
    R-CNN's hard negative mining adds to the cache in each round (its code uses -1.0001).

    Args:
        scores: ``[P]`` classifier scores.
        negative_mask: ``[P]`` bool, which entries are negatives at all.
        margin: scores strictly above it are hard.
        max_count: keep at most this many (the hardest).
    """
    if scores.shape != negative_mask.shape or scores.dim() != 1:
        raise ValueError(
            f"hard_negatives: scores and negative_mask must both be [P], got {list(scores.shape)} "
            f"and {list(negative_mask.shape)}"
        )
    candidates = (negative_mask & (scores > margin)).nonzero().flatten()
    order = scores[candidates].argsort(descending=True)
    candidates = candidates[order]
    if max_count is not None:
        candidates = candidates[: max(int(max_count), 0)]
    return candidates
