"""Mask R-CNN (He et al., 2017): Faster R-CNN with RoIAlign and a mask branch beside the box branch.

    image -> backbone -> RPN -> proposals --+
                  \\------------------------ RoIAlign 7x7  -> box head -> cls (K+1) / bbox (4K)
                   \\----------------------- RoIAlign 14x14 -> mask head -> K masks 28x28 (sigmoid)

Compared with Faster R-CNN two things change: RoI pooling becomes RoIAlign (no quantisation,
§3), for the box branch as for the mask branch, and the RoI heads gain the mask branch
(:class:`rcnn.components.mask_heads.MaskRoIHeads`), trained with L = L_cls + L_box + L_mask.
Everything else is Faster R-CNN's, reused unchanged. At test time the box branch's final
detections go through the mask branch, and each one's mask (its predicted class's channel) is
pasted into the original image at its box.

Shape shorthand:
    N: images;  G: gt objects of an image;  D: detections of an image;  H, W: original image size
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rcnn.components.mask_heads import MaskHead, MaskPredictor, MaskRoIHeads, MaskSettings
from rcnn.components.roi_heads import RoIHeads
from rcnn.core.ops import RoIPooler
from rcnn.models.base import BoxBranch
from rcnn.models.faster_rcnn import FasterRCNN, FasterRCNNOptions

__all__ = ["MaskRCNN", "MaskRCNNOptions", "mask_rcnn", "validate_masks"]


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


class MaskRCNNOptions(FasterRCNNOptions):
    """Faster R-CNN's options plus the mask branch's.

    Attributes:
        pooler: as for Faster R-CNN, but ``None`` means RoIAlign (§3) for both branches; ``"pool"``
            for both is the paper's RoIPool ablation (Table 2c).
        mask: :class:`rcnn.components.mask_heads.MaskSettings` that differ from the defaults
            (14 x 14 input, 4 x 256 convs, 28 x 28 masks; ``mask.pooler`` defaults to the box branch's).
        mask_probabilities: output float mask probabilities instead of binary masks (the RoI heads'
            attribute of the same name may be changed later).
    """

    mask: MaskSettings.overrides() = MaskSettings.overrides()()  # type: ignore[valid-type]
    mask_probabilities: bool = False


class MaskRCNN(FasterRCNN):
    """Mask R-CNN: :class:`FasterRCNN` whose RoI heads are :class:`rcnn.components.mask_heads.MaskRoIHeads`.

    Args: as for :class:`FasterRCNN`; ``**options``: :class:`MaskRCNNOptions`.

    Eval mode adds ``masks [D, 1, H, W]`` at the original image size to each output: uint8 0/1
    (probability >= 0.5, §3.1) or, with ``mask_probabilities``, float probabilities.
    """

    name = "mask_rcnn"
    options = MaskRCNNOptions
    predicts_masks = True

    default_pooler = "align"  # RoIAlign for the box branch too (§3)

    def branch_parts(
        self, backbone: nn.Module, num_classes: int | None, opts: Any, pool_strides: Sequence[int]
    ) -> tuple[RoIPooler, MaskHead, MaskPredictor, str]:
        """The mask branch's pooler, head and predictor (created, then initialised, head first), and
        how its masks are pasted."""
        if num_classes is None:
            raise ValueError("num_classes (K + 1, background included) is needed to build the mask branch")
        defaults = MaskSettings(paste="torchvision") if opts.torchvision_compat else MaskSettings()
        m = defaults.merged(opts.mask, "mask")
        pooler = RoIPooler(m.pool_size, pool_strides, m.pooler or opts.pooler or "align", opts.sampling_ratio, opts.aligned)
        head = MaskHead(backbone.out_channels, m.num_convs, m.channels, init=False, batch_norm=m.batch_norm)
        predictor = MaskPredictor(head.out_channels, num_classes, m.channels, init=False)
        head.reset_parameters()
        predictor.reset_parameters()
        return pooler, head, predictor, m.paste

    def assemble_roi_heads(self, box: BoxBranch, branches: Any, opts: Any) -> RoIHeads:
        """:class:`MaskRoIHeads`: the box branch and the mask parts."""
        *parts, paste = branches
        return MaskRoIHeads(
            *box[:3], *parts, settings=box.settings, mask_probabilities=opts.mask_probabilities, paste=paste
        )

    def effective_options(self) -> dict[str, Any]:
        """Faster R-CNN's effective options plus the mask branch's settings, as its RoI heads have them."""
        options = super().effective_options()
        heads = self.roi_heads
        if not isinstance(heads, MaskRoIHeads):
            raise ValueError(f"{type(self).__name__}: RoI heads of another kind; its options cannot be recorded")
        mask_pooler = heads.mask_pooler
        if (mask_pooler.sampling_ratio, mask_pooler.aligned) != (options["sampling_ratio"], options["aligned"]):
            raise ValueError(
                f"{type(self).__name__}: the mask pooler's sampling_ratio / aligned differ from the box pooler's; "
                "they cannot be recorded as options"
            )
        options.update(mask=heads.mask_settings(), mask_probabilities=heads.mask_probabilities)
        return options

    @property
    def mask_probabilities(self) -> bool:
        """Whether outputs hold float mask probabilities (else binary masks); settable."""
        return getattr(self.roi_heads, "mask_probabilities", False)

    @mask_probabilities.setter
    def mask_probabilities(self, value: bool) -> None:
        self.roi_heads.mask_probabilities = bool(value)

    def check_targets(self, images: Sequence[Tensor], targets: Sequence[dict[str, Any]]) -> None:
        """The targets must also have ``masks [G, H, W]`` (except when training the RPN alone)."""
        if self.train_mode != "rpn":
            validate_masks(images, targets)


def mask_rcnn(backbone: str | nn.Module = "tiny", num_classes: int = 91, **kwargs: Any) -> MaskRCNN:
    """Build a :class:`MaskRCNN` on a named architecture (or a backbone module), as :func:`faster_rcnn`.

    Example: ``mask_rcnn("resnet50_fpn", 81, pretrained_backbone="resnet50.pth", mask={"pooler": "pool"})``.
    """
    return MaskRCNN.build(backbone, num_classes, **kwargs)
