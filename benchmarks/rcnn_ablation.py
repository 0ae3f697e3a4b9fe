"""R-CNN and Fast R-CNN ablations on the shapes data, and per-image inference times of the generations.

    python -m benchmarks.rcnn_ablation [--quick] [--data DIR] [--work DIR] [--threads 2]

Everything is trained as ``rcnn train`` trains it (``run_training`` on the packaged configs
``rcnn_tiny_shapes``, ``fast_rcnn_tiny_shapes``, ``faster_rcnn_tiny_shapes``), from scratch, on
selective search proposals (fast mode) computed once into ``--work``. Runs resume: a finished run
in ``--work`` is reused, an interrupted one continues.

- **R-CNN**, one training per warp mode (anisotropic, isotropic with context, isotropic without);
  on the anisotropic run, the SVMs retrained from the feature cache without hard negative mining
  (random negatives, as many as mining kept; and all negatives), the fine-tuned softmax instead of
  the SVMs, and inference without box regression.
- **Fast R-CNN** with and without truncated SVD of fc6 / fc7 (the tiny head's 256-wide layers
  keep 64 and 16 singular values: the paper's 1024 of 4096 and 256 of 4096 in proportion).
- **Per-image inference time** (batch of one, one thread by default, best of the rounds):
  selective search, and the model given the proposals, for R-CNN and Fast R-CNN; Faster R-CNN
  (tiny backbone, same images; a shorter training: only its time is compared) for reference.

COCO AP and AP@0.5 on the val split. Writes ``benchmarks/results/rcnn_ablation.json``; the tables
go to ``docs/benchmarks.md`` (``python -m benchmarks.run --report-only``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import torch

from benchmarks.harness import command_line, measure, read_result, table, time_one, time_pair, write_result
from rcnn.config import Config, load_config
from rcnn.data.reading import build_dataset
from rcnn.inference import Clock, Predictor, evaluate_model
from rcnn.components.proposals.io import proposal_stats
from rcnn.components.proposals.selective_search import SelectiveSearch, ensure_dataset_proposals, selective_search_file
from rcnn.components.svm import ClassSVMs
from rcnn.build import load_model
from rcnn.io.files import read_json, write_json
from rcnn.components.proposals.io import proposal_source
from rcnn.training.rcnn_stages import FeatureCache, mining_summary, train_svms
from rcnn.training.run import run_training

WARP_MODES = ("anisotropic", "isotropic_context", "isotropic_pad")
SVD_RANKS = (64, 16)  # fc6, fc7 of the tiny head (256 wide)
TIMED_IMAGES = 20  # val images in each timing round

# training steps: None = the packaged config's (R-CNN 1500, Fast R-CNN its own); Faster R-CNN is
# trained only for its inference time
FULL = {"n_train": 400, "n_val": 100, "rcnn_iterations": None, "fast_iterations": None, "faster_iterations": 300}
QUICK = {"n_train": 120, "n_val": 40, "rcnn_iterations": 300, "fast_iterations": 600, "faster_iterations": 100}


def _config(name: str, data: Path, work: Path, iterations: int | None, *overrides: str) -> Config:
    steps = [f"train.iterations={iterations}"] if iterations else []
    return load_config(
        name,
        [
            f"data.root={data}", f"data.proposals_train={work / 'ss_train.safetensors'}",
            f"data.proposals_val={work / 'ss_val.safetensors'}", *steps, *overrides,
        ],
    )  # fmt: skip


def _train(config: Config, run_dir: Path) -> dict[str, Any]:
    """Train a run (resuming an interrupted one), or reuse a finished one: iterations and seconds.

    The times of a training are kept in ``run_dir/benchmark_training.json`` when it finishes (a
    resumed training counts only its last part).
    """
    record = run_dir / "benchmark_training.json"
    if record.is_file():
        done = read_json(record)
        if done["iterations"] == config.train.iterations:
            return done
    cpu, wall, summary = Clock().measure(lambda: run_training(config, run_dir, resume=True, evaluate=False, progress=False))
    done = {"iterations": summary["iterations"], "train_s": summary["train_seconds"], "wall_s": wall, "cpu_s": cpu}
    if (run_dir / "rcnn_stages.json").is_file():
        done["stages"] = read_json(run_dir / "rcnn_stages.json")["stages"]
    write_json(record, done)
    return done


def _accuracy(model: torch.nn.Module, val: Any, proposals: Any) -> dict[str, float]:
    metrics = evaluate_model(model, val, proposals=proposals)
    return {"AP": metrics["bbox"]["AP"], "AP50": metrics["bbox"]["AP50"], "voc_mAP": metrics["voc"]["mAP"]}


def _inputs(val: Any, proposals: Any) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    items = []
    for index in range(min(TIMED_IMAGES, len(val))):
        image, target = val[index]
        items.append((image, proposals(int(target["image_id"])) if proposals is not None else None))
    return items


def _runner(model: torch.nn.Module, inputs: list[tuple[torch.Tensor, torch.Tensor | None]]):
    """A callable running ``model`` on each input, one image at a time (through the library's predictor)."""
    predictor = Predictor(model)

    def run() -> None:
        for image, props in inputs:
            predictor.detect([image], proposals=None if props is None else [props])

    return run


def _per_image(timing: dict[str, float], count: int) -> dict[str, float]:
    return {k: v / count if k.endswith("_s") else v for k, v in timing.items()}


def selective_search_timing(val: Any, limit: int) -> dict[str, float]:
    """Mean CPU and wall seconds of selective search (default settings) per val image."""
    cpu, wall, boxes = [], [], []
    for index in range(min(limit, len(val))):
        c, w = measure(lambda: boxes.append(len(selective_search_file(val.image_path(index), SelectiveSearch()))))
        cpu.append(c)
        wall.append(w)
    return {"cpu_s": statistics.mean(cpu), "wall_s": statistics.mean(wall), "boxes_per_image": statistics.mean(boxes)}


def rcnn_part(data: Path, work: Path, settings: dict[str, Any], val: Any, val_props: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"training": {}, "variants": []}
    for mode in WARP_MODES:
        run_dir = work / f"rcnn_{mode}"
        config = _config("rcnn_tiny_shapes", data, work, settings["rcnn_iterations"], f"model.warp_mode={mode}")
        out["training"][mode] = _train(config, run_dir)
        out["warp_size"] = config.model.warp_size
        model = load_model(run_dir).model
        variant = "R-CNN" if mode == "anisotropic" else f"R-CNN, {mode} warp"
        out["variants"].append({"variant": variant, **_accuracy(model, val, val_props)})
        print(out["variants"][-1], flush=True)
        if mode != "anisotropic":
            continue
        out["training"][mode]["negatives_per_round"] = {str(k): v for k, v in mining_summary(ClassSVMs.load(run_dir / "svms.safetensors")).items()}
        model.use_box_regression = False
        out["variants"].append({"variant": "R-CNN without box regression", **_accuracy(model, val, val_props)})
        model.use_box_regression = True
        mined = model.svms()
        model.trained_parts[0] = False  # score with the fine-tuned softmax (R-CNN appendix B)
        out["variants"].append({"variant": "R-CNN, fine-tuned softmax instead of SVMs", **_accuracy(model, val, val_props)})
        # SVMs without hard negative mining, from the same feature cache
        train_ids = build_dataset(data, "train").image_ids
        cache = FeatureCache(run_dir / "features", train_ids)
        last_update = {r.class_id: r for r in ClassSVMs.load(run_dir / "svms.safetensors").history}
        mined_cache = statistics.mean(r.cache_size - r.evicted for r in last_update.values())  # per class
        base = model.settings
        for label, count in (("random negatives, as many as mining kept", int(mined_cache)), ("all negatives", None)):
            model.settings = replace(base, svm_max_rounds=0, svm_initial_images=len(cache), svm_initial_negatives=count)
            model.set_svms(train_svms(model, cache, progress=False, log=lambda s: None))
            out["variants"].append({"variant": f"R-CNN without hard negative mining ({label})", **_accuracy(model, val, val_props)})
            print(out["variants"][-1], flush=True)
        model.settings = base
        model.set_svms(mined)
        out["negatives_random"] = int(mined_cache)
        out["model_timing"] = _per_image(time_one(_runner(model, _inputs(val, val_props)), rounds=3), min(TIMED_IMAGES, len(val)))
    return out


def fast_rcnn_part(data: Path, work: Path, settings: dict[str, Any], val: Any, val_props: Any) -> dict[str, Any]:
    run_dir = work / "fast_rcnn"
    config = _config("fast_rcnn_tiny_shapes", data, work, settings["fast_iterations"])
    out: dict[str, Any] = {"training": _train(config, run_dir), "variants": []}
    model = load_model(run_dir).model
    compressed = copy.deepcopy(model)
    out["svd"] = compressed.compress_fc(*SVD_RANKS)
    out["variants"].append({"variant": "Fast R-CNN", **_accuracy(model, val, val_props)})
    out["variants"].append({"variant": f"Fast R-CNN, truncated SVD (fc6 {SVD_RANKS[0]}, fc7 {SVD_RANKS[1]})", **_accuracy(compressed, val, val_props)})
    inputs = _inputs(val, val_props)
    pair = time_pair(_runner(compressed, inputs), _runner(model, inputs), rounds=5)
    count = min(TIMED_IMAGES, len(val))
    out["model_timing"] = {
        "full": {"cpu_s": pair["peer_cpu_s"] / count, "wall_s": pair["peer_wall_s"] / count},
        "svd": {"cpu_s": pair["ours_cpu_s"] / count, "wall_s": pair["ours_wall_s"] / count},
    }
    # the fc layers alone, on the RoIs of one image's worth of proposals (where the SVD acts)
    pooled = torch.randn(int(statistics.mean(len(p) for _, p in inputs)), 64, 7, 7)
    with torch.inference_mode():
        fc = time_pair(lambda: compressed.roi_heads.box_head(pooled), lambda: model.roi_heads.box_head(pooled), rounds=10)
    out["fc_timing"] = {"rois": pooled.shape[0], **fc}
    print(out["variants"], out["model_timing"], flush=True)
    return out


def faster_rcnn_part(data: Path, work: Path, settings: dict[str, Any], val: Any) -> dict[str, Any]:
    run_dir = work / "faster_rcnn"
    config = _config("faster_rcnn_tiny_shapes", data, work, settings["faster_iterations"])
    out: dict[str, Any] = {"training": _train(config, run_dir)}
    model = load_model(run_dir).model
    out["accuracy"] = _accuracy(model, val, None)
    count = min(TIMED_IMAGES, len(val))
    out["model_timing"] = _per_image(time_one(_runner(model, _inputs(val, None)), rounds=3), count)
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    rc, fast, faster, ss = result["rcnn"], result["fast_rcnn"], result["faster_rcnn"], result["selective_search"]
    rows = [[v["variant"], v["AP"], v["AP50"]] for v in rc["variants"] + fast["variants"]]
    warp, rc_steps = rc["warp_size"], rc["training"]["anisotropic"]["iterations"]
    parts = [
        f"Shapes data ({s['n_train']} training, {s['n_val']} validation images of 128x128), tiny backbone from "
        f"scratch, selective search proposals (fast mode, {ss['boxes_per_image']:.0f} per image, recall@0.5 "
        f"{ss['recall50']:.3f}), the packaged configs `rcnn_tiny_shapes` ({rc_steps} fine-tuning steps of 128 "
        f"regions warped to {warp}x{warp}) and `fast_rcnn_tiny_shapes` ({fast['training']['iterations']} steps). "
        "COCO AP on the validation images:",
        "",
        table(["variant", "AP", "AP@0.5"], rows),
        "",
        "Hard negative mining (anisotropic run): negatives per round, all classes: "
        + ", ".join(f"round {k}: {v}" for k, v in rc["training"]["anisotropic"]["negatives_per_round"].items())
        + f"; the random-negative SVMs get {rc['negatives_random']} per class.",
        "",
        "Training time, seconds wall / CPU on the shared 2-core machine: R-CNN (all four stages) "
        + ", ".join(f"{m} {rc['training'][m]['wall_s']:.0f} / {rc['training'][m]['cpu_s']:.0f}" for m in WARP_MODES)
        + f"; Fast R-CNN {fast['training']['wall_s']:.0f} / {fast['training']['cpu_s']:.0f}.",
        "",
        f"Inference per image, milliseconds (batch of one, {result['threads']} compute thread(s); CPU time is the "
        "steadier figure on a shared machine, wall time includes waiting for the cores; Faster R-CNN, same tiny "
        f"backbone and images, trained only {s['faster_iterations']} steps since only its time is compared):",
        "",
    ]
    timing = [
        ("R-CNN", ss, rc["model_timing"]),
        ("Fast R-CNN", ss, fast["model_timing"]["full"]),
        ("Fast R-CNN + truncated SVD", ss, fast["model_timing"]["svd"]),
        ("Faster R-CNN (RPN proposals)", None, faster["model_timing"]),
    ]
    rows = []
    for name, props, model in timing:
        p_cpu, p_wall = (props["cpu_s"], props["wall_s"]) if props else (0.0, 0.0)
        values = (p_cpu, model["cpu_s"], p_cpu + model["cpu_s"], p_wall, model["wall_s"], p_wall + model["wall_s"])
        rows.append([name, *(f"{1000 * v:.1f}" for v in values)])
    parts.append(table(["model", "proposals CPU", "rest CPU", "total CPU", "proposals wall", "rest wall",
                        "total wall"], rows))  # fmt: skip
    fc = fast["fc_timing"]
    parts += ["", f"fc6 + fc7 alone on {fc['rois']} RoIs: {1000 * fc['peer_cpu_s']:.2f} ms CPU in full, "
              f"{1000 * fc['ours_cpu_s']:.2f} ms with truncated SVD ({fc['ratio_cpu']:.2f}x); box-head parameters "
              f"{sum(r['params_before'] for r in fast['svd'])} -> {sum(r['params_after'] for r in fast['svd'])}."]  # fmt: skip
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and training steps")
    parser.add_argument("--data", help="shapes data root (generated if absent; default WORK/shapes)")
    parser.add_argument("--work", help="proposals and runs (default /tmp/rcnn_ablation[_quick])")
    parser.add_argument("--report", action="store_true", help="only print the tables of the last results file")
    parser.add_argument("--threads", type=int, default=1, help="compute threads (default 1: steadier on a shared machine)")
    args = parser.parse_args(argv)
    if args.report:
        result = read_result("rcnn_ablation")
        if result is None:
            raise SystemExit("no benchmarks/results/rcnn_ablation.json yet: run the benchmark first")
        print(markdown(result))
        return result
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    settings = QUICK if args.quick else FULL
    suffix = "_quick" if args.quick else ""
    work = Path(args.work or f"/tmp/rcnn_ablation{suffix}")
    data = Path(args.data or work / "shapes")
    work.mkdir(parents=True, exist_ok=True)
    if not (data / "annotations").is_dir():
        from rcnn.data.shapes import make_shapes

        make_shapes(data, settings["n_train"], settings["n_val"], seed=0)
    val = build_dataset(data, "val")
    for split in ("train", "val"):
        ensure_dataset_proposals(build_dataset(data, split), work / f"ss_{split}.safetensors", progress=False)
    val_props = proposal_source(work / "ss_val.safetensors")
    stats = proposal_stats(ensure_dataset_proposals(val, work / "ss_val.safetensors", progress=False), val)
    result: dict[str, Any] = {"settings": settings, "threads": args.threads}
    result["selective_search"] = {**selective_search_timing(val, TIMED_IMAGES), "recall50": stats["recall"][0.5]}
    result["rcnn"] = rcnn_part(data, work, settings, val, val_props)
    result["fast_rcnn"] = fast_rcnn_part(data, work, settings, val, val_props)
    result["faster_rcnn"] = faster_rcnn_part(data, work, settings, val)
    write_result("rcnn_ablation", result, command_line("benchmarks.rcnn_ablation", argv))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
