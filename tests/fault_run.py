"""A tiny training for the fault-injection tests, runnable in a child process that is killed.

    python tests/fault_run.py SHAPES_ROOT RUN_DIR --kill-in-checkpoint N

trains :func:`small_model` with :func:`cfg` into RUN_DIR; with ``--kill-in-checkpoint N`` the
process sends itself SIGKILL in the middle of writing the weights file of its N-th checkpoint
(half of the file written), as a power cut or the out-of-memory killer would stop it.
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
from rcnn.models import faster_rcnn
from rcnn.training.datasets import TrainingSet

QUIET = dict(progress=False, log=lambda s: None)


def small_model(num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    return faster_rcnn(
        "tiny", num_classes, min_size=64, max_size=64,
        rpn={"pre_nms_top_n_train": 200, "post_nms_top_n_train": 50}, roi={"batch_size_per_image": 16},
    )  # fmt: skip


def cfg(**kw) -> TrainConfig:
    base = dict(iterations=6, batch_size=2, lr=0.01, warmup_iterations=2, checkpoint_every=3, log_every=1)
    return TrainConfig(**{**base, **kw})


def training_set(shapes_root: str | os.PathLike) -> TrainingSet:
    images_dir, ann = shapes_paths(Path(shapes_root), "train")
    return TrainingSet(CocoDetection(images_dir, ann, train=True), RandomHorizontalFlip(0.5))


def _kill_in_checkpoint(n: int) -> None:
    """SIGKILL this process halfway through the weights file of the ``n``-th checkpoint."""
    import rcnn.io.checkpoints as checkpoints
    from safetensors.torch import save as to_bytes

    original = checkpoints.save_file
    seen = {"checkpoints": 0}

    def dying_save_file(tensors, filename, metadata=None):
        if Path(filename).name == "model.safetensors":
            seen["checkpoints"] += 1
            if seen["checkpoints"] == n:
                data = to_bytes(tensors, metadata)
                with open(filename, "wb") as fh:
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        return original(tensors, filename, metadata=metadata)

    checkpoints.save_file = dying_save_file


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("shapes_root")
    parser.add_argument("run_dir")
    parser.add_argument("--kill-in-checkpoint", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.kill_in_checkpoint:
        _kill_in_checkpoint(args.kill_in_checkpoint)
    from rcnn.training.loop import train

    data = training_set(args.shapes_root)
    train(small_model(data.dataset.num_classes), data, cfg(), args.run_dir, **QUIET)
    sys.exit(0)
