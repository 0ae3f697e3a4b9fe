"""The library's one entry point for NMS, RoI pooling and RoIAlign.

The fast versions call the ``torchvision.ops`` kernels (C++ on the CPU, CUDA on a GPU). Each has a
slow, loop-based pure-PyTorch reference version beside it (``*_reference``), written from the
papers' descriptions; the tests check that the two agree, so the kernels' semantics are pinned
down here rather than taken on trust.

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
import warnings
from collections.abc import Sequence

import torch
import torchvision.ops
from torch import Tensor, nn

from rcnn.boxes import box_iou

__all__ = [
    "RoIPooler",
    "assign_fpn_levels",
    "batched_nms",
    "nms",
    "nms_reference",
    "roi_align",
    "roi_align_grad",
    "roi_align_reference",
    "roi_pool",
    "roi_pool_reference",
    "to_rois",
]


def _check_nms_inputs(boxes: Tensor, scores: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"nms: boxes must be [B, 4], got {list(boxes.shape)}")
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
    training: 2000 boxes, 512 kept), the boxes are taken on the CPU in chunks instead (see
    :func:`_chunked_nms`), so NMS stops where ``max_kept`` are kept. (Equal scores at a cut may be
    ordered differently from a full run, as NMS orders ties arbitrarily anyway.)
    """
    _check_nms_inputs(boxes, scores)
    if groups.shape != scores.shape:
        raise ValueError(f"batched_nms: groups must be [B] = [{scores.shape[0]}], got {list(groups.shape)}")
    if boxes.numel() == 0 or (max_kept is not None and max_kept <= 0):
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    iou_threshold = float(iou_threshold)
    if max_kept is None:
        return torchvision.ops.batched_nms(boxes, scores, groups, iou_threshold)
    k = 4 * max_kept
    if k >= len(scores) and boxes.device.type == "cpu":
        return _chunked_nms(boxes, scores, groups, iou_threshold, max_kept)
    while k < len(scores):
        top = scores.topk(k).indices  # sorted by decreasing score
        keep = torchvision.ops.batched_nms(boxes[top], scores[top], groups[top], iou_threshold)
        if len(keep) >= max_kept:
            return top[keep[:max_kept]]
        k *= 4
    return torchvision.ops.batched_nms(boxes, scores, groups, iou_threshold)[:max_kept]


def _chunked_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, max_kept: int) -> Tensor:
    """``batched_nms(boxes, scores, groups, iou_threshold)[:max_kept]``, boxes taken in score order in chunks.

    The first chunk (the best ``1.5 * max_kept``) goes through NMS as it is. A later chunk's boxes
    are first dropped where they overlap (IoU above the threshold, same group) a box kept so far,
    all pairs at once; NMS among the survivors then gives exactly the chunk's kept boxes, since a
    box suppressed earlier suppresses nothing. Chunks of ``max_kept / 2`` follow until
    ``max_kept`` are kept. torchvision's CPU kernel compares each kept box with every later box,
    so stopping early saves most of the work when about half the boxes survive: the RPN's 2000
    training proposals, 512 kept, take 3.6 instead of 11.3 ms per image (late in training on the
    shapes data, 2 threads).
    """
    n = len(scores)
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes, scores, groups = boxes[order], scores[order], groups[order]  # from here on, in score order
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    threshold = _float_threshold(iou_threshold, boxes.dtype)
    end = min(n, (3 * max_kept + 1) // 2)
    kept = torchvision.ops.batched_nms(boxes[:end], scores[:end], groups[:end], iou_threshold).sort().values
    parts, count = [kept], len(kept)
    while count < max_kept and end < n:
        start, end = end, min(n, end + max(max_kept // 2, 1))
        kept = torch.cat(parts)
        a, b = boxes[start:end], boxes[kept]  # [c, 4] candidates, [k, 4] kept so far
        w = (torch.min(a[:, None, 2], b[None, :, 2]) - torch.max(a[:, None, 0], b[None, :, 0])).clamp(min=0)
        h = (torch.min(a[:, None, 3], b[None, :, 3]) - torch.max(a[:, None, 1], b[None, :, 1])).clamp(min=0)
        # [c, k]; IoU as torchvision's kernel computes it (raw areas, no guard for degenerate boxes),
        # not rcnn.boxes.box_iou, so that the result is the kernel's also for such boxes
        inter = w * h
        overlap = inter / (area[start:end, None] + area[None, kept] - inter) > threshold
        overlap &= groups[start:end, None] == groups[None, kept]
        alive = torch.arange(start, end, device=boxes.device)[~overlap.any(dim=1)]
        if len(alive):
            chosen = alive[torchvision.ops.batched_nms(boxes[alive], scores[alive], groups[alive], iou_threshold).sort().values]
            parts.append(chosen)
            count += len(chosen)
    return order[torch.cat(parts)[:max_kept]]


def _float_threshold(threshold: float, dtype: torch.dtype) -> float | Tensor:
    """A threshold ``t`` for ``iou > t`` in ``dtype`` that agrees with torchvision's comparison in double.

    A float32 tensor is compared with a Python float rounded to float32; where that rounding goes
    up, ``iou > float32(t)`` would miss an IoU equal to ``float32(t)`` that exceeds ``t``. The largest
    float32 not above ``t`` gives the same answers as comparing in double.
    """
    if dtype == torch.float64:
        return threshold
    t = torch.tensor(threshold, dtype=dtype)
    if float(t) > threshold:
        t = torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype))
    return t


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

    On the CPU, with a fixed ``sampling_ratio`` and float32/64 features, RoIAlign is computed as
    one sparse matrix product for all channels, forward and backward (:func:`roi_align_grad`);
    elsewhere by torchvision's kernel. Both give the same values up to float rounding (tested).
    """
    rois = to_rois(rois).to(features.dtype)
    _check_features(features, rois)
    args = (_pair(output_size), float(spatial_scale), int(sampling_ratio), bool(aligned))
    if (
        features.device.type == "cpu"
        and args[2] > 0
        and features.dtype in (torch.float32, torch.float64)
        and features.numel() > 0
    ):
        return _RoIAlignCPU.apply(features, rois, *args)
    return torchvision.ops.roi_align(features, rois, *args)


class _RoIAlignCPU(torch.autograd.Function):
    """RoIAlign on the CPU as a sparse linear map over all channels, forward and backward.

    RoIAlign is linear in the features: every output cell is a fixed weighted sum of feature cells
    (``sampling_ratio`` squared bilinear samples of 4 taps each, averaged). The forward builds that
    map once (:func:`_roi_align_taps`) as a sparse ``[R*P*Q, N*H*W]`` matrix and applies it to the
    channels-last features, one multi-threaded sparse x dense product; the backward applies its
    transpose to the output gradient from the same taps. torchvision's CPU kernels instead walk the
    samples RoI by RoI and channel by channel on one thread.
    """

    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio, aligned):  # type: ignore[override]
        num_images, channels, height, width = features.shape
        (out_h, out_w), num_rois = output_size, rois.shape[0]
        cell, weight = _roi_align_taps(rois, features.shape, output_size, spatial_scale, sampling_ratio, aligned)
        ctx.save_for_backward(cell, weight)
        ctx.settings = (tuple(features.shape), output_size)
        if num_rois == 0:
            return features.new_zeros((0, channels, out_h, out_w))
        taps = cell.numel() // (num_rois * out_h * out_w)
        index = _index_dtype(cell.numel(), num_images * height * width)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            matrix = torch.sparse_csr_tensor(
                torch.arange(0, cell.numel() + 1, taps, device=cell.device, dtype=index), cell.to(index), weight,
                (num_rois * out_h * out_w, num_images * height * width), check_invariants=False,
            )  # fmt: skip
            out = matrix @ features.permute(0, 2, 3, 1).reshape(-1, channels)  # [R*P*Q, C]
        return out.reshape(num_rois, out_h, out_w, channels).permute(0, 3, 1, 2).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        cell, weight = ctx.saved_tensors
        shape, _ = ctx.settings
        return _roi_align_transpose(grad, cell, weight, shape), None, None, None, None, None


def _index_dtype(nnz: int, columns: int) -> torch.dtype:
    """int32 indices for a sparse matrix when they fit (MKL's native width: faster), else int64."""
    return torch.int32 if max(nnz, columns) < 2**31 - 1 else torch.int64


def _bilinear_taps(coords: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """The two cells and weights of 1-D bilinear interpolation at ``coords [..., S]`` on ``size`` cells,
    with RoIAlign's border rules (zero beyond -1 and ``size``, clamped to the edge cells within):
    ``[..., S, 2]`` int64 cell indices and ``[..., S, 2]`` weights."""
    inside = ((coords >= -1.0) & (coords <= size)).to(coords.dtype)
    c = coords.clamp(min=0.0)
    low = c.floor().long()
    edge = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(edge, low, low + 1)
    frac = torch.where(edge, torch.zeros_like(c), c - low.to(c.dtype))
    return torch.stack((low, high), -1), torch.stack(((1.0 - frac) * inside, frac * inside), -1)


def _roi_align_taps(
    rois: Tensor,
    feature_shape: Sequence[int],
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[Tensor, Tensor]:
    """RoIAlign as a weighted sum of feature cells: ``cell`` and ``weight``, both ``[R*P*Q*T]``.

    Output cell ``(r, p, q)`` is ``sum_t weight[i] * features_flat[cell[i]]`` over its T = (2s)^2
    taps ``i = ((r*P + p)*Q + q)*T + t`` (s x s samples, separable bilinear: 2 x 2 cells each,
    weights divided by s^2 for the average); ``cell`` indexes the N*H*W feature cells (int64),
    ``features_flat`` being the features in channels-last order. Needs ``sampling_ratio > 0``.
    """
    num_images, _, height, width = (int(v) for v in feature_shape)
    out_h, out_w = output_size
    num_rois = rois.shape[0]
    s = int(sampling_ratio)
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x1
    roi_h = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:  # legacy: malformed RoIs forced to at least 1 x 1, as torchvision's kernel does
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    # sample positions in bin units: (i + 0.5) / s for i < P * s; [R, P*s] and [R, Q*s]
    steps_y = (torch.arange(out_h * s, device=rois.device, dtype=rois.dtype) + 0.5) / s
    steps_x = (torch.arange(out_w * s, device=rois.device, dtype=rois.dtype) + 0.5) / s
    rows, row_w = _bilinear_taps(y1[:, None] + steps_y * (roi_h / out_h)[:, None], height)  # [R, P*s, 2]
    cols, col_w = _bilinear_taps(x1[:, None] + steps_x * (roi_w / out_w)[:, None], width)  # [R, Q*s, 2]
    taps = 2 * s  # per bin and axis: s samples x 2 cells
    rows, row_w = rows.reshape(num_rois, out_h, 1, taps, 1), row_w.reshape(num_rois, out_h, 1, taps, 1) / s
    cols, col_w = cols.reshape(num_rois, 1, out_w, 1, taps), col_w.reshape(num_rois, 1, out_w, 1, taps) / s
    image = rois[:, 0].long().reshape(num_rois, 1, 1, 1, 1)
    cell = ((image * height + rows) * width + cols).reshape(-1)  # [R*P*Q*T]
    return cell, (row_w * col_w).reshape(-1)


def _roi_align_transpose(grad: Tensor, cell: Tensor, weight: Tensor, feature_shape: Sequence[int]) -> Tensor:
    """The transpose of the map given by :func:`_roi_align_taps`, applied to ``grad [R, C, P, Q]``:
    the gradient ``[N, C, H, W]`` with respect to the features."""
    num_images, channels, height, width = (int(v) for v in feature_shape)
    num_rois, _, out_h, out_w = grad.shape
    if num_rois == 0:
        return grad.new_zeros((num_images, channels, height, width))
    taps = cell.numel() // (num_rois * out_h * out_w)
    index = _index_dtype(cell.numel(), num_rois * out_h * out_w)
    # CSR over feature cells: sort the taps by cell; column = the output cell (r, p, q) of each tap
    sorted_cell, order = torch.sort(cell)
    counts = torch.bincount(sorted_cell, minlength=num_images * height * width)
    crow = torch.cat((counts.new_zeros(1), counts.cumsum(0))).to(index)
    grad_cells = grad.permute(0, 2, 3, 1).reshape(num_rois * out_h * out_w, channels)  # [R*P*Q, C]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        matrix = torch.sparse_csr_tensor(
            crow, torch.div(order, taps, rounding_mode="floor").to(index), weight[order],
            (num_images * height * width, num_rois * out_h * out_w), check_invariants=False,
        )  # fmt: skip
        out = matrix @ grad_cells  # [N*H*W, C]
    return out.reshape(num_images, height, width, channels).permute(0, 3, 1, 2)


def roi_align_grad(
    grad: Tensor,
    rois: Tensor,
    feature_shape: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = True,
) -> Tensor:
    """Gradient of :func:`roi_align` with respect to its ``[N, C, H, W]`` features, given ``grad [R, C, P, Q]``.

    RoIAlign is linear in the features, so the gradient is the transpose of its map applied to
    ``grad``: one sparse x dense product for all channels (rows: feature cells, columns: output
    cells), where torchvision's CPU backward walks the samples RoI by RoI and channel by channel on
    one thread. Same values up to float rounding (tests compare with torchvision's backward). Needs
    ``sampling_ratio > 0``. (Training computes this from the taps its forward built.)
    """
    if sampling_ratio <= 0:
        raise ValueError(f"roi_align_grad needs a fixed sampling_ratio > 0, got {sampling_ratio}")
    rois = rois.to(grad.dtype)
    cell, weight = _roi_align_taps(rois, feature_shape, tuple(grad.shape[-2:]), spatial_scale, sampling_ratio, aligned)
    return _roi_align_transpose(grad, cell, weight, feature_shape)


def roi_pool_reference(features: Tensor, rois: Tensor, output_size: int | Sequence[int], spatial_scale: float) -> Tensor:
    """Slow reference RoI max pooling with the kernel's exact rounding rules; for tests."""
    out_h, out_w = _pair(output_size)
    num_rois, channels = rois.shape[0], features.shape[1]
    height, width = features.shape[-2:]
    out = features.new_zeros((num_rois, channels, out_h, out_w))

    def round_half_away(v: float) -> int:  # C++ std::round
        return int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))

    for r in range(num_rois):
        b = int(rois[r, 0])
        x1, y1, x2, y2 = (round_half_away(float(v) * spatial_scale) for v in rois[r, 1:])
        roi_w = max(x2 - x1 + 1, 1)  # the kernel's legacy "+1" width, kept to match it
        roi_h = max(y2 - y1 + 1, 1)
        bin_w, bin_h = roi_w / out_w, roi_h / out_h
        for ph in range(out_h):
            hs = min(max(math.floor(ph * bin_h) + y1, 0), height)
            he = min(max(math.ceil((ph + 1) * bin_h) + y1, 0), height)
            for pw in range(out_w):
                ws = min(max(math.floor(pw * bin_w) + x1, 0), width)
                we = min(max(math.ceil((pw + 1) * bin_w) + x1, 0), width)
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


def roi_align_reference(
    features: Tensor,
    rois: Tensor,
    output_size: int | Sequence[int],
    spatial_scale: float,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> Tensor:
    """Slow reference RoIAlign: bilinear samples averaged per bin, as the paper describes; for tests."""
    out_h, out_w = _pair(output_size)
    num_rois, channels = rois.shape[0], features.shape[1]
    out = features.new_zeros((num_rois, channels, out_h, out_w))
    offset = 0.5 if aligned else 0.0
    for r in range(num_rois):
        b = int(rois[r, 0])
        x1, y1, x2, y2 = (float(v) * spatial_scale - offset for v in rois[r, 1:])
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:  # legacy: force malformed RoIs to be at least 1x1
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_w, bin_h = roi_w / out_w, roi_h / out_h
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
        count = max(grid_h * grid_w, 1)
        for ph in range(out_h):
            for pw in range(out_w):
                acc = features.new_zeros(channels)
                for iy in range(grid_h):
                    y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
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
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            idx = (levels == level).nonzero().flatten()
            if idx.numel():
                out[idx] = self._pool(feature, rois[idx], stride).to(out.dtype)
        return out
