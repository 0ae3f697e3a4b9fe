"""``make bench``: run the benchmarks and regenerate docs/benchmarks.md from their results.

    python -m benchmarks.run                 # quick settings: Faster R-CNN vs torchvision, the lineage (~30 min)
    python -m benchmarks.run --full          # full settings of the same, the lineage at the papers' scale and the
                                             # raccoon photographs (about 3.5 hours on 2 CPU cores)
    python -m benchmarks.run --all [--full]  # also Mask R-CNN vs torchvision, the R-CNN ablations, the backends, the
                                             # server under load, the data loader and COCO evaluation at scale
    python -m benchmarks.run --report-only   # only rebuild docs/benchmarks.md from benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from benchmarks.harness import ROOT, read_result

DEFAULT = ("faster_rcnn", "lineage")
EXTRA = ("backends", "runtime_profile", "eager_profile", "mask_rcnn", "rcnn_ablation", "serve_load", "data_loading", "eval_scale", "scaling")
FULL = ("paper_scale", "raccoon")  # with --full or --all (or --only NAME): too long for the quick settings
TITLES = {
    "lineage": "The lineage: four generations, one data set, one budget",
    "paper_scale": "The lineage at the papers' scale: test and training speed",
    "faster_rcnn": "Faster R-CNN against torchvision",
    "backends": "Inference backends: eager PyTorch and ONNX Runtime against torchvision",
    "runtime_profile": "Where ONNX Runtime's and OpenVINO's time goes, and what the uint8 input costs",
    "eager_profile": "Where the eager model's time goes",
    "mask_rcnn": "Mask R-CNN against torchvision; RoIAlign against RoIPool",
    "rcnn_ablation": "R-CNN and Fast R-CNN ablations",
    "serve_load": "The server under load",
    "data_loading": "The training data loader: throughput, waiting for data, padding",
    "eval_scale": "COCO evaluation at scale: bounded memory, pycocotools' numbers",
    "scaling": "Data at scale: cost curves against the number of images",
    "raccoon": "Real photographs: raccoons, against torchvision, from scratch and pre-trained",
}

HEADER = """# Benchmarks

Every figure here was measured by the command shown under its table, on the machine described
there; `make bench` reruns the quick settings and regenerates this page from
`benchmarks/results/*.json`. Timings compare our model with its torchvision peer in the same
process, interleaved (A B B A ...), best of several rounds, as CPU seconds (all threads; the
steadier figure on a shared machine) beside wall seconds. Ratios are ours / torchvision: below
1 means faster.

Run times on 2 CPU cores: `make bench` (quick settings: Faster R-CNN against torchvision with
120 s budgets, the lineage with 90 s each) took 21 minutes, plus about 3 minutes to create the
environment on a fresh clone. The full settings (600 s budgets, 5 timing rounds):
`python -m benchmarks.run --full --only lineage` took 26 minutes (1588 s: backbone pre-training,
five trainings, R-CNN's post-training stages, selective search and evaluation). `--full` also runs
the Faster R-CNN comparison (`python -m benchmarks.faster_rcnn`), not timed end to end: its three
600 s trainings take 30 minutes, its timings and memory probes come on top. `--all` adds the Mask
R-CNN comparison (about 95 minutes at 600 s: timings, four 600 s trainings, the two with and
without masks repeated from two more seeds, two trainings of 1500 steps) and the R-CNN ablations
(about 40). `--full` also runs the lineage at the papers' scale (`python -m benchmarks.paper_scale`:
5 images, 3 rounds); its `--quick` setting (2 images, 2 rounds) took 16 minutes (943 s) on 2 shared
cores; the full setting was stopped after 31 minutes on a machine shared with other work (load
average 4), with the AlexNet half done in 19 minutes and one of VGG16's five test images in 10:
about 70 minutes in all on such a machine, projected from those parts. It also runs the raccoon photographs
(`python -m benchmarks.raccoon`: three 600 s trainings and a 300 s backbone pre-training, about
40 minutes with the evaluations).
"""


def render() -> str:
    """docs/benchmarks.md from the result files present."""
    sections = [HEADER]
    for name in ("lineage", "paper_scale", "faster_rcnn", "backends", "runtime_profile", "eager_profile", "raccoon", "mask_rcnn", "rcnn_ablation", "serve_load", "data_loading", "eval_scale", "scaling"):
        result = read_result(name)
        if result is None:
            continue
        body = importlib.import_module(f"benchmarks.{name}").markdown(result)
        machine = result.get("machine", {})
        where = ", ".join(f"{k} {v}" for k, v in machine.items())
        sections.append(f"## {TITLES[name]}\n\n{body}\n\nMeasured with `{result.get('command', '?')}` ({where}).\n")
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the full settings (longer budgets, more rounds)")
    parser.add_argument("--all", action="store_true", help="also the Mask R-CNN and R-CNN benchmarks")
    parser.add_argument("--only", help="comma-separated benchmarks to run")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    names = list(DEFAULT + EXTRA) if args.all else list(DEFAULT)
    if args.full or args.all:
        names[1:1] = list(FULL)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
    if not args.report_only:
        for name in names:
            tic = time.perf_counter()
            print(f"== {name}", flush=True)
            module = importlib.import_module(f"benchmarks.{name}")
            module.main([] if args.full else ["--quick"])
            print(f"== {name}: {time.perf_counter() - tic:.0f} s", flush=True)
    (ROOT / "docs" / "benchmarks.md").write_text(render(), encoding="utf-8")
    print(f"wrote {ROOT / 'docs' / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
