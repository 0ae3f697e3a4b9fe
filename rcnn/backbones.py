"""Backbones: the shared convolutional layers, and the per-RoI head that sits on top of them.

Every generation runs a CNN pre-trained for classification (the seed's step 1). R-CNN runs it
on each warped region; Fast/Faster/Mask R-CNN run its convolutional part once on the whole
image and replace its last max pool by RoI pooling, keeping its fully connected layers (fc6,
fc7) as the per-RoI *box head* (Fast R-CNN §2.2). A :class:`Backbone` therefore owns both
parts, so that a classification checkpoint (torchvision's layout) loads into both at once:

- ``forward(images)`` -> feature maps, one per entry of ``strides``;
- ``box_head``: ``[R, C, P, P]`` pooled RoI features -> ``[R, box_head.out_features]``,
  with ``P = pool_size`` (7 for VGG16 and FPNs, 6 for AlexNet, 14 for ResNet-C4).

Architectures come from ``torchvision.models`` (classification models only); weights are
never downloaded: :func:`load_pretrained` reads a local file.

Shape shorthand:
    N: images;  C: feature channels (``out_channels``);  R: RoIs;  P: pooled side
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

__all__ = [
    "BACKBONES",
    "Backbone",
    "InferenceOptimizable",
    "LoadReport",
    "build_backbone",
    "fold_batchnorm",
    "load_pretrained",
    "resolve_backbone",
]


class MLPHead(nn.Module):
    """Two fully connected layers on flattened pooled features (the FPN box head, "2fc")."""

    def __init__(self, in_channels: int, pool_size: int, hidden: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels * pool_size * pool_size, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.out_features = hidden

    def forward(self, x: Tensor) -> Tensor:  # [R, C, P, P] -> [R, hidden]
        x = torch.relu(self.fc6(x.flatten(1)))
        return torch.relu(self.fc7(x))


class ClassifierHead(nn.Module):
    """fc6 / fc7 of a classification network (VGG16, AlexNet), reused as the box head.

    ``classifier`` keeps torchvision's module indices, so ``classifier.0.weight`` (VGG16's fc6)
    loads from a torchvision checkpoint unchanged.
    """

    def __init__(self, classifier: nn.Sequential, out_features: int) -> None:
        super().__init__()
        self.classifier = classifier
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:  # [R, C, P, P] -> [R, 4096]
        return self.classifier(x.flatten(1))


class ResNetC5Head(nn.Module):
    """ResNet's res5 stage (``layer4``) + global average pooling as the box head (ResNet-C4)."""

    def __init__(self, layer4: nn.Module, out_features: int) -> None:
        super().__init__()
        self.layer4 = layer4
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:  # [R, 1024, 14, 14] -> [R, 2048]
        return self.layer4(x).mean(dim=(2, 3))


class Backbone(nn.Module):
    """Feature extractor plus box head; see the module docstring.

    Attributes:
        name: the builder name (``"vgg16"``, ``"resnet50_fpn"``, ...).
        out_channels: channels of every returned feature map.
        strides: the stride of each returned feature map, in input pixels.
        pool_strides: the strides (a prefix of ``strides``) that RoIs are pooled from; an FPN's
            extra coarsest level (P6) serves the RPN only.
        pool_size: P, the side of the pooled RoI features the box head expects.
        box_head: the per-RoI head, with attribute ``out_features``.
        stages: the body's stages in order, for freezing (``trainable_stages``).
        key_map: prefix renames from a torchvision classification checkpoint to this module.
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        body_forward: Callable[[nn.Module, Tensor], list[Tensor]],
        box_head: nn.Module,
        out_channels: int,
        strides: Sequence[int],
        pool_strides: Sequence[int],
        pool_size: int,
        stages: Sequence[nn.Module],
        key_map: dict[str, str],
        fpn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self._body_forward = body_forward
        self.fpn = fpn
        self.box_head = box_head
        self.out_channels = int(out_channels)
        self.strides = tuple(int(s) for s in strides)
        self.pool_strides = tuple(int(s) for s in pool_strides)
        self.pool_size = int(pool_size)
        self.stages = list(stages)
        self.key_map = dict(key_map)

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


def _tiny(norm: str) -> Backbone:
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
    return Backbone(
        "tiny", body, _sequential_forward([2]), MLPHead(64, 7, 256),
        out_channels=64, strides=(8,), pool_strides=(8,), pool_size=7, stages=stages, key_map={},
    )


def _vgg16(norm: str) -> Backbone:
    """VGG16 up to conv5_3 (stride 16, pool5 removed) with fc6/fc7 as the box head (the seed's)."""
    del norm  # VGG16 has no normalisation layers
    vgg = torchvision.models.vgg16(weights=None)
    body = vgg.features[:30]  # conv1_1 .. conv5_3 + ReLU; index 30 is pool5
    bounds = [0, 5, 10, 17, 24, 30]  # the five conv blocks, each ending before a max pool
    stages = [body[a:b] for a, b in zip(bounds, bounds[1:])]
    head = ClassifierHead(vgg.classifier[:6], 4096)  # fc6, ReLU, dropout, fc7, ReLU, dropout
    return Backbone(
        "vgg16", body, _sequential_forward([29]), head,
        out_channels=512, strides=(16,), pool_strides=(16,), pool_size=7, stages=stages,
        key_map={"features.": "body.", "classifier.": "box_head.classifier."},
    )


def _alexnet(norm: str) -> Backbone:
    """AlexNet (R-CNN's original network) up to conv5 (stride 16), fc6/fc7 as the head (pool 6)."""
    del norm
    alex = torchvision.models.alexnet(weights=None)
    body = alex.features[:12]  # conv1 .. conv5 + ReLU; index 12 is pool5
    bounds = [0, 3, 6, 8, 10, 12]
    stages = [body[a:b] for a, b in zip(bounds, bounds[1:])]
    head = ClassifierHead(alex.classifier[:6], 4096)  # dropout, fc6, ReLU, dropout, fc7, ReLU
    return Backbone(
        "alexnet", body, _sequential_forward([11]), head,
        out_channels=256, strides=(16,), pool_strides=(16,), pool_size=6, stages=stages,
        key_map={"features.": "body.", "classifier.": "box_head.classifier."},
    )


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


def _resnet50(norm: str) -> Backbone:
    """ResNet-50-C4: conv1..res4 (stride 16, 1024 ch) shared, res5 + average pool as the box head."""
    resnet = torchvision.models.resnet50(weights=None, norm_layer=_norm_layer(norm))
    body = _ResNetBody(resnet, 3)
    stages = [nn.ModuleList([body.conv1, body.bn1]), body.layer1, body.layer2, body.layer3]
    return Backbone(
        "resnet50", body, lambda b, x: b(x)[-1:], ResNetC5Head(resnet.layer4, 2048),
        out_channels=1024, strides=(16,), pool_strides=(16,), pool_size=14, stages=stages,
        key_map={"layer4.": "box_head.layer4.", "": "body."},
    )


def _resnet50_fpn(norm: str) -> Backbone:
    """ResNet-50 + FPN: P2-P5 (256 ch, strides 4-32) for RoIs, plus P6 (stride 64) for the RPN."""
    resnet = torchvision.models.resnet50(weights=None, norm_layer=_norm_layer(norm))
    body = _ResNetBody(resnet, 4)
    fpn = FeaturePyramidNetwork([256, 512, 1024, 2048], 256, extra_blocks=LastLevelMaxPool())
    stages = [nn.ModuleList([body.conv1, body.bn1]), body.layer1, body.layer2, body.layer3, body.layer4]
    return Backbone(
        "resnet50_fpn", body, lambda b, x: b(x), MLPHead(256, 7, 1024),
        out_channels=256, strides=(4, 8, 16, 32, 64), pool_strides=(4, 8, 16, 32), pool_size=7,
        stages=stages, key_map={"": "body."}, fpn=fpn,
    )


def _mobilenet_v3_fpn(norm: str) -> Backbone:
    """MobileNetV3-Large + FPN over its last two stages, as torchvision's Faster R-CNN peer.

    Both stages it reads (blocks 13 and 16) are at stride 32; with the max-pooled extra level
    that gives RPN levels at strides 32, 32, 64 and RoI pooling from the first.
    """
    mobilenet = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=_norm_layer(norm))
    body = mobilenet.features
    fpn = FeaturePyramidNetwork([160, 960], 256, extra_blocks=LastLevelMaxPool())
    bounds = [0, 2, 4, 7, 13, 17]  # stem, then the stages split at each stride-2 block
    stages = [body[a:b] for a, b in zip(bounds, bounds[1:])]
    return Backbone(
        "mobilenet_v3_fpn", body, _sequential_forward([13, 16]), MLPHead(256, 7, 1024),
        out_channels=256, strides=(32, 32, 64), pool_strides=(32,), pool_size=7, stages=stages,
        key_map={"features.": "body."}, fpn=fpn,
    )


BACKBONES: dict[str, Callable[[str], Backbone]] = {
    "tiny": _tiny,
    "alexnet": _alexnet,
    "vgg16": _vgg16,
    "resnet50": _resnet50,
    "resnet50_fpn": _resnet50_fpn,
    "mobilenet_v3_fpn": _mobilenet_v3_fpn,
}


def build_backbone(
    name: str,
    pretrained: str | os.PathLike | None = None,
    trainable_stages: int | None = None,
    norm: str | None = None,
) -> Backbone:
    """Build backbone ``name`` (one of ``BACKBONES``), optionally loading local weights.

    Args:
        pretrained: a local classification checkpoint (torchvision ``.pth`` or ``.safetensors``,
            or one written by ``rcnn pretrain``); see :func:`load_pretrained`.
        trainable_stages: train only the last this many stages of the body (None: all).
        norm: ``"frozen"`` (BatchNorm statistics and affine fixed, the norm for fine-tuning
            with small batches) or ``"bn"`` (ordinary BatchNorm). Default: frozen when
            ``pretrained`` is given, ordinary otherwise — a randomly initialised network with
            frozen (identity) normalisation trains poorly.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if norm is None:
        norm = "frozen" if pretrained is not None else "bn"
    backbone = BACKBONES[name](norm)
    if pretrained is not None:
        load_pretrained(backbone, pretrained)
    backbone.freeze_stages(trainable_stages)
    return backbone


def resolve_backbone(
    backbone: str | Backbone, pretrained: str | os.PathLike | None = None, trainable_stages: int | None = None
) -> Backbone:
    """``backbone`` itself if it is a :class:`Backbone`, else :func:`build_backbone` of that name."""
    if isinstance(backbone, Backbone):
        if pretrained is not None or trainable_stages is not None:
            raise ValueError("pretrained_backbone / trainable_stages apply to a backbone name, not a built Backbone")
        return backbone
    return build_backbone(backbone, pretrained, trainable_stages)


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


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: say which and why
        raise ValueError(f"cannot read weights from {path}: {exc}") from exc
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def load_pretrained(backbone: Backbone, path: str | os.PathLike) -> LoadReport:
    """Load a local classification checkpoint into ``backbone`` (body and box head).

    Accepts torchvision's classification layout (``features.0.weight``, ``layer1.0.conv1.weight``,
    ``classifier.0.weight`` ...), mapped through ``backbone.key_map``, and this library's own
    layout (keys as in ``backbone.state_dict()``, e.g. from ``rcnn pretrain``). Keys of layers the
    detector adds (FPN, heads) are reported as missing; keys the detector does not use (the
    classifier's last layer) as unexpected. A shape mismatch, or a file sharing no key with the
    backbone (the wrong architecture), raises ``ValueError``.
    """
    path = Path(path)
    state = _read_state_dict(path)
    own = backbone.state_dict()
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
    backbone.load_state_dict(mapped, strict=False)
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    return LoadReport(loaded=sorted(mapped), missing=missing, unexpected=unexpected)


class InferenceOptimizable:
    """Mixin for detectors with a ``backbone``: :meth:`optimize_for_inference`, and a guard that
    refuses to train a model so optimised."""

    def optimize_for_inference(self):
        """Prepare the model for fast inference, in place: eval mode, BatchNorm folded into the
        preceding convolutions (same outputs, less work). The model cannot be trained afterwards."""
        self.eval()
        fold_batchnorm(self.backbone)
        self._inference_only = True
        return self

    def train(self, mode: bool = True):
        if mode and getattr(self, "_inference_only", False):
            raise ValueError("this model was optimized for inference (BatchNorm folded) and cannot be trained")
        return super().train(mode)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold each BatchNorm that directly follows a ``Conv2d`` into that conv, for inference.

    At inference a BatchNorm (frozen, or ordinary in eval mode) is a fixed per-channel affine
    map of its running statistics, so ``bn(conv(x))`` equals one conv with rescaled weights and
    a bias: the same outputs with one pass over the activations fewer. The folded model must
    not be trained further. Returns the number of layers folded.
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
            scale = torch.rsqrt(bn.running_var + bn.eps)  # [C]
            if bn.weight is not None:
                scale = bn.weight * scale
            bias = -bn.running_mean * scale
            if bn.bias is not None:
                bias = bias + bn.bias
            with torch.no_grad():
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                if conv.bias is None:
                    conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
                else:
                    conv.bias.copy_(conv.bias * scale + bias)
            parent._modules[name] = nn.Identity()
            folded += 1
    return folded
