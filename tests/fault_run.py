"""A tiny training for the fault-injection tests, runnable in a child process that is killed.

    python tests/fault_run.py SHAPES_ROOT RUN_DIR --kill-in-checkpoint N

trains :func:`small_model` with :func:`cfg` into RUN_DIR; with ``--kill-in-checkpoint N`` the
process sends itself SIGKILL in the middle of writing the weights file of its N-th checkpoint
(half of the file written), as a power cut or the out-of-memory killer would stop it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from tiny_runs import SMALL, TWO_STAGE

QUIET = dict(progress=False, log=lambda s: None)
REPO = Path(__file__).resolve().parent.parent


def train_args(shapes_root: Path, out: Path, *extra: str, iterations: int = 2) -> list[str]:
    """``rcnn train`` of a tiny Faster R-CNN for ``iterations`` steps, without evaluation."""
    sets = [f"data.root={shapes_root}", "data.shapes=null", *SMALL, *TWO_STAGE, f"train.iterations={iterations}"]
    return ["train", "--config", "faster_rcnn_tiny_shapes", "--out", str(out), "--no-eval",
            *(a for s in sets for a in ("--set", s)), *extra]  # fmt: skip


def child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), OMP_NUM_THREADS="1")
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def one_error_line(err: str) -> str:
    """The one error line of a command (progress bars aside), with no traceback."""
    lines = [line for line in re.split(r"[\r\n]+", err) if line.startswith("rcnn ") or "Error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


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
