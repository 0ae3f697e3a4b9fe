"""Anchors: reference boxes of several scales and aspect ratios at every feature-map cell.

Faster R-CNN (§3.1.1) places k = (scales x ratios) anchors, by default 3 x 3 = 9, at every
position of the sliding window over the shared feature map. The RPN predicts, per anchor, an
objectness score and the four deltas of the seed's box parameterisation relative to it.

Shape shorthand:
    A: anchors per feature-map cell (len(sizes) * len(aspect_ratios) for one level)
    Hi, Wi: height and width of feature level i
    L: number of feature levels
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["AnchorGenerator", "cell_anchors", "generate_anchors"]


def _legacy_ratio_enum(base: Tensor, ratios: Tensor) -> Tensor:
    """py-faster-rcnn's ``_ratio_enum``: anchors of equal area and the given h/w ratios."""
    w = base[2] - base[0] + 1
    h = base[3] - base[1] + 1
    x_ctr = base[0] + 0.5 * (w - 1)
    y_ctr = base[1] + 0.5 * (h - 1)
    ws = torch.round(torch.sqrt(w * h / ratios))  # numpy's round-half-to-even, as the original
    hs = torch.round(ws * ratios)
    return torch.stack(
        (x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1), x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)),
        dim=1,
    )


def _legacy_scale_enum(anchor: Tensor, scales: Tensor) -> Tensor:
    """py-faster-rcnn's ``_scale_enum``: the anchor scaled by each factor about its centre."""
    w = anchor[2] - anchor[0] + 1
    h = anchor[3] - anchor[1] + 1
    x_ctr = anchor[0] + 0.5 * (w - 1)
    y_ctr = anchor[1] + 0.5 * (h - 1)
    ws = w * scales
    hs = h * scales
    return torch.stack(
        (x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1), x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)),
        dim=1,
    )


def _check_positive(name: str, values: Sequence[float]) -> None:
    if len(values) == 0 or any(not (float(v) > 0 and math.isfinite(float(v))) for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of positive numbers, got {tuple(values)}")


def generate_anchors(
    base_size: float = 16,
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    scales: Sequence[float] = (8, 16, 32),
    legacy: bool = False,
) -> Tensor:
    """The ``[A, 4]`` anchors of one cell of a stride-``base_size`` feature map, ratio-major.

    ``ratios`` are height / width; ``scales`` multiply ``base_size``, so the defaults give the
    Faster R-CNN paper's areas 128², 256², 512² with ratios 1:2, 1:1, 2:1 (§3.1.1).

    ``legacy=True`` reproduces py-faster-rcnn's ``generate_anchors`` exactly: the ``+ 1``
    pixel-width convention, widths and heights rounded to integers, the cell occupying pixels
    ``0 .. base_size - 1`` (its table starts ``[-84, -40, 99, 55]``).

    ``legacy=False`` (what the library uses) gives the same anchors in continuous coordinates
    without rounding: centred on the cell centre ``(base_size / 2, base_size / 2)``, each
    exactly ``base_size * scale`` on a side for ratio 1, and of area ``(base_size * scale)²``
    with ``h / w = ratio`` otherwise.
    """
    _check_positive("ratios", ratios)
    _check_positive("scales", scales)
    if not base_size > 0:
        raise ValueError(f"base_size must be positive, got {base_size}")
    ratios_t = torch.as_tensor(ratios, dtype=torch.float64)
    scales_t = torch.as_tensor(scales, dtype=torch.float64)
    if legacy:
        base = torch.tensor([0.0, 0.0, base_size - 1, base_size - 1], dtype=torch.float64)
        per_ratio = _legacy_ratio_enum(base, ratios_t)
        anchors = torch.cat([_legacy_scale_enum(a, scales_t) for a in per_ratio])
        return anchors.to(torch.float32)
    sizes = float(base_size) * scales_t  # [S]
    ws = (sizes[None, :] / torch.sqrt(ratios_t)[:, None]).reshape(-1)  # [R*S], ratio-major
    hs = (sizes[None, :] * torch.sqrt(ratios_t)[:, None]).reshape(-1)
    centre = float(base_size) / 2
    anchors = torch.stack((centre - ws / 2, centre - hs / 2, centre + ws / 2, centre + hs / 2), dim=1)
    return anchors.to(torch.float32)


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float], torchvision: bool = False) -> Tensor:
    """``[A, 4]`` anchors centred on (0, 0): one per (ratio, size), ratio-major.

    ``sizes`` are side lengths (the square root of the anchor area) in input-image pixels;
    ``aspect_ratios`` are height / width. ``torchvision=True`` computes them as torchvision's
    detectors do: in float32, with the corners rounded to whole pixels (a 32-pixel anchor of
    ratio 1:2 is 46 x 22 instead of 45.25 x 22.63), to reproduce their outputs.
    """
    _check_positive("sizes", sizes)
    _check_positive("aspect_ratios", aspect_ratios)
    if torchvision:  # torchvision.models.detection.anchor_utils: w = size / sqrt(ratio), then round
        sizes_t = torch.as_tensor(sizes, dtype=torch.float32)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=torch.float32))
        ws = ((1 / h_ratios)[:, None] * sizes_t[None, :]).reshape(-1)  # [A]
        hs = (h_ratios[:, None] * sizes_t[None, :]).reshape(-1)  # [A]
        return (torch.stack((-ws, -hs, ws, hs), dim=1) / 2).round()
    sizes_t = torch.as_tensor(sizes, dtype=torch.float64)
    ratios_t = torch.as_tensor(aspect_ratios, dtype=torch.float64)
    ws = (sizes_t[None, :] / torch.sqrt(ratios_t)[:, None]).reshape(-1)  # [A]
    hs = (sizes_t[None, :] * torch.sqrt(ratios_t)[:, None]).reshape(-1)  # [A]
    return torch.stack((-ws / 2, -hs / 2, ws / 2, hs / 2), dim=1).to(torch.float32)


class AnchorGenerator(nn.Module):
    """Anchors at every cell of one or several feature maps.

    Args:
        sizes: per feature level, the anchor side lengths in input pixels. A single level with
            ``((128, 256, 512),)`` and ratios ``((0.5, 1, 2),)`` is the paper's 3 x 3 = 9
            anchors; an FPN uses one size per level, e.g. ``((32,), (64,), (128,), (256,), (512,))``.
        aspect_ratios: per level, the height / width ratios (one tuple reused for all levels if
            a single tuple is given).
        offset: where in its cell an anchor is centred, as a fraction of the stride; 0.5 puts it
            at the cell's centre, which in continuous coordinates is where the legacy code's
            ``(base_size - 1) / 2`` centre lies.
        torchvision: place anchors as torchvision's detectors do, to reproduce their outputs:
            cell anchors rounded to whole pixels (:func:`cell_anchors`), at the cells' corners
            (``offset`` must be 0), and each level's stride taken as the padded image size
            divided (integer division) by the level's size — 61, not 64, for the 13 cells of an
            FPN's P6 on an 800-pixel side.

    The anchors of level i are ordered ``(y, x, a)`` — location-major, then anchor — which is
    the order of an RPN head's ``[N, A, Hi, Wi]`` output permuted to ``[N, Hi, Wi, A]``.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]] = ((128.0, 256.0, 512.0),),
        aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),),
        offset: float = 0.5,
        torchvision: bool = False,
    ) -> None:
        super().__init__()
        sizes = [tuple(float(s) for s in level) for level in sizes]
        ratios = [tuple(float(r) for r in level) for level in aspect_ratios]
        if len(ratios) == 1 and len(sizes) > 1:
            ratios = ratios * len(sizes)
        if len(ratios) != len(sizes):
            raise ValueError(
                f"AnchorGenerator: {len(sizes)} levels of sizes but {len(ratios)} of aspect_ratios; "
                "give one tuple of ratios per level, or one tuple for all"
            )
        if torchvision and offset != 0.0:
            raise ValueError(f"torchvision's anchors sit at the cells' corners: offset must be 0, got {offset}")
        self.sizes = sizes
        self.aspect_ratios = ratios
        self.offset = float(offset)
        self.torchvision = bool(torchvision)
        self.base_anchors = [cell_anchors(s, r, torchvision) for s, r in zip(sizes, ratios)]  # L x [A, 4]
        self._cache: dict[tuple, list[Tensor]] = {}

    @property
    def num_anchors_per_location(self) -> list[int]:
        """A for each level."""
        return [b.shape[0] for b in self.base_anchors]

    def grid_anchors(
        self,
        feature_shapes: Sequence[tuple[int, int]],
        strides: Sequence[float | tuple[float, float]],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> list[Tensor]:
        """Per level, the ``[Hi * Wi * A, 4]`` anchors of a ``(Hi, Wi)`` map of the given stride
        (one number, or ``(stride_y, stride_x)``)."""
        if len(feature_shapes) != len(self.base_anchors) or len(strides) != len(self.base_anchors):
            raise ValueError(
                f"AnchorGenerator has {len(self.base_anchors)} levels but got "
                f"{len(feature_shapes)} feature maps and {len(strides)} strides"
            )
        key = (tuple(map(tuple, feature_shapes)), tuple(strides), str(device), dtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        out = []
        for (height, width), stride, base in zip(feature_shapes, strides, self.base_anchors):
            stride_y, stride_x = stride if isinstance(stride, tuple) else (stride, stride)
            shift_x = (torch.arange(width, dtype=torch.float32, device=device) + self.offset) * stride_x
            shift_y = (torch.arange(height, dtype=torch.float32, device=device) + self.offset) * stride_y
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")  # [Hi, Wi]
            shifts = torch.stack((xx, yy, xx, yy), dim=-1).reshape(-1, 1, 4)  # [Hi*Wi, 1, 4]
            anchors = (shifts + base.to(device)[None]).reshape(-1, 4)  # [Hi*Wi*A, 4]
            out.append(anchors.to(dtype))
        if len(self._cache) > 16:  # a few input sizes recur; don't grow without bound
            self._cache.clear()
        self._cache[key] = out
        return out

    def forward(self, features: Sequence[Tensor], strides: Sequence[float]) -> list[Tensor]:
        """Anchors for feature maps ``features`` (each ``[N, C, Hi, Wi]``): L x ``[Hi*Wi*A, 4]``.

        The anchors are the same for every image of a padded batch, so one set is returned.
        """
        shapes = [tuple(int(v) for v in f.shape[-2:]) for f in features]
        if self.torchvision:  # padded size // level size, per axis (the first level's stride is exact)
            padded = (shapes[0][0] * int(strides[0]), shapes[0][1] * int(strides[0]))
            strides = [(padded[0] // h, padded[1] // w) for h, w in shapes]
        return self.grid_anchors(shapes, strides, device=features[0].device, dtype=features[0].dtype)
