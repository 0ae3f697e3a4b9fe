"""The CPU fast paths: same results as the plain path of :mod:`rcnn.core.ops`, less time on a CPU.

Each was measured to pay on 2 CPU cores (figures in docs/architecture.md) and each is tested
equal to the plain path (``tests/test_ops.py``, ``tests/test_masks.py``). They are behind one
switch, on by default; the plain path is what the rest of the library's structure shows:

    import rcnn.core.fastpaths as fastpaths
    fastpaths.set_enabled(False)            # plain torchvision kernels and nn layers everywhere
    with fastpaths.enabled_as(False): ...   # for a block only
    RCNN_FAST_PATHS=0 rcnn predict ...      # from the environment, at import

What they replace, and when they apply (otherwise the plain path runs):

- :func:`roi_align` — RoIAlign as one sparse matrix product over all channels, forward and
  backward, where torchvision's CPU kernels walk RoIs and channels on one thread. CPU tensors,
  float32/64, a fixed ``sampling_ratio > 0``.
- :func:`chunked_nms` — per-group NMS that stops once ``max_kept`` boxes are kept, when that is a
  large part of all boxes (the RPN in training: 2000 proposals, 512 kept). CPU tensors.
- :func:`mask_predictor_logits` — Mask R-CNN's 2x2 stride-2 deconvolution, ReLU and 1x1 mask
  logits as two plain matrix products over pixels. CPU tensors; only for the library's own
  :class:`rcnn.components.mask_heads.MaskPredictor` layers with no forward hooks, so hooks and
  swapped-in layers keep working.

Shape shorthand:
    N: images;  C: channels;  H, W: feature-map size;  R: RoIs;  P x Q: pooled size
    B: boxes given to NMS;  K: foreground classes
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
import torchvision.ops
from torch import Tensor, nn

__all__ = [
    "chunked_nms",
    "enabled",
    "enabled_as",
    "float_threshold",
    "mask_predictor_applies",
    "mask_predictor_logits",
    "roi_align",
    "roi_align_applies",
    "roi_align_grad",
    "set_enabled",
]

_enabled = os.environ.get("RCNN_FAST_PATHS", "1").strip().lower() not in ("0", "false", "off", "no")


def enabled() -> bool:
    """Whether the fast paths are on (the default; ``RCNN_FAST_PATHS=0`` turns them off at import).
    Never while a model is exported: the plain path is what ONNX expresses."""
    return _enabled and not torch.compiler.is_exporting()


def set_enabled(flag: bool) -> None:
    """Turn the fast paths on or off for the whole process."""
    global _enabled
    _enabled = bool(flag)


@contextlib.contextmanager
def enabled_as(flag: bool) -> Iterator[None]:
    """Run a block with the fast paths on (``True``) or off (``False``), then restore the setting."""
    before = _enabled
    set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(before)


# -- NMS -------------------------------------------------------------------------------------


def chunked_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, max_kept: int) -> Tensor:
    """``batched_nms(boxes, scores, groups, iou_threshold)[:max_kept]``, boxes taken in score order in chunks (CPU).

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
    threshold = float_threshold(iou_threshold, boxes.dtype)
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
        # not rcnn.core.boxes.box_iou, so that the result is the kernel's also for such boxes
        inter = w * h
        overlap = inter / (area[start:end, None] + area[None, kept] - inter) > threshold
        overlap &= groups[start:end, None] == groups[None, kept]
        alive = torch.arange(start, end, device=boxes.device)[~overlap.any(dim=1)]
        if len(alive):
            chosen = alive[torchvision.ops.batched_nms(boxes[alive], scores[alive], groups[alive], iou_threshold).sort().values]
            parts.append(chosen)
            count += len(chosen)
    return order[torch.cat(parts)[:max_kept]]


def float_threshold(threshold: float, dtype: torch.dtype) -> float | Tensor:
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


# -- RoIAlign ----------------------------------------------------------------------------------


def roi_align_applies(features: Tensor, sampling_ratio: int) -> bool:
    """Whether :func:`roi_align` replaces torchvision's kernel for these inputs."""
    return (
        enabled()
        and features.device.type == "cpu"
        and sampling_ratio > 0
        and features.dtype in (torch.float32, torch.float64)
        and features.numel() > 0
    )


def roi_align(
    features: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool
) -> Tensor:
    """``torchvision.ops.roi_align(features [N, C, H, W], rois [R, 5], ...)`` -> ``[R, C, P, Q]``, as a
    sparse linear map with its own backward (see :class:`_SparseRoIAlign`)."""
    return _SparseRoIAlign.apply(features, rois, output_size, spatial_scale, sampling_ratio, aligned)


class _SparseRoIAlign(torch.autograd.Function):
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


# -- Mask R-CNN's mask predictor ---------------------------------------------------------------


def mask_predictor_applies(x: Tensor, deconv: nn.Module, logits: nn.Module) -> bool:
    """Whether :func:`mask_predictor_logits` may stand in for ``logits(relu(deconv(x)))``."""
    return (
        enabled()
        and x.device.type == "cpu"
        and type(deconv) is nn.ConvTranspose2d
        and type(logits) is nn.Conv2d
        and deconv.kernel_size == (2, 2) and deconv.stride == (2, 2) and deconv.padding == (0, 0)
        and deconv.output_padding == (0, 0) and deconv.groups == 1 and deconv.dilation == (1, 1)
        and deconv.bias is not None
        and logits.kernel_size == (1, 1) and logits.stride == (1, 1) and logits.groups == 1
        and not (deconv._forward_hooks or deconv._forward_pre_hooks or logits._forward_hooks or logits._forward_pre_hooks)
    )  # fmt: skip


def mask_predictor_logits(x: Tensor, deconv: nn.ConvTranspose2d, logits: nn.Conv2d) -> Tensor:
    """``logits(relu(deconv(x)))`` for ``x [R, C, P, P]`` -> ``[R, K, 2P, 2P]``, as matrix products.

    The 2x2 stride-2 deconvolution and the 1x1 convolution each map one input pixel to output
    pixels of their own, so both are plain matrix products over all pixels (the deconvolution's
    four outputs per pixel as 4 x channels columns), with the same weights and results. On a CPU
    this is several times faster, backward included, than the convolution kernels on 14 x 14 and
    28 x 28 maps (mask head forward + backward, 64 RoIs: 133 -> 91 ms).
    """
    rois, width, height = x.shape[0], x.shape[-1], x.shape[-2]
    channels = deconv.out_channels
    pixels = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # [R*P*P, C]
    # deconv weight [C, channels, 2, 2] -> [C, (dy, dx, channels)]; its bias repeats per (dy, dx)
    w = deconv.weight.permute(0, 2, 3, 1).reshape(x.shape[1], 4 * channels)
    y = torch.addmm(deconv.bias.repeat(4), pixels, w)  # [R*P*P, 4*channels]
    y = torch.relu(y).view(-1, channels)  # [R*P*P*4, channels]
    out = F.linear(y, logits.weight.flatten(1), logits.bias)  # [R*P*P*4, K]
    k = out.shape[1]
    out = out.view(rois, height, width, 2, 2, k).permute(0, 5, 1, 3, 2, 4)  # [R, K, P, 2, P, 2]
    return out.reshape(rois, k, 2 * height, 2 * width)
