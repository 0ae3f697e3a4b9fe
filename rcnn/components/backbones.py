"""Backbones: the shared convolutional layers, named architectures, and their pre-trained weights.

Every generation runs a CNN pre-trained for classification (the seed's step 1). R-CNN runs it
on each warped region; Fast/Faster/Mask R-CNN run its convolutional part once on the whole
image and replace its last max pool by RoI pooling, keeping its fully connected layers (fc6,
fc7) as the per-RoI *box head* (Fast R-CNN §2.2). A named architecture therefore gives two
parts (:class:`BackboneParts`): the :class:`Backbone` (``images -> feature maps``) and its box
head (:mod:`rcnn.components.box_heads`), and a classification checkpoint (torchvision's layout)
loads into both at once (:func:`load_pretrained`). The detector registers each part once.

Any ``nn.Module`` with an ``out_channels`` attribute can serve as a detector's backbone, as in
torchvision: it may return one tensor, a list, or a dict of feature maps (torchvision's
``BackboneWithFPN``: levels ``"0"``..``"3"`` and an RPN-only ``"pool"``). Its ``strides`` and
``pool_strides`` are read from it when it has them, else measured once on a blank image
(:func:`feature_strides`).

Architectures come from ``torchvision.models`` (classification models only); weights are never
downloaded: :func:`load_pretrained` reads a local file.

Shape shorthand:
    N: images;  C: feature channels (``out_channels``);  R: RoIs;  P: pooled side
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from rcnn.components.box_heads import ClassifierHead, ConvFCHead, MLPHead, ResNetC5Head
from rcnn.io.tensors import read_state_dict

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneParts",
    "LoadReport",
    "PyramidNetwork",
    "as_feature_list",
    "build_backbone",
    "default_anchor_sizes",
    "feature_strides",
    "fold_batchnorm",
    "load_pretrained",
    "parts_state_dict",
]


class Backbone(nn.Module):
    """The shared convolutional layers of a named architecture (see the module docstring).

    Attributes:
        name: the architecture (``"vgg16"``, ``"resnet50_fpn"``, ...).
        out_channels: channels of every returned feature map.
        strides: the stride of each returned feature map, in input pixels.
        pool_strides: the strides (a prefix of ``strides``) that RoIs are pooled from; an FPN's
            extra coarsest level (P6) serves the RPN only.
        stages: the body's stages in order, for freezing (``trainable_stages``).
        key_map: prefix renames from a torchvision classification checkpoint to this module
            (``body.``) and its box head (``box_head.``).
        anchor_sizes: the architecture's default anchor sizes per level, or ``None`` for the
            general rule (:func:`default_anchor_sizes`).
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        body_forward: Callable[[nn.Module, Tensor], list[Tensor]],
        out_channels: int,
        strides: Sequence[int],
        pool_strides: Sequence[int],
        stages: Sequence[nn.Module],
        key_map: dict[str, str],
        fpn: nn.Module | None = None,
        anchor_sizes: Sequence[Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self._body_forward = body_forward
        self.fpn = fpn
        self.out_channels = int(out_channels)
        self.strides = tuple(int(s) for s in strides)
        self.pool_strides = tuple(int(s) for s in pool_strides)
        self.stages = list(stages)
        self.key_map = dict(key_map)
        self.anchor_sizes = tuple(tuple(float(v) for v in level) for level in anchor_sizes) if anchor_sizes else None

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images [N, 3, H, W]`` (normalised) -> one ``[N, C, H/s, W/s]`` map per stride s."""
        features = self._body_forward(self.body, images)
        if self.fpn is not None:
            features = list(self.fpn({str(i): f for i, f in enumerate(features)}).values())
        return features

    def freeze_stages(self, trainable_stages: int | None) -> None:
        """Freeze all but the last ``trainable_stages`` stages of the body (None: train all).

        Fast R-CNN fine-tunes VGG16 from conv3_1 up (§4.5); torchvision-style detectors train
        the last 3 of ResNet's 5 stages when starting from ImageNet weights.
        """
        if trainable_stages is None:
            return
        if not 0 <= trainable_stages <= len(self.stages):
            raise ValueError(
                f"trainable_stages for {self.name} must lie in [0, {len(self.stages)}], got {trainable_stages}"
            )
        for stage in self.stages[: len(self.stages) - trainable_stages]:
            for p in stage.parameters():
                p.requires_grad_(False)


class BackboneParts(NamedTuple):
    """A named architecture's two parts: the shared conv layers and the per-RoI box head."""

    backbone: Backbone
    box_head: nn.Module


def as_feature_list(output: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> list[Tensor]:
    """A backbone's output as a list of feature maps: one tensor, a list, or a dict's values in order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return list(output.values())
    return list(output)


class PyramidNetwork(FeaturePyramidNetwork):
    """torchvision's feature pyramid (same layers, same state-dict keys) whose top-down pathway
    upsamples by the fixed ratio of the levels' strides when the sizes allow it.

    torchvision's FPN upsamples each coarser map to the finer one's size, read at run time; in an
    exported graph that is a ``Resize`` to computed sizes, which ONNX Runtime's blocked-layout
    (NCHWc) optimiser cannot take over, so the map leaves that layout and the sum runs apart from
    its convolution. When every input image is padded to a multiple of the coarsest stride
    (:meth:`fix_factors`, called by the detector with its transform's ``size_divisible`` and the
    backbone's strides), each level is exactly the padded size over its stride, the ratio is 2 (or
    1 between equal strides, MobileNetV3's two stride-32 maps: no upsampling at all) and the result
    is the same.
    """

    factors: tuple[int, ...] | None = None  # by size until the detector fixes them

    def fix_factors(self, size_divisible: int, strides: Sequence[int]) -> None:
        """Upsample by the ratios of ``strides`` (those of the pyramid's inputs) from now on if images
        are padded to multiples of ``size_divisible`` and that is a multiple of the coarsest stride
        (else by size, as torchvision)."""
        if len(strides) != len(self.inner_blocks):
            raise ValueError(f"{len(strides)} strides for {len(self.inner_blocks)} pyramid inputs")
        exact = size_divisible % strides[-1] == 0 and all(b % a == 0 for a, b in zip(strides, strides[1:]))
        self.factors = tuple(b // a for a, b in zip(strides, strides[1:])) if exact else None

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        names, maps = list(x.keys()), list(x.values())
        factors = self.factors
        if factors is not None and not torch.compiler.is_compiling():  # eager: maps of other sizes fall back
            if any(fine.shape[-2] != coarse.shape[-2] * f or fine.shape[-1] != coarse.shape[-1] * f
                   for fine, coarse, f in zip(maps, maps[1:], factors)):  # fmt: skip
                factors = None
        if factors is None:
            return super().forward(x)
        inner = self.get_result_from_inner_blocks(maps[-1], -1)
        results = [self.get_result_from_layer_blocks(inner, -1)]
        for idx in range(len(maps) - 2, -1, -1):
            top = inner if factors[idx] == 1 else F.interpolate(inner, scale_factor=float(factors[idx]), mode="nearest")
            inner = self.get_result_from_inner_blocks(maps[idx], idx) + top
            results.insert(0, self.get_result_from_layer_blocks(inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, maps, names)
        return OrderedDict(zip(names, results))


def _power_of_two(value: float) -> bool:
    return value >= 1 and abs(math.log2(value) - round(math.log2(value))) < 1e-6


@torch.no_grad()
def feature_strides(backbone: nn.Module, probe_size: int = 256) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(strides, pool_strides)`` of a backbone's feature maps.

    Read from its ``strides`` / ``pool_strides`` attributes when it has them; otherwise measured
    once by running it on a blank ``probe_size`` x ``probe_size`` image (in eval mode, so no
    BatchNorm statistics change). RoIs are pooled from every level but a dict's ``"pool"`` level
    (torchvision's FPN adds it for the RPN only).
    """
    if not isinstance(getattr(backbone, "out_channels", None), int):
        raise ValueError(
            f"a backbone must be an nn.Module with an int attribute out_channels (the channels of its "
            f"feature maps); {type(backbone).__name__} has none"
        )
    strides = getattr(backbone, "strides", None)
    pool_strides = getattr(backbone, "pool_strides", None)
    if strides is None:
        was_training = backbone.training
        backbone.eval()
        try:
            device = next((p.device for p in backbone.parameters()), torch.device("cpu"))
            output = backbone(torch.zeros(1, 3, probe_size, probe_size, device=device))
        finally:
            backbone.train(was_training)
        maps = as_feature_list(output)
        strides = []
        for i, feature in enumerate(maps):
            if feature.dim() != 4 or feature.shape[1] != backbone.out_channels:
                raise ValueError(
                    f"backbone output {i} has shape {list(feature.shape)}; expected [N, {backbone.out_channels}, H, W] "
                    "(every feature map with out_channels channels)"
                )
            stride = probe_size / feature.shape[-1]
            if not _power_of_two(stride):
                raise ValueError(f"backbone output {i} has stride {stride:g}; set the backbone's strides attribute")
            strides.append(round(stride))
        if pool_strides is None:
            rpn_only = isinstance(output, Mapping) and list(output)[-1] == "pool"
            pool_strides = strides[:-1] if rpn_only and len(strides) > 1 else strides
    strides = tuple(int(s) for s in strides)
    pool_strides = tuple(int(s) for s in (pool_strides if pool_strides is not None else strides))
    if strides[: len(pool_strides)] != pool_strides:
        raise ValueError(f"pool_strides {pool_strides} must be the first levels of strides {strides}")
    return strides, pool_strides


def default_anchor_sizes(backbone: nn.Module, num_levels: int) -> tuple[tuple[float, ...], ...]:
    """The backbone's own ``anchor_sizes`` if it has them; else the paper's 128, 256, 512 on one
    level and one size per level on a pyramid (32, 64, ... 512). Used where ``model.anchor_sizes``
    is not given; a run folder records the sizes built (``rcnn.build.resolved_config``)."""
    own = getattr(backbone, "anchor_sizes", None)
    if own:
        return tuple(tuple(float(v) for v in level) for level in own)
    if num_levels > 1:
        return tuple((32.0 * 2**i,) for i in range(num_levels))
    return ((128.0, 256.0, 512.0),)


def _sequential_forward(indices: Sequence[int]) -> Callable[[nn.Module, Tensor], list[Tensor]]:
    """Run a ``nn.Sequential`` body and return the outputs of the modules at ``indices``."""
    wanted = set(indices)

    def run(body: nn.Module, x: Tensor) -> list[Tensor]:
        outs = []
        for i, module in enumerate(body):
            x = module(x)
            if i in wanted:
                outs.append(x)
        return outs

    return run


def _last_output(body: nn.Module, x: Tensor) -> list[Tensor]:
    return body(x)[-1:]


def _all_outputs(body: nn.Module, x: Tensor) -> list[Tensor]:
    return body(x)


def _norm_layer(norm: str) -> type[nn.Module]:
    if norm == "frozen":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    raise ValueError(f"norm must be 'frozen' or 'bn', got {norm!r}")


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _tiny(norm: str) -> BackboneParts:
    """A small stride-8 CNN for tests and CPU demos: 0.1 M conv parameters, 64 output channels.

    Its receptive field (71 px) covers the largest objects of the 128-pixel shapes images; its
    2-fc box head (0.9 M parameters) dominates the cost of a training step.
    """
    del norm  # trained from scratch: always trainable BatchNorm
    stages = [
        nn.Sequential(_conv_bn(3, 16, 2)),  # stride 2
        nn.Sequential(_conv_bn(16, 32, 2), _conv_bn(32, 32, 1)),  # stride 4
        nn.Sequential(_conv_bn(32, 64, 2), _conv_bn(64, 64, 1), _conv_bn(64, 64, 1), _conv_bn(64, 64, 1)),  # stride 8
    ]
    body = nn.Sequential(*stages)
    backbone = Backbone(
        "tiny", body, _sequential_forward([2]), out_channels=64, strides=(8,), pool_strides=(8,), stages=stages,
        key_map={}, anchor_sizes=((16.0, 32.0, 64.0),),  # for ~128-pixel images
    )
    return BackboneParts(backbone, MLPHead(64, 7, 256))


def _vgg16(norm: str) -> BackboneParts:
    """VGG16 up to conv5_3 (stride 16, pool5 removed) with fc6/fc7 as the box head (the seed's)."""
    del norm  # VGG16 has no normalisation layers
    vgg = torchvision.models.vgg16(weights=None)
    body = vgg.features[:30]  # conv1_1 .. conv5_3 + ReLU; index 30 is pool5
    bounds = [0, 5, 10, 17, 24, 30]  # the five conv blocks, each ending before a max pool
    stages = [body[a:b] for a, b in zip(bounds, bounds[1:])]
    head = ClassifierHead(vgg.classifier[:6], 4096, pool_size=7)  # fc6, ReLU, dropout, fc7, ReLU, dropout
    backbone = Backbone(
        "vgg16", body, _sequential_forward([29]), out_channels=512, strides=(16,), pool_strides=(16,), stages=stages,
        key_map={"features.": "body.", "classifier.": "box_head.classifier."},
    )
    return BackboneParts(backbone, head)


def _alexnet(norm: str) -> BackboneParts:
    """AlexNet (R-CNN's original network) up to conv5 (stride 16), fc6/fc7 as the head (pool 6)."""
    del norm
    alex = torchvision.models.alexnet(weights=None)
    body = alex.features[:12]  # conv1 .. conv5 + ReLU; index 12 is pool5
    bounds = [0, 3, 6, 8, 10, 12]
    stages = [body[a:b] for a, b in zip(bounds, bounds[1:])]
    head = ClassifierHead(alex.classifier[:6], 4096, pool_size=6)  # dropout, fc6, ReLU, dropout, fc7, ReLU
    backbone = Backbone(
        "alexnet", body, _sequential_forward([11]), out_channels=256, strides=(16,), pool_strides=(16,),
        stages=stages, key_map={"features.": "body.", "classifier.": "box_head.classifier."},
    )
    return BackboneParts(backbone, head)


class _ResNetBody(nn.Module):
    """ResNet's stem and stages as attributes named as in torchvision (for checkpoint keys)."""

    def __init__(self, resnet: nn.Module, num_stages: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layers = [f"layer{i}" for i in range(1, num_stages + 1)]
        for name in self.layers:
            setattr(self, name, getattr(resnet, name))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for name in self.layers:
            x = getattr(self, name)(x)
            outs.append(x)
        return outs


def _resnet50(norm: str) -> BackboneParts:
    """ResNet-50-C4: conv1..res4 (stride 16, 1024 ch) shared, res5 + average pool as the box head."""
    resnet = torchvision.models.resnet50(weights=None, norm_layer=_norm_layer(norm))
    body = _ResNetBody(resnet, 3)
    stages = [nn.ModuleList([body.conv1, body.bn1]), body.layer1, body.layer2, body.layer3]
    backbone = Backbone(
        "resnet50", body, _last_output, out_channels=1024, strides=(16,), pool_strides=(16,), stages=stages,
        key_map={"layer4.": "box_head.layer4.", "": "body."},
    )
    return BackboneParts(backbone, ResNetC5Head(resnet.layer4, 2048, pool_size=14))


def _resnet50_fpn_backbone(name: str, norm: str, fpn_norm: type[nn.Module] | None) -> Backbone:
    resnet = torchvision.models.resnet50(weights=None, norm_layer=_norm_layer(norm))
    body = _ResNetBody(resnet, 4)
    fpn = PyramidNetwork([256, 512, 1024, 2048], 256, extra_blocks=LastLevelMaxPool(), norm_layer=fpn_norm)
    stages = [nn.ModuleList([body.conv1, body.bn1]), body.layer1, body.layer2, body.layer3, body.layer4]
    return Backbone(
        name, body, _all_outputs, out_channels=256, strides=(4, 8, 16, 32, 64),
        pool_strides=(4, 8, 16, 32), stages=stages, key_map={"": "body."}, fpn=fpn,
    )  # fmt: skip


def _resnet50_fpn(norm: str) -> BackboneParts:
    """ResNet-50 + FPN: P2-P5 (256 ch, strides 4-32) for RoIs, plus P6 (stride 64) for the RPN."""
    return BackboneParts(_resnet50_fpn_backbone("resnet50_fpn", norm, None), MLPHead(256, 7, 1024))


def _resnet50_fpn_v2(norm: str) -> BackboneParts:
    """ResNet-50 + FPN with BatchNorm in the FPN and a 4-conv + 1-fc box head with BatchNorm:
    torchvision's "v2" detectors (Li et al., 2021, "Benchmarking detection transfer learning")."""
    backbone = _resnet50_fpn_backbone("resnet50_fpn_v2", norm, nn.BatchNorm2d)
    return BackboneParts(backbone, ConvFCHead(256, 7, (256,) * 4, (1024,)))


def _mobilenet_v3_fpn(norm: str) -> BackboneParts:
    """MobileNetV3-Large + FPN over its last two stages, as torchvision's Faster R-CNN peer.

    Both stages it reads (blocks 13 and 16) are at stride 32; with the max-pooled extra level
    that gives RPN levels at strides 32, 32, 64 and RoI pooling from the first. As torchvision
    does for it, every level gets all five anchor sizes.
    """
    mobilenet = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=_norm_layer(norm))
    body = mobilenet.features
    fpn = PyramidNetwork([160, 960], 256, extra_blocks=LastLevelMaxPool())
    bounds = [0, 2, 4, 7, 13, 17]  # stem, then the stages split at each stride-2 block
    stages = [body[a:b] for a, b in zip(bounds, bounds[1:])]
    backbone = Backbone(
        "mobilenet_v3_fpn", body, _sequential_forward([13, 16]), out_channels=256, strides=(32, 32, 64),
        pool_strides=(32,), stages=stages, key_map={"features.": "body."}, fpn=fpn,
        anchor_sizes=((32.0, 64.0, 128.0, 256.0, 512.0),) * 3,
    )
    return BackboneParts(backbone, MLPHead(256, 7, 1024))


def _mobilenet_v3_fpn_fine(norm: str) -> BackboneParts:
    """MobileNetV3-Large + FPN over strides 8, 16 and 32 (blocks 6, 12 and 16), plus a max-pooled P6.

    :func:`_mobilenet_v3_fpn` (torchvision's layout) reads both its levels at stride 32: a box edge
    is then known to within a 32-pixel cell, which is too coarse for tight boxes on photographs
    scaled to a few hundred pixels. This variant pools RoIs from strides 8-32 (the FPN's
    scale-to-level rule sends small boxes to the fine levels) at little extra cost, since the
    early blocks are narrow (40 and 112 channels). Two anchor sizes per level, 32 to 512.
    """
    mobilenet = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=_norm_layer(norm))
    body = mobilenet.features
    fpn = PyramidNetwork([40, 112, 960], 256, extra_blocks=LastLevelMaxPool())
    bounds = [0, 2, 4, 7, 13, 17]
    stages = [body[a:b] for a, b in zip(bounds, bounds[1:])]
    backbone = Backbone(
        "mobilenet_v3_fpn_fine", body, _sequential_forward([6, 12, 16]), out_channels=256, strides=(8, 16, 32, 64),
        pool_strides=(8, 16, 32), stages=stages, key_map={"features.": "body."}, fpn=fpn,
        anchor_sizes=((32.0, 45.0), (64.0, 90.0), (128.0, 181.0), (256.0, 362.0)),
    )
    return BackboneParts(backbone, MLPHead(256, 7, 1024))


BACKBONES: dict[str, Callable[[str], BackboneParts]] = {
    "tiny": _tiny,
    "alexnet": _alexnet,
    "vgg16": _vgg16,
    "resnet50": _resnet50,
    "resnet50_fpn": _resnet50_fpn,
    "resnet50_fpn_v2": _resnet50_fpn_v2,
    "mobilenet_v3_fpn": _mobilenet_v3_fpn,
    "mobilenet_v3_fpn_fine": _mobilenet_v3_fpn_fine,
}


def build_backbone(
    name: str,
    pretrained: str | os.PathLike | None = None,
    trainable_stages: int | None = None,
    norm: str | None = None,
) -> BackboneParts:
    """Build architecture ``name`` (one of ``BACKBONES``): its backbone and box head.

    Args:
        pretrained: a local classification checkpoint (torchvision ``.pth`` or ``.safetensors``,
            or one written by ``rcnn pretrain``), loaded into both parts; see :func:`load_pretrained`.
        trainable_stages: train only the last this many stages of the body (None: all); the box
            head always trains.
        norm: ``"frozen"`` (BatchNorm statistics and affine fixed, the norm for fine-tuning
            with small batches) or ``"bn"`` (ordinary BatchNorm). Default: frozen when
            ``pretrained`` is given, ordinary otherwise — a randomly initialised network with
            frozen (identity) normalisation trains poorly.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if norm is None:
        norm = "frozen" if pretrained is not None else "bn"
    parts = BACKBONES[name](norm)
    if pretrained is not None:
        load_pretrained(parts, pretrained)
    parts.backbone.freeze_stages(trainable_stages)
    return parts


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: tensors loaded, and the keys left on either side."""

    loaded: list[str]
    missing: list[str]  # in the model, not in the file (new layers: FPN, heads)
    unexpected: list[str]  # in the file, not used (e.g. the classifier's last layer)

    def __str__(self) -> str:
        def brief(keys: list[str]) -> str:
            prefixes = sorted({k.rsplit(".", 1)[0] for k in keys})
            return ", ".join(prefixes[:8]) + (" ..." if len(prefixes) > 8 else "")

        text = f"loaded {len(self.loaded)} tensors"
        if self.missing:
            text += f"; {len(self.missing)} not in the file, left as initialised ({brief(self.missing)})"
        if self.unexpected:
            text += f"; {len(self.unexpected)} in the file ignored ({brief(self.unexpected)})"
        return text


def parts_state_dict(parts: BackboneParts) -> dict[str, Tensor]:
    """The two parts' tensors in one namespace: the backbone's keys, and ``box_head.`` + the head's."""
    state = dict(parts.backbone.state_dict())
    state.update({f"box_head.{k}": v for k, v in parts.box_head.state_dict().items()})
    return state


def load_pretrained(parts: BackboneParts, path: str | os.PathLike) -> LoadReport:
    """Load a local classification checkpoint into a backbone and its box head.

    Accepts torchvision's classification layout (``features.0.weight``, ``layer1.0.conv1.weight``,
    ``classifier.0.weight`` ...), mapped through ``backbone.key_map``, and this library's own
    layout (:func:`parts_state_dict`'s keys, as ``rcnn pretrain`` writes). Keys of layers the
    detector adds (FPN, heads) are reported as missing; keys the detector does not use (the
    classifier's last layer) as unexpected. A shape mismatch, or a file sharing no key with the
    backbone (the wrong architecture), raises ``ValueError``.
    """
    path = Path(path)
    backbone = parts.backbone
    state = read_state_dict(path, "pretrained weights file")
    own = parts_state_dict(parts)
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):  # BatchNorm bookkeeping, not a weight
            continue
        target = key if key in own else None
        if target is None:
            for src, dst in backbone.key_map.items():
                if key.startswith(src) and dst + key[len(src):] in own:
                    target = dst + key[len(src):]
                    break
        if target is None:
            unexpected.append(key)
            continue
        if own[target].shape != value.shape:
            raise ValueError(
                f"{path}: tensor {key!r} has shape {list(value.shape)} but backbone {backbone.name!r} "
                f"expects {list(own[target].shape)} for {target!r}; is this the right architecture?"
            )
        mapped[target] = value
    if not mapped:
        raise ValueError(
            f"{path} shares no tensor with backbone {backbone.name!r} "
            f"(first keys in the file: {list(state)[:3]}); is this the right architecture?"
        )
    head_prefix = "box_head."
    backbone.load_state_dict({k: v for k, v in mapped.items() if not k.startswith(head_prefix)}, strict=False)
    parts.box_head.load_state_dict(
        {k[len(head_prefix):]: v for k, v in mapped.items() if k.startswith(head_prefix)}, strict=False
    )
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    return LoadReport(loaded=sorted(mapped), missing=missing, unexpected=unexpected)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold each BatchNorm that directly follows a ``Conv2d`` into that conv, for inference.

    At inference a BatchNorm (frozen, or ordinary in eval mode) is a fixed per-channel affine
    map of its running statistics, so ``bn(conv(x))`` equals one conv with rescaled weights and
    a bias (``torch.nn.utils.fusion.fuse_conv_bn_weights``): the same outputs with one pass over
    the activations fewer. The folded model must not be trained further. Returns the number of
    layers folded.
    """
    folded = 0
    for parent in module.modules():
        names = list(parent._modules)
        for prev_name, name in zip(names, names[1:]):
            conv, bn = parent._modules[prev_name], parent._modules[name]
            if not isinstance(conv, nn.Conv2d) or not isinstance(bn, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                continue
            if bn.running_mean is None or bn.running_var is None:  # batch statistics only: not foldable
                continue
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
            conv.weight = nn.Parameter(weight.detach(), requires_grad=False)
            conv.bias = nn.Parameter(bias.detach(), requires_grad=False)
            parent._modules[name] = nn.Identity()
            folded += 1
    return folded
