"""The one training loop every model of the library uses.

SGD with momentum and weight decay (or AdamW), linear warm-up then a step or cosine schedule,
optional gradient clipping, mixed precision on CUDA, a tqdm progress bar with live losses,
TensorBoard scalars and a ``metrics.jsonl`` log, periodic evaluation, atomic checkpoints every
``checkpoint_every`` iterations, exact resumption (``resume=True`` continues from ``last`` with
the same weights, optimiser, schedule, RNG and data order as if never stopped), a guard that
skips and reports non-finite losses, and DDP when launched with ``torchrun`` (gloo on CPU, NCCL
on CUDA), each process taking its own share of every global batch. The controls of long runs —
gradient accumulation, validation loss, keep-best, early stopping, weight EMA, progress by the
time budget — live in :mod:`rcnn.training.control`.

The learning rate scales linearly with the total batch (Goyal et al., 2017): ``lr`` is meant for
``lr_batch_size`` images per step (default: ``batch_size x accumulate``), and the loop uses
``lr * batch_size * world_size * accumulate / lr_batch_size``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from rcnn.config import TrainConfig
from rcnn.data.transforms import collate_fn
from rcnn.io.checkpoints import has_optimizer_state, load_checkpoint, resume_checkpoint, save_checkpoint
from rcnn.io.files import write_text
from rcnn.training.control import RunProgress, TrainingControls, accumulate_gradients, effective_lr

__all__ = ["InterruptAfterStep", "TrainResult", "TrainingInterrupted", "build_optimizer", "distributed_context", "lr_factor", "resolve_device", "train"]

Evaluator = Callable[[nn.Module], dict[str, Any]]


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


class _BatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless, deterministic batches: epoch e is a permutation seeded by (seed, e).

    Each element is ``(dataset index, item seed)``; the item seed drives that item's random
    augmentation, so the data a given iteration sees does not depend on workers or restarts.
    Under DDP, rank r takes the r-th slice of every global batch. With ``accumulate`` N each
    iteration yields N micro-batches, the N slices of the rank's share of a global batch N times
    larger, with the item seeds of that batch: the data of an N-times larger batch.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, start_iteration: int, rank: int, world: int, accumulate: int = 1
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

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration = self.start
        while True:
            epoch, step = divmod(iteration, self.per_epoch)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=generator)
            share = self.batch_size * self.accumulate
            lo = step * self.global_batch + self.rank * share
            for micro in range(self.accumulate):
                batch = order[lo + micro * self.batch_size : lo + (micro + 1) * self.batch_size].tolist()
                first = micro * self.batch_size
                yield [(index, (self.seed * 7919 + iteration) * 65_537 + first + pos) for pos, index in enumerate(batch)]
            iteration += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for display
        return 2**31


class _SeededItems(Dataset):
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


def _to_device(images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device) -> tuple:
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    proposals = None
    if targets and "proposals" in targets[0]:
        proposals = [t.pop("proposals") for t in targets]
    return images, targets, proposals


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
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    rank, world = distributed_context(device)
    total = iterations or cfg.iterations
    torch.manual_seed(cfg.seed + rank)
    model.to(device)
    model.train()
    lr = effective_lr(cfg, world)
    optimizer = build_optimizer(model, cfg, lr)
    controls = TrainingControls(model, cfg, run_dir, evaluator=evaluator, val_set=val_set, device=device, log=log)
    start = 0
    # (every process finds the same checkpoint; the first one switches a broken `last` to it)
    resume_from = resume_checkpoint(run_dir, log, repoint=rank == 0) if resume else None
    if resume_from is not None and not has_optimizer_state(resume_from):
        # weights without a training state (a converted model): they are where training starts
        start = int(load_checkpoint(resume_from, model)["iteration"])
        log(f"{resume_from} holds weights but no optimiser state: training starts from "
            f"those weights at iteration {start} with a new optimiser")  # fmt: skip
    elif resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer=optimizer, restore_rng_state=True)
        start = int(state["iteration"])
        controls.restore(state, resume_from, model)
        if world > 1:  # each process continues its own random stream
            torch.manual_seed(cfg.seed + rank + 1000 * start)
        log(f"resumed from {resume_from} at iteration {start}")
    elif resume:
        log(f"no checkpoint in {run_dir} yet: starting from scratch")
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    use_amp = device.type == "cuda" and cfg.amp != "off"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    loader = DataLoader(
        _SeededItems(dataset),
        batch_sampler=_BatchSampler(len(dataset), cfg.batch_size, cfg.seed, start, rank, world, cfg.accumulate),  # type: ignore[arg-type]
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched (exact resume)
        num_workers=workers,
        worker_init_fn=_ignore_interrupts if workers > 0 else None,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )
    is_main = rank == 0
    # resuming at `start`: the rows a killed run logged after its checkpoint are dropped, not repeated
    writer = _tensorboard(run_dir, purge_step=start + 1 if resume else None) if is_main else None
    metrics_log = (run_dir / "metrics.jsonl") if is_main else None
    if metrics_log is not None and resume:
        _truncate_log(metrics_log, start)
    run_dir.mkdir(parents=True, exist_ok=True)
    window: dict[str, list[float]] = {}
    bad_in_a_row = skipped = 0
    metrics: dict[str, Any] = {}
    checkpoint: Path | None = None
    elapsed = 0.0
    bar = RunProgress(start, total, cfg.time_budget_s, enabled=progress and is_main)

    def save(iteration: int) -> Path | None:
        if not is_main:
            return None
        return save_checkpoint(
            run_dir, iteration, controls.eval_model(model), optimizer=optimizer,
            extra_state={"lr": lr, **controls.state()}, config_yaml=config_yaml,
            class_names=list(class_names) if class_names else None, keep=cfg.keep_checkpoints,
            extra_files=controls.extra_files(model),
        )  # fmt: skip

    def evaluate(iteration: int) -> bool:
        """Evaluate (metrics, val loss), keep the best; True when training should stop early."""
        nonlocal metrics, evaluated_at
        stop = False
        if controls.evaluates and is_main:
            metrics, scalars = controls.evaluate(model)
            evaluated_at = iteration
            _log_scalars(writer, metrics_log, iteration, scalars)
            stop = controls.judge(iteration, metrics, lambda best: best.save(
                iteration, controls.eval_model(model), config_yaml, class_names))  # fmt: skip
        if world > 1 and cfg.patience is not None:  # every process stops with the first
            flag = torch.tensor([float(stop)], device=device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop

    evaluated_at = -1

    iteration = start
    batches = iter(loader)
    with InterruptAfterStep(log) as interrupt:  # Ctrl-C: stop after a whole step, with a checkpoint
        while iteration < total:
            if cfg.time_budget_s is not None and elapsed >= cfg.time_budget_s:
                log(f"time budget of {cfg.time_budget_s:.0f} s reached at iteration {iteration}")
                break
            tic = time.perf_counter()
            for group in optimizer.param_groups:  # the schedule is a function of the iteration alone
                group["lr"] = lr * lr_factor(iteration, cfg, elapsed)
            optimizer.zero_grad(set_to_none=True)
            losses, bad = accumulate_gradients(
                train_model, lambda: _to_device(*next(batches), device), cfg.accumulate, scaler, use_amp, device
            )  # fmt: skip
            if bad:
                skipped += 1
                bad_in_a_row += 1
                log(f"iteration {iteration}: non-finite loss ({', '.join(bad)}); step skipped, weights unchanged")
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise RuntimeError(
                        f"{bad_in_a_row} non-finite losses in a row at iteration {iteration}: training diverged. "
                        "Lower train.lr, raise train.warmup_iterations or set train.clip_grad_norm."
                    )
            else:
                bad_in_a_row = 0
                if cfg.clip_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                controls.after_step(model)
                for k, v in losses.items():
                    window.setdefault(k, []).append(float(v.detach()))
            iteration += 1
            elapsed += time.perf_counter() - tic
            bar.step(iteration, elapsed, {k: sum(v) / len(v) for k, v in window.items() if v})
            if iteration % cfg.log_every == 0 or iteration == total:
                means = {k: sum(v[-cfg.log_every :]) / len(v[-cfg.log_every :]) for k, v in window.items()}
                _log_scalars(
                    writer, metrics_log, iteration,
                    {**{f"train/{k}": v for k, v in means.items()}, "train/lr": optimizer.param_groups[0]["lr"],
                     "train/seconds": elapsed},
                )  # fmt: skip
                window = {k: v[-cfg.log_every :] for k, v in window.items()}
            # evaluations before checkpoints: a checkpoint holds the keep-best state of its iteration
            stop = bool(cfg.eval_every and iteration % cfg.eval_every == 0 and iteration < total) and evaluate(iteration)
            if stop or (iteration % cfg.checkpoint_every == 0 and iteration < total):
                checkpoint = save(iteration)
            if stop:
                break
            if interrupt.requested(device if world > 1 else None):
                bar.close()
                if not (checkpoint is not None and checkpoint.name == f"step_{iteration:07d}"):
                    checkpoint = save(iteration)
                if writer is not None:
                    writer.close()
                saved = f": the checkpoint {checkpoint} is saved; continue with the same command and --resume"
                raise TrainingInterrupted(f"interrupted at iteration {iteration}{saved if checkpoint else ''}")
    bar.close()
    if not controls.stopped_early:  # (an early stop has just saved its checkpoint)
        checkpoint = save(iteration) or checkpoint
    stopped_early = controls.stopped_early
    if evaluated_at != iteration:
        evaluate(iteration)
    if writer is not None:
        writer.close()
    if world > 1:
        dist.barrier()
    final = {k: sum(v) / len(v) for k, v in window.items() if v}
    best = controls.best.state() if controls.best is not None else None
    return TrainResult(iteration, elapsed, final, skipped, metrics, checkpoint, best, stopped_early)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training after a whole step; the message names the checkpoint it saved."""


class InterruptAfterStep:
    """Inside the block, Ctrl-C (SIGINT) asks the loop to stop once the current step is whole
    (:meth:`requested` turns True), instead of killing it in the middle of an optimiser update
    with the steps since the last checkpoint lost; a second Ctrl-C stops at once. Outside the
    main thread (no signal handlers there) it never asks."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.asked = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.asked:
            raise KeyboardInterrupt("interrupted twice: stopped at once, without a checkpoint")
        self.asked = True
        self.log("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again stops at once, without one)")

    def __enter__(self) -> InterruptAfterStep:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def requested(self, device: torch.device | None = None) -> bool:
        """Whether to stop now; with ``device`` (under DDP) whether any process was asked, so that
        all of them stop at the same step."""
        if device is None:
            return self.asked
        flag = torch.tensor([float(self.asked)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _ignore_interrupts(worker_id: int) -> None:
    """A data-loading process leaves Ctrl-C to the training process, which stops after its step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _tensorboard(run_dir: Path, purge_step: int | None = None):
    """TensorBoard's writer; ``purge_step``: events at that step and later, left by an earlier
    process, are discarded when the logs are read (TensorBoard's own rule for restarted runs)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
        return None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)


def _truncate_log(path: Path, iteration: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``iteration`` (the checkpoint resumed from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
        if isinstance(row, dict) and isinstance(row.get("iteration"), int) and row["iteration"] <= iteration:
            kept.append(line + "\n")
    write_text(path, "".join(kept))


def _log_scalars(writer: Any, metrics_log: Path | None, iteration: int, values: dict[str, float]) -> None:
    if writer is not None:
        for key, value in values.items():
            writer.add_scalar(key, value, iteration)
    if metrics_log is not None:
        with metrics_log.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"iteration": iteration, **values}) + "\n")
