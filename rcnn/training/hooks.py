"""The hooks of the one training loop (:func:`rcnn.training.loop.train`), in the order it runs them
after each step:

1. :class:`WeightEMA` — the weight average after each optimiser step (``train.ema_decay``);
2. :class:`MetricsLog` — ``metrics.jsonl`` and TensorBoard: the losses every ``train.log_every``
   steps (their window also feeds the progress bar), and what the evaluations measure;
3. :class:`Evaluation` — every ``train.eval_every`` steps and at the end: metrics, val loss,
   keep-best, early stopping (``train.patience``);
   (then the hooks of your own given to :func:`rcnn.training.loop.build_trainer`;)
4. :class:`Checkpoints` — every ``train.checkpoint_every`` steps, and once at the end of the run
   (at ``iterations``, an early stop, the time budget or Ctrl-C);
5. :class:`Progress` — the progress bar;
6. :class:`StopOnInterrupt` — Ctrl-C stops the run after a whole step, with a checkpoint;
7. :class:`TimeBudget` — ``train.time_budget_s``.

Why this order: the EMA is updated before anything reads it; a log row of an iteration comes
before its evaluation's rows; an evaluation (and its keep-best save) comes before the checkpoint
of the same iteration, so that the checkpoint holds the keep-best state of its iteration; under
DDP the evaluation's broadcast of the early stop comes before the all-reduce of Ctrl-C, in every
process; an early stop, then Ctrl-C, then the time budget: the first to stop the run decides how
it ends. ``after_train`` runs in the reverse order (see :class:`~rcnn.training.trainer.Hook`):
Ctrl-C is given back, the bar closes, the final checkpoint is written, then the final evaluation
runs (a failing evaluation loses no training), then the logs close.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from rcnn.config import TrainConfig
from rcnn.io.checkpoints import load_weights, save_checkpoint
from rcnn.io.files import write_text
from rcnn.training.control import (
    TRAINING_WEIGHTS,
    BestKeeper,
    RunProgress,
    WeightAverage,
    flat_numbers,
    validation_loss,
)
from rcnn.training.trainer import Hook, Trainer

__all__ = [
    "Checkpoints",
    "Evaluation",
    "InterruptAfterStep",
    "LossWindow",
    "MetricsLog",
    "Progress",
    "StopOnInterrupt",
    "TimeBudget",
    "WeightEMA",
    "load_training_weights",
]

Evaluator = Callable[[nn.Module], dict[str, Any]]


class WeightEMA(Hook):
    """The weight EMA (``train.ema_decay``, :class:`~rcnn.training.control.WeightAverage`): updated
    after each optimiser step, as part of the step's time; it is the model evaluated, kept as best
    and saved as each checkpoint's ``model.safetensors`` (``trainer.eval_model``)."""

    def __init__(self, model: nn.Module, decay: float, log: Callable[[str], None] = print) -> None:
        self.model, self.log = model, log
        self.average = WeightAverage(model, decay)

    def before_train(self, trainer: Trainer) -> None:
        trainer.eval_model = self.average.module

    def after_step(self, trainer: Trainer) -> None:
        if trainer.losses is not None:  # a skipped step changed no weight
            with trainer.training_time():
                self.average.update(trainer.model)

    def state(self) -> dict[str, Any]:
        return {"ema": {"decay": self.average.decay, "updates": self.average.updates}}

    def restore(self, state: dict[str, Any], checkpoint: Path) -> None:
        # the model holds the checkpoint's model.safetensors: with training weights beside it, the average
        if (checkpoint / TRAINING_WEIGHTS).is_file():
            self.average.load(self.model.state_dict(), int(state.get("ema", {}).get("updates", 1)))
        else:
            self.log(f"{checkpoint} holds no weight average: the EMA starts from the current weights")


def load_training_weights(model: nn.Module, checkpoint: Path, averaged: bool, log: Callable[[str], None]) -> None:
    """After a resume loaded ``checkpoint``'s ``model.safetensors`` into ``model`` (and the hooks
    took what they needed of it): when those were averaged weights, the training weights beside
    them are the ones training continues from. ``averaged``: this training keeps an average too."""
    path = checkpoint / TRAINING_WEIGHTS
    if not path.is_file():
        return
    load_weights(model, load_file(str(path)), path)
    if not averaged:
        log(f"{checkpoint} was trained with a weight average, train.ema_decay is unset: training "
            "continues from the training weights")  # fmt: skip


class LossWindow:
    """The losses of the recent steps: each log row shows their means over the last ``every``
    steps, the progress bar over all those held — the steps since the row before last. The steps
    before a row's ``every`` are dropped when the next step comes, so that the bar of the row's own
    step still shows the longer mean."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.values: dict[str, list[float]] = {}
        self.logged = False  # a row was written at the last step

    def add(self, losses: dict[str, Tensor] | None) -> None:
        """The losses of a step (None: a skipped step, which adds none)."""
        self.settle()
        for key, value in (losses or {}).items():
            self.values.setdefault(key, []).append(float(value.detach()))

    def settle(self) -> None:
        """Drop what the last row made old."""
        if self.logged:
            self.values = {k: v[-self.every :] for k, v in self.values.items()}
            self.logged = False

    def means(self, last: int | None = None) -> dict[str, float]:
        """Mean of each loss over the ``last`` steps held (all of them by default)."""
        held = {k: v[-last:] if last else v for k, v in self.values.items()}
        return {k: sum(v) / len(v) for k, v in held.items() if v}


class MetricsLog(Hook):
    """``RUN/metrics.jsonl`` (one JSON row per write) and TensorBoard scalars: every ``every`` steps
    and at the last, the mean losses of the last ``every`` steps, the learning rate and the
    training time; and what other hooks :meth:`write` (the evaluations). Written by the first
    process only (``enabled``).

    With ``resume``, the rows a killed run logged after the checkpoint resumed from are dropped,
    not repeated: ``metrics.jsonl`` is cut back to it and TensorBoard purges the later events.
    """

    def __init__(self, run_dir: str | Path, every: int, *, resume: bool = False, enabled: bool = True) -> None:
        self.run_dir, self.every, self.resume, self.enabled = Path(run_dir), every, resume, enabled
        self.path = self.run_dir / "metrics.jsonl" if enabled else None
        self.window = LossWindow(every)
        self.writer: Any = None

    def before_train(self, trainer: Trainer) -> None:
        if not self.enabled:
            return
        self.writer = _tensorboard(self.run_dir, purge_step=trainer.start + 1 if self.resume else None)
        if self.resume and self.path is not None:
            _truncate_log(self.path, trainer.start)

    def after_step(self, trainer: Trainer) -> None:
        self.window.add(trainer.losses)
        iteration = trainer.iteration
        if iteration % self.every == 0 or iteration == trainer.total:
            row = {f"train/{k}": v for k, v in self.window.means(last=self.every).items()}
            row.update({"train/lr": trainer.optimizer.param_groups[0]["lr"], "train/seconds": trainer.elapsed})
            self.write(iteration, row)
            self.window.logged = True

    def after_train(self, trainer: Trainer) -> None:
        self.window.settle()
        if self.writer is not None:
            self.writer.close()

    def write(self, iteration: int, values: dict[str, float]) -> None:
        """One row of ``values`` at ``iteration`` (nothing outside the first process)."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, iteration)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"iteration": iteration, **values}) + "\n")


def _tensorboard(run_dir: Path, purge_step: int | None = None) -> Any:
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


class Evaluation(Hook):
    """Every ``cfg.eval_every`` steps (before the last) and at the end: the ``evaluator``'s metrics
    and the val loss (``cfg.val_loss``) of ``trainer.eval_model``, logged to ``metrics``; then
    keep-best (``cfg.keep_best``, the best weights in ``RUN/best``) and early stopping
    (``cfg.patience``). Measured on the first process; under DDP the others learn from it whether
    to stop. The end's evaluation is skipped when the last step was just evaluated, and after
    Ctrl-C.

    Args:
        evaluator: called with the model in eval mode; returns a dict of metrics (numbers logged).
        val_set: items ``(image, target)`` (no augmentation), for the val loss.
        config_yaml, class_names: written beside the best weights so they can be used alone.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        *,
        evaluator: Evaluator | None = None,
        val_set: Dataset | None = None,
        metrics: MetricsLog | None = None,
        config_yaml: str | None = None,
        class_names: Sequence[str] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        if cfg.val_loss and val_set is None:
            raise ValueError("train.val_loss: true, but there is no val split to compute it on")
        self.cfg, self.evaluator, self.metrics_log, self.log = cfg, evaluator, metrics, log
        self.config_yaml, self.class_names = config_yaml, class_names
        self.val_set = val_set if cfg.val_loss is not False else None
        self.best = BestKeeper(cfg.keep_best, Path(run_dir), cfg.patience, cfg.min_delta) if cfg.keep_best else None
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
        self.metrics: dict[str, Any] = {}  # of the last evaluation (first process)
        self.evaluated_at = -1
        self.stopped_early = False  # by the patience, before the end (first process)

    def after_step(self, trainer: Trainer) -> None:
        iteration = trainer.iteration
        if self.cfg.eval_every and iteration % self.cfg.eval_every == 0 and iteration < trainer.total:
            if self.evaluate(trainer):
                trainer.stop("early stop")

    def after_train(self, trainer: Trainer) -> None:
        if trainer.interrupted or self.evaluated_at == trainer.iteration:
            return
        stopped_early = self.stopped_early
        self.evaluate(trainer)  # (patience running out here stops nothing: the run has ended)
        self.stopped_early = stopped_early

    def evaluate(self, trainer: Trainer) -> bool:
        """Evaluate now, keep the best; True when training should stop early (every process)."""
        stop = False
        self.evaluated_at = trainer.iteration  # in every process: all of them agree on the end's evaluation
        if self.evaluates and trainer.is_main:
            self.metrics, scalars = self.measure(trainer.eval_model, trainer.device)
            if self.metrics_log is not None:
                self.metrics_log.write(trainer.iteration, scalars)
            stop = self._judge(trainer.iteration, trainer.eval_model)
        if trainer.world > 1 and self.cfg.patience is not None:  # every process stops with the first
            flag = torch.tensor([float(stop)], device=trainer.device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop

    def measure(self, model: nn.Module, device: torch.device) -> tuple[dict[str, Any], dict[str, float]]:
        """The metrics of ``model`` (with ``"val": {"loss", ...}``) and the scalars to log."""
        result: dict[str, Any] = {}
        if self.evaluator is not None:
            model.eval()
            try:
                result = dict(self.evaluator(model))
            finally:
                model.train()
        scalars = {f"eval/{k}": v for k, v in flat_numbers(result, sep="/").items()}
        if self.val_set is not None:
            result["val"] = validation_loss(
                model, self.val_set, batch_size=self.cfg.batch_size, device=device, seed=self.cfg.seed
            )  # fmt: skip
            scalars.update({f"val/{k}": v for k, v in result["val"].items()})
        return result, scalars

    def _judge(self, iteration: int, model: nn.Module) -> bool:
        """Keep-best and early stopping after the evaluation in ``self.metrics``; True to stop."""
        if self.best is None:
            return False
        numbers = flat_numbers({k: v for k, v in self.metrics.items() if k != "val"})
        numbers.update({f"val_{k}" if k != "loss" else "val_loss": v for k, v in self.metrics.get("val", {}).items()})
        if self.best.update(iteration, numbers):
            path = self.best.save(iteration, model, self.config_yaml, self.class_names)
            self.log(f"iteration {iteration}: new best {self.best.metric} = {self.best.best:.4f}, kept in {path}")
        if self.best.should_stop:
            self.stopped_early = True
            self.log(
                f"iteration {iteration}: {self.best.metric} has not improved for {self.best.stale} evaluations "
                f"(best {self.best.best:.4f} at iteration {self.best.best_iteration}): stopping early"
            )
        return self.stopped_early

    def state(self) -> dict[str, Any]:
        return {"best": self.best.state()} if self.best is not None else {}

    def restore(self, state: dict[str, Any], checkpoint: Path) -> None:
        if self.best is not None:
            self.best.restore(state.get("best"))


class Checkpoints(Hook):
    """Atomic checkpoints (:func:`rcnn.io.checkpoints.save_checkpoint`) of ``trainer.eval_model``
    with the optimiser, the RNG states, ``lr`` and every hook's :meth:`~Hook.state`: every
    ``every`` steps before the last, and at the end of the run unless its last step was just
    saved. When the weights evaluated are not the trained ones (an EMA), the trained ones go
    beside them, for a resume (:func:`load_training_weights`). First process only."""

    def __init__(
        self,
        run_dir: str | Path,
        every: int,
        *,
        keep: int = 2,
        config_yaml: str | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.run_dir, self.every, self.keep = Path(run_dir), every, keep
        self.config_yaml, self.class_names = config_yaml, class_names
        self.saved_at: int | None = None

    def after_step(self, trainer: Trainer) -> None:
        if trainer.iteration % self.every == 0 and trainer.iteration < trainer.total:
            self.save(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if self.saved_at != trainer.iteration:
            self.save(trainer)

    def save(self, trainer: Trainer) -> Path | None:
        """Write the checkpoint of ``trainer.iteration`` (kept as ``trainer.checkpoint``)."""
        self.saved_at = trainer.iteration
        if not trainer.is_main:
            return None
        states: dict[str, Any] = {}
        for hook in trainer.hooks:
            states.update(hook.state())
        global_batch = trainer.cfg.batch_size * trainer.world * trainer.cfg.accumulate  # (a resume on other processes says so)
        state = {"lr": trainer.lr, "processes": trainer.world, "global_batch": global_batch,
                 **dict(sorted(states.items()))}  # (in key order, whatever the hooks' order)
        averaged = trainer.eval_model is not trainer.model
        trainer.checkpoint = save_checkpoint(
            self.run_dir, trainer.iteration, trainer.eval_model, optimizer=trainer.optimizer, extra_state=state,
            config_yaml=self.config_yaml, class_names=list(self.class_names) if self.class_names else None,
            keep=self.keep, extra_files={TRAINING_WEIGHTS: dict(trainer.model.state_dict())} if averaged else None,
        )  # fmt: skip
        return trainer.checkpoint


class Progress(Hook):
    """The training bar (:class:`~rcnn.training.control.RunProgress`): iterations, or with a time
    ``budget`` the fraction of the run done, and the running means of the losses in ``window``."""

    def __init__(self, window: LossWindow, budget: float | None = None, enabled: bool = True) -> None:
        self.window, self.budget, self.enabled = window, budget, enabled
        self.bar: RunProgress | None = None

    def before_train(self, trainer: Trainer) -> None:
        self.bar = RunProgress(trainer.start, trainer.total, self.budget, enabled=self.enabled)

    def after_step(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.step(trainer.iteration, trainer.elapsed, self.window.means())

    def after_train(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()


class InterruptAfterStep:
    """Inside the block, Ctrl-C (SIGINT) or SIGTERM asks the loop to stop once the current step is
    whole (:meth:`requested` turns True), instead of killing it in the middle of an optimiser update
    with the steps since the last checkpoint lost; a second one stops at once. SIGTERM is what a
    job scheduler sends before it preempts a job, and what torchrun sends the other processes of a
    machine when one of them fails. Outside the main thread (no signal handlers there) it never asks."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.asked = False
        self._previous: dict[int, Any] | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.asked:
            raise KeyboardInterrupt("interrupted twice: stopped at once, without a checkpoint")
        self.asked = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.log(f"{name}: stopping after this step with a checkpoint ({name} again stops at once, without one)")

    def __enter__(self) -> InterruptAfterStep:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handler) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        """Give Ctrl-C and SIGTERM back to the handlers before the block (once)."""
        if self._previous is not None:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
            self._previous = None

    def requested(self, device: torch.device | None = None) -> bool:
        """Whether to stop now; with ``device`` (under DDP) whether any process was asked, so that
        all of them stop at the same step."""
        if device is None:
            return self.asked
        flag = torch.tensor([float(self.asked)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class StopOnInterrupt(Hook):
    """Ctrl-C stops the run after the step it falls in (:class:`InterruptAfterStep`): that step is
    checkpointed (:class:`Checkpoints`), the logs close, and the run raises
    :class:`~rcnn.training.trainer.TrainingInterrupted` naming the checkpoint. Under DDP every
    process learns after each step whether any was interrupted (an all-reduce), and all stop there.
    Ctrl-C is given back after the last step when the run ends otherwise, so that it stops the
    final evaluation at once; after a Ctrl-C, once the run has raised, so that a second one stops
    the checkpoint's writing at once."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.interrupt = InterruptAfterStep(log)

    def before_train(self, trainer: Trainer) -> None:
        trainer.exit_stack.enter_context(self.interrupt)  # given back however the run ends

    def after_step(self, trainer: Trainer) -> None:
        if trainer.stop_reason is None and self.interrupt.requested(trainer.device if trainer.world > 1 else None):
            trainer.stop(f"interrupted at iteration {trainer.iteration}", interrupted=True)

    def after_train(self, trainer: Trainer) -> None:
        if not trainer.interrupted:
            self.interrupt.release()


class TimeBudget(Hook):
    """``train.time_budget_s``: stop once the training steps have taken ``seconds`` (evaluations
    and checkpoints do not count); the run then ends as at its last iteration."""

    def __init__(self, seconds: float, log: Callable[[str], None] = print) -> None:
        self.seconds, self.log = seconds, log

    def before_train(self, trainer: Trainer) -> None:
        self.after_step(trainer)

    def after_step(self, trainer: Trainer) -> None:
        if trainer.stop_reason is None and trainer.iteration < trainer.total and trainer.elapsed >= self.seconds:
            self.log(f"time budget of {self.seconds:.0f} s reached at iteration {trainer.iteration}")
            trainer.stop("time budget")
