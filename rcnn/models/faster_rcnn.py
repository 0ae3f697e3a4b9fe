"""Faster R-CNN (Ren et al., 2015): Fast R-CNN fed by a Region Proposal Network on the same features.

    image -> backbone (shared convs) -> RPN -> proposals --+
                      \\---------------------------------- RoI pooling -> box head -> cls (K+1) / bbox (4K)

Compared with Fast R-CNN, only the proposal source changes: selective search (seconds per
image, on the CPU, outside the network) is replaced by the RPN (milliseconds, sharing the
backbone's features). Everything after the proposals is Fast R-CNN's, reused unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

from rcnn.anchors import AnchorGenerator
from rcnn.backbones import Backbone, build_backbone
from rcnn.heads import RoIHeads, RoIHeadSettings
from rcnn.models.base import TwoStageDetector
from rcnn.models.transform import DetectionTransform
from rcnn.ops import RoIPooler
from rcnn.proposals.rpn import RegionProposalNetwork, RPNHead, RPNSettings

__all__ = ["FasterRCNN", "default_settings", "faster_rcnn"]


def default_anchor_sizes(backbone: Backbone) -> tuple[tuple[float, ...], ...]:
    """The paper's 128, 256, 512 on one level; one size per level on an FPN (32 .. 512).

    MobileNetV3-FPN reads two stride-32 stages, so, as torchvision does for it, every level
    gets all five sizes. The tiny backbone is meant for ~128-pixel images: 16, 32, 64.
    """
    if backbone.name == "tiny":
        return ((16.0, 32.0, 64.0),)
    if backbone.name == "mobilenet_v3_fpn":
        return ((32.0, 64.0, 128.0, 256.0, 512.0),) * len(backbone.strides)
    if len(backbone.strides) > 1:
        return tuple((32.0 * 2**i,) for i in range(len(backbone.strides)))
    return ((128.0, 256.0, 512.0),)


def default_settings(backbone: Backbone) -> tuple[RPNSettings, RoIHeadSettings, str]:
    """RPN settings, RoI settings and RoI pooler kind for a backbone.

    Single-level backbones get the Faster R-CNN paper's settings (RoI pooling; 12000/2000
    proposals before/after NMS in training, 6000/300 at test; cross-boundary anchors ignored;
    64 RoIs per image with background IoU in [0.1, 0.5); NMS 0.3). FPN backbones get the
    conventions of the FPN paper and of torchvision's peer models, so the two can be compared
    like for like: RoIAlign, 2000/2000 then 1000/1000 proposals per level/image, all anchors
    used, the "batch" RPN loss normalisation, smooth L1 with beta 1/9 in both losses, 512 RoIs
    per image with background in [0, 0.5), NMS 0.5.
    """
    if len(backbone.strides) == 1:
        return RPNSettings(), RoIHeadSettings(), "pool"
    rpn = RPNSettings(
        pre_nms_top_n_train=2000, pre_nms_top_n_test=1000, post_nms_top_n_train=2000, post_nms_top_n_test=1000,
        allowed_border=None, loss_normalization="batch", beta=1.0 / 9,
    )
    roi = RoIHeadSettings(batch_size_per_image=512, bg_iou_thresh_lo=0.0, nms_thresh=0.5, box_loss_beta=1.0 / 9)
    return rpn, roi, "align"


def _override(settings: Any, overrides: dict[str, Any] | None, what: str) -> Any:
    if not overrides:
        return settings
    known = {f.name for f in fields(settings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; known: {sorted(known)}")
    return replace(settings, **overrides)


class FasterRCNN(TwoStageDetector):
    """Faster R-CNN: backbone + RPN + Fast R-CNN RoI heads, trained jointly or alternately.

    Args:
        backbone: a :class:`rcnn.backbones.Backbone`.
        num_classes: K + 1 (background included).
        min_size, max_size: image rescaling (600 / 1000 in the papers).
        anchor_sizes, aspect_ratios: per feature level (see :class:`rcnn.anchors.AnchorGenerator`);
            default :func:`default_anchor_sizes` and ratios 1:2, 1:1, 2:1.
        rpn, roi: RPN and RoI-head settings; default :func:`default_settings`.
        pooler: ``"pool"`` (RoI max pooling) or ``"align"`` (RoIAlign); default per backbone.
        sampling_ratio: RoIAlign's samples per bin side.
        mask_branch: Mask R-CNN's branch (see :class:`rcnn.models.MaskRCNN`).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        min_size: int | Sequence[int] = 600,
        max_size: int = 1000,
        anchor_sizes: Sequence[Sequence[float]] | None = None,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn: RPNSettings | None = None,
        roi: RoIHeadSettings | None = None,
        pooler: str | None = None,
        sampling_ratio: int = 2,
        mask_branch: Any = None,
    ) -> None:
        default_rpn, default_roi, default_pooler = default_settings(backbone)
        anchors = AnchorGenerator(anchor_sizes or default_anchor_sizes(backbone), (tuple(aspect_ratios),))
        if len(anchors.sizes) != len(backbone.strides):
            raise ValueError(
                f"anchor_sizes gives {len(anchors.sizes)} levels but backbone {backbone.name!r} has "
                f"{len(backbone.strides)} feature levels (strides {backbone.strides})"
            )
        head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location[0])
        rpn_module = RegionProposalNetwork(anchors, head, backbone.strides, rpn or default_rpn)
        roi_pooler = RoIPooler(backbone.pool_size, backbone.pool_strides, pooler or default_pooler, sampling_ratio)
        roi_heads = RoIHeads(roi_pooler, backbone.box_head, num_classes, roi or default_roi, mask_branch)
        super().__init__(backbone, roi_heads, DetectionTransform(min_size, max_size), rpn=rpn_module)


def faster_rcnn(
    backbone: str | Backbone = "tiny",
    num_classes: int = 91,
    *,
    pretrained_backbone: str | os.PathLike | None = None,
    trainable_stages: int | None = None,
    rpn: dict[str, Any] | None = None,
    roi: dict[str, Any] | None = None,
    **kwargs: Any,
) -> FasterRCNN:
    """Build a :class:`FasterRCNN` from a backbone name, with settings overridden by dicts.

    Example: ``faster_rcnn("resnet50_fpn", 21, pretrained_backbone="resnet50.pth", rpn={"nms_thresh": 0.6})``.
    """
    if isinstance(backbone, str):
        backbone = build_backbone(backbone, pretrained_backbone, trainable_stages)
    default_rpn, default_roi, _ = default_settings(backbone)
    return FasterRCNN(
        backbone,
        num_classes,
        rpn=_override(default_rpn, rpn, "rpn"),
        roi=_override(default_roi, roi, "roi"),
        **kwargs,
    )
