"""``make bench``: run the benchmarks and regenerate docs/benchmarks.md from their results.

    python -m benchmarks.run                 # quick settings: Faster R-CNN vs torchvision, the lineage (~30 min)
    python -m benchmarks.run --full          # full settings of the same (about 1.5 hours on 2 CPU cores)
    python -m benchmarks.run --all [--full]  # also Mask R-CNN vs torchvision and the R-CNN ablations
    python -m benchmarks.run --report-only   # only rebuild docs/benchmarks.md from benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from benchmarks.common import ROOT, read_result

DEFAULT = ("faster_rcnn", "lineage")
EXTRA = ("mask_rcnn", "rcnn_ablation")
TITLES = {
    "lineage": "The lineage: four generations, one data set, one budget",
    "faster_rcnn": "Faster R-CNN against torchvision",
    "mask_rcnn": "Mask R-CNN against torchvision; RoIAlign against RoIPool",
    "rcnn_ablation": "R-CNN and Fast R-CNN ablations",
}

HEADER = """# Benchmarks

Every figure here was measured by the command shown under its table, on the machine described
there; `make bench` reruns the quick settings and regenerates this page from
`benchmarks/results/*.json`. Timings compare our model with its torchvision peer in the same
process, interleaved (A B B A ...), best of several rounds, as CPU seconds (all threads; the
steadier figure on a shared machine) beside wall seconds. Ratios are ours / torchvision: below
1 means faster.
"""


def _lineage_markdown(result: dict) -> str:
    from rcnn.benchmark import markdown

    parts = [markdown(result), ""]
    if result.get("pretrain"):
        p = result["pretrain"]
        parts.append(f"All generations share one tiny backbone pre-trained on object crops of the training set "
                     f"({p['iterations']} iterations, {p['seconds']:.0f} s, top-1 {p['top1']:.3f}): the seed's step 1.")
    speedups = result.get("speedups", {})
    if speedups:
        parts += ["", "Test-time speed-ups measured here, beside the papers' (GPU, VGG16, VOC images):", ""]
        parts.append(f"- R-CNN -> Fast R-CNN: {speedups.get('rcnn_over_fast_rcnn', float('nan')):.1f}x with "
                     f"selective search included, {speedups.get('rcnn_over_fast_rcnn_network_only', float('nan')):.1f}x "
                     "for the networks alone (paper: 146x without SVD, 213x with; network only, proposals excluded).")
        parts.append(f"- Fast R-CNN -> Faster R-CNN: {speedups.get('fast_rcnn_over_faster_rcnn', float('nan')):.1f}x; "
                     f"selective search takes {speedups.get('selective_search_over_rpn', float('nan')):.0f}x the RPN's "
                     "time (paper: 1.51 s against 10 ms, i.e. ~150x).")
    parts += ["", "![AP against test time](img/lineage_speed_accuracy.png)", "",
              "![training curves](img/lineage_training_curves.png)"]
    return "\n".join(parts)


def render() -> str:
    """docs/benchmarks.md from the result files present."""
    sections = [HEADER]
    for name in ("lineage", "faster_rcnn", "mask_rcnn", "rcnn_ablation"):
        result = read_result(name)
        if result is None:
            continue
        if name == "lineage":
            body = _lineage_markdown(result)
        else:
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
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
    if not args.report_only:
        for name in names:
            tic = time.perf_counter()
            print(f"== {name}", flush=True)
            if name == "lineage":
                from rcnn.benchmark import markdown, run_lineage

                result = run_lineage(quick=not args.full)
                _stamp_lineage(not args.full)
                print(markdown(result))
            else:
                module = importlib.import_module(f"benchmarks.{name}")
                module.main([] if args.full else ["--quick"])
            print(f"== {name}: {time.perf_counter() - tic:.0f} s", flush=True)
    (ROOT / "docs" / "benchmarks.md").write_text(render(), encoding="utf-8")
    print(f"wrote {ROOT / 'docs' / 'benchmarks.md'}")
    return 0


def _stamp_lineage(quick: bool) -> None:
    """Add the command and machine to lineage.json (written by the library, which knows neither)."""
    from benchmarks.common import machine

    path = ROOT / "benchmarks" / "results" / "lineage.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["command"] = "rcnn benchmark" + (" --quick" if quick else "")
    data["machine"] = machine()
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
