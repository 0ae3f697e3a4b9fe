"""Box operations and the bounding-box regression parameterisation.

Coordinate convention (used everywhere in the library): boxes are ``(x1, y1, x2, y2)`` in
absolute pixels with *continuous* coordinates, so a box's width is ``x2 - x1`` and its
height ``y2 - y1`` (no ``+ 1``). A pixel with integer index ``i`` covers ``[i, i + 1)``.
The legacy ``+ 1`` convention of the original Caffe code appears only in
``rcnn.anchors.generate_anchors(legacy=True)``.

Shape shorthand:
    N, M: numbers of boxes
    C: number of classes whose deltas are stacked along the last dimension
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "BoxCoder",
    "box_area",
    "box_iou",
    "check_boxes",
    "clip_boxes",
    "cxcywh_to_xyxy",
    "remove_small_boxes",
    "xyxy_to_cxcywh",
]


def check_boxes(boxes: Tensor, name: str = "boxes") -> None:
    """Raise ``ValueError`` unless ``boxes`` is a finite ``[N, 4]`` tensor with x2 >= x1, y2 >= y1.

    Zero-width or zero-height boxes are valid here (they are degenerate, not malformed).
    """
    if not isinstance(boxes, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected shape [N, 4], got {list(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {boxes.dtype}")
    if boxes.numel() == 0:
        return
    finite = torch.isfinite(boxes).all(dim=1)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise ValueError(f"{name}[{bad}] has a NaN or infinite coordinate: {boxes[bad].tolist()}")
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bool(inverted.any()):
        bad = int(inverted.nonzero()[0, 0])
        raise ValueError(
            f"{name}[{bad}] = {boxes[bad].tolist()} has x2 < x1 or y2 < y1; "
            "boxes must be (x1, y1, x2, y2)"
        )


def box_area(boxes: Tensor) -> Tensor:
    """Areas of ``boxes [N, 4]`` -> ``[N]``. Inverted boxes get area 0, NaN stays NaN."""
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    return widths * heights


def box_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Intersection over union of every pair: ``[N, 4] x [M, 4] -> [N, M]``.

    Degenerate boxes (zero area) have IoU 0 with everything, including themselves, rather
    than the NaN that 0 / 0 would give. Empty inputs give an empty ``[N, M]`` matrix.
    NaN coordinates raise ``ValueError``: an IoU with them is meaningless.
    """
    for name, boxes in (("boxes_a", boxes_a), ("boxes_b", boxes_b)):
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"box_iou: {name} must have shape [N, 4], got {list(boxes.shape)}")
        if boxes.numel() and bool(torch.isnan(boxes).any()):
            raise ValueError(f"box_iou: {name} contains NaN coordinates")
    area_a = box_area(boxes_a)  # [N]
    area_b = box_area(boxes_b)  # [M]
    top_left = torch.max(boxes_a[:, None, :2], boxes_b[None, :, :2])  # [N, M, 2]
    bottom_right = torch.min(boxes_a[:, None, 2:], boxes_b[None, :, 2:])  # [N, M, 2]
    wh = (bottom_right - top_left).clamp(min=0)  # [N, M, 2]
    inter = wh[..., 0] * wh[..., 1]  # [N, M]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def clip_boxes(boxes: Tensor, image_size: Sequence[int]) -> Tensor:
    """Clip ``boxes [..., 4]`` to an image of ``image_size = (height, width)``."""
    height, width = int(image_size[0]), int(image_size[1])
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices ``[K]`` (int64) of the boxes whose width and height are both >= ``min_size``.

    Boxes with NaN coordinates are removed too (a NaN comparison is false).
    """
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    keep = (widths >= min_size) & (heights >= min_size)
    return keep.nonzero().flatten()


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(x1, y1, x2, y2) -> (cx, cy, w, h)``, last dimension 4.

    The centre is ``x1 + 0.5 w`` (not ``(x1 + x2) / 2``, which rounds differently in float32), as
    torchvision's box coder computes it, so that the same weights give the same boxes to the last
    bit and NMS decisions near its threshold agree.
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    w, h = x2 - x1, y2 - y1
    return torch.stack((x1 + 0.5 * w, y1 + 0.5 * h, w, h), dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(cx, cy, w, h) -> (x1, y1, x2, y2)``, last dimension 4."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


class BoxCoder:
    """The R-CNN bounding-box regression parameterisation and its inverse.

    For a proposal ``p = (px, py, pw, ph)`` (centre, width, height) and its target
    ``g``, the regression targets are (R-CNN, appendix C; the seed's formulas)::

        tx = (gx - px) / pw      ty = (gy - py) / ph
        tw = log(gw / pw)        th = log(gh / ph)

    each multiplied by ``weights = (wx, wy, ww, wh)``. Weights ``(10, 10, 5, 5)`` are the
    same as Fast R-CNN's normalisation of the targets by the standard deviations
    ``(0.1, 0.1, 0.2, 0.2)``. Decoding applies the inverse, ``ĝx = pw dx + px``,
    ``ĝw = pw exp(dw)``, with ``dw, dh`` clamped at ``clamp`` so that ``exp`` cannot
    overflow early in training (default ``log(1000 / 16)``: no box grows more than
    62.5x its proposal in one step).
    """

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        clamp: float = math.log(1000.0 / 16),
    ) -> None:
        if len(weights) != 4 or any(w <= 0 for w in weights):
            raise ValueError(f"BoxCoder weights must be 4 positive numbers, got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.clamp = float(clamp)

    def encode(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Targets ``[N, 4]`` that take ``proposals [N, 4]`` to ``reference_boxes [N, 4]``.

        Proposals of zero width or height have no defined targets: ``ValueError``.
        """
        if reference_boxes.shape != proposals.shape or proposals.shape[-1:] != (4,):
            raise ValueError(
                "BoxCoder.encode: reference_boxes and proposals must both be [N, 4], got "
                f"{list(reference_boxes.shape)} and {list(proposals.shape)}"
            )
        g = xyxy_to_cxcywh(reference_boxes.to(proposals.dtype))
        p = xyxy_to_cxcywh(proposals)
        if p.numel() and not bool((p[:, 2:] > 0).all()):
            raise ValueError("BoxCoder.encode: proposals must have positive width and height")
        wx, wy, ww, wh = self.weights
        tx = wx * (g[:, 0] - p[:, 0]) / p[:, 2]
        ty = wy * (g[:, 1] - p[:, 1]) / p[:, 3]
        tw = ww * torch.log(g[:, 2] / p[:, 2])
        th = wh * torch.log(g[:, 3] / p[:, 3])
        return torch.stack((tx, ty, tw, th), dim=1)

    def decode(self, deltas: Tensor, proposals: Tensor) -> Tensor:
        """Apply ``deltas [N, 4*C]`` (or ``[N, 4]``) to ``proposals [N, 4]`` -> boxes of deltas' shape."""
        if deltas.dim() != 2 or deltas.shape[1] % 4 != 0 or deltas.shape[0] != proposals.shape[0]:
            raise ValueError(
                f"BoxCoder.decode: deltas must be [N, 4*C] with N = {proposals.shape[0]} "
                f"proposals, got {list(deltas.shape)}"
            )
        p = xyxy_to_cxcywh(proposals.to(deltas.dtype))[:, None, :]  # [N, 1, 4]
        d = deltas.reshape(deltas.shape[0], -1, 4)  # [N, C, 4]
        wx, wy, ww, wh = self.weights
        cx = d[..., 0] / wx * p[..., 2] + p[..., 0]
        cy = d[..., 1] / wy * p[..., 3] + p[..., 1]
        w = torch.exp((d[..., 2] / ww).clamp(max=self.clamp)) * p[..., 2]
        h = torch.exp((d[..., 3] / wh).clamp(max=self.clamp)) * p[..., 3]
        boxes = cxcywh_to_xyxy(torch.stack((cx, cy, w, h), dim=-1))  # [N, C, 4]
        return boxes.reshape(deltas.shape)
