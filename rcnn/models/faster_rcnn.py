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

from rcnn.components.backbones import default_anchor_sizes
from rcnn.components.proposals.rpn import RegionProposalNetwork, RPNHead, RPNSettings, default_rpn_settings
from rcnn.components.settings import PositiveFloat
from rcnn.core.anchors import AnchorGenerator
from rcnn.models.base import refuse_unused
from rcnn.models.fast_rcnn import FastRCNN, FastRCNNOptions

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

    def torchvision_implied(self) -> dict[str, Any]:
        """torchvision's anchors sit on the cells' corners."""
        return {**super().torchvision_implied(), "anchor_offset": 0.0}


class FasterRCNN(FastRCNN):
    """Faster R-CNN: :class:`FastRCNN` fed by a Region Proposal Network; trained jointly or alternately.

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
    needs_proposals = False
    has_rpn = True

    def proposer(
        self, rpn: nn.Module | None, backbone: nn.Module, opts: Any, strides: Sequence[int]
    ) -> RegionProposalNetwork:
        """The RPN: the one given, or the one the options describe (anchors, head, and the settings
        over the backbone's defaults)."""
        if rpn is not None:
            refuse_unused(opts, ("rpn", "anchor_sizes", "aspect_ratios", "anchor_offset"), "RPN")
            return rpn  # type: ignore[return-value]
        sizes = opts.anchor_sizes or default_anchor_sizes(backbone, len(strides))
        anchors = AnchorGenerator(
            sizes, (tuple(opts.aspect_ratios),), offset=opts.anchor_offset, torchvision=opts.torchvision_compat
        )
        if len(anchors.sizes) != len(strides):
            raise ValueError(
                f"anchor_sizes gives {len(anchors.sizes)} levels but the backbone has {len(strides)} feature "
                f"levels (strides {tuple(strides)})"
            )
        settings = default_rpn_settings(len(strides)).merged(opts.rpn, "rpn")
        head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location[0], conv_depth=settings.conv_depth)
        return RegionProposalNetwork(anchors, head, strides, settings)


    def effective_options(self) -> dict[str, Any]:
        """Fast R-CNN's effective options plus the anchors and the RPN's settings, as its RPN has them."""
        options = super().effective_options()
        rpn = self.rpn
        if not isinstance(rpn, RegionProposalNetwork):
            raise ValueError(f"{type(self).__name__}: an RPN of another kind; its options cannot be recorded")
        anchors = rpn.anchor_generator
        if len(set(anchors.aspect_ratios)) != 1 or anchors.torchvision != options["torchvision_compat"]:
            raise ValueError(
                f"{type(self).__name__}: anchors with per-level aspect ratios or another placement than the "
                "transform's; they cannot be recorded as options"
            )
        options.update(
            anchor_sizes=[list(level) for level in anchors.sizes],
            aspect_ratios=list(anchors.aspect_ratios[0]),
            anchor_offset=anchors.offset,
            rpn=rpn.settings,
        )
        return options


def faster_rcnn(backbone: str | nn.Module = "tiny", num_classes: int = 91, **kwargs: Any) -> FasterRCNN:
    """Build a :class:`FasterRCNN` on a named architecture (or a backbone module).

    Keyword arguments: ``pretrained_backbone`` (a local classification checkpoint),
    ``trainable_stages``, and the :class:`FasterRCNNOptions`. Example:
    ``faster_rcnn("resnet50_fpn", 21, pretrained_backbone="resnet50.pth", rpn={"nms_thresh": 0.6})``.
    """
    return FasterRCNN.build(backbone, num_classes, **kwargs)
