"""Controls of long training runs, driven by the one loop (``rcnn.training.loop.train``).

- **Gradient accumulation** (``train.accumulate: N``): each optimiser step sums the gradients of
  N micro-batches of ``batch_size`` images, each loss divided by N, so that one step sees the
  images, augmentation, learning rate and mean gradient of one batch of ``N x batch_size``
  (the sampler hands out the big batch in N slices, see ``loop._BatchSampler``). Under DDP the
  first N - 1 micro-steps run in ``no_sync()``: gradients are all-reduced once per step.
- **Validation loss** (``train.val_loss``): the training losses on the val split at each
  evaluation, with BatchNorm and dropout as in inference and the random sampling of anchors and
  RoIs seeded on its own, so that it neither changes the training run nor varies between calls.
- **Keep the best** (``train.keep_best: bbox_AP``): after each evaluation that improves the
  metric, the evaluated weights go to ``RUN/best_<iteration>/`` and the ``RUN/best`` link is
  switched to it atomically (the previous best is then removed). A ``*loss*`` metric is
  minimised, the others maximised.
- **Early stopping** (``train.patience: P``): stop after P evaluations in a row without an
  improvement of the ``keep_best`` metric by more than ``train.min_delta``.
- **Weight EMA** (``train.ema_decay: d``): ``torch.optim.swa_utils.AveragedModel`` keeps
  ``W_ema <- d W_ema + (1 - d) W`` (parameters and buffers) after each optimiser step. The EMA
  weights are the ones evaluated, kept as best and written to each checkpoint's
  ``model.safetensors`` (what ``rcnn evaluate``, ``predict``, ``export`` load); the training
  weights go beside them to ``training_model.safetensors``, read only when resuming.
- **Progress by the time budget**: with ``train.time_budget_s`` the bar follows the fraction of
  the run done — the larger of iterations / ``iterations`` and training time / budget, the rule
  of the learning-rate schedule — and shows the time left by whichever ends the run first.

Everything the controls hold (the EMA, the best value, the evaluations without improvement)
goes into each checkpoint, so a resumed run ends with the same weights, the same best and the
same stopping point as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset

from rcnn.config import TrainConfig
from rcnn.data.transforms import collate_fn
from rcnn.io.checkpoints import load_weights
from rcnn.io.files import write_json, write_text

__all__ = [
    "BestKeeper",
    "RunProgress",
    "TrainingControls",
    "WeightAverage",
    "accumulate_gradients",
    "effective_lr",
    "time_left",
    "validation_loss",
]

TRAINING_WEIGHTS = "training_model.safetensors"  # beside the EMA weights in a checkpoint
Batch = tuple[list[Tensor], list[dict[str, Any]], list[Tensor] | None]  # images, targets, proposals


def effective_lr(cfg: TrainConfig, world: int) -> float:
    """The learning rate of a step: ``lr`` scaled linearly from ``lr_batch_size`` (default: the
    effective batch ``batch_size x accumulate``) to ``batch_size x processes x accumulate``."""
    effective = cfg.batch_size * cfg.accumulate
    return cfg.lr * effective * world / (cfg.lr_batch_size or effective)


def _run(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    images, targets, proposals = batch
    return model(images, targets, proposals) if proposals is not None else model(images, targets)


def accumulate_gradients(
    train_model: nn.Module,
    fetch: Callable[[], Batch],
    steps: int,
    scaler: torch.amp.GradScaler,
    use_amp: bool,
    device: torch.device,
) -> tuple[dict[str, Tensor], list[str]]:
    """Forward and backward ``steps`` micro-batches into the gradients (zeroed by the caller).

    Returns the mean of each loss over the micro-batches (the loss of the big batch where every
    image weighs the same, see docs/training.md) and the names of the non-finite losses (empty
    when all are finite). A non-finite loss stops the backward passes of the step, whose update
    the caller then skips; every micro-batch is still drawn and run forward, so that the data
    order is kept and, under DDP, every process makes the same collective calls; the processes
    agree before the last backward pass, which is the one that all-reduces the gradients.
    """
    distributed = isinstance(train_model, nn.parallel.DistributedDataParallel)
    means: dict[str, Tensor] = {}
    bad: list[str] = []
    for micro in range(steps):
        last = micro == steps - 1
        batch = fetch()
        sync = contextlib.nullcontext() if last or not distributed else train_model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                losses = _run(train_model, batch)
            loss = sum(losses.values())
            if not bad and not torch.isfinite(loss):
                bad = [k for k, v in losses.items() if not torch.isfinite(v)] or ["loss"]
            if last and distributed:  # one bad process skips the step for all of them
                flag = torch.tensor([float(bool(bad))], device=loss.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item() and not bad:
                    bad = ["(another process)"]
            if bad:
                continue
            scaler.scale(loss / steps).backward()
        for key, value in losses.items():
            means[key] = means.get(key, 0.0) + value.detach() / steps
    return means, bad


class WeightAverage:
    """An exponential moving average of a model's weights (``torch.optim.swa_utils.AveragedModel``
    with ``get_ema_multi_avg_fn``; buffers averaged too, as in torchvision's reference scripts)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class as the trained one)."""
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    def update(self, model: nn.Module) -> None:
        """After an optimiser step; the first update copies the weights."""
        self.averaged.update_parameters(model)

    def load(self, weights: dict[str, Tensor], updates: int) -> None:
        self.module.load_state_dict(weights)
        self.averaged.n_averaged.fill_(updates)


def _higher_is_better(metric: str) -> bool:
    return "loss" not in metric


class BestKeeper:
    """Keep-best and early stopping on one val metric (``train.keep_best``, ``train.patience``)."""

    def __init__(self, metric: str, run_dir: Path, patience: int | None = None, min_delta: float = 0.0) -> None:
        self.metric, self.run_dir, self.patience, self.min_delta = metric, run_dir, patience, min_delta
        self.best: float | None = None
        self.best_iteration: int | None = None
        self.stale = 0  # evaluations since the last improvement

    def state(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.best, "iteration": self.best_iteration, "stale": self.stale}

    def restore(self, state: dict[str, Any] | None) -> None:
        if state and state.get("metric") == self.metric:
            self.best, self.best_iteration, self.stale = state["value"], state["iteration"], int(state["stale"])

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if _higher_is_better(self.metric):
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def update(self, iteration: int, numbers: dict[str, float]) -> bool:
        """Record an evaluation; True when it is the new best."""
        if self.metric not in numbers:
            available = ", ".join(sorted(k for k in numbers if "per_class" not in k)) or "none"
            raise ValueError(f"train.keep_best: the evaluation has no {self.metric} (it has: {available})")
        value = numbers[self.metric]
        if self.improves(value):
            self.best, self.best_iteration, self.stale = value, iteration, 0
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def save(
        self, iteration: int, model: nn.Module, config_yaml: str | None, class_names: Sequence[str] | None
    ) -> Path:
        """``RUN/best_<iteration>/`` (weights, config, classes, the metric) and ``RUN/best`` pointing at it.

        Written to a temporary folder renamed into place, then the link is switched with an atomic
        rename: a kill leaves the previous best or the new one.
        """
        name = f"best_{iteration:07d}"
        final, tmp = self.run_dir / name, self.run_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        write_json(tmp / "state.json", {"iteration": iteration, "best": {"metric": self.metric, "value": self.best}})
        if config_yaml is not None:
            write_text(tmp / "config.yaml", config_yaml)
        if class_names is not None:
            write_json(tmp / "classes.json", list(class_names))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        link = self.run_dir / ".best.tmp"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(name)
        os.replace(link, self.run_dir / "best")
        for old in self.run_dir.glob("best_*"):
            if old.name != name and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        return final


_NORMALISATION = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.GroupNorm, nn.LayerNorm)


@contextlib.contextmanager
def _losses_as_in_inference(model: nn.Module, seed: int):
    """Training mode (the model returns its losses) with BatchNorm and dropout in eval mode, and
    the random sampling seeded on its own (the caller's random streams untouched)."""
    was_training = model.training
    model.train()
    for module in model.modules():
        if isinstance(module, _NORMALISATION):
            module.eval()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield
    finally:
        model.train(was_training)


@torch.no_grad()
def validation_loss(
    model: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device, seed: int = 0
) -> dict[str, float]:
    """Mean of each training loss over ``dataset`` (items ``(image, target)``, a
    ``target["proposals"]`` passed as proposals), and their sum as ``"loss"``.

    Batches of ``batch_size`` images in data set order; each batch weighs by its images.
    """
    sums: dict[str, float] = {}
    count = 0
    with _losses_as_in_inference(model, seed):
        for lo in range(0, len(dataset), batch_size):  # type: ignore[arg-type]
            images, targets = collate_fn([dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))])  # type: ignore[arg-type]
            images = [im.to(device) for im in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            proposals = [t.pop("proposals") for t in targets] if targets and "proposals" in targets[0] else None
            losses = _run(model, (images, targets, proposals))
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(images)
            count += len(images)
    if count == 0:
        raise ValueError("train.val_loss: the val split is empty")
    means = {key: value / count for key, value in sums.items()}
    return {"loss": sum(means.values()), **means}


def _flat(data: dict[str, Any], prefix: str = "", sep: str = "_") -> dict[str, float]:
    """Finite numbers of nested dicts, their keys joined by ``sep`` (``bbox_AP``)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}{sep}", sep))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


class TrainingControls:
    """What the loop asks of the controls: the model to evaluate and save, the EMA update after
    each step, the evaluation (metrics, val loss, keep-best, early stopping), the state that goes
    into each checkpoint and comes back on resume."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        run_dir: Path,
        *,
        evaluator: Callable[[nn.Module], dict[str, Any]] | None,
        val_set: Dataset | None,
        device: torch.device,
        log: Callable[[str], None],
    ) -> None:
        self.cfg, self.device, self.log = cfg, device, log
        self.evaluator = evaluator
        if cfg.val_loss and val_set is None:
            raise ValueError("train.val_loss: true, but there is no val split to compute it on")
        self.val_set = val_set if cfg.val_loss is not False else None
        self.ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.best = BestKeeper(cfg.keep_best, run_dir, cfg.patience, cfg.min_delta) if cfg.keep_best else None
        if cfg.keep_best:
            needs_loss = cfg.keep_best.startswith("val_")
            if needs_loss and self.val_set is None:
                raise ValueError(
                    f"train.keep_best: {cfg.keep_best} needs the val loss: a val split, and train.val_loss not false"
                )
            if not needs_loss and evaluator is None:
                raise ValueError(
                    f"train.keep_best: {cfg.keep_best} needs evaluations on a val split (data.val_split; "
                    "not with --no-eval)"
                )
        self.evaluates = evaluator is not None or self.val_set is not None
        self.stopped_early = False

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The weights that are evaluated and saved: the EMA's, or the model's own."""
        return self.ema.module if self.ema is not None else model

    def after_step(self, model: nn.Module) -> None:
        if self.ema is not None:
            self.ema.update(model)

    def evaluate(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, float]]:
        """Metrics of the evaluated weights (with ``"val": {"loss", ...}``) and the scalars to log."""
        target = self.eval_model(model)
        result: dict[str, Any] = {}
        if self.evaluator is not None:
            target.eval()
            try:
                result = dict(self.evaluator(target))
            finally:
                target.train()
        scalars = {f"eval/{k}": v for k, v in _flat(result, sep="/").items()}
        if self.val_set is not None:
            result["val"] = validation_loss(
                target, self.val_set, batch_size=self.cfg.batch_size, device=self.device, seed=self.cfg.seed
            )  # fmt: skip
            scalars.update({f"val/{k}": v for k, v in result["val"].items()})
        return result, scalars

    def judge(self, iteration: int, result: dict[str, Any], save_best: Callable[[nn.Module], Path]) -> bool:
        """Keep-best and early stopping after an evaluation; True when training should stop."""
        if self.best is None:
            return False
        numbers = _flat({k: v for k, v in result.items() if k != "val"})
        numbers.update({f"val_{k}" if k != "loss" else "val_loss": v for k, v in result.get("val", {}).items()})
        if self.best.update(iteration, numbers):
            path = save_best(self.best)
            self.log(f"iteration {iteration}: new best {self.best.metric} = {self.best.best:.4f}, kept in {path}")
        if self.best.should_stop:
            self.stopped_early = True
            self.log(
                f"iteration {iteration}: {self.best.metric} has not improved for {self.best.stale} evaluations "
                f"(best {self.best.best:.4f} at iteration {self.best.best_iteration}): stopping early"
            )
        return self.stopped_early

    def state(self) -> dict[str, Any]:
        """What goes into a checkpoint's ``state.json``."""
        state: dict[str, Any] = {}
        if self.best is not None:
            state["best"] = self.best.state()
        if self.ema is not None:
            state["ema"] = {"decay": self.ema.decay, "updates": self.ema.updates}
        return state

    def extra_files(self, model: nn.Module) -> dict[str, dict[str, Tensor]] | None:
        """With an EMA: the training weights, beside the EMA's in ``model.safetensors``."""
        return {TRAINING_WEIGHTS: dict(model.state_dict())} if self.ema is not None else None

    def restore(self, state: dict[str, Any], checkpoint: Path, model: nn.Module) -> None:
        """After ``load_checkpoint`` put the checkpoint's ``model.safetensors`` into ``model``:
        with an EMA in the checkpoint, that was the EMA; the training weights come from beside it."""
        if self.best is not None:
            self.best.restore(state.get("best"))
        has_ema = (checkpoint / TRAINING_WEIGHTS).is_file()
        if has_ema and self.ema is not None:
            self.ema.load(model.state_dict(), int(state.get("ema", {}).get("updates", 1)))
        elif self.ema is not None:
            self.log(f"{checkpoint} holds no weight average: the EMA starts from the current weights")
        if has_ema:
            load_weights(model, load_file(str(checkpoint / TRAINING_WEIGHTS)), checkpoint / TRAINING_WEIGHTS)
            if self.ema is None:
                self.log(f"{checkpoint} was trained with a weight average, train.ema_decay is unset: training "
                         "continues from the training weights")  # fmt: skip


def time_left(iteration: int, start: int, total: int, elapsed: float, budget: float | None) -> float | None:
    """Seconds of training left: by the iterations at this run's pace, or by the time budget,
    whichever ends the run first (None before the pace is known and without a budget)."""
    by_budget = max(budget - elapsed, 0.0) if budget else None
    done = iteration - start
    by_iterations = (total - iteration) * elapsed / done if done > 0 and elapsed > 0 else None
    known = [t for t in (by_budget, by_iterations) if t is not None]
    return min(known) if known else None


class RunProgress:
    """The training bar: tqdm over iterations, or, with a time budget, over the fraction of the
    run done (see the module doc), with iterations, budget and time left written beside it."""

    def __init__(self, start: int, total: int, budget: float | None, enabled: bool, file: Any = None) -> None:
        self.start, self.total, self.budget = start, total, budget
        self.bar = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        stream = file if file is not None else sys.stderr
        interactive = hasattr(stream, "isatty") and stream.isatty()  # into a log file: an occasional line
        common = dict(desc="train", dynamic_ncols=True, mininterval=0.5 if interactive else 30, file=stream)
        if budget is None:
            self.bar = tqdm(total=total, initial=start, unit="it", **common)
        else:
            self.bar = tqdm(total=100.0, initial=self.fraction(start, 0.0) * 100, bar_format=(
                "{desc}: {percentage:3.0f}%|{bar}| {postfix}"), **common)  # fmt: skip

    def fraction(self, iteration: int, elapsed: float) -> float:
        """Fraction of the run done: iterations or budget, whichever is further."""
        done = iteration / self.total
        return min(max(done, elapsed / self.budget), 1.0) if self.budget else done

    def step(self, iteration: int, elapsed: float, losses: dict[str, float]) -> None:
        if self.bar is None:
            return
        shown = {k.removeprefix("loss_"): f"{v:.3f}" for k, v in losses.items()}
        if self.budget is None:
            self.bar.update(iteration - self.bar.n)
            if shown:
                self.bar.set_postfix(shown, refresh=False)
            return
        from tqdm import tqdm

        left = time_left(iteration, self.start, self.total, elapsed, self.budget)
        done = iteration - self.start
        pace = f"{done / elapsed:.2f} it/s" if elapsed > 0 and done else "?"
        text = (f"it {iteration}/{self.total}, {tqdm.format_interval(elapsed)} of {tqdm.format_interval(self.budget)} "
                f"budget, {pace}, left {tqdm.format_interval(left) if left is not None else '?'}")  # fmt: skip
        if shown:
            text += ", " + ", ".join(f"{k}={v}" for k, v in shown.items())
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(self.fraction(iteration, elapsed) * 100 - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
