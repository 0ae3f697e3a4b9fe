"""Mask R-CNN's masks as tensors: training targets in the RoI frame, and pasting masks into images.

- :func:`mask_targets`: the gt mask of each positive RoI's object, cropped to the RoI and
  resampled to the head's m x m grid (the target of L_mask, Mask R-CNN §3).
- :func:`paste_masks`: an m x m box-frame mask resampled into the full image at its box, and
  binarised at :data:`MASK_THRESHOLD` (§3.1 "Inference").

Shape shorthand:
    R: RoIs;  G: gt objects of an image;  D: detections of an image
    m: mask side (28 for the FPN head);  H, W: image size
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rcnn.core.ops import roi_align

__all__ = ["MASK_THRESHOLD", "mask_targets", "paste_masks", "paste_masks_torchvision"]

MASK_THRESHOLD = 0.5  # Mask R-CNN §3.1 "Inference": the m x m float mask is binarised at 0.5


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
    if torch.compiler.is_exporting():
        return _paste_dense(mask_probs, boxes, image_size, threshold)
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


def _box_weights(lo: Tensor, hi: Tensor, cells: int, size: int) -> Tensor:
    """``[D, size, cells]``: :func:`_bilinear_weights` of every box at once over a whole image axis
    (zero for boxes of no extent)."""
    centres = torch.arange(size, device=lo.device, dtype=lo.dtype) + 0.5  # [n]
    span = hi - lo  # [D]
    position = (centres[None, :] - lo[:, None]) / span.clamp(min=1e-12)[:, None] * cells - 0.5  # [D, n]
    index = torch.arange(cells, device=lo.device, dtype=lo.dtype)  # [cells]
    weights = (1.0 - (position[..., None] - index).abs()).clamp(min=0.0)  # [D, n, cells]
    return weights * (span > 0).to(lo.dtype)[:, None, None]


def _paste_dense(mask_probs: Tensor, boxes: Tensor, image_size: Sequence[int], threshold: float | None) -> Tensor:
    """:func:`paste_masks` as two batched matrix products over the whole image: the same values
    without a loop over boxes, for an exported graph (``[D, H, W]`` floats in memory)."""
    rows, cols = mask_probs.shape[-2:]
    wy = _box_weights(boxes[:, 1], boxes[:, 3], rows, image_size[0])  # [D, H, rows]
    wx = _box_weights(boxes[:, 0], boxes[:, 2], cols, image_size[1])  # [D, W, cols]
    out = wy @ mask_probs @ wx.transpose(1, 2)  # [D, H, W]
    return (out >= threshold).to(torch.uint8) if threshold is not None else out


def _torchvision_weights(start: Tensor, stop: Tensor, cells: int, size: int, dtype: torch.dtype) -> Tensor:
    """``[D, size, cells]``: the weights of torchvision's pasting along one axis — a mask of
    ``cells`` resized bilinearly (``align_corners=False``) to the integer span ``start .. stop``
    (inclusive) and placed there, zero elsewhere."""
    pixels = torch.arange(size, device=start.device)  # [n]
    length = (stop - start + 1).clamp(min=1)  # [D]
    offset = (pixels[None, :] - start[:, None]).to(dtype)  # [D, n]: position in the resized mask
    source = (offset + 0.5) * (cells / length.to(dtype))[:, None] - 0.5
    source = source.clamp(min=0.0, max=float(cells - 1))  # two float bounds: ONNX export refuses a mix
    index = torch.arange(cells, device=start.device, dtype=dtype)
    weights = (1.0 - (source[..., None] - index).abs()).clamp(min=0.0)  # [D, n, cells]
    inside = (pixels[None, :] >= start[:, None]) & (pixels[None, :] <= stop[:, None])  # [D, n]
    return weights * inside[..., None].to(dtype)


def paste_masks_torchvision(
    mask_probs: Tensor, boxes: Tensor, image_size: Sequence[int], threshold: float | None = None
) -> Tensor:
    """Paste masks as torchvision's detectors do, to reproduce their outputs: ``[D, m, m]`` at
    ``boxes [D, 4]`` -> ``[D, H, W]``.

    Its legacy rule: each mask is padded by one zero cell on every side, its box widened by the
    same factor and cut to integer pixels, the mask resized bilinearly to ``x2 - x1 + 1`` by
    ``y2 - y1 + 1`` pixels (the ``+ 1`` pixel convention) and copied in. :func:`paste_masks` is
    the library's own rule (continuous coordinates); the two differ by about a pixel at the edges.
    With ``threshold`` the result is uint8 ``probability >= threshold``, otherwise probabilities.
    """
    if mask_probs.dim() != 3 or boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] != mask_probs.shape[0]:
        raise ValueError(
            f"paste_masks_torchvision: expected mask_probs [D, m, m] and boxes [D, 4], got "
            f"{list(mask_probs.shape)} and {list(boxes.shape)}"
        )
    side = mask_probs.shape[-1]
    scale = float(side + 2) / side
    padded = F.pad(mask_probs, (1, 1, 1, 1))  # [D, m+2, m+2]
    half_w, half_h = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale, (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    cx, cy = (boxes[:, 2] + boxes[:, 0]) * 0.5, (boxes[:, 3] + boxes[:, 1]) * 0.5
    expanded = torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=1).to(torch.int64)  # [D, 4]
    if torch.compiler.is_exporting():  # the same weights as matrices, without a loop over boxes
        wy = _torchvision_weights(expanded[:, 1], expanded[:, 3], side + 2, image_size[0], padded.dtype)
        wx = _torchvision_weights(expanded[:, 0], expanded[:, 2], side + 2, image_size[1], padded.dtype)
        dense = wy @ padded @ wx.transpose(1, 2)  # [D, H, W]
        return (dense >= threshold).to(torch.uint8) if threshold is not None else dense
    height, width = int(image_size[0]), int(image_size[1])
    out = mask_probs.new_zeros((mask_probs.shape[0], height, width))  # [D, H, W]
    for d, (x1, y1, x2, y2) in enumerate(expanded.tolist()):
        w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        resized = F.interpolate(padded[d][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        c0, c1, r0, r1 = max(x1, 0), min(x2 + 1, width), max(y1, 0), min(y2 + 1, height)
        if c1 > c0 and r1 > r0:
            out[d, r0:r1, c0:c1] = resized[r0 - y1 : r1 - y1, c0 - x1 : c1 - x1]
    return (out >= threshold).to(torch.uint8) if threshold is not None else out
