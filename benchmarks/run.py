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

Run times on 2 CPU cores: `make bench` (quick settings: Faster R-CNN against torchvision with
120 s budgets, the lineage with 90 s each) took 21 minutes, plus about 3 minutes to create the
environment on a fresh clone. The full settings (600 s budgets, 5 timing rounds):
`python -m benchmarks.run --full --only lineage` took 26 minutes (1588 s: backbone pre-training,
five trainings, R-CNN's post-training stages, selective search and evaluation). `--full` also runs
the Faster R-CNN comparison (`python -m benchmarks.faster_rcnn`), not timed end to end: its three
600 s trainings take 30 minutes, its timings and memory probes come on top. `--all` adds the Mask
R-CNN comparison (about 95 minutes at 600 s: timings, four 600 s trainings, the two with and
without masks repeated from two more seeds, two trainings of 1500 steps) and the R-CNN ablations
(about 40).
"""


def _lineage_markdown(result: dict) -> str:
    from rcnn.benchmark import markdown

    parts = [markdown(result), ""]
    if result.get("pretrain"):
        p = result["pretrain"]
        parts.append(f"All generations share one tiny backbone pre-trained on object crops of the training set "
                     f"({p['iterations']} iterations, {p['seconds']:.0f} s, top-1 {p['top1']:.3f}): the seed's step 1.")
        scratch, pre = result.get("faster_rcnn_random_init"), result.get("models", {}).get("faster_rcnn")
        if scratch and pre:
            parts[-1] += (f" It matters: Faster R-CNN from the pre-trained backbone reaches AP {pre['AP']:.3f} / AP@0.5 "
                          f"{pre['AP50']:.3f}, from a random initialisation {scratch['AP']:.3f} / {scratch['AP50']:.3f}, "
                          "same budget (the last row).")
    speedups = result.get("speedups", {})
    if speedups:
        parts += ["", "Test-time speed-ups measured here, beside the papers' (GPU, VGG16, VOC images):", ""]
        parts.append(f"- R-CNN -> Fast R-CNN: {speedups.get('rcnn_over_fast_rcnn', float('nan')):.1f}x with "
                     f"selective search included, {speedups.get('rcnn_over_fast_rcnn_network_only', float('nan')):.1f}x "
                     "for the networks alone (paper: 146x without SVD, 213x with; network only, proposals excluded).")
        parts.append(f"- Fast R-CNN -> Faster R-CNN: {speedups.get('fast_rcnn_over_faster_rcnn', float('nan')):.1f}x; "
                     f"selective search takes {speedups.get('selective_search_over_rpn', float('nan')):.0f}x the RPN's "
                     "time (paper: 1.51 s against 10 ms, i.e. ~150x).")
    parts += _disagreements(result)
    parts += ["", "![AP against test time](img/lineage_speed_accuracy.png)", "",
              "![training curves](img/lineage_training_curves.png)"]
    return "\n".join(parts)


def _mask_note(mask: dict, faster: dict, budget_s: float) -> str:
    """Why Mask R-CNN's box AP came out below Faster R-CNN's in the lineage: what differed between
    the two runs, and what the controlled comparison (the Mask R-CNN benchmark) found."""
    from rcnn.config import SHAPES_CONFIGS, load_config

    note = ("Mask R-CNN's box AP ({:.3f}) is below Faster R-CNN's ({:.3f}), where the paper finds the mask branch "
            "lifts box AP slightly (+0.9 on COCO).").format(mask["AP"], faster["AP"])
    if mask["iterations"] < faster["iterations"]:
        per_step = (mask["train_wall_s"] / max(mask["iterations"], 1)) / (faster["train_wall_s"] / max(faster["iterations"], 1))
        note += (" Its steps cost about {:.1f}x as much on a CPU (the mask head runs on every positive RoI), so it "
                 "made {} steps against {}").format(per_step, mask["iterations"], faster["iterations"])
        if faster["train_wall_s"] < 0.95 * budget_s:
            note += " (Faster R-CNN reached its configured {} iterations after {:.0f} s)".format(
                faster["iterations"], faster["train_wall_s"])
        note += "."
    else:
        note += " Both made {} steps (Mask R-CNN in {:.0f} s, Faster R-CNN in {:.0f} s).".format(
            mask["iterations"], mask["train_wall_s"], faster["train_wall_s"])
    lrs = {name: load_config(SHAPES_CONFIGS[name]).train.lr for name in ("mask_rcnn", "faster_rcnn")}
    if lrs["mask_rcnn"] != lrs["faster_rcnn"]:
        note += (" The two packaged configs differ in more than the mask branch: Mask R-CNN's learning rate is {:g}, "
                 "Faster R-CNN's {:g}.").format(lrs["mask_rcnn"], lrs["faster_rcnn"])
    bench = read_result("mask_rcnn") or {}
    acc = bench.get("accuracy", {})
    rep = acc.get("repeats")
    if acc.get("ours_align") and acc.get("faster") and rep:
        from benchmarks.mask_rcnn import box_ap_differences

        diffs = box_ap_differences(acc)
        mean = sum(diffs) / len(diffs)
        note += (" The Mask R-CNN benchmark below trains one model with and without its mask branch, all else "
                 "equal, for {:.0f} s: over {} seeds the branch changes box AP by {:+.3f} on average ({}).").format(
            acc["budget_s"], len(diffs), mean, ", ".join(f"{d:+.3f}" for d in diffs))
    steps = bench.get("equal_steps")
    if steps:
        note += " After {} steps each, box AP {:.3f} with masks against {:.3f} without (one seed).".format(
            steps["iterations"], steps["ours_align"]["AP"], steps["faster"]["AP"])
    return note


def _disagreements(result: dict) -> list[str]:
    """Where these figures and the papers' disagree, and why, from the figures themselves."""
    rows, speedups = result.get("models", {}), result.get("speedups", {})
    notes = []
    if "rcnn_over_fast_rcnn" in speedups:
        notes.append(
            "R-CNN takes {:.1f}x Fast R-CNN's test time here{}, not ~150x: R-CNN's cost is one CNN pass per "
            "proposal, and on these 128x128 images selective search gives about a hundred proposals (VOC images: "
            "~2000) warped to a small input of the tiny backbone; the papers' gap comes from 2000 VGG16 passes at "
            "224x224 per image.".format(
                speedups["rcnn_over_fast_rcnn"],
                " ({:.1f}x for the networks alone)".format(speedups["rcnn_over_fast_rcnn_network_only"])
                if "rcnn_over_fast_rcnn_network_only" in speedups else "")
        )
    if "selective_search_over_rpn" in speedups:
        notes.append(
            "Selective search costs {:.0f} ms per image here, not ~1.5 s, because the images are 128x128, not "
            "500x375; the RPN's share stays a few ms, so the ratio is {:.0f}x rather than ~150x.".format(
                rows["fast_rcnn"]["ms_proposals"], speedups["selective_search_over_rpn"])
        )
    fast, faster = rows.get("fast_rcnn"), rows.get("faster_rcnn")
    if fast and faster and faster["AP50"] < fast["AP50"]:
        notes.append(
            "Faster R-CNN is less accurate than Fast R-CNN in this run ({:.3f} against {:.3f} AP@0.5), unlike the "
            "papers. The budget is wall-clock time: in {:.0f} s Faster R-CNN made {} steps against Fast R-CNN's {}, "
            "and it must also learn its proposals from scratch where Fast R-CNN is given selective search's.".format(
                faster["AP50"], fast["AP50"], result["budget_s"], faster["iterations"], fast["iterations"])
        )
        longer = (read_result("faster_rcnn") or {}).get("accuracy", {})
        fast_longer = (read_result("rcnn_ablation") or {}).get("fast_rcnn", {})
        if longer.get("ours") and longer["budget_s"] > result["budget_s"] and fast_longer.get("variants"):
            notes[-1] += (" Given time to converge the order turns: after {:.0f} s ({} steps) the same Faster R-CNN "
                          "reaches AP@0.5 {:.3f} (Faster R-CNN table below), Fast R-CNN after {:.0f} s ({} steps) "
                          "{:.3f} (ablation table below).").format(
                longer["budget_s"], longer["ours"]["iterations"], longer["ours"]["AP50"],
                fast_longer["training"]["wall_s"], fast_longer["training"]["iterations"], fast_longer["variants"][0]["AP50"])
    mask = rows.get("mask_rcnn")
    if mask and faster and mask["AP"] < faster["AP"]:
        notes.append(_mask_note(mask, faster, result["budget_s"]))
    if "rcnn" in rows and rows["rcnn"].get("train_wall_s", 0) > 1.5 * result["budget_s"]:
        notes.append(
            "R-CNN's training time exceeds the budget: the budget bounds its CNN fine-tuning; caching features of "
            "every proposal, the SVMs with hard negative mining and the box regressors come on top ({:.0f} s in all)."
            .format(rows["rcnn"]["train_wall_s"])
        )
    if not notes:
        return []
    return ["", "Where these figures differ from the papers, and why:", ""] + [f"- {n}" for n in notes]


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
