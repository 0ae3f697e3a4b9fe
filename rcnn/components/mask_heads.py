"""Mask R-CNN's mask branch, as RoI heads: the box branch of :class:`RoIHeads` plus a mask head.

Mask R-CNN (He et al., 2017) adds a third branch beside Fast R-CNN's class and box siblings:
for every RoI a small fully convolutional network predicts one m x m mask *per class*
(Fig. 4, FPN head: 14 x 14 RoIAlign -> 4 conv 3x3 (:class:`MaskHead`) -> 2x2 deconv -> 1x1
conv to K masks of 28 x 28 (:class:`MaskPredictor`)). Each mask is a per-pixel sigmoid, so
classes do not compete; the class is chosen by the box branch, and only that class's mask is
trained (``rcnn.core.losses.mask_loss``, the seed's L_mask) and used at test time.

:class:`MaskRoIHeads` owns the branch through the hooks of :class:`RoIHeads`:

- training (:meth:`MaskRoIHeads.branch_losses`): positive RoIs only; the target of an RoI is
  the gt mask of its matched object cropped to the RoI and resampled to m x m
  (:func:`rcnn.core.masks.mask_targets`);
- inference (:meth:`MaskRoIHeads.branch_outputs`): the head runs on the final detection boxes
  (top 100 after NMS, §3.1 "Inference") and keeps the predicted class's probability map
  (``masks [D, 1, m, m]`` in the box's frame); :meth:`MaskRoIHeads.finalize` pastes it into the
  original image at the box (:func:`rcnn.core.masks.paste_masks`) and binarises it at 0.5.

Shape shorthand:
    N: images;  R: RoIs of the batch;  G: gt objects of an image;  D: detections of an image
    K: foreground classes (K + 1 with background);  C: feature channels
    P: pooled side (14);  m: mask side (2P = 28);  H, W: image size
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from rcnn.components.roi_heads import BoxPredictor, RoIHeads, RoIHeadSettings, SampledRoIs
from rcnn.components.settings import NonNegativeInt, PositiveInt, Settings
from rcnn.core import fastpaths
from rcnn.core.losses import mask_loss
from rcnn.core.masks import MASK_THRESHOLD, mask_targets, paste_masks, paste_masks_torchvision
from rcnn.core.ops import RoIPooler

__all__ = ["MaskHead", "MaskPredictor", "MaskRoIHeads", "MaskSettings"]


class MaskSettings(Settings):
    """Hyper-parameters of the mask branch; defaults are Mask R-CNN's FPN head (Fig. 4).

    Attributes:
        pool_size: P, the side of the RoI features the head reads (14); masks are 2P = 28.
        pooler: ``"align"`` (RoIAlign) or ``"pool"`` (RoI max pooling, the paper's ablation,
            Table 2c); ``None`` uses the box branch's.
        num_convs, channels: the head's 3x3 convolutions (4 of 256 channels); a CPU-sized
            model may use e.g. 2 of 16 (and ``pool_size`` 7: 14 x 14 masks, as the paper's
            ResNet-C4 head).
        batch_norm: BatchNorm after each convolution (torchvision's v2 mask head).
        paste: ``"exact"`` (masks resampled in continuous coordinates, :func:`rcnn.core.masks.paste_masks`)
            or ``"torchvision"`` (torchvision's integer-box pasting, to reproduce its outputs).
    """

    pool_size: PositiveInt = 14
    pooler: Literal["align", "pool"] | None = None
    num_convs: NonNegativeInt = 4
    channels: PositiveInt = 256
    batch_norm: bool = False
    paste: Literal["exact", "torchvision"] = "exact"


def _msra_init(module: nn.Module) -> None:
    # MSRA (He) initialisation, fan_out, as in the reference implementations of the paper
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class MaskHead(nn.Module):
    """The mask head's class-agnostic part: ``num_convs`` 3x3 convolutions of ``channels`` (+ ReLU).

    ``[R, C, P, P]`` RoI features -> ``[R, channels, P, P]`` (``[R, C, P, P]`` with no convolutions).
    ``init=False`` leaves the initialisation to a later :meth:`reset_parameters` (the Mask R-CNN
    builder creates the head and the predictor first, so that a seed gives the same weights as
    the library always did).
    """

    def __init__(
        self, in_channels: int, num_convs: int = 4, channels: int = 256, init: bool = True, batch_norm: bool = False
    ) -> None:
        super().__init__()
        if num_convs < 0 or channels < 1:
            raise ValueError(f"MaskHead needs num_convs >= 0 and channels >= 1, got {num_convs} and {channels}")
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers.append(nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(channels))
            layers.append(nn.ReLU(inplace=True))
        self.convs = nn.Sequential(*layers)
        self.out_channels = channels if num_convs else in_channels
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.convs:
            if isinstance(module, nn.Conv2d):
                _msra_init(module)

    def forward(self, x: Tensor) -> Tensor:  # [R, C, P, P] -> [R, channels, P, P]
        return self.convs(x)


class MaskPredictor(nn.Module):
    """The class-specific end of the mask head: a 2x2 stride-2 deconvolution (+ ReLU) that doubles the
    resolution, then a 1x1 convolution to one mask logit map per foreground class.

    ``[R, C, P, P]`` -> ``[R, K, 2P, 2P]``. Replace it (with the box predictor) to fine-tune on
    another class set. On the CPU the two layers run as matrix products
    (:func:`rcnn.core.fastpaths.mask_predictor_logits`, same weights and values).

    Args:
        in_channels: C.
        num_classes: K + 1 (background included, as everywhere in the library); K masks are predicted.
        channels: the deconvolution's output channels (the head's width).
        init: as for :class:`MaskHead`.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, init: bool = True) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
        self.deconv = nn.ConvTranspose2d(in_channels, channels, 2, stride=2)
        self.logits = nn.Conv2d(channels, num_classes - 1, 1)
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        _msra_init(self.deconv)
        # the logits start near zero (std 0.001, Detectron) so that every mask starts at p ~ 0.5
        nn.init.normal_(self.logits.weight, std=0.001)
        nn.init.zeros_(self.logits.bias)

    @property
    def num_classes(self) -> int:
        """K + 1."""
        return self.logits.out_channels + 1

    def forward(self, x: Tensor) -> Tensor:  # [R, C, P, P] -> [R, K, 2P, 2P]
        if fastpaths.mask_predictor_applies(x, self.deconv, self.logits):
            return fastpaths.mask_predictor_logits(x, self.deconv, self.logits)
        return self.logits(torch.relu(self.deconv(x)))


class MaskRoIHeads(RoIHeads):
    """:class:`RoIHeads` with Mask R-CNN's mask branch: its pooler, :class:`MaskHead` and :class:`MaskPredictor`.

    Args:
        box_head, predictor, pooler, settings: the box branch (see :class:`RoIHeads`).
        mask_pooler: pools each RoI for the mask head (RoIAlign 14 x 14).
        mask_head: the convolutions; mask_predictor: deconvolution and mask logits.
        mask_probabilities: output float mask probabilities instead of binary masks (the
            attribute of the same name may be changed later).
        paste: how masks are pasted into the image (see :class:`MaskSettings`).
    """

    def __init__(
        self,
        box_head: nn.Module,
        predictor: BoxPredictor,
        pooler: RoIPooler,
        mask_pooler: RoIPooler,
        mask_head: MaskHead,
        mask_predictor: MaskPredictor,
        settings: RoIHeadSettings | None = None,
        mask_probabilities: bool = False,
        paste: str = "exact",
    ) -> None:
        super().__init__(box_head, predictor, pooler, settings)
        if paste not in ("exact", "torchvision"):
            raise ValueError(f"paste must be 'exact' or 'torchvision', got {paste!r}")
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor
        self.mask_probabilities = bool(mask_probabilities)
        self.paste = paste

    @property
    def mask_size(self) -> int:
        """m: the deconvolution doubles the pooled side."""
        return 2 * self.mask_pooler.output_size[0]

    predictor_names = ("predictor", "mask_predictor")

    def mask_settings(self) -> MaskSettings:
        """The :class:`MaskSettings` of this branch as built, read from its parts (pooler, head,
        predictor, pasting), every field set: what a run folder records."""
        side, other = self.mask_pooler.output_size
        if side != other:
            raise ValueError(f"a mask pooler of {side} x {other} bins; MaskSettings.pool_size describes square ones")
        layers = list(self.mask_head.convs)
        return MaskSettings(
            pool_size=side,
            pooler=self.mask_pooler.kind,
            num_convs=sum(isinstance(layer, nn.Conv2d) for layer in layers),
            channels=self.mask_predictor.deconv.out_channels,  # the head's width (its convolutions' too)
            batch_norm=any(isinstance(layer, nn.BatchNorm2d) for layer in layers),
            paste=self.paste,
        )

    def replace_predictor(self, num_classes: int) -> list[str]:
        """New box and mask predictors for ``num_classes`` (K + 1); returns their names."""
        replaced = super().replace_predictor(num_classes)
        self.mask_predictor = MaskPredictor(self.mask_head.out_channels, num_classes, self.mask_predictor.deconv.out_channels)
        return replaced

    def mask_logits(self, features: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """Mask logits ``[R, K, m, m]`` for ``boxes`` (one ``[Ri, 4]`` per image, in feature-input pixels)."""
        if self.mask_predictor.num_classes != self.num_classes:
            raise ValueError(
                f"the mask predictor has {self.mask_predictor.num_classes - 1} classes but the box predictor "
                f"{self.num_classes - 1}; replace both (roi_heads.replace_predictor(num_classes))"
            )
        return self.mask_predictor(self.mask_head(self.mask_pooler(features, boxes)))

    def branch_losses(
        self, features: Sequence[Tensor], sampled: SampledRoIs, targets: Sequence[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """``{"loss_mask": L_mask}`` over the positive sampled RoIs (§3: L_mask is defined on positives only).

        ``targets[i]["masks"]`` ``[G, H, W]`` must be at the (resized) image size the RoIs refer to.
        """
        boxes, labels, goals = [], [], []
        for i, (props, lab, matched, target) in enumerate(
            zip(sampled.proposals, sampled.labels, sampled.matched_gt, targets)
        ):
            if target.get("masks") is None:
                raise ValueError(f"targets[{i}]: Mask R-CNN needs 'masks' [G, H, W] uint8 (load data with_masks=True)")
            positive = (lab > 0).nonzero().flatten()  # [R+]
            boxes.append(props[positive])
            labels.append(lab[positive])
            goals.append(mask_targets(target["masks"], props[positive], matched[positive], self.mask_size))
        logits = self.mask_logits(features, boxes)  # [R+, K, m, m]
        return {"loss_mask": mask_loss(logits, torch.cat(labels), torch.cat(goals))}

    @torch.no_grad()
    def branch_outputs(self, features: Sequence[Tensor], detections: list[dict[str, Tensor]]) -> None:
        """Add ``masks [D, 1, m, m]`` (sigmoid of the predicted class's mask, in the box's frame) to each
        image's detections, in place."""
        boxes = [det["boxes"] for det in detections]
        counts = [b.shape[0] for b in boxes]
        logits = self.mask_logits(features, boxes)  # [R, K, m, m] (R may be 0)
        labels = torch.cat([det["labels"] for det in detections])  # [R] in 1..K
        chosen = logits[torch.arange(labels.shape[0], device=labels.device), labels - 1]  # [R, m, m]
        for det, probs in zip(detections, chosen.sigmoid().split(counts)):
            det["masks"] = probs[:, None]

    def finalize(self, detections: list[dict[str, Tensor]], original_sizes: Sequence[tuple[int, int]]) -> None:
        """Paste each box-frame mask into its original image at its (original-coordinate) box:
        ``masks [D, 1, H, W]``, uint8 0/1 (probability >= 0.5, §3.1) or float probabilities."""
        threshold = None if self.mask_probabilities else MASK_THRESHOLD
        paste = paste_masks if self.paste == "exact" else paste_masks_torchvision
        for det, size in zip(detections, original_sizes):
            det["masks"] = paste(det["masks"][:, 0], det["boxes"], size, threshold)[:, None]
