"""``rcnn train``: train the model a config describes.

    rcnn train --config faster_rcnn_tiny_shapes --out runs/frcnn [--set train.lr=0.01 ...] [--resume]
"""

from __future__ import annotations

import argparse

from rcnn.commands.options import add_config_arguments, config_from_args
from rcnn.io.files import dumps_json


def run(args: argparse.Namespace) -> int:
    from rcnn.training.run import run_training

    config = config_from_args(args)
    if args.init_from:
        config.train.init_from = args.init_from
    summary = run_training(config, args.out, resume=args.resume, overwrite=args.overwrite, evaluate=not args.no_eval)
    print(dumps_json(_brief(summary)))
    return 0


def _brief(summary: dict) -> dict:
    """The summary without per-class tables, for the terminal."""
    metrics = summary.get("metrics") or {}
    brief = {k: v for k, v in summary.items() if k != "metrics"}
    for kind in ("bbox", "segm"):
        if kind in metrics:
            brief[f"{kind}_AP"] = _rounded(metrics[kind]["AP"])
            brief[f"{kind}_AP50"] = _rounded(metrics[kind]["AP50"])
    if "voc" in metrics:
        brief["voc_mAP"] = _rounded(metrics["voc"]["mAP"])
    return brief


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


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
