"""Faster R-CNN (Ren et al., 2015): Fast R-CNN fed by a Region Proposal Network on the same features.

    image -> backbone (shared convs) -> RPN -> proposals --+
                      \\---------------------------------- RoI pooling -> box head -> cls (K+1) / bbox (4K)

Compared with Fast R-CNN, only the proposal source changes: selective search (seconds per
image, on the CPU, outside the network) is replaced by the RPN (milliseconds, sharing the
backbone's features). Everything after the proposals is Fast R-CNN's, reused unchanged: the
options extend :class:`rcnn.models.fast_rcnn.FastRCNNOptions` by the anchors and the RPN's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field
from torch import nn

from rcnn.components.backbones import default_anchor_sizes, feature_strides
from rcnn.components.proposals.rpn import RegionProposalNetwork, RPNHead, RPNSettings, default_rpn_settings
from rcnn.components.roi_heads import RoIHeads
from rcnn.components.settings import PositiveFloat
from rcnn.components.transform import DetectionTransform
from rcnn.core.anchors import AnchorGenerator
from rcnn.models.base import TwoStageDetector, box_branch, detector_options, refuse_unused
from rcnn.models.fast_rcnn import FastRCNNOptions

__all__ = ["FasterRCNN", "FasterRCNNOptions", "faster_rcnn"]


class FasterRCNNOptions(FastRCNNOptions):
    """Fast R-CNN's options plus the anchors and the RPN's settings.

    Attributes:
        anchor_sizes: anchor sizes per feature level; default the backbone's, else the paper's
            128, 256, 512 on one level and one size per level on an FPN (32 .. 512).
        aspect_ratios: anchor height / width ratios, 1:2, 1:1, 2:1 (§3.1.1).
        anchor_offset: where in its feature cell an anchor is centred, as a fraction of the stride
            (0.5: the cell's centre; torchvision uses 0.0, the cell's corner).
        rpn: RPN settings that differ from :func:`rcnn.components.proposals.rpn.default_rpn_settings`
            (the paper's on one level, the FPN conventions on FPNs).
    """

    anchor_sizes: list[list[PositiveFloat]] | None = None
    aspect_ratios: list[PositiveFloat] = Field(default=[0.5, 1.0, 2.0], min_length=1)
    anchor_offset: float = Field(default=0.5, ge=0.0, le=1.0)
    rpn: RPNSettings.overrides() = RPNSettings.overrides()()  # type: ignore[valid-type]


class FasterRCNN(TwoStageDetector):
    """Faster R-CNN: backbone + RPN + Fast R-CNN RoI heads, trained jointly or alternately.

    Args:
        backbone: any ``nn.Module`` with ``out_channels`` (a named architecture's from :func:`faster_rcnn`).
        num_classes: K + 1 (background included); not needed when ``roi_heads`` is given.
        rpn: a built :class:`rcnn.components.proposals.rpn.RegionProposalNetwork`, or the RPN settings
            (a dict or :class:`RPNSettings`) for the one the model builds.
        box_head, roi_heads, transform: as for :class:`rcnn.models.fast_rcnn.FastRCNN`.
        **options: :class:`FasterRCNNOptions`.
    """

    name = "faster_rcnn"
    options = FasterRCNNOptions
    has_rpn = True

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        *,
        rpn: RegionProposalNetwork | Any = None,
        box_head: nn.Module | None = None,
        roi_heads: RoIHeads | None = None,
        transform: DetectionTransform | None = None,
        **options: Any,
    ) -> None:
        rpn_module = rpn if isinstance(rpn, nn.Module) else None
        if rpn is not None and rpn_module is None:
            options["rpn"] = rpn
        opts = detector_options(type(self), options)
        strides, pool_strides = feature_strides(backbone)
        # parts are created in this order (branches, RPN head, box predictor), so that a seed gives
        # the same initial weights as it always did
        branches = self.branch_parts(backbone, num_classes, opts, len(strides), pool_strides) if roi_heads is None else None
        if rpn_module is None:
            rpn_module = self.build_rpn(backbone, opts, strides)
        else:
            refuse_unused(opts, ("rpn", "anchor_sizes", "aspect_ratios", "anchor_offset"), "RPN")
        if roi_heads is None:
            roi_heads = self.build_roi_heads(backbone, box_head, num_classes, opts, len(strides), pool_strides, branches)
        else:
            refuse_unused(opts, ("roi", "pooler", "sampling_ratio", "aligned"), "RoI heads")
        if transform is None:
            transform = DetectionTransform(opts.min_size, opts.max_size)
        else:
            refuse_unused(opts, ("min_size", "max_size"), "transform")
        super().__init__(backbone, roi_heads, transform, rpn=rpn_module, levels=(strides, pool_strides))

    @staticmethod
    def build_rpn(backbone: nn.Module, opts: FasterRCNNOptions, strides: Sequence[int]) -> RegionProposalNetwork:
        """The RPN the options describe: anchors, head, and settings over the backbone's defaults."""
        sizes = opts.anchor_sizes or default_anchor_sizes(backbone, len(strides))
        anchors = AnchorGenerator(sizes, (tuple(opts.aspect_ratios),), offset=opts.anchor_offset)
        if len(anchors.sizes) != len(strides):
            raise ValueError(
                f"anchor_sizes gives {len(anchors.sizes)} levels but the backbone has {len(strides)} feature "
                f"levels (strides {tuple(strides)})"
            )
        settings = default_rpn_settings(len(strides)).merged(opts.rpn, "rpn")
        head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location[0])
        return RegionProposalNetwork(anchors, head, strides, settings)

    def branch_parts(
        self, backbone: nn.Module, num_classes: int | None, opts: Any, num_levels: int, pool_strides: Sequence[int]
    ) -> Any:
        """Parts of further per-RoI branches, made before the RPN (Mask R-CNN's mask head); none here."""
        return None

    def build_roi_heads(
        self,
        backbone: nn.Module,
        box_head: nn.Module | None,
        num_classes: int | None,
        opts: Any,
        num_levels: int,
        pool_strides: Sequence[int],
        branches: Any,
    ) -> RoIHeads:
        """The RoI heads the options describe (:class:`RoIHeads` here)."""
        box_head, predictor, pooler, settings = box_branch(backbone, box_head, num_classes, opts, num_levels, pool_strides)
        return RoIHeads(box_head, predictor, pooler, settings)


def faster_rcnn(backbone: str | nn.Module = "tiny", num_classes: int = 91, **kwargs: Any) -> FasterRCNN:
    """Build a :class:`FasterRCNN` on a named architecture (or a backbone module).

    Keyword arguments: ``pretrained_backbone`` (a local classification checkpoint),
    ``trainable_stages``, and the :class:`FasterRCNNOptions`. Example:
    ``faster_rcnn("resnet50_fpn", 21, pretrained_backbone="resnet50.pth", rpn={"nms_thresh": 0.6})``.
    """
    return FasterRCNN.build(backbone, num_classes, **kwargs)
