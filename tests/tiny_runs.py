"""Tiny trained runs of each generation for the explain and serve tests: a few iterations on the
shapes data (the models are barely trained, but they are real run folders that ``load_model`` reads)."""

from __future__ import annotations

from pathlib import Path

import torch

from rcnn.config import load_config
from rcnn.training.run import run_training

QUIET = dict(progress=False, log=lambda s: None)
SMALL = ["train.batch_size=2", "train.warmup_iterations=1", "train.log_every=1", "train.checkpoint_every=100"]
TWO_STAGE = ["model.min_size=128", "model.max_size=128", "model.rpn.pre_nms_top_n_train=300",
             "model.rpn.post_nms_top_n_train=64", "model.rpn.pre_nms_top_n_test=300", "model.rpn.post_nms_top_n_test=50",
             "model.roi.batch_size_per_image=16"]  # fmt: skip
OVERRIDES = {
    "faster_rcnn": ("faster_rcnn_tiny_shapes", [*TWO_STAGE, "train.iterations=4"]),
    "mask_rcnn": ("mask_rcnn_tiny_shapes", [*TWO_STAGE, "train.iterations=4"]),
    "fast_rcnn": ("fast_rcnn_tiny_shapes", ["model.min_size=128", "model.max_size=128", "model.roi.batch_size_per_image=16",
                                            "train.iterations=4"]),
    "rcnn": ("rcnn_tiny_shapes", ["model.batch_size=64", "train.iterations=3", "train.batch_size=4"]),
}  # fmt: skip


def train_tiny(kind: str, shapes_root: Path, out: Path, proposals: dict[str, Path] | None = None) -> Path:
    """A run folder of generation ``kind`` trained for a few iterations on ``shapes_root``."""
    config_name, overrides = OVERRIDES[kind]
    extra = [f"data.root={shapes_root}", "data.shapes=null", *SMALL, *overrides]
    if proposals is not None:
        extra += [f"data.proposals_train={proposals['train']}", f"data.proposals_val={proposals['val']}"]
    torch.manual_seed(0)
    run_training(load_config(config_name, extra), out, evaluate=False, **QUIET)
    return out


_CACHE: dict[tuple[str, str], Path] = {}


def tiny_run(kind: str, shapes_root: Path, tmp_path_factory, proposals: dict[str, Path] | None = None) -> Path:
    """:func:`train_tiny` once per test process and generation (the explain and serve tests share them)."""
    key = (kind, str(shapes_root))
    if key not in _CACHE:
        needs = kind in ("rcnn", "fast_rcnn")
        if needs and proposals is None:
            raise ValueError(f"{kind} trains on selective search proposals: pass the proposals fixture")
        _CACHE[key] = train_tiny(kind, shapes_root, tmp_path_factory.mktemp(f"run_{kind}"), proposals if needs else None)
    return _CACHE[key]
