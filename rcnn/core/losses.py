"""Losses of the R-CNN family, as free functions tested against hand-computed values.

Shape shorthand:
    R: sampled RoIs;  K: foreground classes (K + 1 with background, label 0)
    S: sampled anchors;  m: mask side (28 in Mask R-CNN)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "binary_log_loss",
    "fast_rcnn_loss",
    "giou_box_loss",
    "mask_loss",
    "rpn_loss",
    "select_class_deltas",
    "smooth_l1",
    "softmax_log_loss",
]


def smooth_l1(x: Tensor, beta: float = 1.0) -> Tensor:
    """Elementwise smooth L1 (Fast R-CNN eq. 3): ``0.5 x² / beta`` if ``|x| < beta``, else ``|x| - 0.5 beta``.

    With ``beta = 1`` this is the seed's definition; smaller ``beta`` approaches L1. It is less
    sensitive to outliers than the L2 loss R-CNN's ridge regressors use, because its gradient is
    bounded by 1.
    """
    if beta < 0:
        raise ValueError(f"smooth_l1: beta must be >= 0, got {beta}")
    absx = x.abs()
    if beta == 0:
        return absx
    return torch.where(absx < beta, 0.5 * absx * absx / beta, absx - 0.5 * beta)


def softmax_log_loss(class_logits: Tensor, labels: Tensor) -> Tensor:
    """Mean of ``-log p_u`` over RoIs: ``class_logits [R, K+1]``, ``labels [R]`` (the seed's L_cls)."""
    if class_logits.shape[0] == 0:
        return class_logits.sum() * 0.0
    return F.cross_entropy(class_logits, labels)


def binary_log_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean of ``-p* log p - (1 - p*) log(1 - p)`` with ``p = sigmoid(logits)`` (RPN objectness, masks)."""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def select_class_deltas(box_deltas: Tensor, labels: Tensor) -> Tensor:
    """The deltas ``t^u`` of each RoI's class ``u``: ``[R, 4K]`` with ``labels [R]`` in 1..K -> ``[R, 4]``.

    Predictors output one set of four deltas per *foreground* class (class u uses columns
    ``4(u-1) .. 4u-1``).
    """
    deltas = box_deltas.reshape(box_deltas.shape[0], -1, 4)  # [R, K, 4]
    return deltas[torch.arange(deltas.shape[0], device=deltas.device), labels - 1]


def fast_rcnn_loss(
    class_logits: Tensor,
    box_deltas: Tensor,
    labels: Tensor,
    box_targets: Tensor,
    box_weight: float = 1.0,
    beta: float = 1.0,
) -> dict[str, Tensor]:
    """Fast R-CNN's multi-task loss ``L = L_cls(p, u) + λ [u >= 1] L_loc(t^u, v)`` (eq. 1).

    Args:
        class_logits: ``[R, K+1]``.
        box_deltas: ``[R, 4K]``, class-specific deltas.
        labels: ``[R]`` int64, 0 for background RoIs.
        box_targets: ``[R, 4]`` regression targets ``v`` (only foreground rows are used).
        box_weight: λ (1 in the paper).
        beta: smooth L1 transition point (1 in the paper).

    Both terms are averaged over all R sampled RoIs, background included, as the reference
    implementation does; background RoIs contribute no box loss (the indicator ``[u >= 1]``),
    and so receive no gradient on their deltas.
    """
    loss_cls = softmax_log_loss(class_logits, labels)
    fg = (labels > 0).nonzero().flatten()
    if fg.numel() == 0:
        loss_box = box_deltas.sum() * 0.0
    else:
        diff = select_class_deltas(box_deltas[fg], labels[fg]) - box_targets[fg]
        loss_box = box_weight * smooth_l1(diff, beta).sum() / max(labels.numel(), 1)
    return {"loss_cls": loss_cls, "loss_box": loss_box}


def giou_box_loss(
    box_deltas: Tensor,
    labels: Tensor,
    proposals: Tensor,
    gt_boxes: Tensor,
    decode: Callable[[Tensor, Tensor], Tensor],
    box_weight: float = 1.0,
) -> Tensor:
    """The box term of Fast R-CNN's loss as a generalised-IoU loss (Rezatofighi et al., 2019).

    Smooth L1 on the deltas treats the four coordinates as independent and weighs a pixel of error
    the same on a small and on a large box; ``1 - GIoU`` of the decoded box with its ground truth
    scores the overlap itself, so it rewards exactly what AP at high IoU thresholds measures.

    Args:
        box_deltas: ``[R, 4K]`` class-specific deltas; labels: ``[R]`` (0 background).
        proposals: ``[R, 4]`` the sampled RoIs; gt_boxes: ``[R, 4]`` each RoI's matched ground truth.
        decode: deltas ``[F, 4]`` + proposals ``[F, 4]`` -> boxes ``[F, 4]`` (the head's box coder).
        box_weight: λ.

    Averaged over all R RoIs like the smooth-L1 term, so λ plays the same part.
    """
    from torchvision.ops import generalized_box_iou_loss

    fg = (labels > 0).nonzero().flatten()
    if fg.numel() == 0:
        return box_deltas.sum() * 0.0
    boxes = decode(select_class_deltas(box_deltas[fg], labels[fg]), proposals[fg])  # [F, 4]
    return box_weight * generalized_box_iou_loss(boxes, gt_boxes[fg].to(boxes.dtype), reduction="sum") / max(labels.numel(), 1)


def rpn_loss(
    objectness: Tensor,
    objectness_labels: Tensor,
    box_deltas: Tensor,
    box_targets: Tensor,
    num_locations: int,
    normalization: str = "paper",
    box_weight: float = 10.0,
    beta: float = 1.0,
) -> dict[str, Tensor]:
    """The RPN's loss over the sampled anchors (Faster R-CNN eq. 1).

    ``L = 1/N_cls Σ L_cls(p_i, p*_i) + λ/N_box Σ p*_i L_reg(t_i, t*_i)``

    Args:
        objectness: ``[S]`` logits of the sampled anchors.
        objectness_labels: ``[S]`` 1 for positive anchors, 0 for negative.
        box_deltas, box_targets: ``[S, 4]`` predicted and target deltas (only positives count).
        num_locations: anchor *locations* of the image batch (sum of Hi * Wi over levels and
            images), the paper's N_box ~ 2400.
        normalization: ``"paper"``: N_cls = S (256 per image), N_box = ``num_locations``,
            λ = ``box_weight`` (10), so both terms weigh about the same. ``"batch"``: the modern
            convention (torchvision, detectron2): the box term is also divided by S and λ = 1,
            usually with ``beta = 1/9``. The two differ only by a constant factor on the box term
            (≈ λ S / N_box), which the learning rate absorbs; "batch" keeps it independent of the
            image size.
        box_weight: λ for ``"paper"`` (ignored by ``"batch"``).
        beta: smooth L1 transition point.
    """
    if normalization not in ("paper", "batch"):
        raise ValueError(f"rpn_loss: normalization must be 'paper' or 'batch', got {normalization!r}")
    loss_objectness = binary_log_loss(objectness, objectness_labels)
    positive = objectness_labels > 0
    box_sum = smooth_l1(box_deltas[positive] - box_targets[positive], beta).sum()
    if normalization == "paper":
        loss_box = box_weight * box_sum / max(int(num_locations), 1)
    else:
        loss_box = box_sum / max(objectness.numel(), 1)
    return {"loss_objectness": loss_objectness, "loss_rpn_box": loss_box}


def mask_loss(mask_logits: Tensor, labels: Tensor, mask_targets: Tensor) -> Tensor:
    """Mask R-CNN's L_mask: average per-pixel binary cross-entropy on the gt class's mask only.

    Args:
        mask_logits: ``[R, K, m, m]``, one mask per foreground class for each positive RoI.
        labels: ``[R]`` ground-truth class of each RoI, in 1..K.
        mask_targets: ``[R, m, m]`` the gt mask in the RoI's frame, values in [0, 1].

    Only channel ``labels[r]`` of RoI r enters the loss, so classes do not compete (a per-pixel
    sigmoid, not a softmax over classes) and the other channels get zero gradient.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    if mask_targets.shape[-2:] != mask_logits.shape[-2:]:
        raise ValueError(
            f"mask_loss: targets {list(mask_targets.shape)} do not match logits {list(mask_logits.shape)}"
        )
    chosen = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels - 1]  # [R, m, m]
    return F.binary_cross_entropy_with_logits(chosen, mask_targets.to(chosen.dtype))
