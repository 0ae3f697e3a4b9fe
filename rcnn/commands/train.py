"""``rcnn train``: train the model a config describes, or a detector for photographs on a folder.

    rcnn train --data FOLDER --out runs/mine [--set train.time_budget_s=600 ...] [--resume]
    rcnn train --config faster_rcnn_tiny_shapes --out runs/frcnn [--set train.lr=0.01 ...] [--resume]
    rcnn train --config CONFIG --pretrained fasterrcnn_mobilenet_v3_large_fpn --out runs/mine
"""

from __future__ import annotations

import argparse

from rcnn.commands.options import add_config_arguments, config_from_args
from rcnn.io.files import dumps_json


def run(args: argparse.Namespace) -> int:
    from rcnn.training.folder import PHOTOS_CONFIG, folder_config
    from rcnn.training.run import run_training

    fit = None
    if args.data is not None:  # a folder: the photographs' config (or --config), fitted to the data
        config, fit = folder_config(args.data, args.config, args.overrides)
    elif args.config is None:
        raise ValueError(f"give --data FOLDER (a folder of annotated images; trains configs/{PHOTOS_CONFIG}.yaml "
                         "on it) or --config CONFIG")  # fmt: skip
    else:
        config = config_from_args(args)
    if args.init_from:
        config.train.init_from = args.init_from
    if args.pretrained:  # the model section follows a detection checkpoint; --set model.* on top
        from rcnn.deploy.published import pretrained_config

        config = pretrained_config(config, args.pretrained, args.overrides)
    summary = run_training(config, args.out, resume=args.resume, overwrite=args.overwrite, evaluate=not args.no_eval,
                           fit=fit)  # fmt: skip
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
        help="train a detector on a folder of annotated images, or from a config",
        description="Train the detector of a config (YAML file or packaged config name) and evaluate it "
        "on the validation split. Checkpoints go to OUT/step_*, with OUT/last the newest. With --data FOLDER "
        "and no --config: a detector for photographs (configs/faster_rcnn_photos.yaml), a split drawn into OUT "
        "when the folder has none, input size and anchors fitted to its boxes, and at the end the val AP and "
        "OUT/val_predictions.png.",
    )
    parser.add_argument(
        "--data", metavar="FOLDER",
        help="the data: any layout `rcnn data check` reads (LabelImg, VOC, COCO, YOLO, ...); without split files it "
        "is split into OUT/split (data.val_fraction, default 0.2; data.split_seed). Without --config, trains the "
        "packaged config for photographs",
    )  # fmt: skip
    add_config_arguments(parser, required=False)
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
    parser.add_argument(
        "--pretrained", metavar="NAME",
        help="start from published weights named as torchvision names its builders: a COCO detector "
        "(fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2, fasterrcnn_mobilenet_v3_large_fpn, "
        "fasterrcnn_mobilenet_v3_large_320_fpn, maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2: the model becomes "
        "its architecture, --set model.* on top, its predictors new for the data's classes) or an ImageNet backbone "
        "(resnet50, mobilenet_v3_large, vgg16, alexnet: loaded into model.backbone); downloaded once into the torch "
        "hub cache, hash checked (mirror: RCNN_WEIGHTS_URL); or the path of such a file (train.pretrained)",
    )  # fmt: skip
    parser.add_argument("--no-eval", action="store_true", help="skip evaluation on the validation split")
    parser.set_defaults(func=run)
