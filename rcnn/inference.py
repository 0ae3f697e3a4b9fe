"""Running a trained detector: over a data set (for evaluation) or over image files.

Shape shorthand:
    D: detections of an image;  H, W: original image size
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from rcnn.components.proposals.selective_search import SelectiveSearch
from rcnn.data.common import DetectionDataset
from rcnn.evaluation.classes import match_classes
from rcnn.evaluation.coco import evaluate_coco
from rcnn.evaluation.voc import evaluate_voc
from rcnn.tiling import MAX_TILES, MERGES, as_float, check_tiling, predict_tiled, tile_count
from rcnn.io.images import MAX_PIXELS, DecodedImage, read_image

T = TypeVar("T")

__all__ = [
    "Prediction",
    "Tiling",
    "check_limit",
    "check_score_thresh",
    "detect_timed",
    "evaluate_model",
    "model_device",
    "model_input_size",
    "peak_memory_mb",
    "predict_dataset",
    "predict_images",
    "predict_stream",
    "reset_peak_memory",
    "score_range",
]

ProposalSource = Callable[[int], Tensor]  # image_id -> proposals [P, 4] in original coordinates


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters, or of its buffers when it has none (the CPU for a model
    run outside PyTorch, e.g. ONNX Runtime)."""
    for tensors in (getattr(model, "parameters", None), getattr(model, "buffers", None)):
        if tensors is not None:
            first = next(iter(tensors()), None)
            if first is not None:
                return first.device
    return torch.device("cpu")


def score_range(model: Any) -> tuple[float, float]:
    """The range of ``model``'s detection scores: ``(0, 1)`` for softmax probabilities; unbounded
    for R-CNN, whose detector (trained in stages) scores with SVM margins (0: the decision boundary)."""
    if getattr(model, "trains_in_stages", False):
        return -math.inf, math.inf
    return 0.0, 1.0


def check_score_thresh(value: float | None, model: Any, what: str = "score_thresh") -> float | None:
    """``value`` as a float, or ``ValueError`` naming ``what`` when it is NaN, infinite or outside the
    range of ``model``'s scores (:func:`score_range`); None stays None (the model's default)."""
    if value is None:
        return None
    value = float(value)
    low, high = score_range(model)
    if not math.isfinite(value):
        raise ValueError(f"{what} {value}: a score threshold must be a finite number")
    if not low <= value <= high:
        name = getattr(model, "name", type(model).__name__)
        raise ValueError(f"{what} {value:g}: {name}'s scores are probabilities; give a threshold in [{low:g}, {high:g}]")
    return value


def check_limit(limit: int | None, what: str = "limit") -> int | None:
    """``limit`` (images to use), or ``ValueError`` naming ``what`` unless it is None or a whole number >= 1."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{what} must be a whole number of images >= 1 (or left out for all), got {limit}")
    return limit


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
    check_limit(limit)
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
    keep_outputs: bool = False,
) -> dict[str, Any]:
    """Box AP (COCO and VOC) — and mask AP for models that predict masks — on ``dataset``.

    ``class_names``: the model's classes (background first, as in its run folder); the data set's
    are matched with them by name (:func:`rcnn.evaluation.classes.match_classes`: a data set with
    other classes is refused, never paired by position). Without them the model's labels are
    taken to be the data set's.

    Returns ``{"bbox": {...12 COCO numbers, per_class_AP}, "segm": {...}?, "voc": {"mAP", ...},
    "seconds_per_image", "images"}`` (and ``"classes_dropped"``: model classes absent from the data;
    with ``keep_outputs``, ``"outputs"``: image_id -> output, in the data set's labels).
    """
    check_limit(limit)
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
    if keep_outputs:
        result["outputs"] = outputs
    return result


@dataclass
class Prediction:
    """The detections of one image (or video frame) of :func:`predict_stream`.

    ``image`` is the picture as decoded for the model (``[3, h, w]``: smaller than the original
    ``H x W`` when the file was decoded reduced); ``output`` holds ``boxes`` in the original's
    pixels (``x1, y1, x2, y2``), ``labels``, ``scores`` and, for Mask R-CNN, ``masks`` at the size
    of ``image``. ``key`` is what the caller passed with the image.
    """

    key: Any
    image: Tensor  # [3, h, w]
    original_size: tuple[int, int]  # (H, W)
    output: dict[str, Tensor]

    @property
    def scale(self) -> tuple[float, float]:
        """``(h / H, w / W)``."""
        return self.image.shape[1] / self.original_size[0], self.image.shape[2] / self.original_size[1]

    def boxes_in_image(self) -> Tensor:
        """``boxes [D, 4]`` in the pixels of ``image`` (for drawing on it)."""
        sy, sx = self.scale
        return self.output["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=self.output["boxes"].dtype)


@dataclass(frozen=True)
class Tiling:
    """Tiled prediction settings (:func:`rcnn.tiling.predict_tiled`; their ranges: :mod:`rcnn.tiling`)."""

    tile: int
    overlap: float = 0.2
    whole: bool = False  # also run the whole image, downscaled, and merge its detections
    merge: str = "nms"
    merge_threshold: float = 0.5
    max_tiles: int = MAX_TILES  # refuse an image that would make more tiles

    def __post_init__(self) -> None:
        check_tiling(self.tile, self.overlap, self.max_tiles)
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {', '.join(MERGES)}, got {self.merge!r}")
        if not 0.0 <= self.merge_threshold <= 1.0:  # NaN fails too
            raise ValueError(f"merge_threshold must be in [0, 1], got {self.merge_threshold}")

    def check(self, height: int, width: int, where: str) -> None:
        """``ValueError`` naming ``where`` when an ``H x W`` image would make more than ``max_tiles`` tiles."""
        count = tile_count(height, width, self.tile, self.overlap)
        if count > self.max_tiles:
            raise ValueError(
                f"{where}: its {width}x{height} pixels cut into {self.tile}-px tiles overlapping by {self.overlap:g} make "
                f"{count} tiles, more than the limit of {self.max_tiles} (one model call each); use a larger --tile or "
                "a smaller --overlap, or raise --max-tiles"
            )


def model_input_size(model: Any) -> tuple[int, int] | None:
    """``(min_size, max_size)`` of a model's resize rule; ``None`` for a model without one
    (R-CNN, which warps each region; an exported model)."""
    transform = getattr(model, "transform", None)
    if transform is None or not hasattr(transform, "max_size"):
        return None
    return transform.min_sizes[-1], transform.max_size


def _prefetched(items: Iterable[T], ahead: int) -> Iterator[T]:
    """``items`` produced in a background thread, up to ``ahead`` in advance (image decoding, which
    releases the GIL, overlaps the model's work); the producer's exceptions are raised here."""
    if ahead <= 0:
        yield from items
        return
    queue: Queue = Queue(maxsize=ahead)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                queue.put((item, None))
        except BaseException as exc:  # handed to the consumer
            queue.put((None, exc))
        queue.put((done, None))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, exc = queue.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(Empty):
                queue.get(timeout=0.05)
        thread.join()


def _pixels(image: Tensor) -> np.ndarray:
    """``[H, W, 3]`` uint8 of an image tensor ``[3, H, W]`` (uint8, or float in 0..1)."""
    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255.0).round().to(torch.uint8)
    return image.permute(1, 2, 0).cpu().numpy()


@torch.inference_mode()
def predict_stream(
    model: Any,
    items: Iterable[tuple[Any, DecodedImage]],
    *,
    batch_size: int = 1,
    tiling: Tiling | None = None,
    whole_images: Callable[[Any], Tensor] | None = None,
    prefetch: int = 2,
) -> Iterator[Prediction]:
    """Run ``model`` over ``(key, decoded image)`` pairs, ``batch_size`` images per call, and yield a
    :class:`Prediction` per image, in order.

    Models that need proposals get selective search's, computed on the decoded image. With
    ``tiling`` each image is cut into tiles (run ``batch_size`` tiles per call) and
    ``whole_images(key)``, when given, supplies the downscaled whole image for ``tiling.whole``.
    Decoding runs ahead of the model in a background thread (``prefetch`` items; 0: none).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    device = model_device(model)
    needs_proposals = bool(getattr(model, "needs_proposals", False))
    search = SelectiveSearch() if needs_proposals else None
    if tiling is not None and needs_proposals:
        raise ValueError("tiled prediction runs models with an RPN (Faster / Mask R-CNN); this model needs proposals")
    if tiling is not None:
        for key, decoded in _prefetched(items, prefetch):
            whole = None
            if tiling.whole:
                whole = whole_images(key) if whole_images is not None else as_float(decoded.image)
                whole = whole.to(device)
            output = predict_tiled(
                model, decoded.image.to(device), tiling.tile, tiling.overlap, whole=whole, merge=tiling.merge,
                merge_threshold=tiling.merge_threshold, batch_size=batch_size, max_tiles=tiling.max_tiles,
            )  # fmt: skip
            yield _prediction(key, decoded, output)
        return
    batch: list[tuple[Any, DecodedImage]] = []
    stream = iter(_prefetched(items, prefetch))
    while True:
        item = next(stream, None)
        if item is not None:
            batch.append(item)
            if len(batch) < batch_size:
                continue
        if not batch:
            return
        images = [as_float(decoded.image).to(device) for _, decoded in batch]
        proposals = [search(_pixels(im)).to(device) for im in images] if search is not None else None
        outputs = _run(model, images, proposals)
        for (key, decoded), output in zip(batch, outputs):
            yield _prediction(key, decoded, output)
        batch = []
        if item is None:
            return


def _prediction(key: Any, decoded: DecodedImage, output: dict[str, Tensor]) -> Prediction:
    output = {k: v.cpu() for k, v in output.items()}
    sy, sx = decoded.scale
    if (sy, sx) != (1.0, 1.0):
        output["boxes"] = output["boxes"] / torch.tensor([sx, sy, sx, sy], dtype=output["boxes"].dtype)
    return Prediction(key, decoded.image, decoded.original_size, output)


def predict_images(
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 1,
    max_pixels: int | None = MAX_PIXELS,
) -> list[tuple[Path, Tensor, dict[str, Tensor]]]:
    """``(path, image [3, H, W], output)`` for each image file, read whole; unreadable files raise
    naming the file. (:func:`predict_stream` is the general form.)"""
    items = ((Path(p), read_image(p, max_pixels=max_pixels)) for p in paths)
    return [(p.key, p.image, p.output) for p in predict_stream(model, items, batch_size=batch_size, prefetch=0)]


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
