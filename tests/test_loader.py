"""The training data order and loader: resumable at any iteration, ranks partition each batch and
epoch, the same with any number of workers, batches of one aspect ratio, pinned copies on CUDA."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

from rcnn.config import TrainConfig
from rcnn.core.images import resized_shape
from rcnn.data.coco import CocoDetection
from rcnn.data.shapes import shapes_paths
from rcnn.training.datasets import (
    ASPECT_RATIO_BINS,
    BatchSampler,
    TrainingSet,
    aspect_ratio_groups,
    aspect_ratios,
    training_loader,
)


def batches(sampler: BatchSampler, count: int) -> list[list[tuple[int, int]]]:
    return list(islice(iter(sampler), count))


def indices(batch: list[tuple[int, int]]) -> list[int]:
    return [index for index, _ in batch]


def test_aspect_ratio_groups_follow_torchvision_bins():
    # width / height cut at 2^(k/3): 1/2, 0.63, 0.79, 1, 1.26, 1.59, 2
    assert ASPECT_RATIO_BINS[0] == 0.5 and ASPECT_RATIO_BINS[3] == 1.0 and ASPECT_RATIO_BINS[-1] == 2.0
    ratios = np.array([0.3, 0.5, 0.75, 0.99, 1.0, 4 / 3, 1.5, 16 / 9, 2.0, 3.0])
    assert aspect_ratio_groups(ratios).tolist() == [0, 1, 2, 3, 4, 5, 5, 6, 7, 7]


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(4, 60), batch=st.integers(1, 3), world=st.integers(1, 3), accumulate=st.integers(1, 2),
    groups=st.integers(1, 4), seed=st.integers(0, 2**32 - 1), data=st.data(),
)  # fmt: skip
def test_resumed_sampler_continues_the_same_order(size, batch, world, accumulate, groups, seed, data):
    global_batch = batch * world * accumulate
    if size < global_batch:
        return
    labels = np.array(data.draw(st.lists(st.integers(0, groups - 1), min_size=size, max_size=size)))
    per_epoch = size // global_batch
    start = data.draw(st.integers(0, 3 * per_epoch))  # mid-epoch and in later epochs
    for rank in range(world):
        straight = batches(BatchSampler(size, batch, seed, 0, rank, world, accumulate, labels), (start + per_epoch) * accumulate)
        resumed = batches(BatchSampler(size, batch, seed, start, rank, world, accumulate, labels), per_epoch * accumulate)
        assert resumed == straight[start * accumulate :]


@settings(max_examples=40, deadline=None)
@given(size=st.integers(6, 80), batch=st.integers(1, 3), world=st.integers(2, 4), groups=st.integers(1, 5),
       seed=st.integers(0, 1000), data=st.data())  # fmt: skip
def test_ranks_partition_every_batch_and_epoch(size, batch, world, groups, seed, data):
    if size < batch * world:
        return
    labels = np.array(data.draw(st.lists(st.integers(0, groups - 1), min_size=size, max_size=size)))
    one = BatchSampler(size, batch * world, seed, 0, 0, 1, groups=labels)  # the same global batch on one process
    per_epoch = one.per_epoch
    shares = [batches(BatchSampler(size, batch, seed, 0, rank, world, groups=labels), 2 * per_epoch) for rank in range(world)]
    whole = batches(one, 2 * per_epoch)
    for step in range(2 * per_epoch):
        # the ranks' slices, in rank order, are the global batch, with the same item seeds
        assert [item for rank in range(world) for item in shares[rank][step]] == whole[step]
    for epoch in range(2):
        seen = [i for rank in range(world) for b in shares[rank][epoch * per_epoch : (epoch + 1) * per_epoch] for i in indices(b)]
        assert len(seen) == len(set(seen)) == per_epoch * batch * world  # no image twice in an epoch
        assert set(seen) <= set(range(size))


def test_grouped_batches_are_of_one_group_but_the_epochs_last():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 103)  # 3 groups of about 34
    sampler = BatchSampler(103, 4, seed=5, start_iteration=0, rank=0, world=1, groups=labels)
    assert sampler.per_epoch == 25  # as without groups: 103 // 4
    for epoch in range(3):
        rows = sampler.epoch(epoch)  # [25, 4]
        assert rows.shape == (25, 4) and len(set(rows.flatten().tolist())) == 100
        mixed = [i for i, row in enumerate(rows.tolist()) if len(set(labels[row].tolist())) > 1]
        assert len(mixed) <= 2  # the groups' leftovers (at most 3 of each) make at most 2 batches
    # one group is no grouping: the plain order
    plain = BatchSampler(103, 4, seed=5, start_iteration=0, rank=0, world=1)
    same = BatchSampler(103, 4, seed=5, start_iteration=0, rank=0, world=1, groups=np.zeros(103, dtype=int))
    assert torch.equal(plain.epoch(2), same.epoch(2))
    with pytest.raises(ValueError, match="one group per item expected \\(103\\)"):
        BatchSampler(103, 4, seed=5, start_iteration=0, rank=0, world=1, groups=np.zeros(10))


def padding_share(sizes: np.ndarray, rows: torch.Tensor, min_size: int = 800, max_size: int = 1333) -> float:
    """The share of the padded batches' pixels that is padding, images resized as the models do
    (shorter side ``min_size``, longer at most ``max_size``) and padded to the batch's largest, a multiple of 32."""
    padded = real = 0
    for row in rows.tolist():
        shapes = np.array([resized_shape(int(h), int(w), min_size, max_size) for h, w in sizes[row]])
        height, width = (-(-shapes.max(axis=0) // 32) * 32).tolist()
        padded += len(row) * height * width
        real += int((shapes[:, 0] * shapes[:, 1]).sum())
    return 1 - real / padded


def test_grouping_by_aspect_ratio_cuts_the_padding():
    # photographs as a data set of landscape (640 x 480, 640 x 360) and portrait (480 x 640) images
    rng = np.random.default_rng(1)
    sizes = np.array([(480, 640), (360, 640), (640, 480)])[rng.choice(3, 400, p=[0.5, 0.25, 0.25])]  # [N, (H, W)]
    groups = aspect_ratio_groups(sizes[:, 1] / sizes[:, 0])
    plain = BatchSampler(400, 4, seed=0, start_iteration=0, rank=0, world=1).epoch(0)
    grouped = BatchSampler(400, 4, seed=0, start_iteration=0, rank=0, world=1, groups=groups).epoch(0)
    assert padding_share(sizes, plain) > 0.2  # 28 %
    assert padding_share(sizes, grouped) < 0.04  # 3 %: the rounding to 32 px, and the epoch's mixed leftovers


def test_aspect_ratios_come_from_the_records(shapes_root):
    data = CocoDetection(*shapes_paths(shapes_root, "train"), train=True)
    ratios = aspect_ratios(TrainingSet(data))
    assert ratios is not None and ratios.shape == (len(data),) and np.all(ratios == 1.0)  # the shapes are square
    assert aspect_ratios(data).tolist() == ratios.tolist()

    class NoSizes(Dataset):
        def __len__(self):
            return 3

    assert aspect_ratios(NoSizes()) is None  # batched without groups


def test_a_large_set_has_exact_epochs():
    size = 118_287  # COCO 2017 train
    groups = np.random.default_rng(0).integers(0, 8, size)
    sampler = BatchSampler(size, 2, seed=0, start_iteration=0, rank=0, world=8, groups=groups)
    rows = sampler.epoch(3)
    assert rows.shape == (size // 16, 16) and len(torch.unique(rows)) == rows.numel()
    resumed = next(iter(BatchSampler(size, 2, seed=0, start_iteration=3 * sampler.per_epoch + 1000, rank=3, world=8,
                                     groups=groups)))  # fmt: skip
    assert indices(resumed) == rows[1000, 6:8].tolist()


class RandomItems(Dataset):
    """Items ``(index, a draw of torch's RNG)``: what a random augmentation of item ``index`` would see."""

    def __len__(self):
        return 23

    def __getitem__(self, index):
        return torch.tensor([index]), {"draw": torch.rand(())}


@pytest.mark.parametrize("world", [1, 2])
def test_the_data_are_the_same_with_any_number_of_workers(world):
    cfg = TrainConfig(batch_size=2, seed=4, accumulate=2)
    seen = {}
    for workers in (0, 2):
        loader = training_loader(RandomItems(), cfg, start=3, rank=world - 1, world=world, workers=workers,
                                 device=torch.device("cpu"))  # fmt: skip
        seen[workers] = [(int(image), float(target["draw"])) for images, targets in islice(loader, 14)
                         for image, target in zip(images, targets)]  # fmt: skip
    assert seen[0] == seen[2]
    assert len({draw for _, draw in seen[0]}) == len(seen[0])  # every item its own augmentation


@pytest.mark.cuda
def test_batches_reach_the_gpu_ahead_and_unchanged():
    from rcnn.training.datasets import DevicePrefetcher

    cfg = TrainConfig(batch_size=2, seed=4)
    device = torch.device("cuda", 0)
    on_cpu = list(islice(training_loader(RandomItems(), cfg, 0, 0, 1, 0, torch.device("cpu")), 6))
    loader = training_loader(RandomItems(), cfg, 0, 0, 1, 0, device)
    assert isinstance(loader, DevicePrefetcher)
    for (images, targets), (cpu_images, cpu_targets) in zip(islice(loader, 6), on_cpu):
        assert all(image.device == device for image in images)
        assert [int(i) for i in images] == [int(i) for i in cpu_images]
        assert [float(t["draw"]) for t in targets] == [float(t["draw"]) for t in cpu_targets]
