"""Timing, result files and report tables shared by the benchmarks.

Timings follow one protocol: the two things compared run in the same process, interleaved
(A B B A A B ...), each after a warm-up; the best (minimum) of the rounds is kept, both as CPU
seconds (``time.process_time``, all threads; the steadier figure on a shared machine) and as
wall seconds, read by the library's one clock (:class:`rcnn.inference.Clock`). Ratios are ours / peer.
Our models run through the library's one inference path, :class:`rcnn.inference.Predictor`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from rcnn.inference import Clock, peak_memory_mb, reset_peak_memory
from rcnn.io.files import write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def measure(fn: Callable[[], Any]) -> tuple[float, float]:
    """``(cpu_seconds, wall_seconds)`` of one call."""
    cpu, wall, _ = Clock().measure(fn)
    return cpu, wall


def time_pair(ours: Callable[[], Any], peer: Callable[[], Any], rounds: int = 5, warmup: int = 1) -> dict[str, float]:
    """Interleaved best-of-``rounds`` timing of two callables; see the module docstring."""
    for _ in range(warmup):
        ours()
        peer()
    best = {"ours": [float("inf"), float("inf")], "peer": [float("inf"), float("inf")]}
    for r in range(rounds):
        order = (("ours", ours), ("peer", peer)) if r % 2 == 0 else (("peer", peer), ("ours", ours))
        for name, fn in order:
            cpu, wall = measure(fn)
            best[name] = [min(best[name][0], cpu), min(best[name][1], wall)]
    return {
        "ours_cpu_s": best["ours"][0], "ours_wall_s": best["ours"][1],
        "peer_cpu_s": best["peer"][0], "peer_wall_s": best["peer"][1],
        "ratio_cpu": best["ours"][0] / best["peer"][0], "ratio_wall": best["ours"][1] / best["peer"][1],
    }  # fmt: skip


def time_one(fn: Callable[[], Any], rounds: int = 5, warmup: int = 1) -> dict[str, float]:
    """Best-of-``rounds`` CPU and wall seconds of one callable."""
    for _ in range(warmup):
        fn()
    runs = [measure(fn) for _ in range(rounds)]
    return {"cpu_s": min(r[0] for r in runs), "wall_s": min(r[1] for r in runs)}


def time_rounds(
    calls: dict[str, Callable[[], dict[str, float] | None]], rounds: int = 3, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """Interleaved best-of-``rounds`` timing of several callables: A B C, then C B A, ...

    Per name: the best CPU and wall seconds (``cpu_s``, ``wall_s``) and, where a callable returns
    a dict of seconds (a part of its work it timed itself, e.g. ``{"rpn_cpu_s": ...}``), the best
    of each of those over the rounds.
    """
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    best: dict[str, dict[str, float]] = {name: {} for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            cpu, wall, parts = Clock().measure(calls[name])
            figures = {"cpu_s": cpu, "wall_s": wall, **(parts if isinstance(parts, dict) else {})}
            for key, value in figures.items():
                best[name][key] = min(best[name].get(key, float("inf")), float(value))
    return best


def peak_rss_mb(module: str, *args: str) -> float:
    """Peak resident memory (MiB) of ``python -m module args...`` run in a fresh process.

    The child must end by calling :func:`print_peak_rss`: ``RUSAGE_CHILDREN`` would give the
    largest of all children so far, not this one's.
    """
    out = subprocess.run([sys.executable, "-m", module, *args], check=True, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("peak_rss_kb=")]
    if not lines:
        raise RuntimeError(f"python -m {module} {' '.join(args)} did not report its peak memory:\n{out.stdout[-2000:]}")
    return int(lines[-1].split("=")[1]) / 1024.0


def reset_peak_rss() -> None:
    """Start this process's peak-memory count afresh, so what was allocated before, e.g. a model
    built only to copy weights from, is not counted."""
    reset_peak_memory()


def print_peak_rss() -> None:
    """Report this process's peak resident memory (since :func:`reset_peak_rss`) to :func:`peak_rss_mb`."""
    print(f"peak_rss_kb={round(peak_memory_mb() * 1024)}", flush=True)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def command_line(module: str, argv: list[str] | None) -> str:
    """``python -m module args...``: the command a result records as its provenance."""
    return shlex.join(["python", "-m", module, *(argv if argv is not None else sys.argv[1:])])


def write_result(name: str, data: dict[str, Any], command: str, directory: Path | None = None) -> Path:
    """Write ``benchmarks/results/<name>.json`` (or ``directory/<name>.json``), atomically, with the
    machine and the command."""
    directory = RESULTS if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    payload = {"benchmark": name, "command": command, "machine": machine(), **data}
    return write_text(path, json.dumps(payload, indent=1, default=float) + "\n")


def read_result(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def merge_accuracy(
    name: str, budget: float, rows: Sequence[str], command: str, train: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Train ``rows`` again (``train()`` returns them) into the accuracy part of ``benchmarks/results/<name>.json``,
    each marked with ``command``; the file's other rows, timings and command stay. Returns the merged result."""
    result = read_result(name)
    if result is None or result.get("accuracy", {}).get("budget_s") != budget:
        raise SystemExit(f"--skip-timing trains rows into benchmarks/results/{name}.json: it needs one whose "
                         f"accuracy part was trained for the same budget ({budget:.0f} s); run without it first")  # fmt: skip
    added = train()
    for row in rows:
        result["accuracy"][row] = {**added[row], "command": command}
    rewrite_result(name, result)
    return result


def rewrite_result(name: str, result: dict[str, Any]) -> None:
    """Write a result read by :func:`read_result` and changed back, keeping its command (and the machine
    of this run)."""
    data = {k: v for k, v in result.items() if k not in ("benchmark", "command", "machine")}
    write_result(name, data, result["command"])


def keep_accuracy(name: str, result: dict[str, Any]) -> None:
    """``--skip-accuracy``: carry the accuracy part of the existing ``benchmarks/results/<name>.json``
    over into ``result``, with the command that measured it (``accuracy_command``)."""
    old = read_result(name)
    if old and old.get("accuracy"):
        result["accuracy"] = old["accuracy"]
        result["accuracy_command"] = old.get("accuracy_command") or old.get("command", "?")
        if "equal_steps" in old:  # trained with the accuracy part (or marked with its own command)
            result["equal_steps"] = old["equal_steps"]


def accuracy_model_names(parser: argparse.ArgumentParser, value: str, known: dict[str, str]) -> list[str]:
    """The ``--accuracy-models`` list, checked against ``known``."""
    names = [n for n in value.split(",") if n]
    if unknown := set(names) - set(known):
        parser.error(f"--accuracy-models: unknown {sorted(unknown)}; choose from {', '.join(known)}")
    return names


def accuracy_provenance(result: dict[str, Any], models: dict[str, str]) -> list[str]:
    """Markdown lines saying which accuracy figures came from other commands than the file's."""
    acc = result.get("accuracy") or {}
    lines = []
    if "accuracy_command" in result:
        lines += ["", f"Accuracy part measured earlier by `{result['accuracy_command']}`; the timings above "
                  "were measured again afterwards."]  # fmt: skip
    for key, title in models.items():
        if "command" in acc.get(key, {}):
            lines += ["", f"Row \"{title}\" trained afterwards, same data and budget: `{acc[key]['command']}`."]
    return lines


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; floats get 3 significant decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def shapes_data(config_name: str, data_root: Path):
    """Train and val readers of the shapes data set (generated if absent) for a packaged config."""
    from rcnn.config import load_config
    from rcnn.training.run import prepare_data

    return prepare_data(load_config(config_name, [f"data.root={data_root}"]))


def train_and_evaluate(
    model: torch.nn.Module,
    config_name: str,
    data: Any,
    budget_s: float | None,
    run_name: str,
    iterations: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` with the config's training settings for ``budget_s`` seconds, by the library's
    loop (any torchvision-API detector works), then evaluate it on ``data.val``. With ``iterations``
    instead of a budget: that many steps, the config's schedule spread over them. ``seed``: the
    training seed (data order, augmentation) instead of the config's."""
    import tempfile

    from rcnn.config import load_config
    from rcnn.data.transforms import RandomHorizontalFlip
    from rcnn.inference import evaluate_model
    from rcnn.training.loop import train
    from rcnn.training.datasets import TrainingSet

    config = load_config(config_name, None if seed is None else [f"train.seed={seed}"])
    # the budget alone ends training (the config's iteration count would stop a faster model early,
    # leaving it part of its budget unused); the schedule then follows elapsed time (see lr_factor)
    if iterations is not None:
        train_cfg = config.train.model_copy(update={"iterations": iterations, "checkpoint_every": 10**9})
    else:
        train_cfg = config.train.model_copy(update={"time_budget_s": budget_s, "iterations": 10**7, "checkpoint_every": 10**9})
    training_set = TrainingSet(data.train, RandomHorizontalFlip(config.data.hflip))
    with tempfile.TemporaryDirectory(prefix=f"rcnn_bench_{run_name}_") as run_dir:
        result = train(model, training_set, train_cfg, run_dir, progress=False, log=lambda s: None)
    metrics = evaluate_model(model, data.val)
    out = {
        "iterations": result.iterations, "train_s": result.seconds, "AP": metrics["bbox"]["AP"],
        "AP50": metrics["bbox"]["AP50"], "ms_per_image": 1000 * metrics["seconds_per_image"],
    }  # fmt: skip
    if "segm" in metrics:
        out.update(mask_AP=metrics["segm"]["AP"], mask_AP50=metrics["segm"]["AP50"], mask_AP75=metrics["segm"]["AP75"])
    return out
