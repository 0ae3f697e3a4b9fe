"""``rcnn train``: train the model a config describes.

    rcnn train --config faster_rcnn_tiny_shapes --out runs/frcnn [--set train.lr=0.01 ...] [--resume]
"""

from __future__ import annotations

import argparse
import json

from rcnn.commands.common import add_config_arguments, config_from_args


def run(args: argparse.Namespace) -> int:
    from rcnn.training.run import run_training

    config = config_from_args(args)
    if args.init_from:
        config.train.init_from = args.init_from
    summary = run_training(config, args.out, resume=args.resume, overwrite=args.overwrite, evaluate=not args.no_eval)
    print(json.dumps(_brief(summary), indent=1))
    return 0


def _brief(summary: dict) -> dict:
    """The summary without per-class tables, for the terminal."""
    metrics = summary.get("metrics") or {}
    brief = {k: v for k, v in summary.items() if k != "metrics"}
    for kind in ("bbox", "segm"):
        if kind in metrics:
            brief[f"{kind}_AP"] = round(metrics[kind]["AP"], 4)
            brief[f"{kind}_AP50"] = round(metrics[kind]["AP50"], 4)
    if "voc" in metrics:
        brief["voc_mAP"] = round(metrics["voc"]["mAP"], 4)
    return brief


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a detector from a config",
        description="Train the detector of a config (YAML file or packaged config name) and evaluate it "
        "on the validation split. Checkpoints go to OUT/step_*, with OUT/last the newest.",
    )
    add_config_arguments(parser, required=True)
    parser.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, TensorBoard logs)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last if it exists")
    parser.add_argument("--overwrite", action="store_true",
                        help="OUT holds an earlier run: delete it and start over (without this, or --resume, "
                        "training into such a folder is refused)")  # fmt: skip
    parser.add_argument(
        "--init-from", metavar="RUN",
        help="start from another run's weights (e.g. a converted torchvision model); its class-specific "
        "layers are newly initialised when the classes differ (train.init_from)",
    )  # fmt: skip
    parser.add_argument("--no-eval", action="store_true", help="skip evaluation on the validation split")
    parser.set_defaults(func=run)
