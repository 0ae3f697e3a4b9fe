"""The one training loop every model of the library uses: :func:`train`.

SGD with momentum and weight decay (or AdamW), linear warm-up then a step or cosine schedule,
optional gradient clipping, mixed precision on CUDA, a tqdm progress bar with live losses,
TensorBoard scalars and a ``metrics.jsonl`` log, periodic evaluation, atomic checkpoints every
``checkpoint_every`` iterations, exact resumption (``resume=True`` continues from ``last`` with
the same weights, optimiser, schedule, RNG and data order as if never stopped), a guard that
skips and reports non-finite losses, and DDP when launched with ``torchrun`` (gloo on CPU, NCCL
on CUDA), each process taking its own share of every global batch; the controls of long runs —
gradient accumulation, validation loss, keep-best, early stopping, weight EMA, the time budget.

:func:`train` builds a :class:`~rcnn.training.trainer.Trainer` (the step: forward, backward,
optimiser) and its hooks (:mod:`rcnn.training.hooks`: everything else), resumes them, and runs
them. This module adds what is particular to a training from a data set: the optimiser, the
device and the process group (the data order and the loader live in :mod:`rcnn.training.datasets`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from rcnn.config import TrainConfig
from rcnn.io.checkpoints import has_optimizer_state, load_checkpoint, resume_checkpoint
from rcnn.training.datasets import BatchSampler, training_loader
from rcnn.training.hooks import (
    Checkpoints,
    Evaluation,
    InterruptAfterStep,
    MetricsLog,
    Progress,
    StopOnInterrupt,
    TimeBudget,
    WeightEMA,
    load_training_weights,
)
from rcnn.training.trainer import Hook, Trainer, TrainingInterrupted, effective_lr, lr_factor

__all__ = [
    "InterruptAfterStep",
    "TrainResult",
    "TrainingInterrupted",
    "build_optimizer",
    "build_trainer",
    "distributed_context",
    "lr_factor",
    "resolve_device",
    "train",
]

Evaluator = Callable[[nn.Module], dict[str, Any]]
_BatchSampler, _loader = BatchSampler, training_loader  # (their names before they moved to rcnn.training.datasets)


@dataclass
class TrainResult:
    """What a call to :func:`train` did."""

    iterations: int  # iteration reached (the total, counting resumed ones)
    seconds: float  # wall time of this call's training steps
    losses: dict[str, float]  # mean of each loss over the last ``log_every`` steps
    skipped_steps: int  # steps skipped for a non-finite loss
    metrics: dict[str, Any] = field(default_factory=dict)  # last evaluation
    checkpoint: Path | None = None
    best: dict[str, Any] | None = None  # train.keep_best: metric, value, iteration (the weights in RUN/best)
    stopped_early: bool = False  # by train.patience


def resolve_device(name: str) -> torch.device:
    """``"auto"``: the process's CUDA device when available, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
            if local_rank >= count:
                raise ValueError(
                    f"train.device: auto: this is local process {local_rank} but the machine has {count} "
                    f"CUDA device(s); start at most {count} process(es) per machine (torchrun "
                    "--nproc_per_node), or train on the CPU with train.device=cpu"
                )
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"train.device: {exc}") from None


def distributed_context(device: torch.device) -> tuple[int, int]:
    """``(rank, world_size)``; initialises the process group when started by ``torchrun``, and
    leaves it open: the caller ends it (``torch.distributed.destroy_process_group()``), as the CLI does."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or AdamW over the trainable parameters.

    Normalisation parameters and biases get no weight decay.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("nothing to train: every parameter of the model is frozen")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def train(
    model: nn.Module,
    dataset: Dataset,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    evaluator: Evaluator | None = None,
    val_set: Dataset | None = None,
    resume: bool = False,
    config_yaml: str | None = None,
    class_names: Sequence[str] | None = None,
    iterations: int | None = None,
    workers: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``model`` on ``dataset`` for ``cfg.iterations`` (or ``iterations``) steps.

    Args:
        model: a detector in the library's API (``model(images, targets[, proposals]) -> losses``).
        dataset: items ``(image, target)``; a ``target["proposals"]`` is passed as proposals.
        cfg: the ``train`` section of the config.
        run_dir: where checkpoints (``step_*``, ``last``), ``metrics.jsonl`` and TensorBoard logs go.
        evaluator: called with the model (in eval mode) every ``cfg.eval_every`` iterations and at
            the end; returns a dict of metrics (numbers are logged). With ``cfg.ema_decay`` it is
            called with the weight average.
        val_set: items like ``dataset``'s (no augmentation): the val loss at each evaluation
            (``cfg.val_loss``), a metric ``cfg.keep_best`` can watch.
        resume: continue from ``run_dir/last`` if it exists.
        config_yaml, class_names: stored with each checkpoint so it can be used on its own.
        iterations: overrides ``cfg.iterations`` (the schedule still follows ``cfg.iterations``).
        workers: data-loading processes.

    Raises :class:`~rcnn.training.trainer.TrainingInterrupted` after Ctrl-C, once the step it fell
    in is checkpointed. :func:`build_trainer` gives the same training with hooks of your own.
    """
    trainer = build_trainer(
        model, dataset, cfg, run_dir, evaluator=evaluator, val_set=val_set, resume=resume, config_yaml=config_yaml,
        class_names=class_names, iterations=iterations, workers=workers, progress=progress, log=log,
    )  # fmt: skip
    trainer.run()
    if trainer.world > 1:
        dist.barrier()
    return _result(trainer)


def build_trainer(
    model: nn.Module,
    dataset: Dataset,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    evaluator: Evaluator | None = None,
    val_set: Dataset | None = None,
    resume: bool = False,
    config_yaml: str | None = None,
    class_names: Sequence[str] | None = None,
    iterations: int | None = None,
    workers: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    hooks: Sequence[Hook] = (),
) -> Trainer:
    """The trainer :func:`train` runs (same arguments), its hooks built and, with ``resume``, restored.

    ``hooks``: your own, run after each step between the evaluation and the checkpoint of that step
    (so that a checkpoint holds their ``state()`` after its step; they are restored on resume like
    the library's). ``trainer.run()`` trains; under DDP end with ``torch.distributed.barrier()``,
    as :func:`train` does.
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    rank, world = distributed_context(device)
    torch.manual_seed(cfg.seed + rank)
    model.to(device)
    model.train()
    lr = effective_lr(cfg, world)
    optimizer = build_optimizer(model, cfg, lr)
    ema = WeightEMA(model, cfg.ema_decay, log) if cfg.ema_decay is not None else None
    metrics = MetricsLog(run_dir, cfg.log_every, resume=resume, enabled=rank == 0)
    every_hook = [
        ema, metrics,
        Evaluation(cfg, run_dir, evaluator=evaluator, val_set=val_set, metrics=metrics, config_yaml=config_yaml,
                   class_names=class_names, log=log),
        *hooks,  # (before the checkpoints: a checkpoint holds their state after its step)
        Checkpoints(run_dir, cfg.checkpoint_every, keep=cfg.keep_checkpoints, config_yaml=config_yaml,
                    class_names=class_names),
        Progress(metrics.window, cfg.time_budget_s, enabled=progress and rank == 0),
        StopOnInterrupt(log),
        TimeBudget(cfg.time_budget_s, log) if cfg.time_budget_s is not None else None,
    ]  # fmt: skip
    in_use = [hook for hook in every_hook if hook is not None]
    start = _resume(run_dir, model, optimizer, in_use, cfg, rank, world, ema is not None, log) if resume else 0
    ddp = None
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    batches = training_loader(dataset, cfg, start, rank, world, workers, device)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(model, optimizer, batches, cfg, lr=lr, start=start, total=iterations or cfg.iterations,
                   hooks=in_use, ddp=ddp, rank=rank, world=world, device=device, log=log)  # fmt: skip


def _result(trainer: Trainer) -> TrainResult:
    """What :func:`train` returns, from its trainer and hooks."""
    metrics = next(hook for hook in trainer.hooks if isinstance(hook, MetricsLog))
    evaluation = next(hook for hook in trainer.hooks if isinstance(hook, Evaluation))
    best = evaluation.best.state() if evaluation.best is not None else None
    return TrainResult(trainer.iteration, trainer.elapsed, metrics.window.means(), trainer.skipped,
                       evaluation.metrics, trainer.checkpoint, best, evaluation.stopped_early)  # fmt: skip


def _resume(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    hooks: Sequence[Hook],
    cfg: TrainConfig,
    rank: int,
    world: int,
    averaged: bool,
    log: Callable[[str], None],
) -> int:
    """The iteration to start at, with the model, optimiser, random streams and hooks as the newest
    intact checkpoint of ``run_dir`` left them (0 without one)."""
    # (every process finds the same checkpoint; the first one switches a broken `last` to it)
    checkpoint = resume_checkpoint(run_dir, log, repoint=rank == 0)
    if checkpoint is None:
        log(f"no checkpoint in {run_dir} yet: starting from scratch")
        return 0
    if not has_optimizer_state(checkpoint):
        # weights without a training state (a converted model): they are where training starts
        start = int(load_checkpoint(checkpoint, model)["iteration"])
        log(f"{checkpoint} holds weights but no optimiser state: training starts from "
            f"those weights at iteration {start} with a new optimiser")  # fmt: skip
        return start
    state = load_checkpoint(checkpoint, model, optimizer=optimizer, restore_rng_state=True)
    start = int(state["iteration"])
    for hook in hooks:  # (the EMA takes the average from model.safetensors, now in the model)
        hook.restore(state, checkpoint)
    load_training_weights(model, checkpoint, averaged, log)
    if world > 1:  # each process continues its own random stream
        torch.manual_seed(cfg.seed + rank + 1000 * start)
    log(f"resumed from {checkpoint} at iteration {start}")
    before, batch = state.get("processes"), cfg.batch_size * world * cfg.accumulate
    if before is not None and before != world:
        was = state.get("global_batch", batch)
        log(f"{checkpoint} was written by {before} process(es), this training has {world}: "
            + ("the global batch is the same, so are the data order and the learning rate" if was == batch else
               f"the global batch changes from {was} to {batch} images (train.batch_size x processes x "
               "train.accumulate): the learning rate and the data order follow the new batch"))  # fmt: skip
    return start

