"""``rcnn benchmark``: the four generations side by side on one data set (the lineage benchmark).

    rcnn benchmark --quick                      # ~20 minutes on 2 CPU cores
    rcnn benchmark --models fast_rcnn,faster_rcnn --budget 300
"""

from __future__ import annotations

import argparse

from rcnn.commands.options import MAX_THREADS, float_range, int_range

MAX_BUDGET_S = 7 * 86_400.0  # training seconds per model: a week


def run(args: argparse.Namespace) -> int:
    from rcnn.training.lineage import markdown, run_lineage

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    result = run_lineage(
        args.out, args.data, models=models, quick=args.quick, budget_s=args.budget, pretrained=args.pretrained,
        compare_random_init=not args.no_random_init, threads=args.threads, results_dir=args.results, img_dir=args.img,
    )  # fmt: skip
    print(markdown(result))
    print("speed-ups:", ", ".join(f"{k} {v:.1f}x" for k, v in result["speedups"].items()))
    print(f"results: {args.results or args.out}/lineage.json   plots: {', '.join(result['plots'])}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="train and measure all four generations on one data set",
        description="The lineage benchmark: pre-train one backbone, train R-CNN, Fast R-CNN, Faster R-CNN and "
        "Mask R-CNN for the same time budget on the shapes data, and measure accuracy, test time (proposals "
        "and the rest), training time and memory. Writes lineage.json and two plots.",
    )
    parser.add_argument("--models", default="rcnn,fast_rcnn,faster_rcnn,mask_rcnn", help="comma-separated generations")
    parser.add_argument("--quick", action="store_true", help="smaller data set and budget (90 s per model)")
    parser.add_argument("--budget", type=float_range(0.0, MAX_BUDGET_S, low_open=True),
                        help="training seconds per model, at most a week (default 600, quick 90)")  # fmt: skip
    parser.add_argument("--data", default="data/shapes", help="shapes data root (generated if absent)")
    parser.add_argument("--pretrained", help="pre-trained tiny backbone weights (default: pre-train one first)")
    parser.add_argument("--no-random-init", action="store_true", help="skip Faster R-CNN from a random init")
    parser.add_argument("--threads", type=int_range(1, MAX_THREADS), default=2, help="torch threads per model (default 2)")
    parser.add_argument("--out", default="runs/lineage", help="folder for the runs, lineage.json and the plots")
    parser.add_argument("--results", help="where lineage.json goes (default: --out)")
    parser.add_argument("--img", help="where the plots go (default: --out)")
    parser.set_defaults(func=run)
