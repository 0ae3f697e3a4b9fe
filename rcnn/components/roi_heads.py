"""Per-RoI heads: RoI sampling, pooling, the box head and predictor, their loss and post-processing.

Fast R-CNN (§2) pools a fixed-size feature map for each RoI from the shared conv features,
runs it through the *box head* (VGG16's fc6/fc7, ResNet's res5, or two new fc layers on an FPN;
:mod:`rcnn.components.box_heads`) and branches into two siblings, the :class:`BoxPredictor`: a
softmax over K + 1 classes and K class-specific box regressors. Faster R-CNN feeds it RPN
proposals; Mask R-CNN's heads (:class:`rcnn.components.mask_heads.MaskRoIHeads`) subclass
:class:`RoIHeads` and add the mask branch through its two hooks, :meth:`RoIHeads.branch_losses`
(training) and :meth:`RoIHeads.branch_outputs` (inference).

The number of classes is the predictor's: replacing ``roi_heads.predictor`` by one for another
class count (the fine-tuning recipe) changes the model's classes everywhere.

Shape shorthand:
    N: images;  P: proposals of an image;  R: RoIs of the batch;  G: gt boxes of an image
    K: foreground classes (K + 1 with background);  D: detections of an image;  F: box-head features
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from rcnn.components.settings import IoU, NonNegativeFloat, PositiveFloat, PositiveInt, Probability, Settings
from rcnn.core.boxes import BoxCoder, clip_boxes
from rcnn.core.losses import fast_rcnn_loss, giou_box_loss
from rcnn.core.matching import BalancedSampler, Matcher, label_proposals
from rcnn.core.ops import RoIPooler
from rcnn.core.postprocess import per_class_detections

__all__ = ["BoxPredictor", "RoIHeadSettings", "RoIHeads", "SampledRoIs", "default_roi_settings"]


class BoxPredictor(nn.Module):
    """The two sibling output layers: class scores ``[R, K+1]`` and class-specific deltas ``[R, 4K]``.

    ``init="gaussian"`` initialises them as in Fast R-CNN §2.2: zero-mean Gaussians with std 0.01
    (classification) and 0.001 (box regression), zero biases. ``init="uniform"`` keeps PyTorch's
    ``nn.Linear`` default, U(-1/sqrt(F), 1/sqrt(F)), as torchvision's predictor does: for F = 256 a
    weight std of 0.036, about 4x (scores) and 36x (deltas) the Gaussian's, so more gradient reaches
    the box head and the backbone early on. That helps when training from scratch on a short budget:
    the tiny shapes Faster R-CNN reached 0.647 AP after 2000 steps with it, 0.626 without (one seed).
    """

    def __init__(self, in_features: int, num_classes: int, init: str = "gaussian") -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
        if init not in ("gaussian", "uniform"):
            raise ValueError(f"roi.predictor_init must be 'gaussian' or 'uniform', got {init!r}")
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, 4 * (num_classes - 1))
        if init == "gaussian":
            nn.init.normal_(self.cls_score.weight, std=0.01)
            nn.init.normal_(self.bbox_pred.weight, std=0.001)
            nn.init.zeros_(self.cls_score.bias)
            nn.init.zeros_(self.bbox_pred.bias)

    @property
    def num_classes(self) -> int:
        """K + 1, read from the classification layer."""
        return self.cls_score.out_features

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # [R, F] -> [R, K+1], [R, 4K]
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeadSettings(Settings):
    """Hyper-parameters of the box branch; defaults follow Fast R-CNN / py-faster-rcnn.

    Attributes:
        fg_iou_thresh: RoIs with IoU >= 0.5 with a gt are foreground (§2.3).
        bg_iou_thresh_hi, bg_iou_thresh_lo: background IoU interval [0.1, 0.5) (§2.3); set
            ``bg_iou_thresh_lo = 0`` for the modern [0, 0.5).
        batch_size_per_image, positive_fraction: 64 RoIs per image, 25 % foreground (§2.3:
            R = 128 over N = 2 images); Mask R-CNN with FPN uses 512 per image.
        add_gt_as_proposals: put the gt boxes among the proposals in training (py-faster-rcnn).
        bbox_reg_weights: target normalisation, (10, 10, 5, 5) = dividing by stds (0.1, 0.1, 0.2, 0.2).
        box_loss_weight, box_loss_beta: λ and smooth L1's beta in the multi-task loss (1, 1).
        box_loss: ``"smooth_l1"`` on the deltas (the paper's) or ``"giou"``, 1 - generalised IoU of
            the decoded box with its ground truth (rewards tight boxes; λ of about 10 balances it).
        score_thresh: detections below this probability are dropped (0.05).
        nms_thresh: per-class NMS IoU at test time (0.3 in Fast R-CNN; 0.5 is the modern choice).
        detections_per_image: at most this many detections per image (100).
        predictor_init: ``"gaussian"`` (Fast R-CNN's std 0.01 / 0.001) or ``"uniform"`` (PyTorch's
            default, as torchvision); see :class:`BoxPredictor`.
    """

    fg_iou_thresh: IoU = 0.5
    bg_iou_thresh_hi: IoU = 0.5
    bg_iou_thresh_lo: IoU = 0.1
    batch_size_per_image: PositiveInt = 64
    positive_fraction: Probability = 0.25
    add_gt_as_proposals: bool = True
    bbox_reg_weights: tuple[PositiveFloat, PositiveFloat, PositiveFloat, PositiveFloat] = (10.0, 10.0, 5.0, 5.0)
    box_loss_weight: NonNegativeFloat = 1.0
    box_loss_beta: PositiveFloat = 1.0
    box_loss: Literal["smooth_l1", "giou"] = "smooth_l1"
    score_thresh: float = Field(default=0.05, ge=0.0, le=1.0)
    nms_thresh: IoU = 0.3
    detections_per_image: PositiveInt = 100
    predictor_init: Literal["gaussian", "uniform"] = "gaussian"

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> RoIHeadSettings:
        if not self.bg_iou_thresh_lo <= self.bg_iou_thresh_hi <= self.fg_iou_thresh:
            raise ValueError(
                "the thresholds must satisfy bg_iou_thresh_lo <= bg_iou_thresh_hi <= fg_iou_thresh, got "
                f"{self.bg_iou_thresh_lo}, {self.bg_iou_thresh_hi}, {self.fg_iou_thresh}"
            )
        return self


def default_roi_settings(num_levels: int) -> tuple[RoIHeadSettings, str]:
    """RoI-head settings and RoI pooler kind (``"pool"`` or ``"align"``) for a backbone with
    ``num_levels`` feature levels.

    Single-level backbones get the Fast / Faster R-CNN papers' settings: RoI max pooling, 64 RoIs
    per image with background IoU in [0.1, 0.5), per-class NMS 0.3, smooth L1 with beta 1. FPN
    backbones get the conventions of the FPN paper and of torchvision's peer models, so that the
    two can be compared like for like: RoIAlign, 512 RoIs per image with background in [0, 0.5),
    NMS 0.5, beta 1/9.

    Fills the fields a config's ``model.roi`` (and ``model.pooler``) leaves out; a run folder
    records the merged settings and the pooler built (``rcnn.build.resolved_config``), so changing
    these defaults changes no trained run.
    """
    if num_levels == 1:
        return RoIHeadSettings(), "pool"
    return RoIHeadSettings(batch_size_per_image=512, bg_iou_thresh_lo=0.0, nms_thresh=0.5, box_loss_beta=1.0 / 9), "align"


@dataclass
class SampledRoIs:
    """The RoIs sampled for training from one batch, with their targets."""

    proposals: list[Tensor]  # per image [Pi, 4]
    labels: list[Tensor]  # per image [Pi] int64, 0 = background
    box_targets: list[Tensor]  # per image [Pi, 4]
    matched_gt: list[Tensor]  # per image [Pi] index of the matched gt (meaningless for background)


class RoIHeads(nn.Module):
    """RoI sampling + pooling + box head + predictor, with the Fast R-CNN loss and post-processing.

    Args:
        box_head: ``[R, C, P, P] -> [R, F]`` with attributes ``out_features`` (F) and, unless
            ``pooler`` is given, ``pool_size`` (P).
        predictor: the :class:`BoxPredictor` (its ``num_classes`` is the model's K + 1).
        pooler: pools each RoI to the box head's input size (RoI pooling or RoIAlign).
        settings: :class:`RoIHeadSettings`.
    """

    def __init__(
        self,
        box_head: nn.Module,
        predictor: BoxPredictor,
        pooler: RoIPooler,
        settings: RoIHeadSettings | None = None,
    ) -> None:
        super().__init__()
        self.settings = s = settings or RoIHeadSettings()
        self.pooler = pooler
        self.box_head = box_head
        self.predictor = predictor
        self.box_coder = BoxCoder(s.bbox_reg_weights)
        self.matcher = Matcher(s.fg_iou_thresh, s.bg_iou_thresh_hi, min_negative=s.bg_iou_thresh_lo)
        self.sampler = BalancedSampler(s.batch_size_per_image, s.positive_fraction)

    @property
    def num_classes(self) -> int:
        """K + 1: the predictor's."""
        return self.predictor.num_classes

    predictor_names: tuple[str, ...] = ("predictor",)  # the class-specific layers

    def replace_predictor(self, num_classes: int) -> list[str]:
        """New, freshly initialised class-specific layers for ``num_classes`` (K + 1); returns their
        names (:attr:`predictor_names`). The box head and everything before it stay."""
        self.predictor = BoxPredictor(self.box_head.out_features, num_classes, self.settings.predictor_init)
        return list(self.predictor_names)

    def sample(self, proposals: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]) -> SampledRoIs:
        """Label proposals by IoU with the gt and sample a balanced mini-batch of RoIs per image."""
        out = SampledRoIs([], [], [], [])
        for props, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            if self.settings.add_gt_as_proposals:
                props = torch.cat((props, gt_boxes.to(props.dtype)))
            labels, matched = label_proposals(self.matcher, gt_boxes, gt_labels, props)  # [P], [P]
            pos, neg = self.sampler(labels)
            idx = torch.cat((pos, neg))
            props, labels, matched = props[idx], labels[idx], matched[idx]
            if gt_boxes.numel():
                box_targets = self.box_coder.encode(gt_boxes[matched], props)
            else:
                box_targets = torch.zeros_like(props)
            out.proposals.append(props)
            out.labels.append(labels)
            out.box_targets.append(box_targets)
            out.matched_gt.append(matched)
        return out

    def box_features(self, features: Sequence[Tensor], proposals: Sequence[Tensor]) -> Tensor:
        """Pool and run the box head: ``[R, F]`` for the RoIs of all images in order."""
        return self.box_head(self.pooler(features, proposals))

    def forward(
        self,
        features: Sequence[Tensor],
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Training: ``([], losses)``; inference: ``(detections per image, {})`` in resized-image pixels."""
        if self.training:
            if targets is None:
                raise ValueError("the RoI heads need targets in training mode")
            sampled = self.sample(proposals, targets)
            class_logits, box_deltas = self.predictor(self.box_features(features, sampled.proposals))
            labels = torch.cat(sampled.labels)
            losses = fast_rcnn_loss(
                class_logits,
                box_deltas,
                labels,
                torch.cat(sampled.box_targets),
                box_weight=self.settings.box_loss_weight,
                beta=self.settings.box_loss_beta,
            )
            if self.settings.box_loss == "giou":
                proposals_ = torch.cat(sampled.proposals)
                gt = self.box_coder.decode(torch.cat(sampled.box_targets), proposals_)  # [R, 4] the matched gt
                losses["loss_box"] = giou_box_loss(box_deltas, labels, proposals_, gt, self.box_coder.decode,
                                                   self.settings.box_loss_weight)  # fmt: skip
            losses.update(self.branch_losses(features, sampled, targets))
            return [], losses
        class_logits, box_deltas = self.predictor(self.box_features(features, proposals))
        detections = self.postprocess(class_logits, box_deltas, proposals, image_sizes)
        self.branch_outputs(features, detections)
        return detections, {}

    def branch_losses(
        self, features: Sequence[Tensor], sampled: SampledRoIs, targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Hook for further per-RoI branches in training (Mask R-CNN's mask loss); none here."""
        return {}

    def branch_outputs(self, features: Sequence[Tensor], detections: list[dict[str, Tensor]]) -> None:
        """Hook for further per-RoI branches at test time, run on the final detections (in place)."""

    def finalize(self, detections: list[dict[str, Tensor]], original_sizes: Sequence[tuple[int, int]]) -> None:
        """Hook run once the boxes are in original image coordinates (Mask R-CNN pastes its masks)."""

    def postprocess(
        self,
        class_logits: Tensor,
        box_deltas: Tensor,
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Softmax, per-class decoding, clipping, then :func:`rcnn.core.postprocess.per_class_detections`."""
        s = self.settings
        detections = []
        for boxes, scores in self.class_boxes(class_logits, box_deltas, proposals, image_sizes):
            found = per_class_detections(boxes, scores, s.score_thresh, s.nms_thresh, s.detections_per_image, min_size=1e-2)
            found.pop("rows")
            detections.append(found)
        return detections

    def class_boxes(
        self,
        class_logits: Tensor,
        box_deltas: Tensor,
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image, before the per-class post-processing: each proposal's box for every class
        (its deltas applied, clipped to the image) ``[P, K, 4]`` and the softmax probabilities
        ``[P, K]`` of the K foreground classes. ``class_logits [R, K+1]``, ``box_deltas [R, 4K]``."""
        num_fg = self.num_classes - 1
        if box_deltas.shape[1] != 4 * num_fg:
            raise ValueError(
                f"the box predictor gives {box_deltas.shape[1] // 4} box regressors for {num_fg} classes; "
                "a predictor of K + 1 scores needs 4K deltas (see BoxPredictor)"
            )
        probs = torch.softmax(class_logits, dim=-1)[:, 1:]  # [R, K]
        counts = [p.shape[0] for p in proposals]  # sizes, symbolic when exported
        all_boxes = self.box_coder.decode(box_deltas, torch.cat(proposals)).reshape(-1, num_fg, 4)  # [R, K, 4]
        return [
            (clip_boxes(boxes, size), scores)
            for boxes, scores, size in zip(all_boxes.split(counts), probs.split(counts), image_sizes)
        ]
