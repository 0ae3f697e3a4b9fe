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
from typing import Any

from rcnn.anchors import AnchorGenerator
from rcnn.backbones import Backbone, resolve_backbone
from rcnn.config import override_settings
from rcnn.heads import RoIHeads, RoIHeadSettings, default_roi_settings
from rcnn.models.base import TwoStageDetector
from rcnn.models.transform import DetectionTransform
from rcnn.proposals.rpn import RegionProposalNetwork, RPNHead, RPNSettings, default_rpn_settings

__all__ = ["FasterRCNN", "build_detector", "default_anchor_sizes", "faster_rcnn"]


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


class FasterRCNN(TwoStageDetector):
    """Faster R-CNN: backbone + RPN + Fast R-CNN RoI heads, trained jointly or alternately.

    Args:
        backbone: a :class:`rcnn.backbones.Backbone`.
        num_classes: K + 1 (background included).
        min_size, max_size: image rescaling (600 / 1000 in the papers).
        anchor_sizes, aspect_ratios: per feature level (see :class:`rcnn.anchors.AnchorGenerator`);
            default :func:`default_anchor_sizes` and ratios 1:2, 1:1, 2:1.
        rpn, roi: RPN and RoI-head settings; default :func:`rcnn.proposals.rpn.default_rpn_settings`
            and :func:`rcnn.heads.default_roi_settings` (the papers' on one level, FPN conventions on FPNs).
        pooler: ``"pool"`` (RoI max pooling) or ``"align"`` (RoIAlign); default per backbone.
        sampling_ratio: RoIAlign's samples per bin side.
        anchor_offset: where in its feature cell an anchor is centred, as a fraction of the stride
            (0.5: the cell's centre; torchvision uses 0.0, the cell's corner).
        aligned: RoIAlign's half-pixel alignment (True; torchvision's detectors use False).
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
        anchor_offset: float = 0.5,
        aligned: bool = True,
        mask_branch: Any = None,
    ) -> None:
        anchors = AnchorGenerator(
            anchor_sizes or default_anchor_sizes(backbone), (tuple(aspect_ratios),), offset=anchor_offset
        )
        if len(anchors.sizes) != len(backbone.strides):
            raise ValueError(
                f"anchor_sizes gives {len(anchors.sizes)} levels but backbone {backbone.name!r} has "
                f"{len(backbone.strides)} feature levels (strides {backbone.strides})"
            )
        head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location[0])
        rpn_module = RegionProposalNetwork(anchors, head, backbone.strides, rpn or default_rpn_settings(backbone))
        roi_heads = RoIHeads.for_backbone(backbone, num_classes, roi, pooler, sampling_ratio, mask_branch, aligned)
        super().__init__(backbone, roi_heads, DetectionTransform(min_size, max_size), rpn=rpn_module)


def build_detector(
    cls: type[FasterRCNN],
    backbone: str | Backbone,
    num_classes: int,
    *,
    pretrained_backbone: str | os.PathLike | None = None,
    trainable_stages: int | None = None,
    rpn: dict[str, Any] | None = None,
    roi: dict[str, Any] | None = None,
    **kwargs: Any,
) -> FasterRCNN:
    """``cls`` (:class:`FasterRCNN` or a subclass) on a backbone given by name, with the default
    RPN and RoI settings overridden by the dicts ``rpn`` and ``roi``."""
    backbone = resolve_backbone(backbone, pretrained_backbone, trainable_stages)
    rpn_settings = override_settings(default_rpn_settings(backbone), rpn, "rpn")
    roi_settings = override_settings(default_roi_settings(backbone)[0], roi, "roi")
    return cls(backbone, num_classes, rpn=rpn_settings, roi=roi_settings, **kwargs)


def faster_rcnn(backbone: str | Backbone = "tiny", num_classes: int = 91, **kwargs: Any) -> FasterRCNN:
    """Build a :class:`FasterRCNN` from a backbone name (see :func:`build_detector` for the options).

    Example: ``faster_rcnn("resnet50_fpn", 21, pretrained_backbone="resnet50.pth", rpn={"nms_thresh": 0.6})``.
    """
    return build_detector(FasterRCNN, backbone, num_classes, **kwargs)
