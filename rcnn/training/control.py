"""The parts the training hooks (:mod:`rcnn.training.hooks`) are made of, each usable alone.

- **Validation loss** (``train.val_loss``, :func:`validation_loss`): the training losses on the
  val split, with BatchNorm and dropout as in inference and the random sampling of anchors and
  RoIs seeded on its own, so that it neither changes the training run nor varies between calls.
- **Keep the best** (``train.keep_best: bbox_AP``, :class:`BestKeeper`): after each evaluation
  that improves the metric, the evaluated weights go to ``RUN/best_<iteration>/`` and the
  ``RUN/best`` link is switched to it atomically (the previous best is then removed). A ``*loss*``
  metric is minimised, the others maximised.
- **Early stopping** (``train.patience: P``, also :class:`BestKeeper`): stop after P evaluations in
  a row without an improvement of the ``keep_best`` metric by more than ``train.min_delta``.
- **Weight EMA** (``train.ema_decay: d``, :class:`WeightAverage`):
  ``torch.optim.swa_utils.AveragedModel`` keeps ``W_ema <- d W_ema + (1 - d) W`` (parameters and
  buffers) after each optimiser step. The EMA weights are the ones evaluated, kept as best and
  written to each checkpoint's ``model.safetensors`` (what ``rcnn evaluate``, ``predict``,
  ``export`` load); the training weights go beside them to ``training_model.safetensors``
  (:data:`TRAINING_WEIGHTS`), read only when resuming.
- **Progress by the time budget** (:class:`RunProgress`): with ``train.time_budget_s`` the bar
  follows the fraction of the run done — the larger of iterations / ``iterations`` and training
  time / budget, the rule of the learning-rate schedule — and shows the time left by whichever
  ends the run first.

Gradient accumulation (``train.accumulate``) is part of the step itself
(:meth:`rcnn.training.trainer.Trainer.step`).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset

from rcnn.data.transforms import collate_fn
from rcnn.io.files import write_json, write_text
from rcnn.training.trainer import compute_losses, to_device

__all__ = [
    "TRAINING_WEIGHTS",
    "BestKeeper",
    "RunProgress",
    "WeightAverage",
    "flat_numbers",
    "time_left",
    "validation_loss",
]

TRAINING_WEIGHTS = "training_model.safetensors"  # beside the EMA weights in a checkpoint


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
            items = [dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))]  # type: ignore[arg-type]
            images, targets, proposals = to_device(collate_fn(items), device)
            losses = compute_losses(model, (images, targets, proposals))
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(images)
            count += len(images)
    if count == 0:
        raise ValueError("train.val_loss: the val split is empty")
    means = {key: value / count for key, value in sums.items()}
    return {"loss": sum(means.values()), **means}


def flat_numbers(data: dict[str, Any], prefix: str = "", sep: str = "_") -> dict[str, float]:
    """Finite numbers of nested dicts, their keys joined by ``sep`` (``bbox_AP``)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_numbers(value, f"{prefix}{key}{sep}", sep))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


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
                "{desc}: {percentage:3.0f}%|{bar}| [{elapsed} wall{postfix}]"), **common)  # fmt: skip

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
