"""What every detector does to its input before the backbone, and to its output after the heads.

Input: validate, rescale each image so its shorter side is ``min_size`` and its longer at most
``max_size`` (Fast R-CNN §2.3: 600 / 1000), normalise with the backbone's mean and std, pad to a
common size divisible by ``size_divisible`` and stack into one batch. Ground-truth boxes and
masks, and external proposals, follow the resize. Output: map boxes (and masks) back to each
image's original size.

Shape shorthand:
    N: images;  H, W: original size;  H', W': resized;  Hp, Wp: padded batch size
    G: ground-truth objects of an image;  P: proposals of an image;  D: detections
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcnn.components.settings import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE
from rcnn.core.boxes import check_boxes
from rcnn.core.images import IMAGENET_MEAN, IMAGENET_STD, normalize, resize_boxes, resize_image, resize_masks, resized_shape

__all__ = ["DetectionTransform", "ImageBatch", "as_decimals", "validate_images", "validate_inputs", "validate_targets"]


@dataclass
class ImageBatch:
    """A padded batch: ``tensors [N, 3, Hp, Wp]`` and each image's size ``(H', W')`` inside it."""

    tensors: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]


def validate_images(images: Sequence[Tensor]) -> None:
    """Raise a ``ValueError`` that names the image unless each is a float ``[3, H, W]`` tensor."""
    if isinstance(images, Tensor) or not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("images must be a non-empty list of float tensors [3, H, W] with values in 0..1")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = list(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"images[{i}]: expected a tensor [3, H, W] (RGB), got {shape}")
        if not image.is_floating_point():
            raise ValueError(f"images[{i}]: expected a float tensor with values in 0..1, got {image.dtype}")
        if image.shape[1] < 1 or image.shape[2] < 1:
            raise ValueError(f"images[{i}]: empty image of size {list(image.shape[1:])}")


def validate_targets(targets: Sequence[dict[str, Any]], num_images: int, num_classes: int) -> None:
    """Raise a ``ValueError`` naming the image and field for malformed training targets."""
    if len(targets) != num_images:
        raise ValueError(f"got {num_images} images but {len(targets)} targets")
    for i, target in enumerate(targets):
        if "boxes" not in target or "labels" not in target:
            raise ValueError(f"targets[{i}]: needs 'boxes' [G, 4] and 'labels' [G]")
        boxes, labels = target["boxes"], target["labels"]
        check_boxes(boxes, f"targets[{i}]['boxes']")
        # A box without area has IoU 0 with every proposal: it would add no loss at all, silently.
        flat = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])  # [G]
        if bool(flat.any()):
            j = int(flat.nonzero()[0, 0])
            raise ValueError(
                f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} has zero width or height; ground-truth boxes "
                "need x2 > x1 and y2 > y1 (drop such boxes, as the data readers do)"
            )
        if labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
            raise ValueError(
                f"targets[{i}]['labels']: expected int64 [{boxes.shape[0]}], got {labels.dtype} {list(labels.shape)}"
            )
        if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"targets[{i}]['labels'] must lie in 1..{num_classes - 1} (0 is background), "
                f"got values {sorted(set(labels.tolist()))}"
            )


def validate_inputs(
    images: Sequence[Tensor],
    targets: Sequence[dict[str, Any]] | None,
    proposals: Sequence[Tensor] | None,
    training: bool,
    num_classes: int,
) -> list[Tensor] | None:
    """Check a detector call ``model(images, targets, proposals)``: the images; in training the
    targets (present, well-formed, labels below ``num_classes``); the number of proposal sets.
    Returns the proposals in the images' dtype. ``ValueError`` naming the image and field."""
    validate_images(images)
    if training:
        if targets is None:
            raise ValueError("training mode needs targets (call model.eval() for inference)")
        validate_targets(targets, len(images), num_classes)
    if proposals is None:
        return None
    if len(proposals) != len(images):
        raise ValueError(f"got {len(images)} images but {len(proposals)} proposal sets")
    return [p.to(images[0].dtype) for p in proposals]


def as_decimals(values: Tensor) -> tuple[float, ...]:
    """The values of a (float32) tensor as the shortest decimals that give them back, e.g. the
    normalisation's 0.485 rather than float32's 0.48500001430511475: what a run folder records."""
    return tuple(float(str(np.float32(v))) for v in values.detach().flatten().cpu().tolist())


def _torchvision_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """torchvision's resized size: the floor of each side times the scale, as ``F.interpolate``
    computes it from a ``scale_factor``."""
    scale = torch.sym_min(min_size / torch.sym_min(height, width), max_size / torch.sym_max(height, width))
    return torch.sym_max(1, math.floor(height * scale)), torch.sym_max(1, math.floor(width * scale))


class DetectionTransform(nn.Module):
    """Resize, normalise and batch images (and their targets); map predictions back.

    Args:
        min_size: shorter side after resizing; a tuple draws one per image in training
            (multi-scale training, Fast R-CNN §5.2).
        max_size: cap on the longer side, at least every ``min_size``; every size in 32..4096
            (``rcnn.components.settings.ImageSide``: the coarsest stride, and the memory a forward
            pass needs).
        image_mean, image_std: per-channel normalisation of the backbone (ImageNet's).
        size_divisible: the padded batch's height and width are multiples of this (32 suits
            every backbone's largest stride but P6's).
        torchvision: resize as torchvision's detectors do, to reproduce their outputs: the
            resized side is the floor of side x scale (the library rounds), and the image is
            normalised before it is resized (the same up to float rounding).
    """

    def __init__(
        self,
        min_size: int | Sequence[int] = 600,
        max_size: int = 1000,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        size_divisible: int = 32,
        torchvision: bool = False,
    ) -> None:
        super().__init__()
        sizes = (min_size,) if isinstance(min_size, numbers.Real) else tuple(min_size)
        for name, value in [*(("min_size", s) for s in sizes), ("max_size", max_size)]:
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value == int(value)
                    and MIN_IMAGE_SIDE <= value <= MAX_IMAGE_SIDE):  # fmt: skip
                raise ValueError(f"{name} must be a whole number of pixels in {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE}, got {value}")
        if not sizes:
            raise ValueError("min_size: give at least one size")
        if max_size < max(sizes):
            raise ValueError(f"max_size {max_size} is smaller than min_size {max(sizes)}; give max_size >= min_size")
        self.min_sizes = tuple(int(s) for s in sizes)
        self.max_size = int(max_size)
        self.register_buffer("image_mean", torch.tensor(image_mean).reshape(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).reshape(3, 1, 1), persistent=False)
        self.size_divisible = int(size_divisible)
        self.torchvision = bool(torchvision)

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(image_mean, image_std)`` as this transform applies them (:func:`as_decimals`)."""
        return as_decimals(self.image_mean), as_decimals(self.image_std)

    def _min_size(self) -> int:
        if self.training and len(self.min_sizes) > 1:
            return self.min_sizes[int(torch.randint(len(self.min_sizes), ()))]
        return self.min_sizes[-1]

    def forward(
        self,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Any]] | None = None,
        proposals: Sequence[Tensor] | None = None,
    ) -> tuple[ImageBatch, list[dict[str, Any]] | None, list[Tensor] | None]:
        """Returns the batch, the resized targets (copies) and the resized proposals."""
        original_sizes = [(im.shape[1], im.shape[2]) for im in images]  # ints, symbolic when exported
        resized, sizes = [], []
        new_targets = [dict(t) for t in targets] if targets is not None else None
        new_proposals = list(proposals) if proposals is not None else None
        for i, image in enumerate(images):
            height, width = original_sizes[i]
            if self.torchvision:
                size = _torchvision_shape(height, width, self._min_size(), self.max_size)
                image = normalize(image, self.image_mean, self.image_std)
            else:
                size = resized_shape(height, width, self._min_size(), self.max_size)
            # bilinear resizing to the same size copies the image: no branch on the size, so an
            # exported graph serves every input size
            image = resize_image(image, size)
            if new_targets is not None and size != (height, width):
                new_targets[i]["boxes"] = resize_boxes(new_targets[i]["boxes"], (height, width), size)
                if "masks" in new_targets[i]:
                    new_targets[i]["masks"] = resize_masks(new_targets[i]["masks"], size)
            if new_proposals is not None:
                new_proposals[i] = resize_boxes(new_proposals[i], (height, width), size)
            resized.append(image if self.torchvision else normalize(image, self.image_mean, self.image_std))
            sizes.append(size)
        batch = self._pad(resized)
        return ImageBatch(batch, sizes, original_sizes), new_targets, new_proposals

    def _pad(self, images: list[Tensor]) -> Tensor:
        d = self.size_divisible
        height, width = images[0].shape[1], images[0].shape[2]
        for im in images[1:]:
            height, width = torch.sym_max(height, im.shape[1]), torch.sym_max(width, im.shape[2])
        height, width = (height + d - 1) // d * d, (width + d - 1) // d * d
        if len(images) == 1:
            im = images[0]
            return F.pad(im, (0, width - im.shape[2], 0, height - im.shape[1]))[None]
        batch = images[0].new_zeros((len(images), 3, height, width))
        for i, im in enumerate(images):
            batch[i, :, : im.shape[1], : im.shape[2]].copy_(im)
        return batch

    @staticmethod
    def postprocess(detections: list[dict[str, Tensor]], batch: ImageBatch) -> list[dict[str, Tensor]]:
        """Map detection boxes from resized to original image coordinates (in place, returned)."""
        for det, size, original in zip(detections, batch.image_sizes, batch.original_sizes):
            det["boxes"] = resize_boxes(det["boxes"], size, original)
        return detections
