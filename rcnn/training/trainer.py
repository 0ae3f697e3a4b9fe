"""The trainer: one optimiser step, repeated, with hooks around it.

:meth:`Trainer.step` is the whole step of every model of the library: the learning rate of its
iteration, the micro-batches fetched and moved to the device, forward and backward with gradient
accumulation and mixed precision (a gradient scaler), the guard that skips a step whose loss is
not finite, gradient clipping, the optimiser step. :meth:`Trainer.run` repeats it up to ``total``
and calls the hooks (:class:`Hook`): ``before_train``, ``after_step`` after each step,
``after_train`` at the end. Everything else a training does — weight EMA, logs, evaluation,
keep-best, early stopping, checkpoints, the progress bar, Ctrl-C, the time budget — is a hook
(:mod:`rcnn.training.hooks`); :func:`rcnn.training.loop.train` puts them together.

The learning rate scales linearly with the total batch (Goyal et al., 2017): ``lr`` is meant for
``lr_batch_size`` images per step (default: ``batch_size x accumulate``), and the step uses
``lr * batch_size * world_size * accumulate / lr_batch_size``.

Shapes: ``B`` images per micro-batch; ``images`` a list of B float tensors ``[3, H, W]`` in 0..1,
``targets`` a list of B dicts (``boxes [N, 4]``, ``labels [N]``, ...), ``proposals`` a list of B
tensors ``[R, 4]`` or None (the model proposes its own).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rcnn.config import TrainConfig

__all__ = [
    "Batch",
    "Hook",
    "ProcessLost",
    "Trainer",
    "TrainingInterrupted",
    "compute_losses",
    "effective_lr",
    "lost_process",
    "lr_factor",
    "to_device",
]

Batch = tuple[list[Tensor], list[dict[str, Any]], list[Tensor] | None]  # images, targets, proposals


def to_device(batch: tuple[list[Tensor], list[dict[str, Any]]], device: torch.device) -> Batch:
    """A collated batch ``(images, targets)`` on ``device``, each ``target["proposals"]`` taken out
    of its target as the batch's proposals (None when the items have none).

    The copies are non-blocking: from the data loader's pinned memory on CUDA they overlap the
    computation; from ordinary memory, and on the CPU, they are plain copies.
    """
    images, targets = batch
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    proposals = [t.pop("proposals") for t in targets] if targets and "proposals" in targets[0] else None
    return images, targets, proposals


def compute_losses(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    """The named losses of ``model`` (in training mode) on ``batch``."""
    images, targets, proposals = batch
    return model(images, targets, proposals) if proposals is not None else model(images, targets)


def effective_lr(cfg: TrainConfig, world: int) -> float:
    """The learning rate of a step: ``lr`` scaled linearly from ``lr_batch_size`` (default: the
    effective batch ``batch_size x accumulate``) to ``batch_size x processes x accumulate``."""
    effective = cfg.batch_size * cfg.accumulate
    return cfg.lr * effective * world / (cfg.lr_batch_size or effective)


def lr_factor(iteration: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``iteration``: warm-up, then the schedule.

    The schedule follows the fraction of training done: ``iteration / iterations``, or, with a
    ``time_budget_s``, the larger of that and ``elapsed / time_budget_s``, so that a run cut by its
    time budget still goes through its whole schedule. (Such a run resumes with the schedule of its
    iteration count, as elapsed time is not replayed.)
    """
    progress = iteration / cfg.iterations
    if cfg.time_budget_s:
        progress = max(progress, elapsed / cfg.time_budget_s)
    if cfg.schedule == "step":
        milestones = [s if s <= 1 else s / cfg.iterations for s in cfg.steps]
        factor = cfg.gamma ** sum(progress >= m - 1e-12 for m in milestones)
    elif cfg.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    else:
        factor = 1.0
    if iteration < cfg.warmup_iterations:
        alpha = iteration / cfg.warmup_iterations
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training after a whole step; the message names the checkpoint it saved."""


class ProcessLost(ConnectionError):
    """Under DDP another process of the training stopped (killed, crashed, its machine gone): the
    others cannot go on without it. The first process saves the last whole step as a checkpoint
    (``checkpoint``) before raising; the message says how to continue."""

    def __init__(self, reason: str | None, checkpoint: Path | None) -> None:
        if checkpoint is not None:
            saved = f"the checkpoint {checkpoint} is saved"
        else:
            saved = "the first process saves the checkpoint (if it is the one that stopped: its last periodic one)"
        super().__init__(f"{reason}: {saved}; start every process again with the same command and --resume "
                         "(any number of processes)")  # fmt: skip
        self.checkpoint = checkpoint


# What a collective call of gloo or NCCL says when the process at the other end has gone.
_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed",
         "connection refused", "nccl communicator was aborted", "remote process exited", "timed out waiting")  # fmt: skip


def lost_process(exc: BaseException) -> str | None:
    """The cause, in a few words, when ``exc`` is a collective call failing because another
    process of the job has gone; None otherwise."""
    text = str(exc)
    if not any(marker in text.lower() for marker in _LOST):
        return None
    line = next((part.strip() for part in text.splitlines() if part.strip()), type(exc).__name__)
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)  # gloo's "[../gloo/transport/tcp/pair.cc:534] " source prefix
    return line.split(". ")[0].rstrip(".")[:200]  # the first sentence: what happened (the rest is advice)


class Hook:
    """Something a training does besides its steps; subclass it and override what you need.

    The trainer calls ``before_train`` once, then ``after_step`` after each step, both in the order
    of its hooks, and ``after_train`` once when the steps end (at ``total`` or by a stop, not when
    a step or a hook raises), in the reverse order, as nested blocks end: a hook set up after
    another finishes before it. (So, in :func:`rcnn.training.loop.train`, the progress bar closes
    before the final checkpoint is written, which comes before the final evaluation, whose numbers
    reach the logs before they close.) What must be undone however the run ends, an exception
    included, goes on ``trainer.exit_stack`` (a :class:`contextlib.ExitStack`) in ``before_train``.

    ``state()`` goes into each checkpoint's ``state.json`` (merged with the other hooks' and the
    trainer's own keys ``iteration``, ``lr``, ``optimizer``, ``rng``: choose keys of your own).
    ``restore(state, checkpoint)`` gets the whole ``state.json`` back when a training resumes from
    ``checkpoint``, before its first step; it is not called for a checkpoint without a training
    state (converted weights), where training starts afresh.
    """

    def before_train(self, trainer: Trainer) -> None:
        """Before the first step (after a resume: ``trainer.start`` is the iteration resumed at)."""

    def after_step(self, trainer: Trainer) -> None:
        """After each step: ``trainer.iteration`` counts it; ``trainer.losses`` are its losses
        (None when a non-finite loss skipped it)."""

    def after_train(self, trainer: Trainer) -> None:
        """After the last step; ``trainer.stop_reason`` says why the steps ended early (None: at
        ``total``)."""

    def state(self) -> dict[str, Any]:
        """What this hook needs to continue exactly after a resume (JSON values)."""
        return {}

    def restore(self, state: dict[str, Any], checkpoint: Path) -> None:
        """Take back what :meth:`state` wrote; ``state`` is the checkpoint's whole ``state.json``."""


class Trainer:
    """Optimiser steps of ``model`` on ``batches``, with hooks around them.

    Args:
        model: a detector in the library's API (``model(images, targets[, proposals]) -> losses``),
            in training mode, on its device.
        optimizer: over the model's trainable parameters; the step sets its learning rate.
        batches: collated ``(images, targets)`` micro-batches, ``cfg.accumulate`` per step (the
            endless data loader of :func:`rcnn.training.loop.train`, or any iterator).
        cfg: the ``train`` section of the config: ``accumulate``, ``amp``, ``clip_grad_norm``,
            ``max_bad_steps`` and the learning-rate schedule (:func:`lr_factor`).
        lr: the base learning rate (default: :func:`effective_lr` for ``world`` processes).
        start, total: the iteration to start at (after a resume) and to stop at (default
            ``cfg.iterations``).
        hooks: run in this order after each step (see :class:`Hook`).
        ddp: the ``DistributedDataParallel`` wrapper of ``model`` that runs forward and backward
            under DDP (None: ``model`` itself); ``rank``, ``world``: this process and their count.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Iterator[tuple[list[Tensor], list[dict[str, Any]]]],
        cfg: TrainConfig,
        *,
        lr: float | None = None,
        start: int = 0,
        total: int | None = None,
        hooks: Sequence[Hook] = (),
        ddp: nn.parallel.DistributedDataParallel | None = None,
        rank: int = 0,
        world: int = 1,
        device: torch.device | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.model, self.optimizer, self.batches, self.cfg = model, optimizer, batches, cfg
        self.ddp, self.rank, self.world, self.log = ddp, rank, world, log
        self.device = device if device is not None else next(model.parameters()).device
        self.lr = effective_lr(cfg, world) if lr is None else lr
        self.start = self.iteration = start
        self.total = total or cfg.iterations
        self.hooks = list(hooks)
        self.use_amp = self.device.type == "cuda" and cfg.amp != "off"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.eval_model: nn.Module = model  # the weights evaluated and saved (WeightEMA puts its average here)
        self.elapsed = 0.0  # seconds of training steps: the time budget and the schedule follow them
        self.losses: dict[str, Tensor] | None = None  # the last step's; None when it was skipped
        self.skipped = 0  # steps skipped for a non-finite loss
        self.bad_in_a_row = 0
        self.checkpoint: Path | None = None  # the last one written (the Checkpoints hook keeps it)
        self.stop_reason: str | None = None
        self.interrupted = False
        self.exit_stack = contextlib.ExitStack()  # what must be undone however run() ends

    @property
    def is_main(self) -> bool:
        """The first process: the one that writes logs and checkpoints and evaluates."""
        return self.rank == 0

    def step(self) -> dict[str, Tensor] | None:
        """One optimiser step at ``iteration``, which then counts it.

        Returns the mean of each loss over the micro-batches (the loss of the big batch where every
        image weighs the same, see docs/training.md), or None when a non-finite loss skipped the
        update (weights and momentum untouched); ``cfg.max_bad_steps`` of those in a row raise.
        """
        tic = time.perf_counter()
        for group in self.optimizer.param_groups:  # the schedule is a function of the iteration alone
            group["lr"] = self.lr * lr_factor(self.iteration, self.cfg, self.elapsed)
        self.optimizer.zero_grad(set_to_none=True)
        losses, bad = self._forward_backward()
        if bad:
            self.skipped += 1
            self.bad_in_a_row += 1
            self.log(f"iteration {self.iteration}: non-finite loss ({', '.join(bad)}); step skipped, weights unchanged")
            if self.bad_in_a_row >= self.cfg.max_bad_steps:
                raise RuntimeError(
                    f"{self.bad_in_a_row} non-finite losses in a row at iteration {self.iteration}: training diverged. "
                    "Lower train.lr, raise train.warmup_iterations or set train.clip_grad_norm."
                )
        else:
            self.bad_in_a_row = 0
            if self.cfg.clip_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.losses = None if bad else losses
        self.iteration += 1
        self.elapsed += time.perf_counter() - tic
        return self.losses

    def _forward_backward(self) -> tuple[dict[str, Tensor], list[str]]:
        """Forward and backward ``cfg.accumulate`` micro-batches into the (zeroed) gradients, each
        loss divided by their number; the mean losses and the names of the non-finite ones.

        A non-finite loss stops the backward passes of the step, but every micro-batch is still
        drawn and run forward, so that the data order is kept and, under DDP, every process makes
        the same collective calls; the processes agree before the last backward pass, the one that
        all-reduces the gradients (the earlier ones run in ``no_sync()``).
        """
        runner, steps = self.ddp or self.model, self.cfg.accumulate
        means: dict[str, Tensor] = {}
        bad: list[str] = []
        for micro in range(steps):
            last = micro == steps - 1
            batch = to_device(next(self.batches), self.device)
            with contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
                    losses = compute_losses(runner, batch)
                loss = sum(losses.values())
                if not bad and not torch.isfinite(loss):
                    bad = [k for k, v in losses.items() if not torch.isfinite(v)] or ["loss"]
                if last and self.ddp is not None:  # one bad process skips the step for all of them
                    flag = torch.tensor([float(bool(bad))], device=loss.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    if flag.item() and not bad:
                        bad = ["(another process)"]
                if bad:
                    continue
                self.scaler.scale(loss / steps).backward()
            for key, value in losses.items():
                means[key] = means.get(key, 0.0) + value.detach() / steps
        return means, bad

    def run(self) -> None:
        """Steps from ``iteration`` to ``total``, or until a hook stops the run, with the hooks
        around them; after an interrupting stop, raises :class:`TrainingInterrupted` once the
        hooks' ``after_train`` are done. Under DDP, when a collective call fails because another
        process has gone, the run ends as after Ctrl-C (the first process checkpoints the last
        whole step) and raises :class:`ProcessLost`."""
        with self.exit_stack:
            for hook in self.hooks:
                hook.before_train(self)
            lost = None
            try:
                while self.iteration < self.total and self.stop_reason is None:
                    self.step()
                    for hook in self.hooks:
                        hook.after_step(self)
            except (dist.DistError, RuntimeError) as exc:
                if self.world <= 1 or (lost := lost_process(exc)) is None:
                    raise
                # the weights and the optimiser are those of the last whole step (a failed collective
                # call comes before the optimiser step, or after the step's hooks' work)
                self.stop(f"another process of the training stopped at iteration {self.iteration} ({lost})",
                          interrupted=True)  # fmt: skip
            for hook in reversed(self.hooks):
                hook.after_train(self)
            if lost is not None:
                raise ProcessLost(self.stop_reason, self.checkpoint if self.is_main else None)
            if self.interrupted:
                saved = f": the checkpoint {self.checkpoint} is saved; continue with the same command and --resume"
                raise TrainingInterrupted(f"{self.stop_reason}{saved if self.checkpoint else ''}")

    def stop(self, reason: str, *, interrupted: bool = False) -> None:
        """End the run after this step (the first reason stands); the hooks after the caller still
        see the step. ``interrupted``: the run ends without its final evaluation and ``run`` raises
        :class:`TrainingInterrupted` (``reason`` and the checkpoint) after the hooks' ``after_train``."""
        if self.stop_reason is None:
            self.stop_reason, self.interrupted = reason, interrupted

    @contextlib.contextmanager
    def training_time(self) -> Iterator[None]:
        """Time spent inside counts as training time, as the step's does: for what a hook does as
        part of every step (the weight EMA's update)."""
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.elapsed += time.perf_counter() - tic
