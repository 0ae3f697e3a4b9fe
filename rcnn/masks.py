"""Mask R-CNN's mask branch: mask head, mask targets, the loss hook and pasting masks into images.

Mask R-CNN (He et al., 2017) adds a third branch beside Fast R-CNN's class and box siblings:
for every RoI a small fully convolutional network predicts one m x m mask *per class*
(Fig. 4, FPN head: 14 x 14 RoIAlign -> 4 conv 3x3 -> 2x2 deconv -> 1x1 conv to K masks of
28 x 28). Each mask is a per-pixel sigmoid, so classes do not compete; the class is chosen by
the box branch, and only that class's mask is trained (``rcnn.losses.mask_loss``, the seed's
L_mask) and used at test time.

- Training (:meth:`MaskBranch.loss`): positive RoIs only; the target of an RoI is the gt mask
  of its matched object cropped to the RoI and resampled to m x m (:func:`mask_targets`).
- Inference (:meth:`MaskBranch.predict`): the head runs on the final detection boxes (top
  100 after NMS, §3.1 "Inference") and keeps the predicted class's probability map;
  :func:`paste_masks` resamples it into the image at the box, and it is binarised at 0.5.

Shape shorthand:
    N: images;  R: RoIs of the batch;  G: gt objects of an image;  D: detections of an image
    K: foreground classes (K + 1 with background);  C: feature channels
    P: pooled side (14);  m: mask side (2P = 28);  H, W: image size
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcnn.heads import SampledRoIs
from rcnn.losses import mask_loss
from rcnn.ops import RoIPooler, roi_align

__all__ = [
    "MASK_THRESHOLD",
    "MaskBranch",
    "MaskHead",
    "MaskSettings",
    "mask_targets",
    "paste_masks",
]

MASK_THRESHOLD = 0.5  # Mask R-CNN §3.1 "Inference": the m x m float mask is binarised at 0.5


@dataclass
class MaskSettings:
    """Hyper-parameters of the mask branch; defaults are Mask R-CNN's FPN head (Fig. 4).

    Attributes:
        pool_size: P, the side of the RoI features the head reads (14); masks are 2P = 28.
        pooler: ``"align"`` (RoIAlign) or ``"pool"`` (RoI max pooling, the paper's ablation,
            Table 2c); ``None`` uses the box branch's.
        num_convs, channels: the head's 3x3 convolutions (4 of 256 channels); a CPU-sized
            model may use e.g. 2 of 16 (and ``pool_size`` 7: 14 x 14 masks, as the paper's
            ResNet-C4 head).
    """

    pool_size: int = 14
    pooler: str | None = None
    num_convs: int = 4
    channels: int = 256


class MaskHead(nn.Module):
    """Fully convolutional mask head: ``[R, C, P, P]`` RoI features -> ``[R, K, 2P, 2P]`` mask logits.

    ``num_convs`` 3x3 convolutions of ``channels`` (+ ReLU), a 2x2 deconvolution with stride 2
    (+ ReLU) that doubles the resolution, and a 1x1 convolution to one mask per foreground class.

    Args:
        in_channels: C, channels of the pooled features.
        num_classes: K + 1 (background included, as everywhere in the library); K masks are predicted.
        num_convs, channels: see :class:`MaskSettings`.
    """

    def __init__(self, in_channels: int, num_classes: int, num_convs: int = 4, channels: int = 256) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
        if num_convs < 0 or channels < 1:
            raise ValueError(f"MaskHead needs num_convs >= 0 and channels >= 1, got {num_convs} and {channels}")
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        width = channels if num_convs else in_channels
        self.deconv = nn.ConvTranspose2d(width, channels, 2, stride=2)
        self.predictor = nn.Conv2d(channels, num_classes - 1, 1)
        # MSRA (He) initialisation, fan_out, as in the reference implementations of the paper;
        # the predictor starts near zero (std 0.001, Detectron) so that every mask starts at p ~ 0.5.
        for module in (*self.convs, self.deconv):
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:  # [R, C, P, P] -> [R, K, 2P, 2P]
        """The 2x2 stride-2 deconvolution and the 1x1 predictor each map one input pixel to output
        pixels of their own, so both are computed as plain matrix products over all pixels (the
        deconvolution's four outputs per pixel as 4 x channels columns), with the same weights and
        results as ``predictor(relu(deconv(x)))``. On a CPU this is several times faster, backward
        included, than the convolution kernels on 14 x 14 and 28 x 28 maps."""
        x = self.convs(x)
        rois, width, height = x.shape[0], x.shape[-1], x.shape[-2]
        channels = self.deconv.out_channels
        pixels = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # [R*P*P, C]
        # deconv weight [C, channels, 2, 2] -> [C, (dy, dx, channels)]; its bias repeats per (dy, dx)
        w = self.deconv.weight.permute(0, 2, 3, 1).reshape(x.shape[1], 4 * channels)
        y = torch.addmm(self.deconv.bias.repeat(4), pixels, w)  # [R*P*P, 4*channels]
        y = torch.relu(y).view(-1, channels)  # [R*P*P*4, channels]
        logits = F.linear(y, self.predictor.weight.flatten(1), self.predictor.bias)  # [R*P*P*4, K]
        k = logits.shape[1]
        logits = logits.view(rois, height, width, 2, 2, k).permute(0, 5, 1, 3, 2, 4)  # [R, K, P, 2, P, 2]
        return logits.reshape(rois, k, 2 * height, 2 * width)


def mask_targets(gt_masks: Tensor, proposals: Tensor, matched_gt: Tensor, mask_size: int) -> Tensor:
    """The gt mask of each RoI's object, in the RoI's frame, at ``mask_size`` x ``mask_size``.

    Args:
        gt_masks: ``[G, H, W]`` (uint8 / bool / float in 0..1) the image's gt masks, at the size
            the proposals' coordinates refer to.
        proposals: ``[R, 4]`` RoIs (x1, y1, x2, y2) in pixels.
        matched_gt: ``[R]`` index into ``gt_masks`` of each RoI's matched object.
        mask_size: m.

    Returns ``[R, m, m]`` float 0/1. Each of the m x m cells is the mean of the gt mask over the
    cell, computed with RoIAlign (``aligned=True``, adaptive sampling: about one bilinear sample
    per mask pixel, so a cell averages the pixels it covers), then thresholded at 0.5: a cell is
    foreground when at least half of it is covered. Cells outside the image count as background.
    """
    if gt_masks.dim() != 3:
        raise ValueError(f"mask_targets: gt_masks must be [G, H, W], got {list(gt_masks.shape)}")
    if proposals.dim() != 2 or proposals.shape[1] != 4 or matched_gt.shape != proposals.shape[:1]:
        raise ValueError(
            f"mask_targets: proposals must be [R, 4] and matched_gt [R], got "
            f"{list(proposals.shape)} and {list(matched_gt.shape)}"
        )
    if proposals.shape[0] == 0:
        return proposals.new_zeros((0, mask_size, mask_size))
    if int(matched_gt.min()) < 0 or int(matched_gt.max()) >= gt_masks.shape[0]:
        raise ValueError(f"mask_targets: matched_gt indices must lie in [0, {gt_masks.shape[0] - 1}]")
    # only the matched objects' masks are made float (a full-size float copy of all G can be large)
    used, index = torch.unique(matched_gt, return_inverse=True)  # [U], [R] into used
    masks = gt_masks[used][:, None].to(proposals.dtype)  # [U, 1, H, W]
    rois = torch.cat((index[:, None].to(proposals.dtype), proposals), dim=1)  # [R, 5]
    # sampling_ratio 0: ceil(bin size) samples per bin side, so no mask pixel is skipped
    cells = roi_align(masks, rois, mask_size, spatial_scale=1.0, sampling_ratio=0, aligned=True)  # [R, 1, m, m]
    return (cells[:, 0] >= 0.5).to(proposals.dtype)


def _bilinear_weights(lo: float, hi: float, cells: int, start: int, stop: int, like: Tensor) -> Tensor:
    """``[stop - start, cells]``: bilinear weights of ``cells`` equal cells spanning ``[lo, hi]``
    at the pixel centres ``start + 0.5, ..., stop - 0.5``; zero beyond the outer cell centres'
    neighbours, as ``grid_sample(align_corners=False, padding_mode="zeros")`` does."""
    centres = torch.arange(start, stop, device=like.device, dtype=like.dtype) + 0.5  # [n]
    position = (centres - lo) / (hi - lo) * cells - 0.5  # [n], in cell-centre units
    index = torch.arange(cells, device=like.device, dtype=like.dtype)  # [cells]
    return (1.0 - (position[:, None] - index[None, :]).abs()).clamp(min=0.0)  # [n, cells]


def paste_masks(
    mask_probs: Tensor, boxes: Tensor, image_size: Sequence[int], threshold: float | None = None
) -> Tensor:
    """Paste each box-frame mask into a full image: ``[D, m, m]`` at ``boxes [D, 4]`` -> ``[D, H, W]``.

    The m x m mask covers its box exactly (cell j spans ``[x1 + j w/m, x1 + (j+1) w/m]``) and is
    resampled bilinearly at the centres of the image's pixels, with zero outside the mask: the same
    values as ``F.grid_sample(..., align_corners=False)`` on a grid over the whole image, but only
    the pixels near each box are computed, as two small matrix products (bilinear resampling is
    separable), so no ``[D, H, W, 2]`` sampling grid is built.

    Boxes partly or wholly outside the image are cut to it; zero-width or zero-height boxes give
    empty masks. ``image_size`` is ``(H, W)``. With ``threshold`` the result is uint8
    ``probability >= threshold``, otherwise float probabilities.
    """
    if mask_probs.dim() != 3 or boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] != mask_probs.shape[0]:
        raise ValueError(
            f"paste_masks: expected mask_probs [D, m, m] and boxes [D, 4], got "
            f"{list(mask_probs.shape)} and {list(boxes.shape)}"
        )
    height, width = int(image_size[0]), int(image_size[1])
    dtype = torch.uint8 if threshold is not None else mask_probs.dtype
    out = mask_probs.new_zeros((mask_probs.shape[0], height, width), dtype=dtype)  # [D, H, W]
    rows, cols = mask_probs.shape[-2:]
    for d, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        if not (x2 > x1 and y2 > y1):  # degenerate (or NaN) box: nothing to paste
            continue
        half_w, half_h = (x2 - x1) / cols / 2, (y2 - y1) / rows / 2
        # pixels whose centre lies within half a cell of the box can get a non-zero value
        c0, c1 = max(math.floor(x1 - half_w), 0), min(math.ceil(x2 + half_w), width)
        r0, r1 = max(math.floor(y1 - half_h), 0), min(math.ceil(y2 + half_h), height)
        if c1 <= c0 or r1 <= r0:
            continue
        wy = _bilinear_weights(y1, y2, rows, r0, r1, mask_probs)  # [h, rows]
        wx = _bilinear_weights(x1, x2, cols, c0, c1, mask_probs)  # [w, cols]
        region = wy @ mask_probs[d] @ wx.T  # [h, w]
        out[d, r0:r1, c0:c1] = region >= threshold if threshold is not None else region
    return out


class MaskBranch(nn.Module):
    """The mask branch of Mask R-CNN: RoI pooler (RoIAlign 14 x 14) + :class:`MaskHead`.

    :class:`rcnn.heads.RoIHeads` calls :meth:`loss` in training and :meth:`predict` at test time.

    Args:
        in_channels: C, channels of the backbone's feature maps.
        num_classes: K + 1.
        strides: strides of the feature maps RoIs are pooled from (the backbone's ``pool_strides``).
        pool_size, pooler, num_convs, channels: see :class:`MaskSettings` (``pooler`` must be given).
        sampling_ratio: RoIAlign's samples per bin side (2, §3).
        aligned: RoIAlign's half-pixel alignment (see :func:`rcnn.ops.roi_align`).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: Sequence[float],
        *,
        pool_size: int = 14,
        pooler: str = "align",
        num_convs: int = 4,
        channels: int = 256,
        sampling_ratio: int = 2,
        aligned: bool = True,
    ) -> None:
        super().__init__()
        self.pooler = RoIPooler(pool_size, strides, pooler, sampling_ratio, aligned)
        self.head = MaskHead(in_channels, num_classes, num_convs, channels)
        self.mask_size = 2 * int(pool_size)  # the deconvolution doubles the pooled side

    def forward(self, features: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """Mask logits ``[R, K, m, m]`` for ``boxes`` (one ``[Ri, 4]`` per image, in feature-input pixels)."""
        return self.head(self.pooler(features, boxes))

    def loss(
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
        logits = self(features, boxes)  # [R+, K, m, m]
        return {"loss_mask": mask_loss(logits, torch.cat(labels), torch.cat(goals))}

    @torch.no_grad()
    def predict(self, features: Sequence[Tensor], detections: list[dict[str, Tensor]]) -> None:
        """Add ``mask_probs [D, m, m]`` (sigmoid of the predicted class's mask) to each image's detections.

        ``detections[i]["boxes"]`` are the final boxes in the pooled features' input coordinates.
        Modifies ``detections`` in place.
        """
        boxes = [det["boxes"] for det in detections]
        counts = [len(b) for b in boxes]
        if sum(counts) == 0:
            for det in detections:
                det["mask_probs"] = det["boxes"].new_zeros((0, self.mask_size, self.mask_size))
            return
        logits = self(features, boxes)  # [R, K, m, m]
        labels = torch.cat([det["labels"] for det in detections])  # [R] in 1..K
        chosen = logits[torch.arange(len(labels), device=labels.device), labels - 1]  # [R, m, m]
        for det, probs in zip(detections, chosen.sigmoid().split(counts)):
            det["mask_probs"] = probs
