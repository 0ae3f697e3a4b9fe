"""Fast R-CNN (Girshick, 2015): one conv pass per image, RoI pooling, and a jointly trained head.

    image -> backbone (conv layers) -> feature map --+
    proposals (selective search, from a file) -------+-> RoI pooling 7x7 -> fc6 -> fc7 -> cls (K+1) / bbox (4K)

Compared with R-CNN (``rcnn.models.rcnn``), the CNN runs once on the whole image instead of
once per warped region, the last max pool becomes RoI max pooling (§2.1), and the SVMs and ridge
regressors become two sibling layers trained with the CNN under one multi-task loss (smooth L1
with the ``[u >= 1]`` indicator, §2.3). The proposals still come from outside the network: a
proposals file (docs/proposals.md), given to ``model(images, targets, proposals=...)``.

Everything after the proposals is :class:`rcnn.components.roi_heads.RoIHeads` — Faster R-CNN later swaps only
the proposal source. Hierarchical sampling (§2.3: N = 2 images x R/N = 64 RoIs, 25 % foreground)
is the training loop's ``batch_size: 2`` with the heads' ``batch_size_per_image: 64``.

Truncated SVD (§3.1): at test time the fc layers dominate the cost when there are many RoIs, so
each ``u x v`` weight matrix ``W ≈ U_t Σ_t V_tᵀ`` is replaced by two layers, ``Σ_t V_tᵀ``
(``t x v``, no bias) then ``U_t`` (``u x t``, the original bias): ``t (u + v)`` parameters
instead of ``u v``. The paper keeps the top 1024 singular values of fc6 and 256 of fc7.

Shape shorthand:
    u, v: output and input features of a fully connected layer;  t: kept singular values
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rcnn.components.backbones import feature_strides
from rcnn.components.roi_heads import RoIHeads
from rcnn.components.transform import DetectionTransform
from rcnn.models.base import BoxBranch, DetectorOptions, TwoStageDetector, box_branch, detector_options, refuse_unused

__all__ = ["FastRCNN", "FastRCNNOptions", "compress_box_head", "fast_rcnn", "truncated_svd"]


def truncated_svd(linear: nn.Linear, rank: int) -> nn.Sequential:
    """``linear`` (weight ``[u, v]``) as two layers through ``rank`` (t) singular values (§3.1).

    The first layer has weight ``Σ_t V_tᵀ [t, v]`` and no bias, the second ``U_t [u, t]`` and the
    original bias. At ``rank = min(u, v)`` the product is ``W`` itself (up to rounding).
    """
    out_features, in_features = linear.weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(
            f"truncated SVD rank must lie in 1..{min(out_features, in_features)} for a "
            f"{in_features} -> {out_features} layer, got {rank}"
        )
    weight = linear.weight.detach().double()  # [u, v]
    if out_features >= in_features:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # [u, m], [m], [m, v]
    else:  # LAPACK is much faster on the tall orientation: W^T = V Σ U^T
        v, s, uh = torch.linalg.svd(weight.T, full_matrices=False)  # [v, m], [m], [m, u]
        u, vh = uh.T, v.T
    first = nn.Linear(in_features, rank, bias=False)
    second = nn.Linear(rank, out_features, bias=linear.bias is not None)
    dtype, device = linear.weight.dtype, linear.weight.device
    with torch.no_grad():
        first.weight.copy_((s[:rank, None] * vh[:rank]).to(dtype))  # [t, v]
        second.weight.copy_(u[:, :rank].to(dtype))  # [u, t]
        if linear.bias is not None:
            second.bias.copy_(linear.bias.detach())
    return nn.Sequential(first, second).to(device)


def compress_box_head(box_head: nn.Module, ranks: Sequence[int | None]) -> list[dict[str, Any]]:
    """Replace the box head's fully connected layers, in order (fc6, fc7), by truncated SVDs.

    ``ranks[i]`` is the number of singular values kept for the i-th ``nn.Linear`` of the head
    (``None``: leave it). Works for any head made of ``nn.Linear`` layers: VGG16's and AlexNet's
    fc6/fc7 (:class:`rcnn.components.backbones.ClassifierHead`) and the 2-fc MLP head. Returns one report
    per replaced layer: name, rank, parameters before and after, and the fraction of the squared
    singular values (the Frobenius energy of the weight) kept.
    """
    linears = [(name, module) for name, module in box_head.named_modules() if isinstance(module, nn.Linear)]
    if len(linears) < len(ranks):
        raise ValueError(
            f"the box head has {len(linears)} fully connected layer(s), not the {len(ranks)} to compress "
            "(a convolutional head such as ResNet's res5 has no fc6/fc7)"
        )
    reports = []
    for (name, linear), rank in zip(linears, ranks):
        if rank is None:
            continue
        factored = truncated_svd(linear, int(rank))
        # ||Σ_t V_tᵀ||² is the sum of the kept squared singular values, ||W||² the sum of all
        kept = factored[0].weight.detach().double().square().sum()
        total = linear.weight.detach().double().square().sum().clamp(min=1e-30)
        parent_name, _, attr = name.rpartition(".")
        setattr(box_head.get_submodule(parent_name) if parent_name else box_head, attr, factored)
        reports.append(
            {
                "layer": name,
                "rank": int(rank),
                "params_before": sum(p.numel() for p in linear.parameters()),
                "params_after": sum(p.numel() for p in factored.parameters()),
                "energy_kept": float(kept / total),
            }
        )
    return reports


class FastRCNNOptions(DetectorOptions):
    """Fast R-CNN's options: those of every two-stage detector (:class:`rcnn.models.base.DetectorOptions`)."""


class FastRCNN(TwoStageDetector):
    """Fast R-CNN: backbone + RoI heads on external proposals (no RPN).

    Args:
        backbone: any ``nn.Module`` with ``out_channels`` (a named architecture's from
            :func:`fast_rcnn`); single-level backbones pool with RoI max pooling by default.
        num_classes: K + 1 (background included); not needed when ``roi_heads`` is given.
        box_head: the per-RoI head (fc6/fc7 of VGG16 for the paper); default 2 fc layers of 1024.
        roi_heads: built RoI heads, instead of those made from ``box_head`` and the options.
        transform: a built :class:`rcnn.components.transform.DetectionTransform`.
        **options: :class:`FastRCNNOptions` — ``min_size``, ``max_size`` (600 / 1000, §2.3; a list of
            ``min_size`` draws one per image in training, multi-scale §5.2), ``pooler`` (``"pool"``,
            §2.1, or ``"align"``), ``sampling_ratio``, ``aligned``, and ``roi`` (RoI-head settings:
            default the paper's 64 RoIs per image, 25 % foreground with IoU >= 0.5, background
            [0.1, 0.5), per-class NMS 0.3 on single-level backbones).

    ``model(images, targets, proposals=...)``: see :class:`rcnn.models.base.TwoStageDetector`.

    The later generations subclass it and change what the seed says they change, through three
    hooks called in this order (the order in which parts are created fixes the initial weights a
    seed gives): :meth:`branch_parts` (further per-RoI branches: Mask R-CNN's), :meth:`proposer`
    (the proposal network: Faster R-CNN's RPN) and :meth:`assemble_roi_heads`.
    """

    name = "fast_rcnn"
    options = FastRCNNOptions
    needs_proposals = True
    default_pooler: str | None = None  # None: per backbone (RoI pooling on one level, RoIAlign on an FPN)

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        *,
        box_head: nn.Module | None = None,
        roi_heads: RoIHeads | None = None,
        transform: DetectionTransform | None = None,
        rpn: Any = None,
        **options: Any,
    ) -> None:
        rpn_module = rpn if isinstance(rpn, nn.Module) else None
        if rpn is not None and rpn_module is None:
            options["rpn"] = rpn  # settings for the RPN the model builds
        opts = detector_options(type(self), options)
        strides, pool_strides = feature_strides(backbone)
        branches = None
        if roi_heads is None:
            branches = self.branch_parts(backbone, num_classes, opts, pool_strides)
        rpn_module = self.proposer(rpn_module, backbone, opts, strides)
        if roi_heads is None:
            box = box_branch(backbone, box_head, num_classes, opts, len(strides), pool_strides, self.default_pooler)
            roi_heads = self.assemble_roi_heads(box, branches, opts)
        else:
            refuse_unused(opts, ("roi", "pooler", "sampling_ratio", "aligned", "mask"), "RoI heads")
        if transform is None:
            transform = DetectionTransform(opts.min_size, opts.max_size, opts.image_mean, opts.image_std,
                                           opts.size_divisible, torchvision=opts.torchvision_compat)  # fmt: skip
        else:
            refuse_unused(opts, ("min_size", "max_size", "image_mean", "image_std", "size_divisible", "torchvision_compat"),
                          "transform")  # fmt: skip
        super().__init__(backbone, roi_heads, transform, rpn=rpn_module, levels=(strides, pool_strides))

    def effective_options(self) -> dict[str, Any]:
        """The options this model runs with (see :meth:`rcnn.models.base.DetectorCapabilities.effective_options`):
        the transform's sizes and normalisation, the box branch's pooler and RoI-head settings."""
        transform, heads = self.transform, self.roi_heads
        if not isinstance(transform, DetectionTransform) or not isinstance(heads, RoIHeads):
            raise ValueError(f"{type(self).__name__}: a transform or RoI heads of another kind; its options cannot be recorded")
        pooler = heads.pooler
        mean, std = transform.normalization()
        sizes = transform.min_sizes
        return {
            "min_size": sizes[0] if len(sizes) == 1 else list(sizes),
            "max_size": transform.max_size,
            "pooler": pooler.kind,
            "sampling_ratio": pooler.sampling_ratio,
            "aligned": pooler.aligned,
            "image_mean": mean,
            "image_std": std,
            "size_divisible": transform.size_divisible,
            "roi": heads.settings,
            "torchvision_compat": transform.torchvision,
        }

    def branch_parts(self, backbone: nn.Module, num_classes: int | None, opts: Any, pool_strides: Sequence[int]) -> Any:
        """Parts of further per-RoI branches, made first (Mask R-CNN's mask head); none here."""
        return None

    def proposer(self, rpn: nn.Module | None, backbone: nn.Module, opts: Any, strides: Sequence[int]) -> nn.Module | None:
        """The proposal network: none, Fast R-CNN's proposals come from outside (selective search)."""
        if rpn is not None:
            raise ValueError(f"{type(self).__name__} has no RPN: its proposals come from outside (proposals=...)")
        return None

    def assemble_roi_heads(self, box: BoxBranch, branches: Any, opts: Any) -> RoIHeads:
        """The RoI heads from the box branch's parts (and ``branches``): :class:`RoIHeads` here."""
        return RoIHeads(box.box_head, box.predictor, box.pooler, box.settings)

    def compress_fc(self, fc6_rank: int | None = 1024, fc7_rank: int | None = 256) -> list[dict[str, Any]]:
        """Truncated SVD of fc6 and fc7 for faster detection (§3.1: top 1024 and 256 singular values).

        Meant for a trained model at test time (after this, the two factors would be trained
        separately). Returns :func:`compress_box_head`'s reports.
        """
        return compress_box_head(self.roi_heads.box_head, (fc6_rank, fc7_rank))


def fast_rcnn(backbone: str | nn.Module = "tiny", num_classes: int = 21, **kwargs: Any) -> FastRCNN:
    """Build a :class:`FastRCNN` on a named architecture (or a backbone module).

    Keyword arguments: ``pretrained_backbone`` (a local classification checkpoint),
    ``trainable_stages``, and the :class:`FastRCNNOptions`. Example:
    ``fast_rcnn("vgg16", 21, pretrained_backbone="vgg16.pth", trainable_stages=3)`` (VGG16 fine-tuned
    from conv3_1 up, §4.5).
    """
    return FastRCNN.build(backbone, num_classes, **kwargs)
