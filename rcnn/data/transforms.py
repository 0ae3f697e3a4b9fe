"""Joint image/target transforms and batching.

Every transform takes and returns ``(image [3, H, W] float 0..1, target dict)``; boxes
(``[N, 4]`` x1 y1 x2 y2) and masks (``[N, H, W]`` uint8) follow the image. ``target["orig_size"]``
is left alone, so predictions can be mapped back to the original image. Normalisation by the
backbone's mean and std happens inside the models, as in torchvision.

Shape shorthand:
    N: number of objects in an image
    H, W: image height and width before a transform; H', W' after
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rcnn.core.images import resize_boxes, resize_image, resize_masks, resized_shape
from rcnn.data.records import Transform

__all__ = ["Compose", "RandomHorizontalFlip", "Resize", "collate_fn"]

Target = dict[str, Any]

# Target entries holding boxes that move with the image: the objects, and proposals attached for
# Fast R-CNN / R-CNN training (``[P, 4]``, see rcnn.training.run.TrainingSet).
BOX_KEYS = frozenset({"boxes", "proposals"})


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Resize:
    """Resize so the shorter side is ``min_size`` and the longer at most ``max_size``.

    ``min_size`` may be a sequence: one value is drawn per image (multi-scale training).
    Images and masks are resized as the detectors resize them (:mod:`rcnn.core.images`).
    """

    def __init__(self, min_size: int | Sequence[int], max_size: int) -> None:
        sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        if not sizes or any(int(s) <= 0 for s in sizes) or max_size <= 0:
            raise ValueError(f"Resize: sizes must be positive, got min_size={min_size}, max_size={max_size}")
        self.min_sizes = tuple(int(s) for s in sizes)
        self.max_size = int(max_size)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        height, width = image.shape[-2:]
        min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]  # torch RNG, seeded per worker
        new_size = resized_shape(height, width, min_size, self.max_size)
        if new_size == (height, width):
            return image, target
        image = resize_image(image, new_size)  # [3, H', W']
        target = dict(target)
        for key in BOX_KEYS & target.keys():
            target[key] = resize_boxes(target[key], (height, width), new_size)
        if "masks" in target:
            target["masks"] = resize_masks(target["masks"], new_size)  # [N, H', W']
        return image, target

    def __repr__(self) -> str:
        return f"Resize(min_size={self.min_sizes}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p`` (Fast R-CNN's only augmentation)."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if torch.rand(()).item() >= self.p:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        target = dict(target)
        for key in BOX_KEYS & target.keys():
            boxes = target[key]  # [N, 4]
            target[key] = torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)  # [N, H, W]
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def collate_fn(batch: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Batch ``(image, target)`` pairs as two lists: images keep their own sizes."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
