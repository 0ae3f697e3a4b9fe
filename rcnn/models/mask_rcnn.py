"""Mask R-CNN (He et al., 2017): Faster R-CNN with RoIAlign and a mask branch beside the box branch.

    image -> backbone -> RPN -> proposals --+
                  \\------------------------ RoIAlign 7x7  -> box head -> cls (K+1) / bbox (4K)
                   \\----------------------- RoIAlign 14x14 -> mask head -> K masks 28x28 (sigmoid)

Compared with Faster R-CNN two things change: RoI pooling becomes RoIAlign (no quantisation,
§3), for the box branch as for the mask branch, and the mask branch (``rcnn.masks``) is added,
trained with L = L_cls + L_box + L_mask. Everything else is Faster R-CNN's, reused unchanged.
At test time the box branch's final detections go through the mask branch, and each one's
mask (its predicted class's channel) is pasted into the original image at its box.

Shape shorthand:
    N: images;  G: gt objects of an image;  D: detections of an image;  H, W: original image size
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rcnn.backbones import Backbone
from rcnn.config import override_settings
from rcnn.masks import MASK_THRESHOLD, MaskBranch, MaskSettings, paste_masks
from rcnn.models.faster_rcnn import FasterRCNN, build_detector
from rcnn.models.transform import ImageBatch

__all__ = ["MaskRCNN", "mask_rcnn", "validate_masks"]


def validate_masks(images: Sequence[Tensor], targets: Sequence[dict[str, Any]]) -> None:
    """Raise a ``ValueError`` naming the image unless each target has ``masks [G, H, W]`` uint8/bool
    matching its image's size and its number of boxes (checked images and targets)."""
    for i, (image, target) in enumerate(zip(images, targets)):
        masks = target.get("masks")
        if not isinstance(masks, Tensor):
            raise ValueError(
                f"targets[{i}]: Mask R-CNN needs 'masks' [G, H, W] uint8 (load the data set with with_masks=True)"
            )
        expected = [len(target["boxes"]), *image.shape[1:]]
        if masks.dim() != 3 or list(masks.shape) != expected:
            raise ValueError(
                f"targets[{i}]['masks']: expected [G, H, W] = {expected} (one mask per box, the image's "
                f"size), got {list(masks.shape)}"
            )
        if masks.dtype not in (torch.uint8, torch.bool):
            raise ValueError(f"targets[{i}]['masks']: expected uint8 or bool 0/1 masks, got {masks.dtype}")


class MaskRCNN(FasterRCNN):
    """Mask R-CNN: :class:`FasterRCNN` + :class:`rcnn.masks.MaskBranch`, RoIAlign by default.

    Args:
        backbone, num_classes, min_size, max_size, anchor_sizes, aspect_ratios, rpn, roi,
            sampling_ratio, anchor_offset, aligned: as for :class:`FasterRCNN` (``aligned`` for both branches).
        pooler: ``"align"`` (RoIAlign, the default here) or ``"pool"`` (RoI max pooling) for the
            box branch, and for the mask branch unless ``mask.pooler`` says otherwise; ``"pool"``
            for both is the paper's RoIPool ablation (Table 2c).
        mask: :class:`rcnn.masks.MaskSettings` (14 x 14 input, 4 x 256 convs, 28 x 28 masks).
        mask_probabilities: output float mask probabilities instead of binary masks (the
            attribute of the same name may be changed later).

    Eval mode adds ``masks [D, 1, H, W]`` at the original image size to each output: uint8 0/1
    (probability >= 0.5, §3.1) or, with ``mask_probabilities``, float probabilities.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        pooler: str | None = "align",
        sampling_ratio: int = 2,
        aligned: bool = True,
        mask: MaskSettings | None = None,
        mask_probabilities: bool = False,
        **kwargs: Any,
    ) -> None:
        if "mask_branch" in kwargs:
            raise ValueError("MaskRCNN builds its own mask branch; configure it with mask=MaskSettings(...)")
        pooler = pooler or "align"  # None: Mask R-CNN's own choice, RoIAlign (§3)
        m = mask or MaskSettings()
        branch = MaskBranch(
            backbone.out_channels,
            num_classes,
            backbone.pool_strides,
            pool_size=m.pool_size,
            pooler=m.pooler or pooler,
            num_convs=m.num_convs,
            channels=m.channels,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
        )
        super().__init__(
            backbone, num_classes, pooler=pooler, sampling_ratio=sampling_ratio, aligned=aligned,
            mask_branch=branch, **kwargs,
        )  # fmt: skip
        self.mask_probabilities = bool(mask_probabilities)

    def check_targets(self, images: Sequence[Tensor], targets: Sequence[dict[str, Any]]) -> None:
        """As :meth:`TwoStageDetector.check_targets`; the targets must also have ``masks [G, H, W]``
        (except when training the RPN alone)."""
        super().check_targets(images, targets)
        if self.train_mode != "rpn":
            validate_masks(images, targets)

    def finalize(self, detections: list[dict[str, Tensor]], batch: ImageBatch) -> list[dict[str, Tensor]]:
        """Map boxes back to the original images, then paste each mask there at its box."""
        detections = super().finalize(detections, batch)
        threshold = None if self.mask_probabilities else MASK_THRESHOLD
        for det, size in zip(detections, batch.original_sizes):
            det["masks"] = paste_masks(det.pop("mask_probs"), det["boxes"], size, threshold)[:, None]  # [D, 1, H, W]
        return detections


def mask_rcnn(
    backbone: str | Backbone = "tiny", num_classes: int = 91, *, mask: dict[str, Any] | None = None, **kwargs: Any
) -> MaskRCNN:
    """Build a :class:`MaskRCNN` from a backbone name, as :func:`rcnn.models.faster_rcnn.build_detector`,
    with the mask branch's settings overridden by the dict ``mask``.

    Example: ``mask_rcnn("resnet50_fpn", 81, pretrained_backbone="resnet50.pth", mask={"pooler": "pool"})``.
    """
    return build_detector(MaskRCNN, backbone, num_classes, mask=override_settings(MaskSettings(), mask, "mask"), **kwargs)
