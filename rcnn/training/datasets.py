"""What the training loop reads, and in which order.

:class:`TrainingSet` is a data set with optional proposals attached, then augmentation.
:class:`BatchSampler` is the data order: endless, seeded by the config, resumable at any iteration,
the same whatever the number of loader workers, each process of a DDP job taking its slice of
every global batch; images of similar aspect ratio batched together (:func:`aspect_ratio_groups`),
so that little of a batch is padding. :func:`training_loader` is the loader of one process: its
workers, pinned memory and, on CUDA, :class:`DevicePrefetcher`, which copies the next batch to the
device while the current one is trained on.

Shape shorthand:
    P: proposals of an image
    N: images of the data set
    G: images of a global batch (``batch_size x processes x accumulate``)
    S: global batches of an epoch (``N // G``)
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from rcnn.components.proposals.io import ProposalSource
from rcnn.config import TrainConfig
from rcnn.data.records import DetectionDataset, RecordTable
from rcnn.data.transforms import collate_fn

__all__ = [
    "BatchSampler",
    "DevicePrefetcher",
    "SeededItems",
    "TrainingSet",
    "aspect_ratio_groups",
    "aspect_ratios",
    "training_loader",
]

# The aspect-ratio bins of torchvision's detection references (``create_aspect_ratio_groups`` with
# its default factor 3): width / height cut at 2^(k/3), k = -3..3, into 8 groups.
ASPECT_RATIO_BINS = tuple(float(2 ** (k / 3)) for k in range(-3, 4))


class TrainingSet(Dataset):
    """A data set for the training loop: optional proposals attached, then augmentation.

    ``target["proposals"]`` (original image coordinates) is added before the transforms so that
    a flip moves the proposals with the boxes.
    """

    def __init__(
        self,
        dataset: DetectionDataset,
        transforms: Callable | None = None,
        proposals: ProposalSource | None = None,
    ) -> None:
        self.dataset = dataset
        self.transforms = transforms
        self.proposals = proposals

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image, target = self.dataset[index]
        if self.proposals is not None:
            target["proposals"] = self.proposals(int(target["image_id"]))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def aspect_ratios(dataset: Dataset) -> np.ndarray | None:
    """``[N]`` width / height of each item's image, read from the data set's records (no image is
    opened); None for a data set that does not record its image sizes.

    Takes a :class:`TrainingSet` or a :class:`~rcnn.data.records.DetectionDataset` (flips and the
    models' resize keep an image's aspect ratio).
    """
    inner = dataset.dataset if isinstance(dataset, TrainingSet) else dataset
    records = getattr(inner, "records", None)
    if records is None or len(records) != len(dataset):  # type: ignore[arg-type]
        return None
    if isinstance(records, RecordTable):  # read from its columns, no record built per image
        return records.widths / records.heights
    return np.fromiter((r.width / r.height for r in records), dtype=np.float64, count=len(records))


def aspect_ratio_groups(ratios: np.ndarray) -> np.ndarray:
    """``[N]`` group (0..7) of each aspect ratio ``ratios [N]`` (width / height), by
    :data:`ASPECT_RATIO_BINS`: portrait, square and landscape images apart, and the wide apart from
    the slightly wide."""
    return np.searchsorted(np.asarray(ASPECT_RATIO_BINS), np.asarray(ratios, dtype=np.float64), side="right")


class BatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless, deterministic batches: epoch e is a permutation of the N items seeded by (seed, e),
    cut into S = N // G global batches (the N mod G items left over sit the epoch out).

    With ``groups`` (``[N]`` group of each item, e.g. :func:`aspect_ratio_groups`) each global batch
    is drawn from one group, as the samplers of detectron2 and torchvision's references batch
    images of one aspect ratio: the permutation is read in order and each item goes to its group's
    batch, which is handed out when full. The items a group has left at the end of the epoch (fewer
    than G per group) make the epoch's last batches, mixed, of neighbouring groups, so an epoch still
    has S batches and leaves out the same number of items as without groups (the latest ones).

    Each element is ``(dataset index, item seed)``; the item seed drives that item's random
    augmentation and depends on the iteration and the item's place in the global batch only, so
    the data an iteration sees does not depend on workers, restarts or the number of processes.
    Under DDP, rank r takes the r-th slice of every global batch. With ``accumulate`` N each
    iteration yields N micro-batches, the N slices of the rank's share of a global batch N times
    larger, with the item seeds of that batch: the data of an N-times larger batch.
    ``start_iteration``: where a resumed run continues, exactly as if it had never stopped.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        start_iteration: int,
        rank: int,
        world: int,
        accumulate: int = 1,
        groups: np.ndarray | None = None,
    ) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.rank, self.world, self.accumulate = start_iteration, rank, world, accumulate
        self.global_batch = batch_size * world * accumulate
        if size < self.global_batch:
            raise ValueError(
                f"the training set has {size} images, fewer than one batch of {self.global_batch} "
                "(train.batch_size x processes x train.accumulate); lower train.batch_size or train.accumulate"
            )
        self.per_epoch = size // self.global_batch
        self.groups: Tensor | None = None
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != (size,):
                raise ValueError(f"groups: one group per item expected ({size}), got shape {list(groups.shape)}")
            if len(np.unique(groups)) > 1:  # one group is no grouping
                self.groups = torch.from_numpy(np.unique(groups, return_inverse=True)[1].astype(np.int64))  # [N]

    def epoch(self, epoch: int) -> Tensor:
        """``[S, G]`` the dataset indices of epoch ``epoch``'s global batches, in the order trained."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.size, generator=generator)  # [N]
        steps, width = self.per_epoch, self.global_batch
        if self.groups is None:
            return order[: steps * width].view(steps, width)
        group = self.groups[order]  # [N] the group of each position of the epoch's order
        by_group = torch.argsort(group, stable=True)  # [N] positions, group by group, each in order
        counts = torch.bincount(group)  # [groups]
        starts = torch.cumsum(counts, 0) - counts
        grouped = group[by_group]
        whole = torch.arange(self.size) - starts[grouped] < counts[grouped] // width * width  # [N] in a full batch
        batches = by_group[whole].view(-1, width)  # each row: G positions of one group, in order
        rest = by_group[~whole]  # what the groups have left, group after group
        if len(rest) % width:  # the latest of them in the epoch's order sit it out, as without groups
            rest = rest[rest < rest.sort().values[len(rest) // width * width]]
        mixed = rest.view(-1, width)  # batches of neighbouring groups: little padding still
        batches = torch.cat([batches, mixed])  # [S, G]; sum(n_g // G) + (sum n_g mod G) // G = N // G rows
        batches = batches[torch.argsort(batches.max(dim=1).values)]  # in the order they fill up
        return order[batches]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration, cached, batches = self.start, -1, None
        share = self.batch_size * self.accumulate
        while True:
            epoch, step = divmod(iteration, self.per_epoch)
            if epoch != cached:
                cached, batches = epoch, self.epoch(epoch)
            batch = batches[step]  # type: ignore[index]  # [G]
            base = (self.seed * 7919 + iteration) * 65_537
            for micro in range(self.accumulate):
                first = self.rank * share + micro * self.batch_size  # place in the global batch
                items = batch[first : first + self.batch_size].tolist()
                yield [(index, base + first + pos) for pos, index in enumerate(items)]
            iteration += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for display
        return 2**31


class SeededItems(Dataset):
    """Fetch ``dataset[index]`` with the RNG seeded by the item seed (restored afterwards)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


Batch = tuple[list[Tensor], list[dict[str, Any]]]  # collated: images, targets


def _move(batch: Batch, device: torch.device) -> Batch:
    images, targets = batch
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images, targets


class DevicePrefetcher:
    """The batches of ``batches`` on a CUDA ``device``, each copied one batch ahead on a stream of
    its own: the copy of batch i + 1 runs while the step on batch i computes (from the loader's
    pinned memory the copies are asynchronous). The trainer's own move to the device then finds
    the tensors there."""

    def __init__(self, batches: Iterable[Batch], device: torch.device) -> None:
        self.batches, self.device = iter(batches), device
        self.stream = torch.cuda.Stream(device)
        self.ready: Batch | None = None
        self._fetch()

    def _fetch(self) -> None:
        try:
            batch = next(self.batches)
        except StopIteration:
            self.ready = None
            return
        with torch.cuda.stream(self.stream):
            self.ready = _move(batch, self.device)

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Batch:
        if self.ready is None:
            raise StopIteration
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)  # the copy is done before the step reads it
        batch = self.ready
        images, targets = batch
        for tensor in [*images, *(v for t in targets for v in t.values() if torch.is_tensor(v))]:
            tensor.record_stream(current)  # memory made on the copy stream, freed after the step's use
        self._fetch()
        return batch


def training_loader(
    dataset: Dataset,
    cfg: TrainConfig,
    start: int,
    rank: int,
    world: int,
    workers: int,
    device: torch.device,
) -> Iterator[Batch]:
    """The endless, deterministic micro-batches of process ``rank`` of ``world`` from iteration
    ``start`` on, on ``device``'s side: ``workers`` loading processes (each with ``prefetch_factor``
    2 batches in flight), pinned memory and :class:`DevicePrefetcher` on CUDA, and with
    ``cfg.aspect_ratio_grouping`` batches of one aspect ratio where the data set records its image
    sizes (:func:`aspect_ratios`)."""
    groups = None
    if cfg.aspect_ratio_grouping:
        ratios = aspect_ratios(dataset)
        groups = aspect_ratio_groups(ratios) if ratios is not None else None
    size = len(dataset)  # type: ignore[arg-type]
    sampler = BatchSampler(size, cfg.batch_size, cfg.seed, start, rank, world, cfg.accumulate, groups)
    loader = DataLoader(
        SeededItems(dataset),
        batch_sampler=sampler,  # type: ignore[arg-type]
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched (exact resume)
        num_workers=workers,
        worker_init_fn=_ignore_interrupts if workers > 0 else None,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )
    return DevicePrefetcher(loader, device) if device.type == "cuda" else iter(loader)


def _ignore_interrupts(worker_id: int) -> None:
    """A data-loading process leaves Ctrl-C and SIGTERM to the training process, which stops after
    its step with a checkpoint and then ends its workers itself (the loader's shutdown). A terminal's
    Ctrl-C, ``kill -- -PGID``, a scheduler's preemption and torchrun signal the whole process group:
    a worker that died of it would take the training process down in the middle of its step, without
    the checkpoint. A worker whose training process is gone ends on its own (the loader's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
