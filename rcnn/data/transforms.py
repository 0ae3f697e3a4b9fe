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

__all__ = ["ColorJitter", "Compose", "RandomHorizontalFlip", "Resize", "ScaleJitter", "augmentation", "collate_fn"]

Target = dict[str, Any]

# Target entries holding boxes that move with the image: the objects, and proposals attached for
# Fast R-CNN / R-CNN training (``[P, 4]``, see rcnn.training.run.TrainingSet).
BOX_KEYS = frozenset({"boxes", "proposals"})
# Target entries with one row per object: kept or dropped together when a crop leaves an object out.
OBJECT_KEYS = frozenset({"boxes", "labels", "iscrowd", "masks", "difficult", "area"})


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


class ScaleJitter:
    """Zoom the image in or out by a random factor, keeping its size: scale jitter for small data sets.

    A factor ``s`` is drawn log-uniformly from ``scale`` (with probability ``p``, else the image is
    left alone). ``s > 1`` crops a random window of ``1/s`` of each side (objects appear larger),
    ``s < 1`` places the image at a random spot of a canvas ``1/s`` times its sides filled with
    ``fill`` (objects appear smaller, as in SSD's "zoom out"); the detector's own resize then
    brings either back to its input size, so objects are seen at scales the data set does not
    hold. This is the large-scale jitter of Ghiasi et al. (2021, "Simple copy-paste is a strong
    data augmentation method"), which with flips is what lets detectors trained from scratch
    generalise from a few hundred photographs. Boxes are clipped to the window; an object of
    which less than ``min_visible`` of the area stays in the window is dropped, with its label
    and mask (a crop never drops every object: such a draw falls back to the uncropped image).
    Best placed after a :class:`Resize` to about the detector's input size, so that the canvas of a
    zoom-out stays small.
    """

    def __init__(self, scale: tuple[float, float] = (0.5, 2.0), p: float = 1.0, min_visible: float = 0.3,
                 fill: tuple[float, float, float] = (0.485, 0.456, 0.406)) -> None:  # fmt: skip
        lo, hi = (float(v) for v in scale)
        if not 0.0 < lo <= hi:
            raise ValueError(f"ScaleJitter: scale must be (low, high) with 0 < low <= high, got {scale}")
        if not 0.0 <= p <= 1.0 or not 0.0 <= min_visible <= 1.0:
            raise ValueError(f"ScaleJitter: p and min_visible must be in [0, 1], got {p}, {min_visible}")
        self.scale, self.p, self.min_visible, self.fill = (lo, hi), p, min_visible, tuple(fill)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if torch.rand(()).item() >= self.p:
            return image, target
        lo, hi = torch.log(torch.tensor(self.scale))
        s = float(torch.exp(lo + (hi - lo) * torch.rand(())))
        height, width = image.shape[-2:]
        if s >= 1.0:
            return self._crop(image, target, max(1, round(height / s)), max(1, round(width / s)))
        return self._pad(image, target, round(height / s), round(width / s))

    def _crop(self, image: Tensor, target: Target, h: int, w: int) -> tuple[Tensor, Target]:
        height, width = image.shape[-2:]
        y0 = int(torch.randint(height - h + 1, ()))
        x0 = int(torch.randint(width - w + 1, ()))
        boxes = target["boxes"]  # [N, 4]
        shifted = boxes - boxes.new_tensor([x0, y0, x0, y0])
        clipped = torch.stack((shifted[:, 0].clamp(0, w), shifted[:, 1].clamp(0, h),
                               shifted[:, 2].clamp(0, w), shifted[:, 3].clamp(0, h)), dim=1)  # fmt: skip
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        kept_area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        keep = kept_area >= self.min_visible * area.clamp(min=1e-6)  # [N]
        if len(boxes) and not bool(keep.any()):
            return image, target  # every object would be cropped away
        target = dict(target)
        for key in OBJECT_KEYS & target.keys():
            if isinstance(target[key], Tensor) and len(target[key]) == len(keep):
                target[key] = target[key][keep]
        target["boxes"] = clipped[keep]
        if "masks" in target:
            target["masks"] = target["masks"][:, y0 : y0 + h, x0 : x0 + w]  # [N', h, w]
        if "proposals" in target:
            target["proposals"] = _clip_boxes(target["proposals"] - boxes.new_tensor([x0, y0, x0, y0]), h, w)
        return image[:, y0 : y0 + h, x0 : x0 + w], target

    def _pad(self, image: Tensor, target: Target, h: int, w: int) -> tuple[Tensor, Target]:
        height, width = image.shape[-2:]
        y0 = int(torch.randint(h - height + 1, ()))
        x0 = int(torch.randint(w - width + 1, ()))
        canvas = image.new_empty((image.shape[0], h, w))
        canvas[:] = torch.tensor(self.fill, dtype=image.dtype).view(-1, 1, 1)
        canvas[:, y0 : y0 + height, x0 : x0 + width] = image
        target = dict(target)
        for key in BOX_KEYS & target.keys():
            target[key] = target[key] + target[key].new_tensor([x0, y0, x0, y0])
        if "masks" in target:
            masks = target["masks"]  # [N, H, W]
            padded = masks.new_zeros((masks.shape[0], h, w))
            padded[:, y0 : y0 + height, x0 : x0 + width] = masks
            target["masks"] = padded
        return canvas, target

    def __repr__(self) -> str:
        return f"ScaleJitter(scale={self.scale}, p={self.p}, min_visible={self.min_visible})"


def _clip_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """``boxes`` [P, 4] clipped to the image; those left with no area dropped."""
    clipped = torch.stack((boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                           boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)), dim=1)  # fmt: skip
    return clipped[(clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])]


class ColorJitter:
    """Random photometric changes: brightness, contrast, saturation (factors drawn uniformly from
    ``1 ± value``) and hue (a shift drawn from ``± hue`` of a turn), applied in a random order with
    probability ``p``; boxes and masks are unchanged. Photographs of one subject vary in light and
    camera far more than a few hundred of them show; YOLO-style photometric jitter makes the
    detector see that variation (torchvision's ``ColorJitter`` functions do the work)."""

    def __init__(self, brightness: float = 0.3, contrast: float = 0.3, saturation: float = 0.3, hue: float = 0.02,
                 p: float = 0.8) -> None:  # fmt: skip
        for name, value, top in (("brightness", brightness, 1.0), ("contrast", contrast, 1.0),
                                 ("saturation", saturation, 1.0), ("hue", hue, 0.5), ("p", p, 1.0)):  # fmt: skip
            if not 0.0 <= value <= top:
                raise ValueError(f"ColorJitter: {name} must be in [0, {top}], got {value}")
        self.brightness, self.contrast, self.saturation, self.hue, self.p = brightness, contrast, saturation, hue, p

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if torch.rand(()).item() >= self.p:
            return image, target
        import torchvision.transforms.functional as F

        steps = [(F.adjust_brightness, self.brightness), (F.adjust_contrast, self.contrast),
                 (F.adjust_saturation, self.saturation)]  # fmt: skip
        for i in torch.randperm(4).tolist():
            if i == 3:
                if self.hue > 0:
                    image = F.adjust_hue(image, float(torch.empty(()).uniform_(-self.hue, self.hue)))
                continue
            adjust, value = steps[i]
            if value > 0:
                image = adjust(image, float(torch.empty(()).uniform_(1 - value, 1 + value)))
        return image.clamp(0.0, 1.0), target

    def __repr__(self) -> str:
        return (f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
                f"hue={self.hue}, p={self.p})")  # fmt: skip


def augmentation(
    hflip: float = 0.5, scale_jitter: tuple[float, float] | None = None, color_jitter: float | None = None
) -> Compose | None:
    """The training augmentation a ``data`` section asks for, in the order that keeps each cheap:
    scale jitter (a crop or a canvas), then the flip, then photometric jitter of strength
    ``color_jitter`` (brightness, contrast and saturation by ``1 ± color_jitter``, hue by a tenth of
    it); ``None`` when nothing is asked."""
    steps: list[Transform] = []
    if scale_jitter is not None:
        steps.append(ScaleJitter(scale_jitter))
    if hflip > 0:
        steps.append(RandomHorizontalFlip(hflip))
    if color_jitter:
        steps.append(ColorJitter(color_jitter, color_jitter, color_jitter, min(0.5, color_jitter / 10)))
    return Compose(steps) if steps else None


def collate_fn(batch: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Batch ``(image, target)`` pairs as two lists: images keep their own sizes."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
