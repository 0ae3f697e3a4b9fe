"""Pre-training a backbone on image classification: the seed's step 1.

Every R-CNN generation starts from a CNN pre-trained on classification. Without downloads, the
library trains one itself: from any ImageFolder-style directory (``root/<class>/<image>``), or
from a detection data set by cropping its objects (so the shapes data gives a classification
set for free). The classifier is the backbone's body, its RoI-sized pooling and its box head
(fc6/fc7 for VGG16 and AlexNet) topped by one linear layer, so both the shared conv layers and
the per-RoI head that the detectors reuse get trained. Training runs through the common loop
(progress bar, checkpoints, resume, TensorBoard) and the result is saved in the layout
:func:`rcnn.components.backbones.load_pretrained` reads (``model.pretrained_backbone`` in a config).

Shape shorthand:
    N: images;  S: crop side;  C: backbone channels;  P: pooled side;  K: classes
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from rcnn.components.backbones import BackboneParts, build_backbone, parts_state_dict
from rcnn.config import TrainConfig
from rcnn.core.images import IMAGENET_MEAN, IMAGENET_STD, normalize, resize_image
from rcnn.io.images import load_image
from rcnn.io.runs import claim_run_folder
from rcnn.io.tensors import save_tensors
from rcnn.training.loop import train

__all__ = ["BackboneClassifier", "CropDataset", "ImageFolderDataset", "classification_accuracy", "pretrain"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class BackboneClassifier(nn.Module):
    """Backbone body -> pool to the box head's input -> box head -> linear layer to K classes.

    Follows the library's model API: ``model(images, targets)`` with ``targets[i]["label"]``
    returns ``{"loss_cls"}`` in training; in eval mode it returns the logits ``[N, K]``.
    """

    def __init__(self, parts: BackboneParts, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes, got {num_classes}")
        self.backbone = parts.backbone
        self.box_head = parts.box_head
        self.classifier = nn.Linear(parts.box_head.out_features, num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD), persistent=False)

    def logits(self, images: Sequence[Tensor]) -> Tensor:
        x = normalize(torch.stack(list(images)), self.mean, self.std)  # [N, 3, S, S]
        level = len(self.backbone.pool_strides) - 1  # the coarsest level RoIs are pooled from
        features = self.backbone(x)[level]  # [N, C, S/s, S/s]
        size = self.box_head.pool_size
        pooled = F.adaptive_max_pool2d(features, size)  # [N, C, P, P], what RoI pooling gives a whole-image RoI
        return self.classifier(self.box_head(pooled))  # [N, K]

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict[str, Any]] | None = None) -> Any:
        logits = self.logits(images)
        if not self.training:
            return logits
        if targets is None:
            raise ValueError("training mode needs targets with a 'label'")
        labels = torch.as_tensor([int(t["label"]) for t in targets], device=logits.device)
        return {"loss_cls": F.cross_entropy(logits, labels)}


def _square(image: Tensor, size: int) -> Tensor:
    return resize_image(image, (size, size), antialias=True)


class ImageFolderDataset(Dataset):
    """``root/<class name>/<image>``: items ``(image [3, S, S], {"label": k})``, classes sorted by name."""

    def __init__(self, root: str | os.PathLike, size: int = 64) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: image folder not found")
        self.class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
        if len(self.class_names) < 2:
            raise ValueError(f"{root}: expected one sub-folder per class (at least 2), found {self.class_names}")
        self.items = [
            (path, k)
            for k, name in enumerate(self.class_names)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in _IMAGE_SUFFIXES
        ]
        if not self.items:
            raise ValueError(f"{root}: no images found in the class folders")
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        path, label = self.items[index]
        image = _square(load_image(path), self.size)
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, {"label": label}


class CropDataset(Dataset):
    """The objects of a detection data set as a classification set: one crop per object.

    Each crop is the object's box enlarged by ``context`` of its size on every side (clipped to
    the image) and resized to ``size`` x ``size``; its label is the object's class minus one
    (class 1..K -> 0..K-1). Objects smaller than ``min_size`` pixels are skipped.

    ``background=True`` adds a class ``"background"`` (label K), as R-CNN's classifiers have: per
    image as many regions as it has objects, drawn once (seeded by the image's position) among
    boxes of 10-60 % of the image's sides that overlap every object at IoU under 0.3. A set of
    one class needs it to be a classification task at all.
    """

    def __init__(
        self,
        dataset: Any,
        size: int = 64,
        context: float = 0.1,
        min_size: float = 4.0,
        augment: bool = True,
        background: bool = False,
    ) -> None:
        self.dataset = dataset
        self.size, self.context, self.augment = size, context, augment
        self.class_names = list(dataset.class_names[1:]) + (["background"] if background else [])
        self.items: list[tuple[int, list[float], int]] = []
        for index in range(len(dataset)):
            ann = dataset.annotation(index)
            boxes = [b for b in ann["boxes"].tolist() if min(b[2] - b[0], b[3] - b[1]) >= min_size]
            for box, label in zip(ann["boxes"].tolist(), ann["labels"].tolist()):
                if min(box[2] - box[0], box[3] - box[1]) >= min_size:
                    self.items.append((index, box, int(label) - 1))
            if background and boxes:
                for box in _background_boxes(ann["boxes"], ann["orig_size"], len(boxes), index):
                    self.items.append((index, box, len(self.class_names) - 1))
        if not self.items:
            raise ValueError("the data set has no objects to crop")
        self._cache: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int) -> tuple[Tensor, dict[str, Any]]:
        index, (x1, y1, x2, y2), label = self.items[item]
        if self._cache is None or self._cache[0] != index:
            self._cache = (index, self.dataset[index][0])
        image = self._cache[1]
        height, width = image.shape[-2:]
        pad_x, pad_y = self.context * (x2 - x1), self.context * (y2 - y1)
        if self.augment:  # jitter the crop a little
            shift = (torch.rand(2) - 0.5) * 0.2
            x1, x2 = x1 + float(shift[0]) * (x2 - x1), x2 + float(shift[0]) * (x2 - x1)
            y1, y2 = y1 + float(shift[1]) * (y2 - y1), y2 + float(shift[1]) * (y2 - y1)
        left, top = max(int(x1 - pad_x), 0), max(int(y1 - pad_y), 0)
        right, bottom = min(int(round(x2 + pad_x)), width), min(int(round(y2 + pad_y)), height)
        crop = _square(image[:, top : max(bottom, top + 1), left : max(right, left + 1)], self.size)
        if self.augment and torch.rand(()) < 0.5:
            crop = crop.flip(-1)
        return crop, {"label": label}


def _background_boxes(objects: Tensor, size: tuple[int, int], count: int, seed: int) -> list[list[float]]:
    """Up to ``count`` boxes in an image of ``size`` (H, W) overlapping each of ``objects`` [N, 4] at IoU < 0.3."""
    from torchvision.ops import box_iou

    height, width = size
    g = torch.Generator().manual_seed(seed)
    sides = torch.rand(64, 2, generator=g) * 0.5 + 0.1  # [64, 2]: width and height as fractions
    w, h = sides[:, 0] * width, sides[:, 1] * height
    x1 = torch.rand(64, generator=g) * (width - w)
    y1 = torch.rand(64, generator=g) * (height - h)
    candidates = torch.stack((x1, y1, x1 + w, y1 + h), 1)  # [64, 4]
    if len(objects):
        candidates = candidates[box_iou(candidates, objects.float()).max(1).values < 0.3]
    return candidates[:count].tolist()


@torch.inference_mode()
def classification_accuracy(model: BackboneClassifier, dataset: Dataset, batch_size: int = 64) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``dataset``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    loss = 0.0
    for start in range(0, len(dataset), batch_size):  # type: ignore[arg-type]
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]  # type: ignore[arg-type]
        logits = model([im.to(device) for im, _ in items])
        labels = torch.tensor([t["label"] for _, t in items], device=device)
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        total += len(items)
    model.train(was_training)
    return {"top1": correct / max(total, 1), "loss": loss / max(total, 1)}


def pretrain(
    backbone_name: str,
    train_set: Dataset,
    num_classes: int,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    val_set: Dataset | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``backbone_name`` as a classifier; write ``out_dir/backbone.safetensors``.

    Returns the training summary, the validation accuracy (when ``val_set`` is given) and the path
    of the weights file (in the layout :func:`rcnn.components.backbones.load_pretrained` reads).
    """
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    model = BackboneClassifier(build_backbone(backbone_name, norm="bn"), num_classes)
    evaluator = (lambda m: classification_accuracy(m, val_set)) if val_set is not None else None
    with claim_run_folder(out_dir, resume=resume, overwrite=overwrite):  # one training per folder
        result = train(model, train_set, cfg, out_dir, evaluator=evaluator, resume=resume, progress=progress, log=log)
    weights = save_tensors(out_dir / "backbone.safetensors", parts_state_dict(BackboneParts(model.backbone, model.box_head)))
    return {
        "backbone": backbone_name,
        "iterations": result.iterations,
        "train_seconds": result.seconds,
        "losses": result.losses,
        "metrics": result.metrics,
        "weights": str(weights),
    }
