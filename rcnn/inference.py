"""Running a trained detector: over a data set (for evaluation) or over image files.

Shape shorthand:
    D: detections of an image;  H, W: original image size
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rcnn.data.common import DetectionDataset, load_image
from rcnn.evaluation.coco import evaluate_coco
from rcnn.evaluation.voc import evaluate_voc

__all__ = ["evaluate_model", "model_device", "predict_dataset", "predict_images"]

ProposalSource = Callable[[int], Tensor]  # image_id -> proposals [P, 4] in original coordinates


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def _run(model: nn.Module, images: list[Tensor], proposals: list[Tensor] | None) -> list[dict[str, Tensor]]:
    if proposals is None:
        return model(images)
    return model(images, proposals=proposals)


@torch.inference_mode()
def predict_dataset(
    model: nn.Module,
    dataset: DetectionDataset,
    *,
    proposals: ProposalSource | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    progress: bool = False,
) -> tuple[dict[int, dict[str, Tensor]], float]:
    """Outputs for each image of ``dataset`` (image_id -> output on the CPU) and seconds per image.

    The time counts the model call only (resizing and post-processing included, data loading not).
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    outputs: dict[int, dict[str, Tensor]] = {}
    seconds = 0.0
    indices = range(count)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="predict", unit="img")
    batch: list[tuple[int, Tensor]] = []
    for n, index in enumerate(indices):
        image, target = dataset[index]
        batch.append((int(target["image_id"]), image.to(device)))
        if len(batch) < batch_size and n + 1 < count:
            continue
        ids = [i for i, _ in batch]
        props = [proposals(i).to(device) for i in ids] if proposals is not None else None
        tic = time.perf_counter()
        results = _run(model, [im for _, im in batch], props)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - tic
        for image_id, result in zip(ids, results):
            outputs[image_id] = {k: v.cpu() for k, v in result.items()}
        batch = []
    model.train(was_training)
    return outputs, seconds / max(count, 1)


def evaluate_model(
    model: nn.Module,
    dataset: DetectionDataset,
    *,
    proposals: ProposalSource | None = None,
    masks: bool | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Box AP (COCO and VOC) — and mask AP for models that predict masks — on ``dataset``.

    Returns ``{"bbox": {...12 COCO numbers, per_class_AP}, "segm": {...}?, "voc": {"mAP", ...},
    "seconds_per_image", "images"}``.
    """
    outputs, seconds = predict_dataset(model, dataset, proposals=proposals, limit=limit, progress=progress)
    image_ids = list(outputs)
    if masks is None:
        masks = dataset.with_masks and any("masks" in o for o in outputs.values())
    iou_types = ("bbox", "segm") if masks else ("bbox",)
    result = evaluate_coco(outputs, dataset, iou_types, image_ids=image_ids)
    result["voc"] = evaluate_voc(outputs, dataset, image_ids=image_ids)
    result["seconds_per_image"] = seconds
    result["images"] = len(image_ids)
    return result


@torch.inference_mode()
def predict_images(
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    *,
    proposals: Mapping[str, Tensor] | None = None,
) -> list[tuple[Path, Tensor, dict[str, Tensor]]]:
    """``(path, image [3, H, W], output)`` for each image file; unreadable files raise naming the file."""
    model.eval()
    device = model_device(model)
    results = []
    for path in paths:
        path = Path(path)
        image = load_image(path)
        props = None
        if proposals is not None:
            props = [proposals[str(path)].to(device)]
        (output,) = _run(model, [image.to(device)], props)
        results.append((path, image, {k: v.cpu() for k, v in output.items()}))
    return results
