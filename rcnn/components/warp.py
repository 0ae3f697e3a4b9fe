"""R-CNN's region warping: every proposal becomes a fixed-size image for the CNN (R-CNN §2.1, App. A).

A CNN with fully connected layers needs a fixed input (227 x 227 for R-CNN's AlexNet), so each
proposal is cut out of the image and resampled. The seed lists three ways, all here:

``"anisotropic"`` (R-CNN's choice, "warp")
    stretch the box to ``size x size`` whatever its aspect ratio.
``"isotropic_context"`` ("tightest square with context")
    scale width and height by the same factor so that the longer side fits; the rest of the
    square is filled with the image around the box.
``"isotropic_pad"`` ("tightest square without context")
    the same scale and square, but only the box is shown; the rest is filled with ``fill``.

Context padding ``p`` (App. A; ``p = 16`` at ``size = 227``) first enlarges the box so that,
after warping, ``p`` output pixels of image context surround the original box on every side:
the box lands on ``[p, size - p]`` of the output (along its longer side for the isotropic
modes). Where the enlarged window leaves the image, the output takes ``fill`` — the mean, as in
R-CNN's code, where mean-subtracted pixels outside the image are zero.

Resampling is bilinear (as R-CNN's ``imresize(..., 'bilinear')``) and reads only pixels of the
visible window, as if it had been cropped first: no colour bleeds in from outside it. All boxes
are warped at once by one ``grid_sample`` call, on the image's device.

Shape shorthand:
    H, W: image height and width
    R: boxes (regions)
    S: output side (``size``)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rcnn.core.boxes import check_boxes

__all__ = ["WARP_MODES", "WarpWindows", "to_warp_frame", "warp_regions", "warp_windows"]

WARP_MODES = ("anisotropic", "isotropic_context", "isotropic_pad")


class WarpWindows(NamedTuple):
    """Where each warped output comes from, in image coordinates.

    Attributes:
        source: ``[R, 4]`` the image window that maps onto the whole ``S x S`` output.
        visible: ``[R, 4]`` the part of ``source`` whose pixels are shown; output pixels outside it
            (or outside the image) take the fill value.
    """

    source: Tensor
    visible: Tensor


def warp_windows(boxes: Tensor, size: int = 227, mode: str = "anisotropic", padding: int = 16) -> WarpWindows:
    """The source and visible windows ``[R, 4]`` of ``boxes [R, 4]`` for a warp (see the module doc)."""
    if mode not in WARP_MODES:
        raise ValueError(f"warp mode must be one of {WARP_MODES}, got {mode!r}")
    if size < 1 or padding < 0 or 2 * padding >= size:
        raise ValueError(f"warp: need size >= 1 and 0 <= 2 * padding < size, got size={size}, padding={padding}")
    check_boxes(boxes, "warp boxes")
    widths = boxes[:, 2] - boxes[:, 0]  # [R]
    heights = boxes[:, 3] - boxes[:, 1]  # [R]
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    # the box fills the inner (size - 2p) pixels: enlarge it by size / (size - 2p)
    enlarge = size / (size - 2 * padding)
    if mode == "anisotropic":
        half_w, half_h = widths * enlarge / 2, heights * enlarge / 2
    else:  # the tightest square around the box, with the same enlargement
        half_w = half_h = torch.maximum(widths, heights) * enlarge / 2
    source = torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=1)  # [R, 4]
    if mode != "isotropic_pad":
        return WarpWindows(source, source)
    # only the box and its p output pixels of context are shown: p px = p * side / (S - 2p) image px
    margin = torch.maximum(widths, heights) * padding / (size - 2 * padding)  # [R]
    visible = boxes + torch.stack((-margin, -margin, margin, margin), dim=1)
    return WarpWindows(source, visible)


def to_warp_frame(boxes: Tensor, source: Tensor, size: int = 227) -> Tensor:
    """Map ``boxes [R, 4]`` (image coordinates) into the output frame of their warps ``[R, 4]``.

    ``source [R, 4]`` is :func:`warp_windows`'s source window of each output; the result is in
    output pixels (continuous, ``0 .. size``). Useful to draw or test where an object lands.
    """
    scale_x = size / (source[:, 2] - source[:, 0])  # [R]
    scale_y = size / (source[:, 3] - source[:, 1])  # [R]
    x = (boxes[:, 0::2] - source[:, 0:1]) * scale_x[:, None]  # [R, 2]
    y = (boxes[:, 1::2] - source[:, 1:2]) * scale_y[:, None]  # [R, 2]
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def _fill_value(image: Tensor, fill: float | Sequence[float] | Tensor | None) -> Tensor:
    """Per-channel fill ``[3]`` on the image's device and dtype."""
    if fill is None:
        return image.mean(dim=(1, 2))
    value = torch.as_tensor(fill, dtype=image.dtype, device=image.device).reshape(-1)
    if value.numel() == 1:
        value = value.expand(image.shape[0])
    if value.numel() != image.shape[0]:
        raise ValueError(f"warp: fill must be a number or one value per channel ({image.shape[0]}), got {value.numel()}")
    return value


def _sample_axis(
    source_lo: Tensor, source_hi: Tensor, visible_lo: Tensor, visible_hi: Tensor, length: int, size: int
) -> tuple[Tensor, Tensor]:
    """Sampling positions ``[R, S]`` along one axis, and whether each is shown ``[R, S]``.

    Output pixel ``j`` samples the source window at ``lo + (j + 0.5) / S * (hi - lo)``. It shows
    the image if that point lies in the visible window and in the image; the position is then
    clamped to the pixel centres of that window, so bilinear reads only pixels inside it.
    """
    steps = (torch.arange(size, device=source_lo.device, dtype=source_lo.dtype) + 0.5) / size  # [S]
    positions = source_lo[:, None] + steps[None, :] * (source_hi - source_lo)[:, None]  # [R, S]
    lo = visible_lo.clamp(min=0)  # [R]
    hi = visible_hi.clamp(max=length)  # [R]
    shown = (positions >= lo[:, None]) & (positions < hi[:, None])  # [R, S]
    # pixel centres of the window: [lo + 0.5, hi - 0.5] (its middle when it is under 1 px wide)
    first = torch.minimum(lo + 0.5, (lo + hi) / 2)
    last = torch.maximum(hi - 0.5, (lo + hi) / 2)
    clamped = torch.minimum(torch.maximum(positions, first[:, None]), last[:, None])
    return clamped, shown


def warp_regions(
    image: Tensor,
    boxes: Tensor,
    size: int = 227,
    mode: str = "anisotropic",
    padding: int = 16,
    fill: float | Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Warp every box of ``image [3, H, W]`` to ``size x size``: ``[R, 3, size, size]``.

    Args:
        image: float tensor ``[C, H, W]`` (``C = 3``), on any device.
        boxes: ``[R, 4]`` (x1, y1, x2, y2) in image pixels; boxes may extend beyond the image.
        size: output side (R-CNN: 227).
        mode: ``"anisotropic"``, ``"isotropic_context"`` or ``"isotropic_pad"`` (module doc).
        padding: context padding ``p`` in output pixels (R-CNN: 16; 0 for none).
        fill: value of output pixels outside the image (and, for ``isotropic_pad``, outside the
            box): a number or one per channel. Default: this image's per-channel mean. Pass the
            network's normalisation mean to reproduce R-CNN, where such pixels are zero after
            mean subtraction.

    Memory is ``R * 3 * size²`` values (~0.6 MB per box at 227): warp large sets in chunks.
    """
    if image.dim() != 3 or not image.is_floating_point():
        raise ValueError(f"warp_regions: image must be a float tensor [C, H, W], got {image.dtype} {list(image.shape)}")
    windows = warp_windows(boxes.to(image.dtype), size, mode, padding)
    fill_value = _fill_value(image, fill)  # [C]
    num_boxes = boxes.shape[0]
    channels, height, width = image.shape
    if num_boxes == 0:
        return image.new_zeros((0, channels, size, size))
    source, visible = windows.source.to(image.device), windows.visible.to(image.device)
    xs, shown_x = _sample_axis(source[:, 0], source[:, 2], visible[:, 0], visible[:, 2], width, size)  # [R, S]
    ys, shown_y = _sample_axis(source[:, 1], source[:, 3], visible[:, 1], visible[:, 3], height, size)  # [R, S]
    # grid_sample with align_corners=False maps the continuous coordinate x to 2 x / W - 1
    grid_x = (2 * xs / width - 1)[:, None, :].expand(num_boxes, size, size)  # [R, S, S]
    grid_y = (2 * ys / height - 1)[:, :, None].expand(num_boxes, size, size)  # [R, S, S]
    grid = torch.stack((grid_x, grid_y), dim=-1).reshape(1, num_boxes * size, size, 2)
    # all boxes in one call: stacked vertically as one tall output, so the image is not copied R times
    sampled = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    sampled = sampled.reshape(channels, num_boxes, size, size).permute(1, 0, 2, 3)  # [R, C, S, S]
    shown = (shown_y[:, :, None] & shown_x[:, None, :])[:, None]  # [R, 1, S, S]
    return torch.where(shown, sampled, fill_value[None, :, None, None]).contiguous()
