"""Selective search region proposals (R-CNN §2.1: "fast mode", ~2000 per image), via OpenCV contrib.

:class:`SelectiveSearch` proposes boxes for one image with
``cv2.ximgproc.segmentation.createSelectiveSearchSegmentation`` (Uijlings et al.'s hierarchical
grouping of Felzenszwalb-Huttenlocher segments, in its "fast" or "quality" strategy set), then
converts OpenCV's ``(x, y, w, h)`` pixel rectangles to the library's continuous
``(x1, y1, x2, y2) = (x, y, x + w, y + h)``, maps them back to the original image if it was
shrunk for speed, removes duplicates and boxes smaller than ``min_size`` and keeps the first
``max_proposals`` in OpenCV's order (the paper's pseudo-random ranking: large, high-level
regions first).

:func:`compute_proposals` runs it over a data set in worker processes and writes one
proposals file (``rcnn.components.proposals.io``). The file is also the cache: a second run with the same
settings reads it and computes nothing, an interrupted run (partial results are saved every
``save_every_s`` seconds and on any exception) resumes where it stopped, and a run whose
settings differ from the file's refuses to touch it (``ValueError``: pick another file).

Shape shorthand:
    H, W: image height and width
    P: proposals of one image
"""

from __future__ import annotations

import ctypes
import functools
import math
import multiprocessing
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from rcnn.components.proposals.io import ProposalsFile, load_proposals, save_proposals
from rcnn.core.boxes import clip_boxes, remove_small_boxes
from rcnn.io.images import load_image

__all__ = [
    "SelectiveSearch",
    "compute_proposals",
    "dataset_items",
    "ensure_dataset_proposals",
    "selective_search",
    "selective_search_file",
]

_MODES = ("fast", "quality")


@functools.cache
def _c_library() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):  # no dlopen(NULL) (e.g. Windows)
        return None


def _seed_c_rand(seed: int) -> None:
    """Seed the C library's ``rand()``, which OpenCV's selective search uses to rank regions.

    Without it the order of the boxes (hence which ones survive ``max_proposals``) changes from
    call to call. Where the C library cannot be reached the order stays unseeded.
    """
    library = _c_library()
    if library is not None and hasattr(library, "srand"):
        library.srand(ctypes.c_uint(seed))


@dataclass(frozen=True)
class SelectiveSearch:
    """Selective search with fixed settings; call it on an image to get its proposals.

    Args:
        mode: ``"fast"`` (R-CNN's choice: 2 colour spaces x 2 segmentation scales x 2 similarity
            strategies) or ``"quality"`` (more of each: slower, more and better boxes).
        max_proposals: keep at most this many boxes per image (R-CNN: ~2000).
        min_size: drop boxes narrower or lower than this, in original-image pixels. R-CNN's code
            drops boxes under 20 px on ~500 px VOC images; the default 4 px suits the 128 px
            shapes images, whose objects are 8 px and more.
        max_side: shrink images whose longer side exceeds this before the search (the cost grows
            faster than the pixel count); boxes are mapped back. ``None``: never shrink.
        base_k, inc_k, sigma: OpenCV's graph-segmentation parameters (its defaults: the first
            segmentation uses k = base_k, each next one k + inc_k; Gaussian sigma 0.8).
        seed: seeds the random part of the ranking, so the same image gives the same boxes.
    """

    mode: str = "fast"
    max_proposals: int = 2000
    min_size: float = 4.0
    max_side: int | None = 500
    base_k: int = 150
    inc_k: int = 150
    sigma: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"selective search mode must be one of {_MODES}, got {self.mode!r}")
        if self.max_proposals < 1:
            raise ValueError(f"max_proposals must be >= 1, got {self.max_proposals}")
        if not (self.min_size >= 0 and math.isfinite(self.min_size)):
            raise ValueError(f"min_size must be a finite number >= 0, got {self.min_size}")
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"max_side must be None or >= 16 pixels, got {self.max_side}")
        if self.base_k <= 0 or self.inc_k <= 0 or self.sigma <= 0:
            raise ValueError(
                f"base_k, inc_k and sigma must be positive, got {self.base_k}, {self.inc_k}, {self.sigma}"
            )
        # normalise the types so that settings compare equal after a JSON round trip
        object.__setattr__(self, "max_proposals", int(self.max_proposals))
        object.__setattr__(self, "min_size", float(self.min_size))
        object.__setattr__(self, "max_side", None if self.max_side is None else int(self.max_side))
        object.__setattr__(self, "sigma", float(self.sigma))

    def settings(self) -> dict[str, Any]:
        """The settings recorded in (and compared with) a proposals file."""
        return {"method": "selective_search", **asdict(self)}

    def __call__(self, image: np.ndarray) -> Tensor:
        """Proposals ``[P, 4]`` float32 (x1, y1, x2, y2) for an ``[H, W, 3]`` uint8 RGB image."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            described = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"selective_search expects an [H, W, 3] uint8 RGB array, got a {described}")
        height, width = image.shape[:2]
        if height < 2 or width < 2:
            raise ValueError(f"selective_search: image of {width}x{height} pixels is too small")
        small = image
        if self.max_side is not None and max(height, width) > self.max_side:
            scale = self.max_side / max(height, width)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 wants (w, h)
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        search.setBaseImage(cv2.cvtColor(np.ascontiguousarray(small), cv2.COLOR_RGB2BGR))  # OpenCV is BGR
        if self.mode == "fast":
            search.switchToSelectiveSearchFast(self.base_k, self.inc_k, self.sigma)
        else:
            search.switchToSelectiveSearchQuality(self.base_k, self.inc_k, self.sigma)
        # One OpenCV thread: the strategies' random ranks come from one C rand() stream, which
        # threads would draw from in the order the scheduler runs them (another order of the
        # proposals on a busy machine, seen under load).
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            _seed_c_rand(self.seed)
            rects = np.asarray(search.process(), dtype=np.int64).reshape(-1, 4)  # [M, 4] x, y, w, h
        finally:
            cv2.setNumThreads(threads)
        # duplicates: the same rectangle found by several strategies; keep the first (best-ranked)
        _, first = np.unique(rects, axis=0, return_index=True)
        rects = rects[np.sort(first)]
        # OpenCV's rectangle (x, y, w, h) covers pixels x .. x+w-1, i.e. [x, x+w) continuously
        boxes = np.concatenate((rects[:, :2], rects[:, :2] + rects[:, 2:]), axis=1).astype(np.float64)
        boxes[:, 0::2] *= width / small.shape[1]
        boxes[:, 1::2] *= height / small.shape[0]
        proposals = clip_boxes(torch.from_numpy(boxes).float(), (height, width))  # [M, 4]
        proposals = proposals[remove_small_boxes(proposals, self.min_size)]
        return proposals[: self.max_proposals].contiguous()  # [P, 4]


def selective_search(
    image: np.ndarray, mode: str = "fast", max_proposals: int = 2000, min_size: float = 4.0, **options: Any
) -> Tensor:
    """Proposals ``[P, 4]`` float32 (x1, y1, x2, y2) for one ``[H, W, 3]`` uint8 RGB image.

    A shortcut for ``SelectiveSearch(mode=mode, max_proposals=max_proposals, min_size=min_size,
    **options)(image)``; see :class:`SelectiveSearch` for the arguments and ``max_side``,
    ``base_k``, ``inc_k``, ``sigma`` and ``seed``.
    """
    return SelectiveSearch(mode=mode, max_proposals=max_proposals, min_size=min_size, **options)(image)


def selective_search_file(path: str | os.PathLike, search: SelectiveSearch | None = None) -> Tensor:
    """Proposals ``[P, 4]`` float32 of an image file (default settings: ``SelectiveSearch()``).

    The image is read with the data sets' reader (any mode converted to RGB; errors name the file).
    """
    image = load_image(path)  # [3, H, W] float 0..1
    pixels = (image.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)  # [H, W, 3]
    return (search if search is not None else SelectiveSearch())(pixels)


def _propose_one(search: SelectiveSearch, image_id: int, path: Path) -> np.ndarray:
    """Proposals ``[P, 4]`` float32 of one image file, as a numpy array (cheap to send between processes)."""
    return selective_search_file(path, search).numpy()


_WORKER_SEARCH: SelectiveSearch | None = None


def _init_worker(search: SelectiveSearch) -> None:
    global _WORKER_SEARCH
    _WORKER_SEARCH = search
    # the parallelism is across processes: one thread each, or the cores are oversubscribed
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _worker_task(item: tuple[int, Path]) -> tuple[int, np.ndarray]:
    assert _WORKER_SEARCH is not None, "worker not initialised"
    image_id, path = item
    return image_id, _propose_one(_WORKER_SEARCH, image_id, path)


def _check_items(items: Iterable[tuple[int, str | os.PathLike]]) -> list[tuple[int, Path]]:
    checked: list[tuple[int, Path]] = []
    seen: set[int] = set()
    for position, item in enumerate(items):
        try:
            image_id, path = item
            image_id = int(image_id)
        except (TypeError, ValueError):
            raise ValueError(f"compute_proposals: item {position} must be (image_id, path), got {item!r}") from None
        if image_id in seen:
            raise ValueError(f"compute_proposals: image id {image_id} appears twice (item {position})")
        seen.add(image_id)
        checked.append((image_id, Path(path)))
    return checked


def _open_cache(out_file: Path, settings: dict[str, Any]) -> ProposalsFile | None:
    """The existing proposals file if its settings match ``settings``; ``None`` if there is none."""
    if not out_file.exists():
        return None
    try:
        existing = load_proposals(out_file)
    except ValueError as exc:
        raise ValueError(f"{exc}\n(delete {out_file} or choose another output file to recompute)") from None
    if existing.settings != settings:
        differing = sorted(k for k in settings.keys() | existing.settings.keys() if settings.get(k) != existing.settings.get(k))
        details = ", ".join(f"{k}: file {existing.settings.get(k)!r} vs asked {settings.get(k)!r}" for k in differing)
        raise ValueError(
            f"{out_file} holds proposals made with other settings ({details}); "
            "proposals with different settings are never mixed in one file: choose another output file "
            "or delete this one"
        )
    return existing


def compute_proposals(
    items: Iterable[tuple[int, str | os.PathLike]],
    out_file: str | os.PathLike,
    search: SelectiveSearch | None = None,
    *,
    workers: int = 2,
    save_every_s: float = 60.0,
    progress: bool = True,
) -> ProposalsFile:
    """Selective search over a data set's images, into one proposals file (cached, resumable).

    Args:
        items: ``(image_id, image_path)`` pairs, e.g.
            ``[(ds.image_ids[i], ds.image_path(i)) for i in range(len(ds))]``.
        out_file: the proposals file (``.safetensors``) to write, or to reuse if it exists.
        search: the settings (default ``SelectiveSearch()``: fast mode, 2000 boxes).
        workers: worker processes (``spawn``, so safe with CUDA and threads in the parent);
            ``0`` or ``1`` runs in this process.
        save_every_s: save partial results at most this often (seconds); they are also saved when
            the run ends, normally or by an exception (e.g. Ctrl-C).
        progress: show a tqdm progress bar.

    Returns:
        the proposals file, opened, holding every requested image.

    If ``out_file`` exists with the same settings, only the images it lacks are computed (none
    for a finished file, so a second run just reads it). If its settings differ, ``ValueError``:
    a file always holds proposals of one setting.
    """
    search = search if search is not None else SelectiveSearch()
    out_file = Path(out_file)
    todo = _check_items(items)
    if not todo:
        raise ValueError(f"compute_proposals: no images given for {out_file}")
    settings = search.settings()
    existing = _open_cache(out_file, settings)
    if existing is not None:
        todo = [(image_id, path) for image_id, path in todo if image_id not in existing]
        if not todo:
            return existing
    boxes: dict[int, Any] = existing.to_dicts()[0] if existing is not None else {}
    done_before = len(boxes)
    last_save = time.monotonic()
    bar = tqdm(total=done_before + len(todo), initial=done_before, desc=f"selective search ({search.mode})",
               unit="img", disable=not progress)
    try:
        if workers <= 1:
            results: Iterable[tuple[int, np.ndarray]] = (
                (image_id, _propose_one(search, image_id, path)) for image_id, path in todo
            )
            _collect(results, boxes, bar, out_file, settings, save_every_s, last_save)
        else:
            context = multiprocessing.get_context("spawn")
            with context.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(search,)) as pool:
                results = pool.imap_unordered(_worker_task, todo, chunksize=1)
                _collect(results, boxes, bar, out_file, settings, save_every_s, last_save)
    finally:
        bar.close()
        if len(boxes) > done_before:  # save what was computed, also when interrupted
            save_proposals(out_file, boxes, settings=settings)
    return load_proposals(out_file)


def _collect(
    results: Iterable[tuple[int, np.ndarray]],
    boxes: dict[int, Any],
    bar: tqdm,
    out_file: Path,
    settings: dict[str, Any],
    save_every_s: float,
    last_save: float,
) -> None:
    """Gather results into ``boxes``, saving the file every ``save_every_s`` seconds."""
    for image_id, image_boxes in results:
        boxes[image_id] = image_boxes
        bar.update(1)
        bar.set_postfix(boxes=len(image_boxes))
        if time.monotonic() - last_save >= save_every_s:
            save_proposals(out_file, boxes, settings=settings)
            last_save = time.monotonic()


def dataset_items(dataset: Any) -> list[tuple[int, Path]]:
    """``(image_id, image_path)`` of every image of a data set (``image_ids`` and ``image_path(i)``)."""
    return [(int(image_id), Path(dataset.image_path(i))) for i, image_id in enumerate(dataset.image_ids)]


def ensure_dataset_proposals(
    dataset: Any,
    out_file: str | os.PathLike,
    search: SelectiveSearch | None = None,
    *,
    workers: int = 2,
    progress: bool = True,
) -> ProposalsFile:
    """The proposals of every image of ``dataset`` in ``out_file``, computed only where missing.

    :func:`compute_proposals` over :func:`dataset_items`; see there for caching and resuming.
    """
    return compute_proposals(dataset_items(dataset), out_file, search, workers=workers, progress=progress)
