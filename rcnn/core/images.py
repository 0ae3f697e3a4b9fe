"""Image geometry and normalisation: the one resize and the one normalisation of the library.

- :func:`resized_shape`: the Fast R-CNN scale rule (shorter side ``min_size``, longer at most
  ``max_size``; 600 / 1000 in the paper, §2.3).
- :func:`resize_image`: bilinear, ``align_corners=False``, as torchvision's detection transform
  does (so converted torchvision models see exactly the pixels they were trained on);
  :func:`resize_masks`: nearest neighbour; :func:`resize_boxes`: boxes follow the image.
- :func:`normalize`: per-channel ``(x - mean) / std`` with the backbone's statistics (ImageNet's
  by default); pixels outside an image (R-CNN's context padding) are filled with the mean, which
  normalises to zero.

Shape shorthand:
    N: images / masks;  H, W: size before;  H', W': size after
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "normalize",
    "resize_boxes",
    "resize_image",
    "resize_masks",
    "resized_shape",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """``(H', W')`` with the shorter side ``min_size`` unless the longer would exceed ``max_size``.

    Sides are rounded half up (``floor(x + 0.5)``) with ``torch.sym_min`` / ``sym_max``, so that an
    exported graph computes the same sizes for any input size (ONNX export keeps them symbolic).
    """
    scale = torch.sym_min(min_size / torch.sym_min(height, width), max_size / torch.sym_max(height, width))
    return torch.sym_max(1, math.floor(height * scale + 0.5)), torch.sym_max(1, math.floor(width * scale + 0.5))


def resize_image(image: Tensor, size: Sequence[int], antialias: bool = False) -> Tensor:
    """``image [3, H, W]`` (or ``[N, 3, H, W]``) resized bilinearly to ``size (H', W')``.

    ``antialias`` low-pass filters when shrinking (for classification crops); the detectors
    resize without it, as torchvision's detectors do.
    """
    batch = image if image.dim() == 4 else image[None]
    out = F.interpolate(batch, size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias)
    return out if image.dim() == 4 else out[0]


def resize_masks(masks: Tensor, size: Sequence[int]) -> Tensor:
    """``masks [N, H, W]`` (any dtype) resized to ``size (H', W')`` by nearest neighbour, same dtype."""
    resized = F.interpolate(masks[None].float(), size=tuple(size), mode="nearest")[0]
    return resized.to(masks.dtype)


def resize_boxes(boxes: Tensor, from_size: Sequence[int], to_size: Sequence[int]) -> Tensor:
    """Scale ``boxes [N, 4]`` from an image of ``from_size (H, W)`` to one of ``to_size (H', W')``."""
    xs = boxes[:, 0::2] * (to_size[1] / from_size[1])  # [N, 2]
    ys = boxes[:, 1::2] * (to_size[0] / from_size[0])
    return torch.stack((xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]), dim=1)


def normalize(images: Tensor, mean: Tensor | Sequence[float], std: Tensor | Sequence[float]) -> Tensor:
    """``(images - mean) / std`` per channel, for ``[3, H, W]`` or ``[N, 3, H, W]`` images in 0..1."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(3, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(3, 1, 1)
    return (images - mean) / std
