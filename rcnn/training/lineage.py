"""The lineage benchmark: the four generations measured side by side on one data set and backbone.

On the shapes data set (or your own), with one backbone pre-trained once for all of them (the
seed's step 1), each of R-CNN, Fast R-CNN, Faster R-CNN and Mask R-CNN is trained for the same
wall-clock budget and measured on the val split: box AP and AP@0.5 (mask AP for Mask R-CNN),
test time per image split into proposal time (selective search, or the RPN) and the rest,
training time and peak memory. Faster R-CNN is also trained from a randomly initialised backbone,
to show what pre-training buys. Each model runs in its own process, so its peak memory is its own.

    rcnn benchmark [--quick] [--models rcnn,fast_rcnn,faster_rcnn,mask_rcnn] [--budget SECONDS] [--out DIR]

Writes ``DIR/lineage.json`` and the plots ``DIR/lineage_speed_accuracy.png`` (AP against
milliseconds per image) and ``DIR/lineage_training_curves.png``, beside the runs (``DIR/<model>``,
which ``rcnn evaluate``, ``predict`` and ``serve`` take). The repository's benchmark page is made
from the same function by ``python -m benchmarks.lineage``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rcnn.build import load_model, model_class
from rcnn.config import MODEL_NAMES as MODELS
from rcnn.config import SHAPES_CONFIGS, TrainConfig, load_config
from rcnn.data.reading import build_dataset
from rcnn.data.shapes import make_shapes
from rcnn.inference import GENERATIONS, Predictor, evaluate_model, peak_memory_mb
from rcnn.io.files import write_text
from rcnn.components.proposals.io import proposal_source
from rcnn.training.pretrain import CropDataset, pretrain
from rcnn.training.run import prepare_data, run_training

__all__ = ["MODELS", "PAPER_FIGURES", "markdown", "measure_model", "plot", "run_lineage"]

# What the papers report (VOC 2007 test, VGG16 unless noted, GPU test times), for the report.
PAPER_FIGURES = {
    "rcnn": {"mAP_voc07": 0.660, "s_per_image": 47.0, "note": "R-CNN VGG16, 47 s/image (Fast R-CNN paper, Table 4)"},
    "fast_rcnn": {"mAP_voc07": 0.669, "s_per_image": 0.32, "note": "0.32 s/image, 0.22 s with SVD: 146x / 213x R-CNN"},
    "faster_rcnn": {"mAP_voc07": 0.699, "s_per_image": 0.198, "note": "RPN 10 ms vs selective search 1.51 s (CPU)"},
    "mask_rcnn": {"mask_AP_coco": 0.357, "s_per_image": 0.2, "note": "COCO mask AP 35.7 (R101-FPN), ~5 fps"},
}


def measure_model(
    name: str,
    data_root: str,
    run_dir: str,
    budget_s: float,
    pretrained: str | None,
    timing_images: int,
    threads: int,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Train one generation for ``budget_s`` seconds and measure it (runs in a child process)."""
    torch.set_num_threads(threads)
    run = Path(run_dir)
    sets = [f"data.root={data_root}", "data.shapes=null", f"train.time_budget_s={budget_s}",
            "train.checkpoint_every=1000000", f"model.pretrained_backbone={pretrained or 'null'}"]  # fmt: skip
    if model_class(name).needs_proposals:
        sets += [f"data.proposals_train={run.parent / 'ss_train.safetensors'}",
                 f"data.proposals_val={run.parent / 'ss_val.safetensors'}"]  # fmt: skip
    config = load_config(SHAPES_CONFIGS[name], [*sets, *overrides])
    tic = time.perf_counter()
    summary = run_training(config, run, overwrite=True, evaluate=False, progress=False, log=lambda s: None)
    wall = time.perf_counter() - tic

    loaded = load_model(run)
    config = loaded.config
    val = prepare_data(config, need_train=False).val
    proposals = proposal_source(config.data.proposals_val) if config.data.proposals_val else None
    metrics = evaluate_model(Predictor(loaded.model, proposals=proposals), val)
    # test time per image, proposals (selective search for the models that need them) and the rest,
    # on the first val images
    timer = Predictor(loaded.model)
    prop_s, rest_s = [], []
    for index in range(min(timing_images, len(val))):
        image, _ = val[index]
        _, timing = timer.timed(image)
        prop_s.append(timing["proposals_s"])
        rest_s.append(timing["rest_s"])
    curve = []
    metrics_file = run / "metrics.jsonl"
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            row = json.loads(line)
            losses = [v for k, v in row.items() if k.startswith("train/loss")]
            if losses:
                curve.append([row["iteration"], sum(losses)])
    result = {
        "model": name,
        "iterations": summary["iterations"],
        "train_s": summary["train_seconds"],
        "train_wall_s": wall,
        "AP": metrics["bbox"]["AP"],
        "AP50": metrics["bbox"]["AP50"],
        "voc_mAP": metrics["voc"]["mAP"],
        "ms_proposals": 1000 * float(np.median(prop_s)),
        "ms_rest": 1000 * float(np.median(rest_s)),
        "ms_per_image": 1000 * float(np.median(np.add(prop_s, rest_s))),
        "peak_memory_mb": peak_memory_mb(),
        "curve": curve,
    }
    if "segm" in metrics:
        result["mask_AP"] = metrics["segm"]["AP"]
        result["mask_AP50"] = metrics["segm"]["AP50"]
    return result


def _in_child(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh process (spawned: its own memory peak, no state shared)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(fn, args)


def _pretrain_child(data_root: str, out: str, backbone: str, iterations: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    train_set = CropDataset(build_dataset(data_root, "train"), size=48)
    val_set = CropDataset(build_dataset(data_root, "val"), size=48, augment=False)
    cfg = TrainConfig(iterations=iterations, batch_size=min(64, len(train_set)), lr=0.02, schedule="cosine", warmup_iterations=20,
                      checkpoint_every=10**9)  # fmt: skip
    tic = time.perf_counter()
    summary = pretrain(backbone, train_set, len(train_set.class_names), cfg, out, val_set=val_set, overwrite=True, progress=False,
                       log=lambda s: None)  # fmt: skip
    return {"weights": summary["weights"], "seconds": time.perf_counter() - tic, "top1": summary["metrics"]["top1"],
            "iterations": iterations}  # fmt: skip


def run_lineage(
    out_dir: str | os.PathLike = "runs/lineage",
    data_root: str | os.PathLike = "data/shapes",
    *,
    models: Sequence[str] = MODELS,
    quick: bool = False,
    budget_s: float | None = None,
    pretrained: str | None = None,
    compare_random_init: bool = True,
    pretrain_iterations: int | None = None,
    timing_images: int | None = None,
    threads: int = 2,
    results_dir: str | os.PathLike | None = None,
    img_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the lineage benchmark (see the module docstring); return and write its results.

    ``lineage.json`` goes to ``results_dir`` and the plots to ``img_dir``, both ``out_dir`` by default.
    """
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    out, data_root = Path(out_dir), Path(data_root)
    budget = budget_s or (90.0 if quick else 600.0)
    n_train, n_val = (200, 50) if quick else (400, 100)
    if not (data_root / "annotations").is_dir():
        log(f"generating the shapes data set ({n_train} + {n_val} images) in {data_root}")
        make_shapes(data_root, n_train, n_val, seed=0)
    result: dict[str, Any] = {"quick": quick, "budget_s": budget, "data": str(data_root), "backbone": "tiny"}
    if pretrained is None:
        log("pre-training the tiny backbone on object crops (the seed's step 1)")
        iterations = pretrain_iterations or (150 if quick else 600)
        result["pretrain"] = _in_child(_pretrain_child, str(data_root), str(out / "pretrain"), "tiny", iterations, threads)
        pretrained = result["pretrain"]["weights"]
        log(f"  top-1 {result['pretrain']['top1']:.3f} in {result['pretrain']['seconds']:.0f} s")
    result["pretrained"] = pretrained
    timing_images = timing_images or (20 if quick else 50)
    result["models"] = {}
    for name in models:
        log(f"training {name} for {budget:.0f} s")
        row = _in_child(measure_model, name, str(data_root), str(out / name), budget, pretrained, timing_images, threads)
        result["models"][name] = row
        log(f"  AP {row['AP']:.3f}  AP@0.5 {row['AP50']:.3f}  {row['ms_per_image']:.1f} ms/image "
            f"(proposals {row['ms_proposals']:.1f})")  # fmt: skip
    if compare_random_init and "faster_rcnn" in models:
        log(f"training faster_rcnn from a random initialisation for {budget:.0f} s")
        row = _in_child(measure_model, "faster_rcnn", str(data_root), str(out / "faster_rcnn_random_init"), budget,
                        None, timing_images, threads)  # fmt: skip
        result["faster_rcnn_random_init"] = row
    result["speedups"] = _speedups(result["models"])
    write_text(Path(results_dir or out) / "lineage.json", json.dumps(result, indent=1) + "\n")
    result["plots"] = plot(result, img_dir or out)
    return result


def _speedups(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Test-time speed-up ratios between generations (the papers' headline comparisons)."""
    out = {}
    for slow, fast in (("rcnn", "fast_rcnn"), ("fast_rcnn", "faster_rcnn"), ("rcnn", "faster_rcnn")):
        if slow in rows and fast in rows:
            out[f"{slow}_over_{fast}"] = rows[slow]["ms_per_image"] / rows[fast]["ms_per_image"]
    if "rcnn" in rows and "fast_rcnn" in rows:  # without proposals: the network part alone
        out["rcnn_over_fast_rcnn_network_only"] = rows["rcnn"]["ms_rest"] / rows["fast_rcnn"]["ms_rest"]
    if "fast_rcnn" in rows and "faster_rcnn" in rows:
        out["selective_search_over_rpn"] = rows["fast_rcnn"]["ms_proposals"] / max(rows["faster_rcnn"]["ms_proposals"], 1e-9)
    return out


def plot(result: dict[str, Any], img_dir: str | os.PathLike) -> list[str]:
    """AP against ms/image, one point per generation; training curves. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    img_dir = Path(img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = result["models"]
    names = GENERATIONS
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    points = [(names[key], row, "o") for key, row in rows.items()]
    if result.get("faster_rcnn_random_init"):
        points.append(("Faster R-CNN, random init", result["faster_rcnn_random_init"], "x"))
    for label, row, marker in points:
        ax.scatter(row["ms_per_image"], row["AP50"], s=60, marker=marker)
    ax.set_xscale("log")
    times = [row["ms_per_image"] for _, row, _ in points]
    ax.set_xlim(min(times) / 1.6, max(times) * 1.6)  # room for the labels of the outer points
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    # each label goes to the first of six places beside its point, inside the axes, where it overlaps no
    # marker and no label placed before (highest points first), else to the least overlapping one, so
    # close points such as two Faster R-CNN variants stay legible
    renderer = fig.canvas.get_renderer()
    from matplotlib.transforms import Bbox

    # the markers are obstacles too; every box is padded so that neighbours do not touch
    pad = 3.0
    placed: list[Any] = []
    for _, row, _ in points:
        x, y = ax.transData.transform((row["ms_per_image"], row["AP50"]))
        placed.append(Bbox.from_extents(x - 5, y - 5, x + 5, y + 5))
    places = [((6, 5), "left"), ((6, -14), "left"), ((-6, 5), "right"), ((-6, -14), "right"),
              ((0, 9), "center"), ((0, -22), "center")]  # fmt: skip
    frame = ax.get_window_extent(renderer)

    def cost(box: Any) -> float:
        """Area overlapping markers and earlier labels, plus a large penalty for leaving the axes."""
        outside = not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1)
        overlap = sum(max(0.0, min(box.x1, o.x1) - max(box.x0, o.x0)) * max(0.0, min(box.y1, o.y1) - max(box.y0, o.y0))
                      for o in placed)  # fmt: skip
        return overlap + (1e6 if outside else 0.0)

    for label, row, _ in sorted(points, key=lambda p: -p[1]["AP50"]):
        best = None
        for offset, align in places:
            note = ax.annotate(label, (row["ms_per_image"], row["AP50"]), textcoords="offset points",
                               xytext=offset, ha=align)  # fmt: skip
            box = note.get_window_extent(renderer).padded(pad)
            penalty = cost(box)
            if best is not None and penalty >= best[0]:
                note.remove()
                continue
            if best is not None:
                best[1].remove()
            best = (penalty, note, box)
            if penalty == 0.0:
                break
        placed.append(best[2])
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("test time per image, ms (log scale, CPU, proposals included)")
    ax.set_ylabel("box AP@0.5 on shapes val")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"The R-CNN lineage: {result['budget_s']:.0f} s of training each")
    fig.tight_layout()
    speed = img_dir / "lineage_speed_accuracy.png"
    fig.savefig(speed, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, row in rows.items():
        if row["curve"]:
            its, losses = zip(*row["curve"])
            ax.plot(its, losses, label=names[key])
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (sum of terms)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    curves = img_dir / "lineage_training_curves.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)
    return [str(speed), str(curves)]


def markdown(result: dict[str, Any]) -> str:
    """The lineage table (and the seed's claims checked) as markdown."""
    names = GENERATIONS
    lines = [
        "| generation | AP | AP@0.5 | mask AP | ms/image | of which proposals | train s | iterations | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = dict(result["models"])
    if "faster_rcnn_random_init" in result:
        rows["faster_rcnn_random_init"] = result["faster_rcnn_random_init"]
    for key, r in rows.items():
        label = names.get(key, "Faster R-CNN, random init")
        mask = f"{r['mask_AP']:.3f}" if "mask_AP" in r else ""
        lines.append(
            f"| {label} | {r['AP']:.3f} | {r['AP50']:.3f} | {mask} | {r['ms_per_image']:.1f} | {r['ms_proposals']:.1f} | "
            f"{r['train_wall_s']:.0f} | {r['iterations']} | {r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines)
