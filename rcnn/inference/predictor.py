"""The one predictor: a detector of any backend run on images, data sets, files and video frames.

    predictor = Predictor(model)                        # a model of rcnn.models, or any backend's Detector
    prediction = predictor.predict(predictor.read("photo.jpg"))     # one image
    for prediction in predictor.stream(items): ...      # (key, decoded image) pairs, batched (or tiled)
    outputs, seconds = predictor.dataset(val)           # image_id -> output, for evaluation
    for image_id, output in predictor.iter_dataset(val): ...    # the same, one image at a time

A :class:`Predictor` owns everything between an image and its detections: the device (its
detector's), the decode size (files are decoded reduced to the detector's input size, unless
tiled or asked whole), the proposals of the generations that need them (a proposals file by image
id, else selective search on the image), batching, tiling, and the backend (anything that
implements :class:`rcnn.deploy.backends.Detector`: the eager model, ONNX Runtime). What it returns is in
the original image's pixels, boxes and masks alike. ``rcnn predict``, ``evaluate``, ``serve``,
``explain``, ``benchmark`` and the benchmarks all run a model through it.

Timing is a hook, not a second path: a :class:`Clock` given to :meth:`Predictor.detect` times the
selective search and the detector call; a :class:`Recorder` given to it receives what the forward
pass writes (``batch``, ``features``, ``proposals``, ``detections``, ...) with the time of each
write: explain draws those stages, serve splits its time into proposals and the rest
(:func:`time_split`).

The writers of ``rcnn predict`` (pictures, JSON records, COCO results, videos) are sinks of the
predictor's output (:class:`ImageFiles`, :class:`VideoFiles`, :class:`CocoResults`); a detection is
written to JSON in one schema everywhere (:func:`detection_records`, also ``rcnn serve``'s).

Shape shorthand:
    D: detections of an image;  P: proposals of an image;  H, W: original image size;
    h, w: the image as decoded for the detector
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from rcnn.deploy.backends import Detector, as_detector
from rcnn.models import model_device
from rcnn.components.proposals.io import ProposalSource
from rcnn.components.proposals.selective_search import SelectiveSearch
from rcnn.data.records import DetectionDataset
from rcnn.evaluation.classes import match_classes
from rcnn.evaluation.coco import CocoDatasetEvaluator, JsonListWriter, check_backend, result_entries
from rcnn.evaluation.voc import evaluate_voc
from rcnn.io.files import dumps_json, write_json, write_text
from rcnn.io.images import MAX_PIXELS, DecodedImage, as_float, read_image
from rcnn.inference.tiling import MAX_TILES, MERGES, check_tiling, predict_tiled, tile_count
from rcnn.viz import draw_detections, image_pixels, save_png

T = TypeVar("T")

__all__ = [
    "GENERATIONS",
    "Clock",
    "CocoResults",
    "ImageFiles",
    "Prediction",
    "Predictor",
    "ProposalSource",
    "Recorder",
    "Tiling",
    "VideoFiles",
    "check_limit",
    "check_score_thresh",
    "detection_records",
    "evaluate_model",
    "generation",
    "image_record",
    "model_device",
    "peak_memory_mb",
    "predict_dataset",
    "predict_images",
    "predict_stream",
    "reset_peak_memory",
    "score_range",
    "time_split",
]

# The generations' display names, by model name (a table to look names up in, never to compare them).
GENERATIONS = {"rcnn": "R-CNN", "fast_rcnn": "Fast R-CNN", "faster_rcnn": "Faster R-CNN", "mask_rcnn": "Mask R-CNN"}


def generation(detector: Any) -> str:
    """The display name of a detector's generation (``"Faster R-CNN"``), else its class's name."""
    return GENERATIONS.get(detector.name, type(detector).__name__)


def score_range(model: Any) -> tuple[float, float]:
    """The range of ``model``'s detection scores: ``(0, 1)`` for softmax probabilities; unbounded
    for R-CNN, whose detector (trained in stages) scores with SVM margins (0: the decision boundary)."""
    if getattr(model, "trains_in_stages", False):  # a duck-typed model may leave it out (tests/test_faults_options.py)
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
        raise ValueError(f"{what} {value:g}: {model.name}'s scores are probabilities; give a threshold in [{low:g}, {high:g}]")
    return value


def check_limit(limit: int | None, what: str = "limit") -> int | None:
    """``limit`` (images to use), or ``ValueError`` naming ``what`` unless it is None or a whole number >= 1."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{what} must be a whole number of images >= 1 (or left out for all), got {limit}")
    return limit


# -- time and what the forward pass wrote --------------------------------------------------------
class Clock:
    """CPU seconds (``time.process_time``: all threads; the steadier figure on a shared machine) and
    wall seconds (``time.perf_counter``) per named step, summed over the blocks run under the name.
    With a CUDA ``device`` the device is synchronised at each reading, so that its queued work counts."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    def now(self) -> tuple[float, float]:
        """``(cpu, wall)`` seconds now (after the device's queued work)."""
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.process_time(), time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Add the block's seconds to ``name``'s."""
        cpu, wall = self.now()
        try:
            yield
        finally:
            cpu_end, wall_end = self.now()
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu_end - cpu
            self.wall[name] = self.wall.get(name, 0.0) + wall_end - wall

    def measure(self, fn: Callable[[], T]) -> tuple[float, float, T]:
        """``(cpu_seconds, wall_seconds, result)`` of one call of ``fn``."""
        cpu, wall = self.now()
        result = fn()
        cpu_end, wall_end = self.now()
        return cpu_end - cpu, wall_end - wall, result


def _timed(clock: Clock | None, name: str) -> contextlib.AbstractContextManager:
    return clock(name) if clock is not None else contextlib.nullcontext()


class Recorder(dict):
    """What one forward pass wrote: ``recorder[name] = value`` by its stages (the models' ``forward``
    takes it as ``recorder``; the predictor adds ``images``, ``external_proposals`` and ``output``),
    and ``times[name]``: the wall seconds since the recorder was made at which ``name`` was written
    (the idea of detectron2's event storage). :meth:`watching` records the outputs of inner modules
    too, by forward hooks. Make one with :meth:`Predictor.recorder` (its clock synchronises the
    detector's device)."""

    def __init__(self, clock: Clock | None = None) -> None:
        super().__init__()
        self.clock = clock or Clock()
        self.times: dict[str, float] = {}
        self._start = self.clock.now()[1]

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, value)
        self.times[name] = self.clock.now()[1] - self._start

    def between(self, start: str, end: str) -> float:
        """Wall seconds from writing ``start`` to writing ``end``."""
        return self.times[end] - self.times[start]

    @contextlib.contextmanager
    def watching(self, modules: Mapping[str, nn.Module]) -> Iterator[Recorder]:
        """While the block runs, each call of ``modules[name]`` records its output as ``name``."""
        handles = [module.register_forward_hook(lambda _m, _args, out, name=name: self.__setitem__(name, out))
                   for name, module in modules.items()]  # fmt: skip
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def time_split(recorder: Recorder) -> dict[str, float | None]:
    """``{"proposals_s", "rest_s"}`` of a call recorded by :meth:`Predictor.detect`: proposals are the
    selective search, or the RPN inside the model (``None`` where the two are not told apart: an
    ONNX graph runs its RPN inside); rest is everything else of the detector call (resizing and
    post-processing included)."""
    if "external_proposals" in recorder:
        return {"proposals_s": recorder.between("images", "external_proposals"),
                "rest_s": recorder.between("external_proposals", "output")}  # fmt: skip
    total = recorder.between("images", "output")
    if "features" in recorder and "proposals" in recorder:  # the model's own RPN, between the two
        rpn = recorder.between("features", "proposals")
        return {"proposals_s": rpn, "rest_s": total - rpn}
    return {"proposals_s": None, "rest_s": total}


# -- the predictor -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiling:
    """Tiled prediction settings (:func:`rcnn.inference.tiling.predict_tiled`; their ranges: :mod:`rcnn.inference.tiling`)."""

    tile: int
    overlap: float = 0.2
    whole: bool = False  # also run the whole image and merge its detections
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


@dataclass
class Prediction:
    """The detections of one image (or video frame).

    ``output`` holds ``boxes [D, 4]`` (x1, y1, x2, y2), ``labels [D]``, ``scores [D]`` and, for
    Mask R-CNN, ``masks [D, 1, H, W]``, all in the pixels of the original ``H x W`` image.
    ``image`` is the picture as decoded for the detector, ``[3, h, w]`` (smaller than the original
    where the file was decoded reduced: ``draw_detections(image, output, ..., frame=original_size)``
    draws on it). ``key`` is what the caller passed with the image.
    """

    key: Any
    image: Tensor  # [3, h, w]
    original_size: tuple[int, int]  # (H, W)
    output: dict[str, Tensor]


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


def _in_original_pixels(output: dict[str, Tensor], decoded: DecodedImage) -> dict[str, Tensor]:
    """A detector's ``output`` on ``decoded.image`` (on the CPU) in the original image's pixels: boxes
    scaled, masks ``[D, 1, h, w]`` resampled (bilinear, binarised at 0.5 unless probabilities)."""
    sy, sx = decoded.scale
    if (sy, sx) == (1.0, 1.0):
        return output
    output = dict(output)
    output["boxes"] = output["boxes"] / torch.tensor([sx, sy, sx, sy], dtype=output["boxes"].dtype)
    if "masks" in output:
        masks = output["masks"]  # [D, 1, h, w]
        size = decoded.original_size
        resized = torch.empty((len(masks), 1, *size), dtype=masks.dtype)
        for d in range(len(masks)):  # one at a time: a float copy of all of them at full size would be 4x the result
            mask = nn.functional.interpolate(masks[d : d + 1].float(), size=size, mode="bilinear")
            resized[d] = mask[0] if masks.is_floating_point() else (mask[0] >= 0.5).to(masks.dtype)
        output["masks"] = resized
    return output


class Predictor:
    """The one way the library runs a detector on images (see the module docstring).

    Args:
        detector: any backend's :class:`rcnn.deploy.backends.Detector`, or a model of :mod:`rcnn.models`
            (run by the eager backend).
        proposals: for a detector that needs proposals, ``image_id -> [P, 4]`` (a proposals file:
            ``rcnn.training.datasets.proposal_source``) for the images of :meth:`dataset`; other
            images get selective search's, computed on the image as given to the detector.
        search: that selective search (default settings).
        batch_size: images (or tiles) per detector call.
        tiling: cut each image into tiles (:class:`Tiling`); files are then decoded whole, uint8.
        full_resolution: decode files whole even where the detector would shrink them.
        max_pixels: files with more pixels (by their header) are refused.
        prefetch: :meth:`stream` decodes this many items ahead, in a thread (0: none).
    """

    def __init__(
        self,
        detector: Detector | nn.Module,
        *,
        proposals: ProposalSource | None = None,
        search: SelectiveSearch | None = None,
        batch_size: int = 1,
        tiling: Tiling | None = None,
        full_resolution: bool = False,
        max_pixels: int | None = MAX_PIXELS,
        prefetch: int = 2,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.detector = as_detector(detector)
        if tiling is not None and self.detector.needs_proposals:
            raise ValueError("tiled prediction runs models with an RPN (Faster / Mask R-CNN); this model needs proposals")
        self.proposals = proposals
        self.search = search or SelectiveSearch()
        self.batch_size = batch_size
        self.tiling = tiling
        self.full_resolution = full_resolution
        self.max_pixels = max_pixels
        self.prefetch = prefetch

    @property
    def device(self) -> torch.device:
        """Where the images go: the detector's device."""
        return self.detector.device

    @property
    def decode_size(self) -> tuple[int, int] | None:
        """``(min_size, max_size)`` files are decoded to (``rcnn.io.images.read_image``'s ``fit``), or
        None: whole (tiled, asked for whole, or a detector without a resize rule)."""
        return None if self.tiling is not None or self.full_resolution else self.detector.input_size

    def read(self, path: str | os.PathLike) -> DecodedImage:
        """An image file decoded for the detector (reduced to :attr:`decode_size`; uint8 and checked
        against the tile limit when tiled). ``ValueError`` naming the file when it cannot be read."""
        dtype = torch.uint8 if self.tiling is not None else torch.float32
        decoded = read_image(path, fit=self.decode_size, max_pixels=self.max_pixels, dtype=dtype)
        if self.tiling is not None:  # before any tile is run
            self.tiling.check(*decoded.original_size, str(path))
        return decoded

    def recorder(self) -> Recorder:
        """A :class:`Recorder` whose clock synchronises this detector's device."""
        return Recorder(Clock(self.device))

    @torch.inference_mode()
    def detect(
        self,
        images: Sequence[Tensor],
        *,
        image_ids: Sequence[int] | None = None,
        proposals: Sequence[Tensor] | None = None,
        recorder: Recorder | None = None,
        clock: Clock | None = None,
    ) -> list[dict[str, Tensor]]:
        """One detector call on ``images`` ``[3, H, W]`` (float 0..1, or uint8): per image ``boxes``,
        ``labels``, ``scores`` (+ ``masks``) in that image's pixels, on the CPU.

        A detector that needs proposals gets ``proposals``, else the proposals file's for
        ``image_ids``, else selective search's. ``clock`` times ``"proposals"`` (selective search,
        the file) and ``"model"`` (the detector call); ``recorder`` receives ``images``,
        ``external_proposals`` (where they come from outside), what the forward pass writes, and
        ``output``.
        """
        images = [as_float(image).to(self.device) for image in images]
        if recorder is not None:
            recorder["images"] = images
        if proposals is not None:
            proposals = [p.to(self.device) for p in proposals]
        elif self.detector.needs_proposals:
            with _timed(clock, "proposals"):
                if self.proposals is not None and image_ids is not None:
                    proposals = [self.proposals(int(i)).to(self.device) for i in image_ids]
                else:
                    proposals = [self.search(image_pixels(image)).to(self.device) for image in images]
            if recorder is not None:
                recorder["external_proposals"] = proposals
        with _timed(clock, "model"):
            outputs = self.detector(images, proposals=proposals, recorder=recorder)
        if recorder is not None:
            recorder["output"] = outputs
        return [{k: v.cpu() for k, v in output.items()} for output in outputs]

    def _tiled(self, image: Tensor) -> dict[str, Tensor]:
        tiling = self.tiling
        whole = as_float(image).to(self.device) if tiling.whole else None
        output = predict_tiled(
            self.detector, image.to(self.device), tiling.tile, tiling.overlap, whole=whole, merge=tiling.merge,
            merge_threshold=tiling.merge_threshold, batch_size=self.batch_size, max_tiles=tiling.max_tiles,
        )  # fmt: skip
        return {k: v.cpu() for k, v in output.items()}

    def predict(self, image: DecodedImage | Tensor, key: Any = None, *, recorder: Recorder | None = None) -> Prediction:
        """One image (as :meth:`read` decodes it, or a tensor ``[3, H, W]`` taken as the original):
        its :class:`Prediction`, in the original's pixels. ``recorder``: as :meth:`detect` (untiled)."""
        decoded = image if isinstance(image, DecodedImage) else DecodedImage(image, (image.shape[1], image.shape[2]))
        if self.tiling is not None:
            output = self._tiled(decoded.image)
        else:
            (output,) = self.detect([decoded.image], recorder=recorder)
        return Prediction(key, decoded.image, decoded.original_size, _in_original_pixels(output, decoded))

    def timed(self, image: DecodedImage | Tensor) -> tuple[Prediction, dict[str, float | None]]:
        """:meth:`predict` with its time split (:func:`time_split`)."""
        recorder = self.recorder()
        prediction = self.predict(image, recorder=recorder)
        return prediction, time_split(recorder)

    def stream(self, items: Iterable[tuple[Any, DecodedImage]]) -> Iterator[Prediction]:
        """A :class:`Prediction` for each ``(key, decoded image)`` pair, in order: ``batch_size``
        images per detector call, or each image's tiles ``batch_size`` at a time; decoding runs
        ahead in a background thread (``prefetch``)."""
        items = iter(_prefetched(items, self.prefetch))
        size = 1 if self.tiling is not None else self.batch_size
        while batch := list(itertools.islice(items, size)):
            if self.tiling is not None:
                (key, decoded), = batch
                yield Prediction(key, decoded.image, decoded.original_size, self._tiled(decoded.image))
                continue
            for (key, decoded), output in zip(batch, self.detect([decoded.image for _, decoded in batch])):
                yield Prediction(key, decoded.image, decoded.original_size, _in_original_pixels(output, decoded))

    def iter_dataset(
        self,
        dataset: DetectionDataset,
        *,
        limit: int | None = None,
        progress: bool = False,
        clock: Clock | None = None,
    ) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """``(image_id, output)`` for each image of ``dataset`` in order (the first ``limit``), the
        output on the CPU in the original image's pixels, yielded as its batch is predicted: nothing
        is held beyond the batch (``rcnn evaluate`` streams them to its metrics). ``clock`` times the
        detector calls (``"model"``: resizing and post-processing included) and the proposals."""
        from tqdm.auto import tqdm

        check_limit(limit)
        count = len(dataset) if limit is None else min(limit, len(dataset))
        with tqdm(total=count, desc="predict", unit="img", disable=not progress) as bar:  # closed before an error is told
            for start in range(0, count, self.batch_size):
                ids, images = [], []
                for index in range(start, min(start + self.batch_size, count)):
                    image, target = dataset[index]
                    ids.append(int(target["image_id"]))
                    images.append(image)
                yield from zip(ids, self.detect(images, image_ids=ids, clock=clock))
                bar.update(len(ids))

    def dataset(
        self, dataset: DetectionDataset, *, limit: int | None = None, progress: bool = False
    ) -> tuple[dict[int, dict[str, Tensor]], float]:
        """Outputs for each image of ``dataset`` (image_id -> output on the CPU, original pixels) and
        the seconds per image of the detector calls (resizing and post-processing included; data
        loading and proposals not). All held at once: :meth:`iter_dataset` gives them one at a time."""
        check_limit(limit)
        count = len(dataset) if limit is None else min(limit, len(dataset))
        clock = Clock(self.device)
        outputs = dict(self.iter_dataset(dataset, limit=limit, progress=progress, clock=clock))
        return outputs, clock.wall.get("model", 0.0) / max(count, 1)


# -- the functions of earlier versions, on the predictor -----------------------------------------
def _predictor(model: Predictor | Detector | nn.Module, **options: Any) -> Predictor:
    return model if isinstance(model, Predictor) else Predictor(model, **options)


def predict_dataset(
    model: Predictor | Detector | nn.Module,
    dataset: DetectionDataset,
    *,
    proposals: ProposalSource | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    progress: bool = False,
) -> tuple[dict[int, dict[str, Tensor]], float]:
    """:meth:`Predictor.dataset` of ``model``."""
    return _predictor(model, proposals=proposals, batch_size=batch_size).dataset(dataset, limit=limit, progress=progress)


def predict_stream(
    model: Predictor | Detector | nn.Module,
    items: Iterable[tuple[Any, DecodedImage]],
    *,
    batch_size: int = 1,
    tiling: Tiling | None = None,
    prefetch: int = 2,
) -> Iterator[Prediction]:
    """:meth:`Predictor.stream` of ``model``."""
    return _predictor(model, batch_size=batch_size, tiling=tiling, prefetch=prefetch).stream(items)


def predict_images(
    model: Predictor | Detector | nn.Module,
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 1,
    max_pixels: int | None = MAX_PIXELS,
) -> list[tuple[Path, Tensor, dict[str, Tensor]]]:
    """``(path, image [3, H, W], output)`` for each image file, read whole; unreadable files raise
    naming the file."""
    predictor = _predictor(model, batch_size=batch_size, full_resolution=True, max_pixels=max_pixels, prefetch=0)
    items = ((Path(p), predictor.read(p)) for p in paths)
    return [(p.key, p.image, p.output) for p in predictor.stream(items)]


class _StreamedMetrics:
    """:func:`evaluate_model`'s metrics taken image by image: each output goes to a
    :class:`~rcnn.evaluation.coco.CocoDatasetEvaluator` (checked, stored on disk, masks as RLE) and
    its boxes, labels and scores (48 bytes a detection, never its masks) are kept for VOC, which
    ranks each class's detections over all images at the end.

    ``masks`` None: mask AP where the data set has ground-truth masks and the outputs have masks,
    decided by the first output (a later one that disagrees is an error, as :func:`evaluate_coco`
    gives for outputs of which some lack masks)."""

    def __init__(self, dataset: DetectionDataset, masks: bool | None, backend: str) -> None:
        self.dataset, self.masks, self.backend = dataset, masks, backend
        self.coco: CocoDatasetEvaluator | None = None
        if masks is not None:  # (its arguments checked before any prediction)
            self.coco = CocoDatasetEvaluator(dataset, ("bbox", "segm") if masks else ("bbox",), backend=backend)
        self.voc: dict[int, dict[str, np.ndarray]] = {}  # image_id -> boxes [D, 4], labels [D], scores [D]
        self.without_masks: int | None = None  # the first image whose output has no masks

    def __enter__(self) -> _StreamedMetrics:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.coco is not None:
            self.coco.close()

    def add(self, image_id: int, output: Mapping[str, Any]) -> None:
        """One image's ``output`` (the data set's labels, original pixels)."""
        has_masks = "masks" in output
        if self.coco is None:
            iou_types = ("bbox", "segm") if self.dataset.with_masks and has_masks else ("bbox",)
            self.coco = CocoDatasetEvaluator(self.dataset, iou_types, backend=self.backend)
        if not has_masks and self.without_masks is None:
            self.without_masks = image_id
        elif has_masks and self.masks is None and self.dataset.with_masks and "segm" not in self.coco.iou_types:
            raise ValueError(f"predictions[{self.without_masks}]: 'segm' evaluation needs 'masks' in every output")
        det = self.coco.add(image_id, output)
        self.voc[image_id] = {"boxes": det.boxes, "labels": det.labels, "scores": det.scores}  # (copies: no masks)

    def result(self, image_ids: list[int]) -> dict[str, Any]:
        """:func:`evaluate_coco`'s dict on ``image_ids`` with ``"voc"``: :func:`evaluate_voc`'s."""
        if self.coco is None:  # no image at all
            self.coco = CocoDatasetEvaluator(self.dataset, ("bbox",), backend=self.backend)
        result = self.coco.result(image_ids)
        result["voc"] = evaluate_voc(self.voc, self.dataset, image_ids=image_ids)
        return result


def evaluate_model(
    model: Predictor | Detector | nn.Module,
    dataset: DetectionDataset,
    *,
    proposals: ProposalSource | None = None,
    masks: bool | None = None,
    limit: int | None = None,
    progress: bool = False,
    class_names: Sequence[str] | None = None,
    keep_outputs: bool = False,
    coco_backend: str = "pycocotools",
) -> dict[str, Any]:
    """Box AP (COCO and VOC) — and mask AP for models that predict masks — on ``dataset``.

    ``class_names``: the model's classes (background first, as in its run folder); the data set's
    are matched with them by name (:func:`rcnn.evaluation.classes.match_classes`: a data set with
    other classes is refused, never paired by position). Without them the model's labels are
    taken to be the data set's. ``masks``: mask AP too (default: where the data set has masks and
    the outputs do). ``coco_backend``: who scores COCO AP, ``"pycocotools"`` or
    ``"faster-coco-eval"`` (:class:`rcnn.evaluation.coco.CocoEvaluator`; checked before any
    prediction).

    The outputs are streamed: each image's goes, as it is predicted, to a COCO evaluator that
    stores it on disk (masks as RLE) and, as boxes, labels and scores only, to the VOC metric; so
    the memory does not grow with the images' masks or the model's outputs. The numbers are
    those of :func:`evaluate_coco` and :func:`evaluate_voc` on all the outputs at once.

    Returns ``{"bbox": {...12 COCO numbers, per_class_AP}, "segm": {...}?, "summary", "voc": {"mAP", ...},
    "seconds_per_image", "images"}`` (and ``"classes_dropped"``: model classes absent from the data;
    with ``keep_outputs``, ``"outputs"``: image_id -> output, in the data set's labels, all held in memory).
    """
    check_limit(limit)
    check_backend(coco_backend, "coco_backend")
    mapping = match_classes(class_names, dataset.class_names, "the data set") if class_names is not None else None
    predictor = _predictor(model, proposals=proposals)
    clock = Clock(predictor.device)
    image_ids: list[int] = []
    kept: dict[int, dict[str, Tensor]] = {}
    outputs = predictor.iter_dataset(dataset, limit=limit, progress=progress, clock=clock)
    with _StreamedMetrics(dataset, masks, coco_backend) as metrics, contextlib.closing(outputs):
        for image_id, output in outputs:  # (the progress bar closed before an error is told)
            if mapping is not None and not mapping.identity:
                output = mapping.apply(output)
            metrics.add(image_id, output)
            image_ids.append(image_id)
            if keep_outputs:
                kept[image_id] = output
        result = metrics.result(image_ids)
    result["seconds_per_image"] = clock.wall.get("model", 0.0) / max(len(image_ids), 1)
    result["images"] = len(image_ids)
    if mapping is not None and mapping.dropped:
        result["classes_dropped"] = list(mapping.dropped)
    if keep_outputs:
        result["outputs"] = kept
    return result


# -- sinks of the predictor's output -------------------------------------------------------------
def _binary(mask: Tensor) -> Tensor:
    """A mask ``[H, W]`` (uint8 0/1, or float probabilities) as bool, probabilities at 0.5."""
    return mask >= 0.5 if mask.is_floating_point() else mask > 0


def detection_records(output: Mapping[str, Tensor], class_names: Sequence[str], keep: Tensor | None = None) -> list[dict[str, Any]]:
    """The detections of ``output`` (``keep``: a bool ``[D]`` of those to write; default all) in the
    library's one JSON schema: ``{"box": [x1, y1, x2, y2], "label": 1..K, "class_name", "score",
    "mask"?}``, boxes in the pixels of the output's image (2 decimals), scores to 4 decimals, masks
    (Mask R-CNN) as COCO RLE ``{"size": [H, W], "counts": str}``. ``rcnn predict`` and ``rcnn serve``
    write it; docs/predict.md describes it."""
    from pycocotools import mask as mask_utils

    rows = range(len(output["scores"])) if keep is None else keep.nonzero().flatten().tolist()
    records = []
    for d in rows:
        label = int(output["labels"][d])
        record: dict[str, Any] = {
            "box": [round(float(v), 2) for v in output["boxes"][d]],
            "label": label,
            "class_name": class_names[label] if 0 <= label < len(class_names) else f"class_{label}",
            "score": round(float(output["scores"][d]), 4),
        }
        if "masks" in output:
            rle = mask_utils.encode(np.asfortranarray(_binary(output["masks"][d, 0]).to(torch.uint8).numpy()))
            record["mask"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        records.append(record)
    return records


def image_record(name: str, source: str | os.PathLike, image_id: int, size: Sequence[int], output: Mapping[str, Tensor],
                 class_names: Sequence[str], threshold: float) -> dict[str, Any]:  # fmt: skip
    """The JSON record of one image's detections (``rcnn predict``'s ``OUT/N.json``, ``rcnn explain``'s
    ``OUT/detections.json``): ``{"image": name, "source": path, "image_id", "size": [H, W],
    "detections": [...]}``, the detections scoring at least ``threshold`` (:func:`detection_records`)."""
    return {"image": name, "source": str(source), "image_id": image_id, "size": [int(v) for v in size],
            "detections": detection_records(output, class_names, output["scores"] >= threshold)}  # fmt: skip


class ImageFiles:
    """``OUT/N.png`` (the detections scoring at least ``threshold`` drawn on the image) and ``OUT/N.json``
    (``{"image", "source", "image_id", "size", "detections"}``) for each image whose key is ``(source,
    None)`` (an ``rcnn.io.sources.Source``); video frames are :class:`VideoFiles`'."""

    def __init__(self, out: Path, class_names: Sequence[str], threshold: float) -> None:
        self.out, self.class_names, self.threshold = Path(out), class_names, threshold

    def write(self, prediction: Prediction, image_id: int) -> None:
        source, frame = prediction.key
        if frame is not None:
            return
        keep = prediction.output["scores"] >= self.threshold
        shown = {k: v[keep] for k, v in prediction.output.items()}
        picture = draw_detections(prediction.image, shown, self.class_names, self.threshold, frame=prediction.original_size)
        (self.out / source.name).parent.mkdir(parents=True, exist_ok=True)
        save_png(picture, self.out / f"{source.name}.png")
        write_json(self.out / f"{source.name}.json", image_record(source.name, source.path, image_id, prediction.original_size,
                                                                 prediction.output, self.class_names, self.threshold))

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class VideoFiles:
    """``OUT/N.detections.mp4`` (every predicted frame, drawn) and ``OUT/N.jsonl`` (a record per frame:
    ``{"video", "source", "frame", "time_s", "image_id", "detections"}``) for each video whose frames
    come with keys ``(source, frame index)``; ``videos``: source path -> ``rcnn.io.sources.VideoInfo``,
    ``stride``: every how many frames one is predicted."""

    def __init__(self, out: Path, class_names: Sequence[str], threshold: float, videos: Mapping[Path, Any],
                 stride: int, log: Callable[[str], None] = print) -> None:  # fmt: skip
        self.out, self.class_names, self.threshold = Path(out), class_names, threshold
        self.videos, self.stride, self.log = videos, stride, log
        self.writer, self.source, self.records = None, None, []

    def write(self, prediction: Prediction, image_id: int) -> None:
        from rcnn.io.sources import VideoWriter

        source, frame = prediction.key
        if frame is None:
            return
        info = self.videos[source.path]
        if self.source is not source:
            self.close()
            self.writer = VideoWriter(self.out / f"{source.name}.detections.mp4", info.fps / self.stride, info.size)
            self.source = source
        keep = prediction.output["scores"] >= self.threshold
        shown = {k: v[keep] for k, v in prediction.output.items()}
        self.writer.write(draw_detections(prediction.image, shown, self.class_names, self.threshold,
                                          frame=prediction.original_size))  # fmt: skip
        self.records.append({"video": source.name, "source": str(source.path), "frame": frame,
                             "time_s": round(frame / info.fps, 4), "image_id": image_id,
                             "detections": detection_records(prediction.output, self.class_names, keep)})  # fmt: skip

    def close(self) -> None:
        """Finish the video being written (and its records)."""
        if self.writer is not None:
            self.writer.close()
            write_text(self.out / f"{self.source.name}.jsonl", "".join(json.dumps(r) + "\n" for r in self.records))
            self.log(f"{self.source.path}: {len(self.records)} frames -> {self.writer.path}")
        self.writer, self.records = None, []

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


class CocoResults:
    """Every detection as one COCO results list (``path``, a JSON list; category ids from
    ``categories``, the data's ``{"id", "name"}`` per label) and ``images_path`` listing the images
    (``{"images": [{"id", "file_name", "height", "width"}], "categories"}``; a video frame is named
    ``N#frame=I``). Both are streamed to temporary files as the images come (nothing held in
    memory) and put in place when closed; aborted, they are removed."""

    def __init__(self, path: str | os.PathLike, images_path: Path, categories: Sequence[Mapping[str, Any]]) -> None:
        self.path, self.images_path, self.categories = path, images_path, list(categories)
        self.category_ids = {i: int(c["id"]) for i, c in enumerate(self.categories)}
        self.results = JsonListWriter(path)
        self.images = JsonListWriter(images_path, head='{"images": [',
                                     tail=f'], "categories": {dumps_json(self.categories[1:], indent=None)}}}')  # fmt: skip

    def write(self, prediction: Prediction, image_id: int) -> None:
        source, frame = prediction.key
        output = prediction.output
        masks = _binary(output["masks"][:, 0]).numpy() if "masks" in output else None
        for entry in result_entries(image_id, output["boxes"].numpy(), output["labels"].numpy(),
                                    output["scores"].numpy(), self.category_ids, masks):  # fmt: skip
            self.results.write(entry)
        name = source.name if frame is None else f"{source.name}#frame={frame}"
        height, width = prediction.original_size
        self.images.write({"id": image_id, "file_name": name, "height": height, "width": width})

    def close(self) -> None:
        self.results.close()
        self.images.close()

    def abort(self) -> None:
        self.results.abort()
        self.images.abort()


# -- memory --------------------------------------------------------------------------------------
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
