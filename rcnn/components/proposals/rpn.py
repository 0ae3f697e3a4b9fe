"""The Region Proposal Network (Faster R-CNN §3.1).

A small network slides over the shared feature map: a 3x3 conv, then two sibling 1x1 convs
giving, at each location, k objectness scores and 4k box deltas, one per anchor. Training
labels anchors by IoU with the ground truth (positive > 0.7 or best for a gt, negative < 0.3),
samples 256 per image at up to 1:1 and minimises the RPN loss; at test time (and to feed the
detector in training) the proposal layer decodes the deltas, clips, drops tiny boxes, keeps the
top-scoring ones and runs NMS at IoU 0.7.

This implementation scores objectness with one logit per anchor and a sigmoid (the paper's
"k scores" variant; its two-class softmax with 2k outputs is equivalent).

Shape shorthand:
    N: images;  A: anchors per location;  Hi, Wi: size of feature level i
    T: anchors of all levels of one image (sum of Hi * Wi * A);  G: gt boxes;  P: proposals
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from pydantic import model_validator
from torch import Tensor, nn

from rcnn.components.settings import IoU, NonNegativeFloat, PositiveFloat, PositiveInt, Probability, Settings
from rcnn.core.anchors import AnchorGenerator
from rcnn.core.boxes import BoxCoder, clip_boxes, remove_small_boxes
from rcnn.core.losses import rpn_loss
from rcnn.core.matching import BalancedSampler, Matcher, label_proposals
from rcnn.core.ops import batched_nms

__all__ = ["RPNHead", "RPNOutputs", "RPNSettings", "RegionProposalNetwork", "default_rpn_settings"]


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs to A objectness logits and 4A deltas; shared by all levels.

    ``conv_depth`` > 1 stacks further 3x3 conv + ReLU layers (``more_convs``), as torchvision's
    v2 detectors do (two).
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_channels: int | None = None, conv_depth: int = 1) -> None:
        super().__init__()
        if conv_depth < 1:
            raise ValueError(f"the RPN head needs at least one 3x3 convolution, got conv_depth={conv_depth}")
        conv_channels = conv_channels or in_channels  # 512-d for VGG16 in the paper
        self.conv = nn.Conv2d(in_channels, conv_channels, 3, padding=1)
        self.more_convs = nn.ModuleList(nn.Conv2d(conv_channels, conv_channels, 3, padding=1) for _ in range(conv_depth - 1))
        self.cls_logits = nn.Conv2d(conv_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(conv_channels, 4 * num_anchors, 1)
        for layer in (self.conv, *self.more_convs, self.cls_logits, self.bbox_pred):  # Gaussian, std 0.01 (§3.1.3)
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness ``[N, A, Hi, Wi]`` and deltas ``[N, 4A, Hi, Wi]``."""
        logits, deltas = [], []
        for x in features:
            h = torch.relu(self.conv(x))
            for conv in self.more_convs:
                h = torch.relu(conv(h))
            logits.append(self.cls_logits(h))
            deltas.append(self.bbox_pred(h))
        return logits, deltas


def _flatten_level(logits: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """``[N, A, H, W], [N, 4A, H, W] -> [N, H*W*A], [N, H*W*A, 4]`` in the anchors' (y, x, a) order."""
    n, a, h, w = logits.shape
    logits = logits.permute(0, 2, 3, 1).reshape(n, -1)
    deltas = deltas.reshape(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
    return logits, deltas


class RPNOutputs(NamedTuple):
    """The RPN head's outputs on all levels, with the anchors they refer to."""

    logits: list[Tensor]  # per level [N, A, Hi, Wi] objectness logits
    objectness: Tensor  # [N, T] logits, flattened in the anchors' (level, y, x, a) order
    box_deltas: Tensor  # [N, T, 4]
    anchors: Tensor  # [T, 4]
    level_sizes: list[int]  # Hi * Wi * A per level


class RPNSettings(Settings):
    """The RPN's hyper-parameters; defaults are the Faster R-CNN paper's (py-faster-rcnn's config).

    Attributes:
        fg_iou_thresh, bg_iou_thresh: anchor labelling thresholds, 0.7 / 0.3 (§3.1.2).
        batch_size_per_image, positive_fraction: 256 anchors, up to half positive (§3.1.3).
        pre_nms_top_n_train/test: proposals kept per level before NMS (12000 / 6000).
        post_nms_top_n_train/test: proposals kept per image after NMS (2000 / 300).
        nms_thresh: 0.7.
        min_size: proposals narrower or lower than this (in resized-image pixels) are dropped.
        score_thresh: proposals with objectness probability below this are dropped.
        allowed_border: anchors reaching more than this many pixels beyond the image are
            ignored in training (0: the paper's rule, which ignores cross-boundary anchors);
            None keeps them all (the modern convention).
        loss_normalization, box_weight, beta: see :func:`rcnn.losses.rpn_loss` ("paper": λ = 10,
            N_box = anchor locations).
    """

    fg_iou_thresh: IoU = 0.7
    bg_iou_thresh: IoU = 0.3
    batch_size_per_image: PositiveInt = 256
    positive_fraction: Probability = 0.5
    pre_nms_top_n_train: PositiveInt = 12000
    pre_nms_top_n_test: PositiveInt = 6000
    post_nms_top_n_train: PositiveInt = 2000
    post_nms_top_n_test: PositiveInt = 300
    nms_thresh: IoU = 0.7
    min_size: NonNegativeFloat = 1e-3
    score_thresh: Probability = 0.0
    allowed_border: NonNegativeFloat | None = 0.0
    loss_normalization: Literal["paper", "batch"] = "paper"
    box_weight: NonNegativeFloat = 10.0
    beta: PositiveFloat = 1.0
    conv_depth: PositiveInt = 1

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> RPNSettings:
        if self.bg_iou_thresh > self.fg_iou_thresh:
            raise ValueError(
                f"bg_iou_thresh ({self.bg_iou_thresh}) must not exceed fg_iou_thresh ({self.fg_iou_thresh})"
            )
        return self


def default_rpn_settings(num_levels: int) -> RPNSettings:
    """The Faster R-CNN paper's RPN settings on single-level backbones (12000 / 2000 proposals
    before / after NMS in training, 6000 / 300 at test, cross-boundary anchors ignored, the
    paper's loss normalisation); on FPN backbones (``num_levels > 1``) the FPN / torchvision
    conventions (2000 / 2000 per level / image in training, 1000 / 1000 at test, all anchors used,
    the "batch" loss normalisation with beta 1/9).

    Fills the fields a config's ``model.rpn`` leaves out; a run folder records the merged
    settings (``rcnn.build.resolved_config``), so changing these defaults changes no trained run."""
    if num_levels == 1:
        return RPNSettings()
    return RPNSettings(
        pre_nms_top_n_train=2000, pre_nms_top_n_test=1000, post_nms_top_n_train=2000, post_nms_top_n_test=1000,
        allowed_border=None, loss_normalization="batch", beta=1.0 / 9,
    )  # fmt: skip


class RegionProposalNetwork(nn.Module):
    """Anchors + RPN head + anchor targets + loss + proposal layer.

    Args:
        anchor_generator: places A anchors per location on each feature level.
        head: an :class:`RPNHead` with A anchors per location.
        strides: stride of each feature level given to ``forward``.
        settings: :class:`RPNSettings`.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        strides: Sequence[int],
        settings: RPNSettings | None = None,
    ) -> None:
        super().__init__()
        counts = set(anchor_generator.num_anchors_per_location)
        if len(counts) != 1:
            raise ValueError(f"the RPN head is shared by all levels, so every level needs the same anchor count, got {counts}")
        self.anchor_generator = anchor_generator
        self.head = head
        self.strides = tuple(strides)
        self.settings = settings or RPNSettings()
        s = self.settings
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))  # the paper's unweighted targets
        self.matcher = Matcher(s.fg_iou_thresh, s.bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(s.batch_size_per_image, s.positive_fraction)

    def forward(
        self,
        features: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals (``[P, 4]`` per image, detached, resized-image pixels) and the losses.

        Losses are computed in training mode when ``targets`` are given; without targets a
        training-mode RPN still uses the training-time proposal counts (for alternating training).
        """
        out = self.head_outputs(features)
        objectness, box_deltas, all_anchors, level_sizes = out.objectness, out.box_deltas, out.anchors, out.level_sizes

        proposals = self.propose(objectness.detach(), box_deltas.detach(), all_anchors, level_sizes, image_sizes)
        losses: dict[str, Tensor] = {}
        if self.training and targets is not None:
            num_locations = len(image_sizes) * sum(f.shape[-2] * f.shape[-1] for f in features)
            losses = self.loss(objectness, box_deltas, all_anchors, image_sizes, targets, num_locations)
        return proposals, losses

    def head_outputs(self, features: Sequence[Tensor]) -> RPNOutputs:
        """The head on every level and the anchors, flattened in the anchors' order (see :class:`RPNOutputs`)."""
        logits, deltas = self.head(features)
        anchors = self.anchor_generator(features, self.strides)  # levels x [Hi*Wi*A, 4]
        flat = [_flatten_level(lg, dl) for lg, dl in zip(logits, deltas)]
        return RPNOutputs(
            logits=logits,
            objectness=torch.cat([f[0] for f in flat], dim=1),  # [N, T]
            box_deltas=torch.cat([f[1] for f in flat], dim=1),  # [N, T, 4]
            anchors=torch.cat(anchors, dim=0),  # [T, 4]
            level_sizes=[f[0].shape[1] for f in flat],
        )

    def propose(
        self,
        objectness: Tensor,
        box_deltas: Tensor,
        anchors: Tensor,
        level_sizes: Sequence[int],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[Tensor]:
        """The proposal layer: per level top-k, decode, clip, drop small, NMS per level, top-k per image."""
        s = self.settings
        post_top_n = s.post_nms_top_n_train if self.training else s.post_nms_top_n_test
        proposals = []
        for boxes, scores, lv in self.candidates(objectness, box_deltas, anchors, level_sizes, image_sizes):
            keep = batched_nms(boxes, scores, lv, s.nms_thresh, max_kept=post_top_n)
            proposals.append(boxes[keep])
        return proposals

    def candidates(
        self,
        objectness: Tensor,
        box_deltas: Tensor,
        anchors: Tensor,
        level_sizes: Sequence[int],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The proposal layer before its NMS: per image ``(boxes [C, 4], scores [C], levels [C])``.

        Per level the top-scoring anchors (``pre_nms_top_n``), decoded, clipped, without the small
        and (``score_thresh``) low-scoring ones; scores are objectness probabilities. ``objectness``
        ``[N, T]``, ``box_deltas [N, T, 4]``, ``anchors [T, 4]`` as in :meth:`forward`.
        """
        s = self.settings
        pre_top_n = s.pre_nms_top_n_train if self.training else s.pre_nms_top_n_test
        # per level, the indices of the top-scoring anchors (on all images at once)
        picks, levels = [], []
        start = 0
        for level, size in enumerate(level_sizes):
            k = torch.sym_min(pre_top_n, size)
            top = objectness[:, start : start + size].topk(k, dim=1).indices + start  # [N, k]
            picks.append(top)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=objectness.device))
            start += size
        picks_t = torch.cat(picks, dim=1)  # [N, sum k]
        level_t = torch.cat(levels)  # [sum k]
        found = []
        for i, size in enumerate(image_sizes):
            idx = picks_t[i]
            scores = objectness[i, idx].sigmoid()
            boxes = self.box_coder.decode(box_deltas[i, idx], anchors[idx])
            boxes = clip_boxes(boxes, size)
            keep = remove_small_boxes(boxes, s.min_size)
            if s.score_thresh > 0:
                keep = keep[scores[keep] >= s.score_thresh]
            found.append((boxes[keep], scores[keep], level_t[keep]))
        return found

    def anchor_labels(
        self, anchors: Tensor, image_size: tuple[int, int], gt_boxes: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Anchor targets of one image: labels ``[T]`` (1 / 0 / -1 ignored) and matched gt ``[T]``."""
        s = self.settings
        objects = torch.ones(gt_boxes.shape[0], dtype=torch.int64, device=gt_boxes.device)  # object / not object
        labels, matched = label_proposals(self.matcher, gt_boxes, objects, anchors)  # [T], [T]
        if s.allowed_border is not None:
            b = s.allowed_border
            height, width = image_size
            inside = (
                (anchors[:, 0] >= -b) & (anchors[:, 1] >= -b) & (anchors[:, 2] <= width + b) & (anchors[:, 3] <= height + b)
            )
            labels[~inside] = -1
        return labels, matched

    def loss(
        self,
        objectness: Tensor,
        box_deltas: Tensor,
        anchors: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict[str, Tensor]],
        num_locations: int,
    ) -> dict[str, Tensor]:
        """Sample anchors per image and compute :func:`rcnn.losses.rpn_loss` over the batch."""
        s = self.settings
        sampled_logits, sampled_labels, sampled_deltas, sampled_targets = [], [], [], []
        for i, (size, target) in enumerate(zip(image_sizes, targets)):
            gt = target["boxes"]
            labels, matched = self.anchor_labels(anchors, size, gt)
            pos, neg = self.sampler(labels)
            idx = torch.cat((pos, neg))
            sampled_logits.append(objectness[i, idx])
            sampled_labels.append((labels[idx] == 1).to(objectness.dtype))
            sampled_deltas.append(box_deltas[i, idx])
            if gt.numel():
                sampled_targets.append(self.box_coder.encode(gt[matched[idx]], anchors[idx]))
            else:  # no objects: only negatives, whose targets are unused
                sampled_targets.append(torch.zeros_like(anchors[idx]))
        return rpn_loss(
            torch.cat(sampled_logits),
            torch.cat(sampled_labels),
            torch.cat(sampled_deltas),
            torch.cat(sampled_targets),
            num_locations=num_locations,
            normalization=s.loss_normalization,
            box_weight=s.box_weight,
            beta=s.beta,
        )
