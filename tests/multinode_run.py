"""One process of a training on several machines, started by ``torchrun`` for tests/test_multinode.py.

    torchrun --nnodes 2 ... tests/multinode_run.py api SHAPES_ROOT RUN_DIR --iterations N
    torchrun --nnodes 2 ... tests/multinode_run.py cli --kill-rank 1 --kill-at 3 -- train --config ...

``api`` trains the deterministic small model of tests/test_training_control.py (frozen BatchNorm,
the first anchors and RoIs instead of a random draw: the weights of a DDP job equal those of one
process with the same global batch) with :func:`rcnn.training.loop.train` and :func:`cfg`, one
image per process, and prints ``RANK-OK``. ``cli`` runs ``rcnn`` with the arguments after ``--``;
with ``--kill-rank R --kill-at N`` the process of rank R sends itself SIGKILL when its step N
begins, as the out-of-memory killer or a lost machine would stop it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

from rcnn.config import TrainConfig
from rcnn.data.coco import CocoDetection
from rcnn.data.shapes import shapes_paths
from rcnn.data.transforms import RandomHorizontalFlip
from rcnn.training.datasets import TrainingSet


def cfg(batch_size: int, iterations: int) -> TrainConfig:
    """The training of the ``api`` runs: ``lr`` meant for a global batch of 2 images."""
    return TrainConfig(iterations=iterations, batch_size=batch_size, lr=0.02, lr_batch_size=2, warmup_iterations=0,
                       checkpoint_every=2, log_every=1, clip_grad_norm=50.0, device="cpu")  # fmt: skip


def training_set(shapes_root: str | os.PathLike) -> TrainingSet:
    """The shapes' train split with random flips (each image's flip seeded by its place in the global batch)."""
    return TrainingSet(CocoDetection(*shapes_paths(Path(shapes_root), "train"), train=True), RandomHorizontalFlip(0.5))


def _kill_at(rank: int, iteration: int) -> None:
    """SIGKILL the process of ``rank`` when its step ``iteration`` begins."""
    if int(os.environ.get("RANK", -1)) != rank:
        return
    from rcnn.training.trainer import Trainer

    step = Trainer.step

    def dying_step(self: Trainer):  # noqa: ANN202
        if self.iteration == iteration:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self)

    Trainer.step = dying_step  # type: ignore[method-assign]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["api", "cli"])
    parser.add_argument("shapes_root", nargs="?")
    parser.add_argument("run_dir", nargs="?")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--kill-rank", type=int)
    parser.add_argument("--kill-at", type=int)
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    torch.set_num_threads(1)
    if args.kill_rank is not None:
        _kill_at(args.kill_rank, args.kill_at)
    if args.mode == "cli":
        from rcnn.cli import main

        sys.exit(main(rest))
    import torch.distributed as dist

    from test_training_control import small_model
    from rcnn.training.loop import train

    data = training_set(args.shapes_root)
    model = small_model(data.dataset.num_classes, deterministic=True)
    train(model, data, cfg(1, args.iterations), args.run_dir, progress=False, log=lambda s: None)
    print("RANK-OK", dist.get_rank(), dist.get_world_size(), flush=True)
    dist.destroy_process_group()
