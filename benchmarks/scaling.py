"""Cost curves: time and peak memory against the number of images, with their fitted exponents.

    python -m benchmarks.scaling                         # 1k, 10k and 118k images (about 15 minutes on 2 cores)
    python -m benchmarks.scaling --quick                 # the same, the loader only at 1k and 10k (about 5)
    python -m benchmarks.scaling --data /tmp/scaling     # keep the generated data sets there (reused next time)
    python -m benchmarks.scaling --tree /tmp/old --label before   # the same rows with another copy of
                                                         # the library (e.g. `git archive` of an older commit)

The data sets are :mod:`benchmarks.coco_scale`'s COCO files (COCO 2017 train's distributions; 118,287
images is its size). Each measured row is a function in :data:`ROWS`, run once per size in a fresh
process (``python -m benchmarks.scaling --child ROW FILE``) so that its peak memory is its own
(``ru_maxrss`` of that process, from ``wait4``). A row reports the seconds of its work (timed inside
the process, after the imports) and the process's peak resident memory, and the memory it added
to what the imports left (peak minus the resident memory before the work). The exponent of a
curve is the slope of the least-squares line through ``log(cost)`` against ``log(images)``: 1 is
linear; anything above about 1.1 grows faster than the data and is a defect to fix or to justify.

Rows (add one by writing a function ``(ann_file) -> dict`` and listing it in :data:`ROWS`):

- ``data check``: ``rcnn data check FILE`` (its default: every annotation validated, every image's
  header and end read);
- ``start-up``: what training does before its first step with the data: ``build_dataset`` of the
  training split, the training data set around it, the images' aspect ratios for batching;
- ``pycocotools``: ``COCO(FILE)``, for reference: parsing the file and indexing it, nothing checked;
- ``4 workers``: one epoch of loading with four ``DataLoader`` worker processes (on the same
  annotations with images a quarter of the sides, :data:`LOADER_SCALE`: the records are what this
  row is about, and an epoch of full-size decoding takes most of an hour on 2 cores), and the memory of
  the main process and the workers together against the main process's alone before the workers
  started. Together is the main process's RSS plus each worker's USS (the pages it holds alone:
  its copy-on-write copies and its own allocations; those it shares with the main process are in
  the main process's RSS). The sum of the PSS is recorded too, but on a machine where other
  processes map the same libraries (libtorch: hundreds of megabytes) it grows with the number of
  processes in the group without a page being added. Data-set records held as Python objects are
  copied into each worker page by page as the workers' reference counts touch them; held as
  arrays, they stay shared.

Writes ``benchmarks/results/scaling.json`` (each ``--label`` a part of it) and the plot
``docs/img/scaling_data.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# (benchmarks.harness is imported where it is used: it imports the models, which would be part of
# every measured process's memory)
ROOT = Path(__file__).resolve().parent.parent

__all__ = ["ROWS", "exponent", "markdown", "main"]

SIZES = (1_000, 10_000, 118_287)
WORKERS = 4
BATCH = 4
# The loader row reads images a quarter of COCO's sides (160x120 for 640x480): an epoch of 118,287
# images then costs minutes, not the better part of an hour on 2 cores, and the records are the same.
LOADER_SCALE = 0.25
PLOT = ROOT / "docs" / "img" / "scaling_data.png"
# The targets of the project's issue on COCO-2017-train-sized data (118,287 images): seconds and MB.
TARGETS = {"data check": ("process_s", 20.0, 1000.0), "build_dataset": ("seconds", 10.0, 1000.0)}
WORKER_RATIO_TARGET = 1.5
SLOWEST_LINEAR = 1.1  # an exponent above this is reported as growing faster than the data


# ---------------------------------------------------------------------------------------------
# The measured rows: each runs in its own process, given the annotation file.


def _data_check(ann_file: Path) -> dict[str, Any]:
    from rcnn.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = main(["data", "check", str(ann_file)])
    return {"status": status, "summary": out.getvalue().strip().splitlines()[-1]}


def _build_dataset(ann_file: Path) -> dict[str, Any]:
    from rcnn.data import build_dataset

    dataset = build_dataset(ann_file, ann_file.stem.removeprefix("instances_"), train=True)
    return {"images": len(dataset)}


def _start_up(ann_file: Path) -> dict[str, Any]:
    from rcnn.data import build_dataset
    from rcnn.data.transforms import RandomHorizontalFlip
    from rcnn.training.datasets import TrainingSet

    dataset = build_dataset(ann_file, ann_file.stem.removeprefix("instances_"), train=True)
    training = TrainingSet(dataset, RandomHorizontalFlip(0.5))
    try:  # batching by aspect ratio reads every image's size from the records
        from rcnn.training.datasets import aspect_ratio_groups, aspect_ratios
    except ImportError:  # a copy of the library from before it batched so (--tree)
        groups = None
    else:
        ratios = aspect_ratios(training)
        groups = None if ratios is None else aspect_ratio_groups(ratios)
    return {"images": len(training), "groups": None if groups is None else int(len(set(groups.tolist())))}


def _pycocotools(ann_file: Path) -> dict[str, Any]:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_file))
    return {"images": len(coco.imgs), "annotations": len(coco.anns)}


def _collate(batch: list[Any]) -> tuple[Any, ...]:
    return tuple(zip(*batch))


def _memory_kb(pid: int) -> dict[str, int]:
    """``Pss``, ``Rss`` and the private (``Private_Clean + Private_Dirty``: USS) kB of process ``pid``."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            fields[parts[0][:-1]] = int(parts[1])
    return {"pss": fields["Pss"], "rss": fields["Rss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM: the peak since exec or the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(p) for p in text]
    return found


def _workers(ann_file: Path) -> dict[str, Any]:
    import gc

    import torch
    from torch.utils.data import DataLoader

    from rcnn.data import build_dataset
    from rcnn.data.transforms import RandomHorizontalFlip
    from rcnn.training.datasets import TrainingSet

    torch.set_num_threads(1)
    dataset = build_dataset(ann_file, ann_file.stem.removeprefix("instances_"), train=True)
    training = TrainingSet(dataset, RandomHorizontalFlip(0.5))
    gc.collect()
    alone = _memory_kb(os.getpid())
    loader = DataLoader(training, batch_size=BATCH, shuffle=True, num_workers=WORKERS, collate_fn=_collate,
                        persistent_workers=True, generator=torch.Generator().manual_seed(0))  # fmt: skip
    tic = time.perf_counter()
    seen = 0
    for images, _ in loader:
        seen += len(images)
    seconds = time.perf_counter() - tic
    gc.collect()
    main = _memory_kb(os.getpid())
    workers = [_memory_kb(pid) for pid in _children(os.getpid())]
    # The group's memory: every page of the main process once (RSS), and what each worker holds of
    # its own (USS: its copy-on-write copies and its allocations; the pages it shares with the main
    # process are in the main process's RSS already).
    together = main["rss"] + sum(w["uss"] for w in workers)
    pss = main["pss"] + sum(w["pss"] for w in workers)
    return {
        "workers": len(workers), "epoch_s": seconds, "images_per_s": seen / seconds,
        "main_alone_rss_mb": alone["rss"] / 1024, "main_alone_pss_mb": alone["pss"] / 1024,
        "main_alone_uss_mb": alone["uss"] / 1024, "main_rss_mb": main["rss"] / 1024, "main_uss_mb": main["uss"] / 1024,
        "workers_uss_mb": [w["uss"] / 1024 for w in workers], "workers_rss_mb": [w["rss"] / 1024 for w in workers],
        "together_mb": together / 1024, "ratio": together / alone["rss"],
        "total_pss_mb": pss / 1024, "ratio_pss": pss / alone["pss"],
    }  # fmt: skip


ROWS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "data check": _data_check,
    "build_dataset": _build_dataset,
    "start-up": _start_up,
    "pycocotools": _pycocotools,
    "4 workers": _workers,
}
# Imported before the clock starts, so that a row's seconds are its work, not the imports.
_IMPORTS = {
    "data check": ("rcnn.cli", "rcnn.commands.data", "rcnn.data.check", "rcnn.data.anchors"),
    "build_dataset": ("rcnn.data",),
    "start-up": ("rcnn.data", "rcnn.data.transforms", "rcnn.training.datasets"),
    "pycocotools": ("pycocotools.coco",),
    "4 workers": ("torch", "rcnn.data", "rcnn.data.transforms", "rcnn.training.datasets"),
}


def _child(row: str, ann_file: Path) -> int:
    """Run one row in this process and print its figures as one JSON line."""
    import importlib

    for module in _IMPORTS[row]:
        importlib.import_module(module)
    imports_peak = _status_kb("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # the peak counted afresh from here (Linux >= 4.0)
    base = _status_kb("VmRSS")
    cpu, tic = time.process_time(), time.perf_counter()
    extra = ROWS[row](ann_file)
    seconds, cpu = time.perf_counter() - tic, time.process_time() - cpu
    peak = _status_kb("VmHWM")
    figures = {"seconds": seconds, "cpu_s": cpu, "base_rss_mb": base / 1024, "peak_mb": max(peak, imports_peak) / 1024,
               "added_mb": (peak - base) / 1024, **extra}  # fmt: skip
    print("result=" + json.dumps(figures), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: data sets, one process per (row, size), the fit, the plot and the report.


def run_row(row: str, ann_file: Path, tree: Path | None = None) -> dict[str, Any]:
    """The figures of ``row`` on ``ann_file`` from a fresh process (``tree``: the copy of the
    library it imports, default this one), with its process's peak memory and wall seconds."""
    env = dict(os.environ)
    cwd = ROOT
    if tree is not None:  # python -m puts the working folder first: the tree's rcnn, then ours for benchmarks
        cwd = tree
        env["PYTHONPATH"] = os.pathsep.join([str(tree), str(ROOT)])
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--child", row, str(ann_file)],
                          cwd=cwd, env=env, capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - tic
    lines = [line for line in done.stdout.splitlines() if line.startswith("result=")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"row {row!r} on {ann_file} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    # (the peak is the child's own VmHWM: ru_maxrss carries over the parent's across fork and exec)
    return {**json.loads(lines[-1].removeprefix("result=")), "process_s": wall}


def exponent(sizes: list[int], values: list[float]) -> float:
    """The slope of ``log(values)`` against ``log(sizes)`` (least squares)."""
    keep = [(s, v) for s, v in zip(sizes, values) if v > 0 and np.isfinite(v)]
    if len(keep) < 2:
        return float("nan")
    x, y = np.log([s for s, _ in keep]), np.log([v for _, v in keep])
    return float(np.polyfit(x, y, 1)[0])


def _data_set(folder: Path, images: int, scale: float = 1.0) -> Path:
    """The COCO file of ``images`` images (sizes times ``scale``) in ``folder`` (generated unless
    already there)."""
    from benchmarks.coco_scale import MARKER, SPLIT, make_coco_scale

    out = folder / (f"coco_{images}" if scale == 1.0 else f"coco_{images}_x{scale:g}")
    ann_file = out / "annotations" / f"instances_{SPLIT}.json"
    if not ((out / MARKER).is_file() and ann_file.is_file()):
        print(f"generating {images} images in {out}", flush=True)
        make_coco_scale(out, images, scale=scale)
    return ann_file


def measure(folder: Path, rows: list[str], sizes: list[int], tree: Path | None, loader_sizes: list[int]) -> dict[str, Any]:
    """Every row at every size (the loader row at ``loader_sizes`` only); the curves' exponents."""
    found: dict[str, Any] = {}
    for row in rows:
        points = []
        for size in sizes if row != "4 workers" else loader_sizes:
            ann_file = _data_set(folder, size, LOADER_SCALE if row == "4 workers" else 1.0)
            print(f"{row}: {size} images ...", flush=True)
            figures = run_row(row, ann_file, tree)
            print(f"  {figures['seconds']:.2f} s, peak {figures['peak_mb']:.0f} MB (+{figures['added_mb']:.0f})", flush=True)
            points.append({"images": size, **figures})
        images = [p["images"] for p in points]
        found[row] = {
            "points": points,
            "time_exponent": exponent(images, [p["seconds"] for p in points]),
            "memory_exponent": exponent(images, [p["added_mb"] for p in points]),
        }
    return found


def plot(result: dict[str, Any], path: Path = PLOT) -> None:
    """Log-log curves of seconds and added memory against images, each label dashed or solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"after": "-", "before": "--"}
    for label, rows in result["runs"].items():
        for k, (row, data) in enumerate(rows.items()):
            images = [p["images"] for p in data["points"]]
            style = styles.get(label, ":")
            color = f"C{k}"
            ax_t.plot(images, [p["seconds"] for p in data["points"]], style, marker="o", color=color,
                      label=f"{row} ({label}, n^{data['time_exponent']:.2f})")  # fmt: skip
            ax_m.plot(images, [max(p["added_mb"], 0.1) for p in data["points"]], style, marker="o", color=color,
                      label=f"{row} ({label}, n^{data['memory_exponent']:.2f})")  # fmt: skip
    for ax, what in ((ax_t, "seconds (work, after imports)"), (ax_m, "peak memory added, MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("images (COCO-2017-train distributions)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Data: cost against the number of images (log-log; the exponent is the slope)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md."""
    from benchmarks.harness import table

    runs = result["runs"]
    lines = ["Time and peak memory against the number of images, on `benchmarks.coco_scale`'s COCO files "
             "(COCO 2017 train's distributions; 118,287 images, 684,443 boxes at full size). Seconds are the "
             "work, timed inside a fresh process after its imports; *peak* is that process's peak resident "
             "memory, *added* the part of it the work added. The exponent is the slope of the log-log "
             "line (1: linear).", ""]  # fmt: skip
    for label, rows in runs.items():
        body = []
        for row, data in rows.items():
            for p in data["points"]:
                extra = ""
                if "ratio" in p:
                    extra = (f"epoch {p['epoch_s']:.0f} s, {p['images_per_s']:.0f} img/s; main alone {p['main_alone_rss_mb']:.0f} MB, "
                             f"main + {p['workers']} workers {p['together_mb']:.0f} MB (x{p['ratio']:.2f}; each worker's own "
                             f"{max(p['workers_uss_mb']):.0f} MB at most; PSS sum x{p['ratio_pss']:.2f})")  # fmt: skip
                body.append([row, p["images"], p["seconds"], p["process_s"], p["peak_mb"], p["added_mb"], extra])
        lines += [f"**{label}** (`{result['commands'].get(label, '?')}`)", "",
                  table(["measured", "images", "work s", "process s", "peak MB", "added MB", "notes"], body), ""]  # fmt: skip
        fits = [[row, f"{d['time_exponent']:.2f}", f"{d['memory_exponent']:.2f}"] for row, d in rows.items()]
        lines += [table(["measured", "time exponent", "memory exponent"], fits), ""]
    lines += _acceptance(runs)
    if PLOT.is_file():
        lines += ["", f"![cost curves](img/{PLOT.name})"]
    return "\n".join(lines)


def _at(rows: dict[str, Any], row: str, images: int) -> dict[str, Any] | None:
    for p in rows.get(row, {}).get("points", []):
        if p["images"] == images:
            return p
    return None


def _acceptance(runs: dict[str, Any]) -> list[str]:
    """The figures at COCO size against the targets, before and after where both were measured."""
    from benchmarks.harness import table

    size = SIZES[-1]
    labels = list(runs)
    body = []
    for row, (figure, seconds, megabytes) in TARGETS.items():
        cells = [_at(runs[label], row, size) for label in labels]
        if any(c is not None for c in cells):
            what = "the whole command" if figure == "process_s" else "the call"
            body.append([f"{row}: seconds ({what})", f"<= {seconds:.0f}",
                         *[f"{c[figure]:.1f}" if c else "-" for c in cells]])  # fmt: skip
            body.append([f"{row}: peak MB", f"<= {megabytes:.0f}", *[f"{c['peak_mb']:.0f}" if c else "-" for c in cells]])
    cells = [_at(runs[label], "4 workers", size) for label in labels]
    if any(c is not None for c in cells):
        body.append([f"{WORKERS} workers after an epoch: main + workers / main alone (RSS + workers' USS)",
                     f"<= {WORKER_RATIO_TARGET}", *[f"{c['ratio']:.2f}" if c else "-" for c in cells]])  # fmt: skip
    cells = [_at(runs[label], "pycocotools", size) for label in labels]
    if any(c is not None for c in cells):
        body.append(["pycocotools COCO(file): seconds / peak MB", "(reference)",
                     *[f"{c['process_s']:.1f} / {c['peak_mb']:.0f}" if c else "-" for c in cells]])  # fmt: skip
    if not body:
        return []
    return [f"At {size:,} images, against the targets:", "", table(["figure", "target", *labels], body)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the loader row at 1k and 10k images only")
    parser.add_argument("--data", type=Path, help="folder for the generated data sets (kept; default: a temporary one)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows to measure (default: {','.join(ROWS)})")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="numbers of images")
    parser.add_argument("--tree", type=Path, help="measure this copy of the library instead (a folder holding rcnn/)")
    parser.add_argument("--label", default="after", help="the name of these figures in the result (default after)")
    parser.add_argument("--child", nargs=2, metavar=("ROW", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child[0], Path(args.child[1]))
    from benchmarks.harness import command_line, read_result, write_result

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := set(rows) - set(ROWS):
        parser.error(f"--rows: unknown {sorted(unknown)}; choose from {', '.join(ROWS)}")
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sizes: expected whole numbers separated by commas, got {args.sizes!r}")
    if not sizes or min(sizes) < 1:
        parser.error("--sizes: at least one size, each >= 1")
    if args.tree is not None and not (args.tree / "rcnn" / "__init__.py").is_file():
        parser.error(f"--tree: {args.tree} holds no rcnn/ package")
    loader_sizes = [s for s in sizes if s <= 10_000] if args.quick else sizes
    folder = args.data or Path(tempfile.mkdtemp(prefix="rcnn_scaling_"))
    try:
        measured = measure(folder, rows, sizes, args.tree, loader_sizes)
    finally:
        if args.data is None:
            shutil.rmtree(folder, ignore_errors=True)
    result = read_result("scaling") or {"runs": {}, "commands": {}}
    result.setdefault("runs", {}).setdefault(args.label, {}).update(measured)  # (rows measured again replace theirs)
    result.setdefault("commands", {})[args.label] = command_line("benchmarks.scaling", argv)
    data = {k: v for k, v in result.items() if k not in ("benchmark", "command", "machine")}
    write_result("scaling", data, command_line("benchmarks.scaling", argv))
    plot(data)
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
