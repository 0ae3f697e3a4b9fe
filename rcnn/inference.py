"""Running a trained detector: over a data set (for evaluation) or over image files.

Shape shorthand:
    D: detections of an image;  H, W: original image size
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rcnn.components.proposals.selective_search import SelectiveSearch
from rcnn.data.common import DetectionDataset
from rcnn.evaluation.classes import match_classes
from rcnn.evaluation.coco import evaluate_coco
from rcnn.evaluation.voc import evaluate_voc
from rcnn.io.images import load_image

__all__ = [
    "detect_timed",
    "evaluate_model",
    "model_device",
    "peak_memory_mb",
    "predict_dataset",
    "predict_images",
    "reset_peak_memory",
]

ProposalSource = Callable[[int], Tensor]  # image_id -> proposals [P, 4] in original coordinates


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the CPU for a model run outside PyTorch, e.g. ONNX Runtime)."""
    parameters = getattr(model, "parameters", None)
    return next(parameters()).device if parameters is not None else torch.device("cpu")


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
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Box AP (COCO and VOC) — and mask AP for models that predict masks — on ``dataset``.

    ``class_names``: the model's classes (background first, as in its run folder); the data set's
    are matched with them by name (:func:`rcnn.evaluation.classes.match_classes`: a data set with
    other classes is refused, never paired by position). Without them the model's labels are
    taken to be the data set's.

    Returns ``{"bbox": {...12 COCO numbers, per_class_AP}, "segm": {...}?, "voc": {"mAP", ...},
    "seconds_per_image", "images"}`` (and ``"classes_dropped"``: model classes absent from the data).
    """
    mapping = match_classes(class_names, dataset.class_names, "the data set") if class_names is not None else None
    outputs, seconds = predict_dataset(model, dataset, proposals=proposals, limit=limit, progress=progress)
    if mapping is not None and not mapping.identity:
        outputs = {image_id: mapping.apply(output) for image_id, output in outputs.items()}
    image_ids = list(outputs)
    if masks is None:
        masks = dataset.with_masks and any("masks" in o for o in outputs.values())
    iou_types = ("bbox", "segm") if masks else ("bbox",)
    result = evaluate_coco(outputs, dataset, iou_types, image_ids=image_ids)
    result["voc"] = evaluate_voc(outputs, dataset, image_ids=image_ids)
    result["seconds_per_image"] = seconds
    result["images"] = len(image_ids)
    if mapping is not None and mapping.dropped:
        result["classes_dropped"] = list(mapping.dropped)
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _module_clock(module: nn.Module, device: torch.device) -> Iterator[list[float]]:
    """Seconds spent in ``module``'s forward calls while the block runs, appended to the yielded list."""
    spent: list[float] = []
    start = [0.0]

    def before(*_: Any) -> None:
        _synchronize(device)
        start[0] = time.perf_counter()

    def after(*_: Any) -> None:
        _synchronize(device)
        spent.append(time.perf_counter() - start[0])

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield spent
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def detect_timed(
    model: nn.Module, image: Tensor, search: SelectiveSearch | None = None
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """One image ``[3, H, W]`` through a trained model, timed: ``(output, {"proposals_s", "rest_s"})``.

    The proposal stage is selective search (``search``, default settings) for models that need
    proposals, else the RPN inside the model; "rest" is everything else of the model call
    (resizing and post-processing included). The model is put in eval mode. A model run by ONNX
    Runtime (:mod:`rcnn.backends`) computes its RPN inside one graph: ``proposals_s`` is None and
    ``rest_s`` the whole call.
    """
    model.eval()
    device = model_device(model)
    image = image.to(device)
    if model.needs_proposals:
        search = search or SelectiveSearch()
        pixels = (image.detach().cpu().permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        tic = time.perf_counter()
        boxes = search(pixels).to(device)
        proposals_s = time.perf_counter() - tic
        tic = time.perf_counter()
        (output,) = model([image], proposals=[boxes])
        _synchronize(device)
        return output, {"proposals_s": proposals_s, "rest_s": time.perf_counter() - tic}
    if not isinstance(model, nn.Module):  # ONNX Runtime: the RPN runs inside the one graph, not timed apart
        tic = time.perf_counter()
        (output,) = model([image])
        return output, {"proposals_s": None, "rest_s": time.perf_counter() - tic}
    with _module_clock(model.rpn, device) as rpn_seconds:
        _synchronize(device)
        tic = time.perf_counter()
        (output,) = model([image])
        _synchronize(device)
        total = time.perf_counter() - tic
    proposals_s = sum(rpn_seconds)
    return output, {"proposals_s": proposals_s, "rest_s": total - proposals_s}


def peak_memory_mb() -> float:
    """This process's peak resident memory in MiB (Linux: VmHWM, since :func:`reset_peak_memory`;
    elsewhere ``ru_maxrss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_memory() -> None:
    """Start this process's peak-memory count afresh (Linux >= 4.0: ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as err:
        raise RuntimeError("cannot reset the peak memory count: needs Linux >= 4.0 and /proc") from err
