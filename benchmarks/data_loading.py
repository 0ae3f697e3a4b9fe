"""The training data loader: decoding and augmentation throughput against the number of loader
workers, the share of a training step spent waiting for data, and the padding that batching by
aspect ratio saves.

    python -m benchmarks.data_loading            # about 6 minutes on 2 cores
    python -m benchmarks.data_loading --quick    # shorter timings (for `make bench --all`)

1. **Throughput**: the loader of the training loop (:func:`rcnn.training.datasets.training_loader`:
   the seeded sampler, decoding, the config's augmentation, collation) draining batches of each
   shipped config's data, with 0 (in the training process), 1, 2 and 4 worker processes: images/s
   and images/s per worker. The shapes configs read the generated shapes (PNG, 128 px; Mask R-CNN's
   also decodes the masks); the VOC 2007 configs' photographs are not shipped, so the raccoon
   photographs (``../shared/data/raccoon``: JPEG, about 500 x 375 px, as VOC's) stand in for them.
2. **Waiting for data**: training steps of ``faster_rcnn_tiny_shapes`` and ``mask_rcnn_tiny_shapes``
   (their configs, on the CPU), the time the step spends in ``next(batches)`` against the whole
   step, with 0 and 2 workers.
3. **Padding**: the share of the padded batch that is padding (images resized as the models do,
   800 / 1333 px, padded to the batch's largest, a multiple of 32) over an epoch of the raccoon
   photographs' sizes and of 118,287 images of COCO train's sizes, batched with and without
   aspect-ratio grouping.

Writes ``benchmarks/results/data_loading.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.coco_scale import SIZE_WEIGHTS, SIZES as COCO_SIZES
from benchmarks.harness import ROOT, command_line, table, write_result
from rcnn.config import TrainConfig, load_config
from rcnn.data import build_dataset
from rcnn.data.shapes import make_shapes
from rcnn.data.transforms import RandomHorizontalFlip
from rcnn.training.datasets import BatchSampler, TrainingSet, aspect_ratio_groups, training_loader

__all__ = ["main", "markdown", "padding_share", "throughput", "waiting_share"]

PHOTOGRAPHS = ROOT.parent / "shared" / "data" / "raccoon"
WORKERS = (0, 1, 2, 4)
COCO_TRAIN_IMAGES = 118_287
COCO_SHARES = np.asarray(SIZE_WEIGHTS) / sum(SIZE_WEIGHTS)
# The shipped configs by the data they read: (name, configs, data, with masks).
SOURCES = (
    ("shapes", ("faster_rcnn_tiny_shapes", "fast_rcnn_tiny_shapes", "rcnn_tiny_shapes"), "shapes", False),
    ("shapes with masks", ("mask_rcnn_tiny_shapes",), "shapes", True),
    ("photographs (VOC 2007's stand-in)", ("fast_rcnn_vgg16_voc07", "rcnn_alexnet_voc07"), "photographs", False),
)


def throughput(dataset: Any, hflip: float, batch_size: int, workers: int, seconds: float) -> float:
    """Images/s of the training loader on ``dataset`` (decode, flip with probability ``hflip``,
    collate) with ``workers`` processes, over ``seconds`` after its first batch (the start-up)."""
    cfg = TrainConfig(batch_size=batch_size, seed=0)
    loader = training_loader(TrainingSet(dataset, RandomHorizontalFlip(hflip)), cfg, 0, 0, 1, workers, torch.device("cpu"))
    next(loader)
    images, tic = 0, time.perf_counter()
    while time.perf_counter() - tic < seconds:
        images += len(next(loader)[0])
    rate = images / (time.perf_counter() - tic)
    del loader  # (its workers end)
    return rate


class _Timed:
    """The batches of an iterator, with the seconds spent waiting for each."""

    def __init__(self, batches: Any) -> None:
        self.batches, self.waited = batches, 0.0

    def __iter__(self) -> _Timed:
        return self

    def __next__(self) -> Any:
        tic = time.perf_counter()
        batch = next(self.batches)
        self.waited += time.perf_counter() - tic
        return batch


def waiting_share(config_name: str, data_root: Path, workers: int, steps: int) -> dict[str, float]:
    """Training steps of ``config_name`` on the CPU: seconds per step and the share of it spent
    waiting for the data loader (after 2 steps of warm-up)."""
    from rcnn.build import build_model
    from rcnn.training.loop import build_trainer
    from rcnn.training.run import prepare_data

    config = load_config(config_name, [f"data.root={data_root}", "data.shapes=null"])
    data = prepare_data(config, need_val=False)
    torch.manual_seed(0)
    model = build_model(config.model, data.train.num_classes)
    cfg = config.train.model_copy(update={"device": "cpu", "checkpoint_every": 10**9, "iterations": steps + 2})
    with tempfile.TemporaryDirectory(prefix="rcnn_bench_loading_") as run:
        trainer = build_trainer(model, TrainingSet(data.train, RandomHorizontalFlip(config.data.hflip)), cfg, run,
                                workers=workers, progress=False, log=lambda s: None)  # fmt: skip
        for _ in range(2):
            trainer.step()
        trainer.batches = timed = _Timed(trainer.batches)
        tic = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        seconds = time.perf_counter() - tic
    return {"step_s": seconds / steps, "waiting_share": timed.waited / seconds, "batch_size": cfg.batch_size}


def padding_share(sizes: np.ndarray, rows: torch.Tensor, min_size: int = 800, max_size: int = 1333) -> float:
    """Of the pixels of the padded batches ``rows`` (``[S, B]`` indices into ``sizes [N, (H, W)]``),
    the share that is padding, images resized as the models do (:func:`rcnn.core.images.resized_shape`:
    shorter side ``min_size``, longer at most ``max_size``, rounded half up) and each batch padded to
    its largest height and width, rounded up to a multiple of 32."""
    sizes = np.asarray(sizes, dtype=np.float64)
    scale = np.minimum(min_size / sizes.min(axis=1), max_size / sizes.max(axis=1))  # [N]
    shapes = np.maximum(1, np.floor(sizes * scale[:, None] + 0.5))  # [N, 2]
    batched = shapes[rows.numpy()]  # [S, B, 2]
    padded = -(-batched.max(axis=1) // 32) * 32  # [S, 2]
    return float(1 - batched.prod(axis=2).sum() / (padded.prod(axis=1) * rows.shape[1]).sum())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per throughput figure, 6 training steps")
    args = parser.parse_args(argv)
    seconds, steps = (2.0, 6) if args.quick else (6.0, 20)
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # (4 workers on 2 cores: measured on purpose)
    result: dict[str, Any] = {"throughput": [], "waiting": [], "padding": []}
    with tempfile.TemporaryDirectory(prefix="rcnn_bench_loading_") as work:
        shapes = make_shapes(Path(work) / "shapes", n_train=256, n_val=8, seed=0, image_size=128)
        datasets: dict[tuple[str, bool], Any] = {
            ("shapes", False): build_dataset(shapes, "train", train=True),
            ("shapes", True): build_dataset(shapes, "train", train=True, with_masks=True),
        }
        if PHOTOGRAPHS.is_dir():
            datasets[("photographs", False)] = build_dataset(PHOTOGRAPHS, "all", train=True, val_fraction=0.2)
        else:
            result["skipped"] = f"{PHOTOGRAPHS} is absent: no photographs row"
        for name, configs, source, masks in SOURCES:
            if (source, masks) not in datasets:
                continue
            config = load_config(configs[0])
            rates = {w: throughput(datasets[(source, masks)], config.data.hflip, config.train.batch_size, w, seconds)
                     for w in WORKERS}  # fmt: skip
            result["throughput"].append({"data": name, "configs": list(configs), "batch_size": config.train.batch_size,
                                         "images_per_s": rates})  # fmt: skip
            print(name, {w: round(r, 1) for w, r in rates.items()}, flush=True)
        for config_name in ("faster_rcnn_tiny_shapes", "mask_rcnn_tiny_shapes"):
            for workers in (0, 2):
                row = {"config": config_name, "workers": workers, **waiting_share(config_name, shapes, workers, steps)}
                result["waiting"].append(row)
                print(row, flush=True)
        size_sets = {}  # name -> [N, (H, W)]
        if ("photographs", False) in datasets:
            photos = datasets[("photographs", False)]
            size_sets[f"{len(photos)} raccoon photographs"] = np.array([(r.height, r.width) for r in photos.records])
        draw = np.random.default_rng(0).choice(len(COCO_SIZES), size=COCO_TRAIN_IMAGES, p=COCO_SHARES)
        size_sets[f"{COCO_TRAIN_IMAGES:,} images of COCO train's sizes"] = np.array([COCO_SIZES[k][::-1] for k in draw])
        for name, sizes in size_sets.items():
            groups = aspect_ratio_groups(sizes[:, 1] / sizes[:, 0])
            for batch in (2, 4, 8, 16):
                row = {"images": name, "groups": int(len(np.unique(groups))), "batch_size": batch}
                for label, by in (("without", None), ("with", groups)):
                    rows = BatchSampler(len(sizes), batch, 0, 0, 0, 1, groups=by)
                    row[label] = float(np.mean([padding_share(sizes, rows.epoch(e)) for e in range(3)]))
                result["padding"].append(row)
    result["threads"] = torch.get_num_threads()
    write_result("data_loading", result, command_line("benchmarks.data_loading", list(argv) if argv is not None else None))
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md."""
    workers = [str(w) for w in WORKERS]
    rows = []
    for row in result["throughput"]:
        rates = {str(k): v for k, v in row["images_per_s"].items()}
        rows.append([row["data"], ", ".join(row["configs"]), row["batch_size"],
                     *(f"{rates[w]:.0f} ({rates[w] / max(int(w), 1):.0f})" for w in workers)])  # fmt: skip
    lines = [
        "Decoding and augmentation (the training loader: sampler, decode, flip, collate), images/s (per worker):",
        "",
        table(["data", "configs", "batch", *(f"{w} workers" for w in workers)], rows),
        "",
        "0 workers: loaded in the training process. On 2 cores, more than 2 workers only share them.",
        "",
        "Share of a training step spent waiting for data (CPU training, the configs' batch sizes):",
        "",
        table(["config", "workers", "batch", "s / step", "waiting for data"],
              [[r["config"], r["workers"], r["batch_size"], f"{r['step_s']:.3f}", f"{100 * r['waiting_share']:.1f} %"]
               for r in result["waiting"]]),
    ]  # fmt: skip
    if result.get("padding"):
        lines += [
            "",
            "Padding: the share of the batches' pixels that is padding over an epoch (mean of 3), images resized "
            "to 800 / 1333 px as the models do and padded to the batch's largest, a multiple of 32; with grouping "
            "(`train.aspect_ratio_grouping`, the default) and without:",
            "",
            table(["images", "aspect-ratio groups", "batch", "without grouping", "with grouping"],
                  [[r["images"], r["groups"], r["batch_size"], f"{100 * r['without']:.1f} %", f"{100 * r['with']:.1f} %"]
                   for r in result["padding"]]),
            "",
            "COCO train's sizes: its most common image sizes in their shares (`benchmarks.coco_scale.SIZES`), "
            "drawn for 118,287 images. What grouping leaves is the spread of aspect ratios within a group (COCO's "
            "640 x 480 and 640 x 427 share one) and the rounding to 32 px.",
        ]  # fmt: skip
    if result.get("skipped"):
        lines += ["", result["skipped"]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
