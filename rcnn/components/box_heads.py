"""Box heads: the per-RoI layers between RoI pooling and the class / box predictor.

Fast R-CNN (§2.2) keeps a classification network's fully connected layers (fc6, fc7) as the
per-RoI head, on RoI-pooled features of the size its first fc layer expects; ResNet-C4 uses its
res5 stage; FPN detectors add two new fc layers ("2fc"). Each head takes pooled features
``[R, C, P, P]`` with ``P = pool_size`` and returns ``[R, out_features]``.

Shape shorthand:
    R: RoIs;  C: feature channels;  P: pooled side;  F: output features
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

__all__ = ["ClassifierHead", "ConvFCHead", "MLPHead", "ResNetC5Head"]


class MLPHead(nn.Module):
    """Two fully connected layers on flattened pooled features (the FPN box head, "2fc")."""

    def __init__(self, in_channels: int, pool_size: int, hidden: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels * pool_size * pool_size, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.out_features = hidden
        self.pool_size = pool_size

    def forward(self, x: Tensor) -> Tensor:  # [R, C, P, P] -> [R, hidden]
        x = torch.relu(self.fc6(x.flatten(1)))
        return torch.relu(self.fc7(x))


class ClassifierHead(nn.Module):
    """fc6 / fc7 of a classification network (VGG16, AlexNet), reused as the box head.

    ``classifier`` keeps torchvision's module indices, so ``classifier.0.weight`` (VGG16's fc6)
    loads from a torchvision checkpoint unchanged.
    """

    def __init__(self, classifier: nn.Sequential, out_features: int, pool_size: int) -> None:
        super().__init__()
        self.classifier = classifier
        self.out_features = out_features
        self.pool_size = pool_size

    def forward(self, x: Tensor) -> Tensor:  # [R, C, P, P] -> [R, 4096]
        return self.classifier(x.flatten(1))


class ResNetC5Head(nn.Module):
    """ResNet's res5 stage (``layer4``) + global average pooling as the box head (ResNet-C4)."""

    def __init__(self, layer4: nn.Module, out_features: int, pool_size: int = 14) -> None:
        super().__init__()
        self.layer4 = layer4
        self.out_features = out_features
        self.pool_size = pool_size

    def forward(self, x: Tensor) -> Tensor:  # [R, 1024, 14, 14] -> [R, 2048]
        return self.layer4(x).mean(dim=(2, 3))


class ConvFCHead(nn.Module):
    """3x3 convolutions (each + BatchNorm + ReLU) then fully connected layers: the "4conv1fc" box head
    of torchvision's v2 detectors (and of Detectron's GN/BN heads).

    ``layers`` keeps torchvision's module indices (convolution ``i`` is ``layers.i.0``, its
    BatchNorm ``layers.i.1``; then a flatten and each fc layer with its ReLU), so their weights
    map by a prefix.
    """

    def __init__(
        self, in_channels: int, pool_size: int, conv_channels: Sequence[int] = (256,) * 4, fc_features: Sequence[int] = (1024,)
    ) -> None:
        super().__init__()
        if not fc_features:
            raise ValueError("ConvFCHead needs at least one fully connected layer")
        layers: list[nn.Module] = []
        channels = in_channels
        for width in conv_channels:
            layers.append(Conv2dNormActivation(channels, width, kernel_size=3, norm_layer=nn.BatchNorm2d))
            channels = width
        layers.append(nn.Flatten())
        features = channels * pool_size * pool_size
        for width in fc_features:
            layers += [nn.Linear(features, width), nn.ReLU(inplace=True)]
            features = width
        self.layers = nn.Sequential(*layers)
        self.out_features = features
        self.pool_size = pool_size

    def forward(self, x: Tensor) -> Tensor:  # [R, C, P, P] -> [R, F]
        return self.layers(x)
