"""The proposals file: region proposals for every image of a data set, in one file.

R-CNN and Fast R-CNN read their proposals from such a file, whatever method made them
(selective search here, or any other: see docs/proposals.md). The format is a safetensors
file with, for each image id::

    "boxes/<image_id>"   float32 [P, 4]   (x1, y1, x2, y2), absolute pixels, continuous coordinates
    "scores/<image_id>"  float32 [P]      optional, one score per box (higher = better)

and the metadata entries ``"format": "rcnn-proposals"``, ``"version": "1"`` and
``"settings"``: a JSON object with the settings that produced the boxes (``method`` and its
parameters). safetensors reads one image's boxes without loading the rest of the file.

:func:`load_proposals` also reads two simpler formats, so that proposals can be brought from
anywhere without this library: a ``.json`` file ``{"<image_id>": [[x1, y1, x2, y2], ...]}``
(or ``{"<image_id>": {"boxes": [...], "scores": [...]}}``), and a ``.npz`` file with the same
keys as the safetensors file. :func:`convert_proposals` turns either into the safetensors form.

Shape shorthand:
    P: proposals of one image
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from rcnn.core.boxes import box_iou, check_boxes
from rcnn.io.files import atomic_write

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MissingProposalsError",
    "ProposalSource",
    "ProposalsFile",
    "convert_proposals",
    "load_proposals",
    "proposal_source",
    "proposal_stats",
    "save_proposals",
]

FORMAT_NAME = "rcnn-proposals"
FORMAT_VERSION = "1"
_BOXES = "boxes/"
_SCORES = "scores/"
_MAX_LISTED = 5  # how many missing image ids an error message lists

ProposalSource = Callable[[int], Tensor]  # image_id -> proposals [P, 4] in original image coordinates


class MissingProposalsError(KeyError, ValueError):
    """A proposals file has no entry for an image id a data set asks for.

    Both a ``KeyError`` (the file is a mapping) and a ``ValueError`` (bad input, reported as one
    line by the command line).
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _as_boxes(value: Any, where: str) -> Tensor:
    """A validated float32 ``[P, 4]`` tensor from a tensor, array or nested list."""
    try:
        boxes = torch.as_tensor(np.asarray(value, dtype=np.float32))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: boxes are not numbers ({exc})") from None
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    check_boxes(boxes, where)
    return boxes.contiguous()


def _as_scores(value: Any, num_boxes: int, where: str) -> Tensor:
    """A validated float32 ``[P]`` tensor of finite scores, one per box."""
    try:
        scores = torch.as_tensor(np.asarray(value, dtype=np.float32)).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: scores are not numbers ({exc})") from None
    if scores.shape[0] != num_boxes:
        raise ValueError(f"{where}: {scores.shape[0]} scores for {num_boxes} boxes; give one score per box")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{where}: scores contain NaN or infinite values")
    return scores.contiguous()


def _image_id(key: str, path: Path) -> int:
    try:
        return int(key)
    except ValueError:
        raise ValueError(f"{path}: {key!r} is not an integer image id") from None


def save_proposals(
    path: str | os.PathLike,
    boxes: Mapping[int, Tensor | np.ndarray],
    scores: Mapping[int, Tensor | np.ndarray] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write a proposals file (safetensors) atomically; returns its path.

    Args:
        path: the output file (conventionally ``*.safetensors``).
        boxes: image id -> ``[P, 4]`` boxes (x1, y1, x2, y2), any float dtype; ``P`` may be 0.
        scores: optional image id -> ``[P]`` scores; every id in it must be in ``boxes``.
        settings: what produced the boxes (JSON-serialisable), e.g. ``{"method": "edge_boxes"}``.
    """
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    for image_id, value in boxes.items():
        where = f"{path}: image id {image_id}"
        tensors[f"{_BOXES}{int(image_id)}"] = _as_boxes(value, where)
    for image_id, value in (scores or {}).items():
        key = f"{_BOXES}{int(image_id)}"
        if key not in tensors:
            raise ValueError(f"{path}: scores given for image id {image_id} but no boxes")
        tensors[f"{_SCORES}{int(image_id)}"] = _as_scores(value, tensors[key].shape[0], f"{path}: image id {image_id}")
    try:
        settings_json = json.dumps(dict(settings or {}), sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"{path}: settings must be JSON-serialisable ({exc})") from None
    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "settings": settings_json}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


class ProposalsFile(Mapping[int, Tensor]):
    """Read access to a proposals file: ``proposals[image_id] -> boxes [P, 4]`` float32.

    Opened by :func:`load_proposals`. For a safetensors file each image's boxes are read from
    disk when asked for (so a large file costs no memory) and validated then; ``.json`` and
    ``.npz`` files are read and validated whole. The object can be pickled (to DataLoader
    workers): the file is reopened on first use.

    Attributes:
        path: the file.
        settings: the settings that produced the boxes (``{}`` for ``.json`` / ``.npz``).
        image_ids: sorted image ids the file holds.
    """

    def __init__(
        self,
        path: Path,
        settings: dict[str, Any],
        image_ids: Iterable[int],
        has_scores: set[int],
        loaded: dict[str, Tensor] | None = None,
    ) -> None:
        self.path = path
        self.settings = settings
        self.image_ids: list[int] = sorted(image_ids)
        self._ids = set(self.image_ids)
        self._has_scores = has_scores
        self._loaded = loaded  # the tensors of an eagerly read file, else None
        self._handle: Any = None

    # -- pickling: the safetensors handle cannot travel, reopen it lazily -------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        return state

    def _tensor(self, key: str) -> Tensor:
        if self._loaded is not None:
            return self._loaded[key]
        if self._handle is None:
            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.path}: proposals file not found (was it moved?)") from None
        try:
            return self._handle.get_tensor(key)
        except SafetensorError as exc:
            raise ValueError(f"{self.path}: cannot read {key!r} ({exc}); the file is damaged, recompute it") from None

    def _missing(self, image_id: Any) -> MissingProposalsError:
        return MissingProposalsError(
            f"{self.path}: no proposals for image id {image_id} ({len(self.image_ids)} images in the "
            "file); compute proposals for this data set / split, or resume the interrupted run"
        )

    def __getitem__(self, image_id: int) -> Tensor:
        """Boxes ``[P, 4]`` float32 of ``image_id``; ``MissingProposalsError`` naming the file if absent."""
        if image_id not in self:
            raise self._missing(image_id)
        where = f"{self.path}: image id {int(image_id)}"
        return _as_boxes(self._tensor(f"{_BOXES}{int(image_id)}"), where)

    def scores(self, image_id: int) -> Tensor | None:
        """Scores ``[P]`` of ``image_id``'s boxes, or ``None`` when the file has none for it."""
        if image_id not in self:
            raise self._missing(image_id)
        if int(image_id) not in self._has_scores:
            return None
        num_boxes = self[image_id].shape[0]
        where = f"{self.path}: image id {int(image_id)}"
        return _as_scores(self._tensor(f"{_SCORES}{int(image_id)}"), num_boxes, where)

    def __contains__(self, image_id: object) -> bool:
        try:
            return int(image_id) in self._ids  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False

    def __iter__(self) -> Iterator[int]:
        return iter(self.image_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def missing(self, image_ids: Iterable[int]) -> list[int]:
        """The ids among ``image_ids`` that the file has no proposals for, in the given order."""
        return [int(i) for i in image_ids if int(i) not in self._ids]

    def check_covers(self, image_ids: Iterable[int]) -> None:
        """Raise ``MissingProposalsError`` naming the file and the first missing ids, if any."""
        missing = self.missing(image_ids)
        if missing:
            listed = ", ".join(str(i) for i in missing[:_MAX_LISTED])
            more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
            raise MissingProposalsError(
                f"{self.path}: no proposals for {len(missing)} image(s) of the data set (ids {listed}{more}); "
                "compute proposals for this data set / split, or resume the interrupted run"
            )

    def to_dicts(self) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """All boxes and scores in memory: ``({image_id: [P, 4]}, {image_id: [P]})``."""
        boxes = {image_id: self[image_id] for image_id in self.image_ids}
        scores = {i: s for i in self.image_ids if (s := self.scores(i)) is not None}
        return boxes, scores


def _load_safetensors(path: Path) -> ProposalsFile:
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable safetensors proposals file ({exc})") from None
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path}: not a proposals file (metadata 'format' is {metadata.get('format')!r}, "
            f"expected {FORMAT_NAME!r}); write it with rcnn.components.proposals.io.save_proposals"
        )
    if metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: proposals format version {metadata.get('version')!r}, this library reads {FORMAT_VERSION!r}")
    try:
        settings = json.loads(metadata.get("settings", "{}"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the 'settings' metadata is not valid JSON ({exc})") from None
    image_ids, has_scores = _ids_from_keys(keys, path)
    return ProposalsFile(path, settings, image_ids, has_scores)


def _ids_from_keys(keys: Iterable[str], path: Path) -> tuple[set[int], set[int]]:
    """Image ids with boxes, and those with scores, from ``boxes/<id>`` / ``scores/<id>`` keys."""
    image_ids: set[int] = set()
    has_scores: set[int] = set()
    for key in keys:
        if key.startswith(_BOXES):
            image_ids.add(_image_id(key[len(_BOXES) :], path))
        elif key.startswith(_SCORES):
            has_scores.add(_image_id(key[len(_SCORES) :], path))
        else:
            raise ValueError(f"{path}: unexpected entry {key!r}; entries are 'boxes/<image_id>' and 'scores/<image_id>'")
    orphans = has_scores - image_ids
    if orphans:
        raise ValueError(f"{path}: scores without boxes for image id(s) {sorted(orphans)[:_MAX_LISTED]}")
    return image_ids, has_scores


def _eager(path: Path, arrays: Mapping[str, Any]) -> ProposalsFile:
    """A validated in-memory ``ProposalsFile`` from ``boxes/<id>`` / ``scores/<id>`` arrays."""
    image_ids, has_scores = _ids_from_keys(arrays.keys(), path)
    loaded: dict[str, Tensor] = {}
    for image_id in image_ids:
        boxes = _as_boxes(arrays[f"{_BOXES}{image_id}"], f"{path}: image id {image_id}")
        loaded[f"{_BOXES}{image_id}"] = boxes
        if image_id in has_scores:
            where = f"{path}: image id {image_id}"
            loaded[f"{_SCORES}{image_id}"] = _as_scores(arrays[f"{_SCORES}{image_id}"], boxes.shape[0], where)
    return ProposalsFile(path, {}, image_ids, has_scores, loaded=loaded)


def _load_json(path: Path) -> ProposalsFile:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON proposals file ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected a JSON object {{"<image_id>": [[x1, y1, x2, y2], ...]}}')
    arrays: dict[str, Any] = {}
    for key, value in data.items():
        image_id = _image_id(key, path)
        if isinstance(value, dict):
            if "boxes" not in value:
                raise ValueError(f"{path}: image id {image_id} has no 'boxes' list")
            arrays[f"{_BOXES}{image_id}"] = value["boxes"]
            if value.get("scores") is not None:
                arrays[f"{_SCORES}{image_id}"] = value["scores"]
        else:
            arrays[f"{_BOXES}{image_id}"] = value
    return _eager(path, arrays)


def _load_npz(path: Path) -> ProposalsFile:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable .npz proposals file ({exc})") from None
    return _eager(path, arrays)


def load_proposals(path: str | os.PathLike) -> ProposalsFile:
    """Open a proposals file: ``.safetensors`` (the library's format), ``.json`` or ``.npz``.

    Raises ``FileNotFoundError`` naming a missing file and ``ValueError`` naming a damaged one
    or the image whose boxes are malformed (NaN, x2 < x1, wrong shape).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: proposals file not found")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _load_json(path)
    if suffix == ".npz":
        return _load_npz(path)
    return _load_safetensors(path)


def convert_proposals(
    source: str | os.PathLike, destination: str | os.PathLike, settings: Mapping[str, Any] | None = None
) -> Path:
    """Read any accepted proposals file and write it as a safetensors proposals file.

    ``settings`` (e.g. ``{"method": "edge_boxes"}``) replace the source's settings when given.
    """
    proposals = load_proposals(source)
    boxes, scores = proposals.to_dicts()
    return save_proposals(destination, boxes, scores, settings if settings is not None else proposals.settings)


def _ground_truth(dataset: Any, index: int) -> Tensor:
    """The boxes ``[G, 4]`` of image ``index`` that recall counts (crowd / difficult ones left out)."""
    if hasattr(dataset, "annotation"):  # the library's readers: no need to decode the image
        target = dataset.annotation(index)
    else:
        target = dataset[index][1]
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    keep = torch.ones(boxes.shape[0], dtype=torch.bool)
    for flag in ("iscrowd", "difficult"):
        if flag in target:
            keep &= ~torch.as_tensor(target[flag], dtype=torch.bool)
    return boxes[keep]


def proposal_stats(
    proposals: ProposalsFile, dataset: Any | None = None, thresholds: Iterable[float] = (0.5, 0.7)
) -> dict[str, Any]:
    """Boxes per image and, given a data set, the recall of its ground-truth boxes.

    Recall at ``t``: the fraction of ground-truth boxes (crowd and difficult ones excluded) that
    some proposal of their image overlaps with IoU >= ``t``; ``mean_best_iou`` averages each gt
    box's best IoU. Images are those of the data set (all must be in the file), else the file's.

    Returns a dict: ``images``, ``boxes_per_image`` (``min``, ``mean``, ``median``, ``max``),
    ``settings``; with a data set also ``gt_boxes``, ``recall`` ({threshold: fraction}) and
    ``mean_best_iou``.
    """
    thresholds = tuple(float(t) for t in thresholds)
    if dataset is not None:
        proposals.check_covers(dataset.image_ids)
        image_ids = [int(i) for i in dataset.image_ids]
    else:
        image_ids = proposals.image_ids
    counts = np.array([proposals[i].shape[0] for i in image_ids], dtype=np.float64)
    stats: dict[str, Any] = {
        "images": len(image_ids),
        "boxes_per_image": {
            "min": int(counts.min()) if counts.size else 0,
            "mean": float(counts.mean()) if counts.size else 0.0,
            "median": float(np.median(counts)) if counts.size else 0.0,
            "max": int(counts.max()) if counts.size else 0,
        },
        "settings": proposals.settings,
    }
    if dataset is None:
        return stats
    best: list[Tensor] = []
    for index, image_id in enumerate(image_ids):
        gt = _ground_truth(dataset, index)
        boxes = proposals[image_id]
        if gt.shape[0] == 0:
            continue
        if boxes.shape[0] == 0:
            best.append(torch.zeros(gt.shape[0]))
        else:
            best.append(box_iou(gt, boxes).max(dim=1).values)  # [G]
    best_iou = torch.cat(best) if best else torch.zeros(0)
    stats["gt_boxes"] = int(best_iou.numel())
    stats["recall"] = {t: float((best_iou >= t).float().mean()) if best_iou.numel() else float("nan") for t in thresholds}
    stats["mean_best_iou"] = float(best_iou.mean()) if best_iou.numel() else float("nan")
    return stats


def proposal_source(path: str | os.PathLike) -> ProposalSource:
    """``image_id -> proposals [P, 4]`` read from a proposals file (see docs/proposals.md)."""
    proposals = load_proposals(path)
    return lambda image_id: proposals[image_id]
