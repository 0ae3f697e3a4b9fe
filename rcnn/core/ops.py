"""The library's one entry point for NMS, RoI pooling and RoIAlign.

These call the ``torchvision.ops`` kernels (C++ on the CPU, CUDA on a GPU). Each has a slow,
loop-based pure-PyTorch reference version beside it (``*_reference``), written from the papers'
descriptions; the tests check that the two agree, so the kernels' semantics are pinned down here
rather than taken on trust. Where a CPU fast path of :mod:`rcnn.core.fastpaths` applies (and the
switch there is on), one line hands the work to it; the results are the same.

RoIs are given either as a ``[R, 5]`` tensor of ``(batch_index, x1, y1, x2, y2)`` or as a list
with one ``[Ri, 4]`` box tensor per image, in input-image pixels; ``spatial_scale`` (1 / stride)
maps them onto the feature map.

Shape shorthand:
    N: images in the batch;  C: channels;  H, W: feature-map size
    R: RoIs;  P x Q: pooled output size (``output_size``)
    B: boxes given to NMS
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchvision.ops
from torch import Tensor, nn

from rcnn.core import fastpaths
from rcnn.core.boxes import box_iou

__all__ = [
    "RoIPooler",
    "assign_fpn_levels",
    "batched_nms",
    "nms",
    "nms_reference",
    "roi_align",
    "roi_align_points",
    "roi_align_reference",
    "roi_pool",
    "roi_pool_bins",
    "roi_pool_reference",
    "to_rois",
]


def _check_nms_inputs(boxes: Tensor, scores: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"nms: boxes must be [B, 4], got {list(boxes.shape)}")
    if torch.compiler.is_exporting():  # the checks below read the data, which a graph cannot
        return
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"nms: scores must be [B] = [{boxes.shape[0]}], got {list(scores.shape)}")
    if boxes.numel() and not bool(torch.isfinite(boxes).all()):
        raise ValueError("nms: boxes contain NaN or infinite coordinates")


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression (the seed's "Common tricks").

    Visits boxes by decreasing score and keeps a box unless its IoU with an already-kept box
    exceeds ``iou_threshold``. Returns the int64 indices of the kept boxes ``[K]``, by
    decreasing score. Zero-area boxes overlap nothing and are therefore kept.
    """
    _check_nms_inputs(boxes, scores)
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    return torchvision.ops.nms(boxes, scores, float(iou_threshold))


def batched_nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, max_kept: int | None = None
) -> Tensor:
    """NMS within each group (e.g. class) independently: ``[B, 4], [B], [B] -> [K]`` kept indices.

    Boxes of different groups never suppress each other. Like ``nms`` the result is sorted by
    decreasing score.

    ``max_kept``: return only the first ``max_kept`` kept boxes, as ``batched_nms(...)[:max_kept]``
    does, but without running NMS on boxes that cannot be among them. Whether greedy NMS keeps a
    box depends only on the boxes that score higher, so NMS on the ``k`` best-scoring boxes keeps
    exactly the kept boxes among them; once that is ``max_kept`` or more, the rest cannot enter the
    answer. ``k`` starts at ``4 * max_kept`` and grows fourfold until it is enough. This is what
    makes per-class NMS cheap at a low score threshold: 90 classes x 1000 proposals are 90,000
    candidates for 100 detections. When ``4 * max_kept`` already covers all boxes (the RPN in
    training: 2000 boxes, 512 kept), the CPU fast path takes the boxes in chunks instead (see
    :func:`rcnn.core.fastpaths.chunked_nms`), so NMS stops where ``max_kept`` are kept. (Equal scores at a cut may be
    ordered differently from a full run, as NMS orders ties arbitrarily anyway.)
    """
    _check_nms_inputs(boxes, scores)
    if torch.compiler.is_exporting():
        return _batched_nms_graph(boxes, scores, groups, float(iou_threshold), max_kept)
    if groups.shape != scores.shape:
        raise ValueError(f"batched_nms: groups must be [B] = [{scores.shape[0]}], got {list(groups.shape)}")
    if boxes.numel() == 0 or (max_kept is not None and max_kept <= 0):
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    iou_threshold = float(iou_threshold)
    if max_kept is None:
        return torchvision.ops.batched_nms(boxes, scores, groups, iou_threshold)
    k = 4 * max_kept
    if k >= len(scores) and fastpaths.enabled() and boxes.device.type == "cpu":
        return fastpaths.chunked_nms(boxes, scores, groups, iou_threshold, max_kept)
    while k < len(scores):
        top = scores.topk(k).indices  # sorted by decreasing score
        keep = torchvision.ops.batched_nms(boxes[top], scores[top], groups[top], iou_threshold)
        if len(keep) >= max_kept:
            return top[keep[:max_kept]]
        k *= 4
    return torchvision.ops.batched_nms(boxes, scores, groups, iou_threshold)[:max_kept]


@torch.library.custom_op("rcnn::nms_first", mutates_args=())
def nms_first(boxes: Tensor, scores: Tensor, iou_threshold: float, max_kept: int) -> Tensor:
    """``nms(boxes, scores, iou_threshold)[:max_kept]`` as one graph operator: exported, it becomes
    ONNX's ``NonMaxSuppression`` with ``max_output_boxes_per_class = max_kept``, which stops once
    that many are kept (a plain ``nms`` exports with no bound and visits every box: 4.3 s of a 6 s
    ResNet-50-FPN image at score threshold 0 in ONNX Runtime)."""
    return torchvision.ops.nms(boxes, scores, iou_threshold)[:max_kept]


@nms_first.register_fake
def _(boxes: Tensor, scores: Tensor, iou_threshold: float, max_kept: int) -> Tensor:
    kept = torch.library.get_ctx().new_dynamic_size(min=0, max=max_kept)
    return boxes.new_empty((kept,), dtype=torch.int64)


def _batched_nms_graph(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, max_kept: int | None) -> Tensor:
    """``batched_nms`` as an exported graph computes it: one NMS with each group's boxes moved apart
    by the largest coordinate (torchvision's "coordinate trick"), no branch on the data, stopping
    at ``max_kept`` (:func:`nms_first`). Equal to the eager result up to float rounding of the moved
    coordinates, i.e. except for IoUs within about 1e-6 of the threshold."""
    largest = torch.cat((boxes.flatten(), boxes.new_zeros(1))).max()  # defined for no boxes too
    offsets = groups.to(boxes.dtype) * (largest + 1)  # [B]
    if max_kept is None:
        return torchvision.ops.nms(boxes + offsets[:, None], scores, iou_threshold)
    return nms_first(boxes + offsets[:, None], scores, iou_threshold, int(max_kept))


def nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Slow reference NMS, exactly the seed's loop; for tests."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    iou = box_iou(boxes, boxes)
    kept: list[int] = []
    for i in order:
        if all(float(iou[i, j]) <= iou_threshold for j in kept):
            kept.append(i)
    return torch.tensor(kept, dtype=torch.int64)


def to_rois(boxes: Tensor | Sequence[Tensor]) -> Tensor:
    """Boxes per image (list of ``[Ri, 4]``) -> ``[R, 5]`` RoIs ``(batch_index, x1, y1, x2, y2)``.

    A ``[R, 5]`` tensor is checked and returned as it is.
    """
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"rois must be [R, 5] (batch_index, x1, y1, x2, y2), got {list(boxes.shape)}")
        return boxes
    parts = []
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes of image {i} must be [Ri, 4], got {list(b.shape)}")
        parts.append(torch.cat((torch.full_like(b[:, :1], i), b), dim=1))
    if not parts:
        raise ValueError("to_rois: no images given")
    return torch.cat(parts, dim=0)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"output_size must be an int or (height, width), got {size}")
    return size  # type: ignore[return-value]


def _check_features(features: Tensor, rois: Tensor) -> None:
    if features.dim() != 4:
        raise ValueError(f"features must be [N, C, H, W], got {list(features.shape)}")
    if torch.compiler.is_exporting():  # the checks below read the data, which a graph cannot
        return
    if rois.numel() and not bool(torch.isfinite(rois).all()):
        raise ValueError("RoIs contain NaN or infinite coordinates")
    if rois.numel() and (int(rois[:, 0].min()) < 0 or int(rois[:, 0].max()) >= features.shape[0]):
        raise ValueError(f"RoI batch indices must lie in [0, {features.shape[0] - 1}]")


def roi_pool(
    features: Tensor, rois: Tensor | Sequence[Tensor], output_size: int | Sequence[int], spatial_scale: float
) -> Tensor:
    """RoI max pooling (Fast R-CNN §2.1): ``[N, C, H, W]`` features, R RoIs -> ``[R, C, P, Q]``.

    The RoI is projected onto the feature map and its corners *rounded* to feature cells,
    divided into a P x Q grid of sub-windows of about (h / P) x (w / Q) cells, and each
    sub-window max-pooled. That rounding is the quantisation RoIAlign removes.
    """
    rois = to_rois(rois).to(features.dtype)
    _check_features(features, rois)
    return torchvision.ops.roi_pool(features, rois, _pair(output_size), float(spatial_scale))


def roi_align(
    features: Tensor,
    rois: Tensor | Sequence[Tensor],
    output_size: int | Sequence[int],
    spatial_scale: float,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> Tensor:
    """RoIAlign (Mask R-CNN §3): ``[N, C, H, W]`` features, R RoIs -> ``[R, C, P, Q]``.

    No rounding anywhere: each of the P x Q bins is sampled by bilinear interpolation at
    ``sampling_ratio`` x ``sampling_ratio`` regularly spaced points (2 x 2 = 4 in the paper),
    which are averaged. ``sampling_ratio <= 0`` adapts the count to the bin size.
    ``aligned=True`` shifts the RoI by half a feature cell so that continuous pixel
    coordinates map exactly onto feature-cell centres (without it the sampling grid is
    misaligned by half a pixel, the legacy behaviour).

    On the CPU, with a fixed ``sampling_ratio``, the fast path computes it as one sparse matrix
    product for all channels, forward and backward (:func:`rcnn.core.fastpaths.roi_align`); both
    give the same values up to float rounding (tested).
    """
    rois = to_rois(rois).to(features.dtype)
    _check_features(features, rois)
    args = (_pair(output_size), float(spatial_scale), int(sampling_ratio), bool(aligned))
    if fastpaths.roi_align_applies(features, args[2]):
        return fastpaths.roi_align(features, rois, *args)
    return torchvision.ops.roi_align(features, rois, *args)


def roi_pool_bins(
    roi: Sequence[float], output_size: int | Sequence[int], spatial_scale: float, feature_size: Sequence[int]
) -> Tensor:
    """The feature cells each output bin of RoI pooling max-pools, with the kernel's exact rounding.

    ``roi`` is ``(x1, y1, x2, y2)`` in input pixels, ``feature_size`` the map's ``(H, W)``. Returns
    int64 ``[P, Q, 4]``: per bin the half-open cell ranges ``(h_start, h_end, w_start, w_end)``
    (an empty range pools nothing and gives 0). The corners are rounded to cells first: the
    quantisation that RoIAlign removes.
    """
    out_h, out_w = _pair(output_size)
    height, width = int(feature_size[0]), int(feature_size[1])

    def round_half_away(v: float) -> int:  # C++ std::round
        return int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))

    x1, y1, x2, y2 = (round_half_away(float(v) * spatial_scale) for v in roi)
    roi_w = max(x2 - x1 + 1, 1)  # the kernel's legacy "+1" width, kept to match it
    roi_h = max(y2 - y1 + 1, 1)
    bin_w, bin_h = roi_w / out_w, roi_h / out_h
    bins = torch.zeros((out_h, out_w, 4), dtype=torch.int64)
    for ph in range(out_h):
        hs = min(max(math.floor(ph * bin_h) + y1, 0), height)
        he = min(max(math.ceil((ph + 1) * bin_h) + y1, 0), height)
        for pw in range(out_w):
            ws = min(max(math.floor(pw * bin_w) + x1, 0), width)
            we = min(max(math.ceil((pw + 1) * bin_w) + x1, 0), width)
            bins[ph, pw] = torch.tensor((hs, he, ws, we))
    return bins


def roi_pool_reference(features: Tensor, rois: Tensor, output_size: int | Sequence[int], spatial_scale: float) -> Tensor:
    """Slow reference RoI max pooling with the kernel's exact rounding rules (:func:`roi_pool_bins`); for tests."""
    out_h, out_w = _pair(output_size)
    num_rois, channels = rois.shape[0], features.shape[1]
    out = features.new_zeros((num_rois, channels, out_h, out_w))
    for r in range(num_rois):
        b = int(rois[r, 0])
        bins = roi_pool_bins(rois[r, 1:].tolist(), (out_h, out_w), spatial_scale, features.shape[-2:])
        for ph in range(out_h):
            for pw in range(out_w):
                hs, he, ws, we = bins[ph, pw].tolist()
                if he > hs and we > ws:
                    out[r, :, ph, pw] = features[b, :, hs:he, ws:we].amax(dim=(-2, -1))
    return out


def _bilinear(feature: Tensor, y: float, x: float) -> Tensor:
    """Bilinear interpolation of ``feature [C, H, W]`` at (y, x), zero outside [-1, H] x [-1, W]."""
    height, width = feature.shape[-2:]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return feature.new_zeros(feature.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * feature[:, y0, x0]
        + hy * lx * feature[:, y0, x1]
        + ly * hx * feature[:, y1, x0]
        + ly * lx * feature[:, y1, x1]
    )


def roi_align_points(
    roi: Sequence[float],
    output_size: int | Sequence[int],
    spatial_scale: float,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> Tensor:
    """Where RoIAlign samples: ``[P, Q, S, 2]`` points ``(y, x)`` in feature-map coordinates (the
    centre of cell ``(i, j)`` is ``(i, j)``), ``S`` = samples per bin; each bin averages the
    bilinear values at its points. No rounding anywhere. ``roi`` is ``(x1, y1, x2, y2)`` in input pixels."""
    out_h, out_w = _pair(output_size)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (float(v) * spatial_scale - offset for v in roi)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # legacy: force malformed RoIs to be at least 1x1
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_w, bin_h = roi_w / out_w, roi_h / out_h
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
    points = torch.zeros((out_h, out_w, grid_h * grid_w, 2), dtype=torch.float64)
    for ph in range(out_h):
        for pw in range(out_w):
            for iy in range(grid_h):
                y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    points[ph, pw, iy * grid_w + ix] = torch.tensor((y, x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w))
    return points


def roi_align_reference(
    features: Tensor,
    rois: Tensor,
    output_size: int | Sequence[int],
    spatial_scale: float,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> Tensor:
    """Slow reference RoIAlign: bilinear samples (:func:`roi_align_points`) averaged per bin, as the
    paper describes; for tests."""
    out_h, out_w = _pair(output_size)
    num_rois, channels = rois.shape[0], features.shape[1]
    out = features.new_zeros((num_rois, channels, out_h, out_w))
    for r in range(num_rois):
        b = int(rois[r, 0])
        points = roi_align_points(rois[r, 1:].tolist(), (out_h, out_w), spatial_scale, sampling_ratio, aligned)
        count = max(points.shape[2], 1)
        for ph in range(out_h):
            for pw in range(out_w):
                acc = features.new_zeros(channels)
                for y, x in points[ph, pw].tolist():
                    acc += _bilinear(features[b], y, x)
                out[r, :, ph, pw] = acc / count
    return out


def assign_fpn_levels(
    boxes: Tensor, min_level: int, max_level: int, canonical_size: float = 224.0, canonical_level: int = 4
) -> Tensor:
    """FPN level of each RoI ``[R, 4] -> [R]`` int64 (FPN eq. 1, used by Mask R-CNN with FPN).

    ``k = floor(k0 + log2(sqrt(w h) / 224))`` with ``k0 = 4``, clamped to
    ``[min_level, max_level]``: a 224 x 224 RoI (an ImageNet-sized object) is pooled from P4,
    one half that size from P3, and so on.
    """
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    scale = torch.sqrt(widths * heights)
    # the small epsilon keeps boxes of exactly 224 * 2^j on level 4 + j despite rounding
    levels = torch.floor(canonical_level + torch.log2(scale / canonical_size + 1e-6))
    return levels.clamp(min=min_level, max=max_level).to(torch.int64)


class RoIPooler(nn.Module):
    """Pool RoIs from one feature map, or from the right level of a feature pyramid.

    Args:
        output_size: P (or (P, Q)): 7 for the box head, 14 for the mask head.
        strides: the stride of each feature level given to ``forward`` (e.g. ``(16,)`` for
            VGG16's conv5_3, ``(4, 8, 16, 32)`` for P2-P5 of an FPN).
        kind: ``"align"`` (RoIAlign, Mask R-CNN) or ``"pool"`` (RoI max pooling, Fast R-CNN).
        sampling_ratio, aligned: RoIAlign's settings (ignored by ``"pool"``).
        canonical_size, canonical_level: the FPN level-assignment rule (``assign_fpn_levels``).
    """

    def __init__(
        self,
        output_size: int | Sequence[int],
        strides: Sequence[float],
        kind: str = "align",
        sampling_ratio: int = 2,
        aligned: bool = True,
        canonical_size: float = 224.0,
        canonical_level: int = 4,
    ) -> None:
        super().__init__()
        if kind not in ("align", "pool"):
            raise ValueError(f"RoIPooler kind must be 'align' or 'pool', got {kind!r}")
        if len(strides) == 0:
            raise ValueError("RoIPooler needs at least one feature stride")
        levels = [math.log2(s) for s in strides]
        if len(strides) > 1 and any(abs(b - a - 1) > 1e-6 for a, b in zip(levels, levels[1:])):
            raise ValueError(f"RoIPooler: pyramid strides must double from level to level, got {tuple(strides)}")
        self.output_size = _pair(output_size)
        self.strides = tuple(float(s) for s in strides)
        self.kind = kind
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.canonical_size = float(canonical_size)
        self.canonical_level = int(canonical_level)
        self.min_level = round(levels[0])
        self.max_level = round(levels[-1])

    def _pool(self, features: Tensor, rois: Tensor, stride: float) -> Tensor:
        if self.kind == "pool":
            return roi_pool(features, rois, self.output_size, 1.0 / stride)
        return roi_align(features, rois, self.output_size, 1.0 / stride, self.sampling_ratio, self.aligned)

    def forward(self, features: Sequence[Tensor], boxes: Tensor | Sequence[Tensor]) -> Tensor:
        """``features``: one ``[N, C, Hi, Wi]`` map per stride; ``boxes``: RoIs -> ``[R, C, P, Q]``."""
        if len(features) != len(self.strides):
            raise ValueError(f"RoIPooler has {len(self.strides)} strides but got {len(features)} feature maps")
        rois = to_rois(boxes).to(features[0].dtype)
        if len(features) == 1:
            return self._pool(features[0], rois, self.strides[0])
        levels = assign_fpn_levels(
            rois[:, 1:], self.min_level, self.max_level, self.canonical_size, self.canonical_level
        ) - self.min_level  # [R], index into features
        order, pooled = [], []
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            idx = (levels == level).nonzero().flatten()  # may be empty: pooling no RoI is cheap
            order.append(idx)
            pooled.append(self._pool(feature, rois[idx], stride).to(features[0].dtype))
        # level by level, then back to the RoIs' order: one copy and one gather (not a zero-filled
        # [R, C, P, Q] written once per level)
        out = torch.cat(pooled).index_select(0, torch.argsort(torch.cat(order)))
        torch._check(out.shape[0] == rois.shape[0])  # every RoI has one level (for torch.export's shapes)
        return out
