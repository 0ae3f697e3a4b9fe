"""``rcnn pretrain``: pre-train a backbone on image classification (the seed's step 1).

    rcnn pretrain --backbone tiny --data data/shapes --out runs/pretrain          # object crops
    rcnn pretrain --backbone vgg16 --images /data/imagenet-subset/train --out runs/vgg --size 224
"""

from __future__ import annotations

import argparse

from rcnn.commands.options import float_range, int_range
from rcnn.components.settings import MAX_IMAGE_SIDE, MAX_SEED, MIN_IMAGE_SIDE
from rcnn.io.files import dumps_json


def run(args: argparse.Namespace) -> int:
    from rcnn.config import TrainConfig
    from rcnn.data.reading import build_dataset
    from rcnn.training.pretrain import CropDataset, ImageFolderDataset, pretrain

    if (args.images is None) == (args.data is None):
        raise ValueError("give exactly one of --images (class folders) or --data (a detection data set to crop)")
    if args.images is not None:
        train_set = ImageFolderDataset(args.images, args.size)
        val_set = ImageFolderDataset(args.val_images, args.size) if args.val_images else None
    else:
        train_set = CropDataset(build_dataset(args.data, args.split), args.size, background=args.background)
        val_set = None
        if args.val_split:
            val_set = CropDataset(
                build_dataset(args.data, args.val_split), args.size, augment=False, background=args.background
            )
        if len(train_set.class_names) < 2:
            raise ValueError(f"{args.data}: one class ({train_set.class_names[0]}); add --background to classify "
                             "its objects against background regions")  # fmt: skip
    cfg = TrainConfig(
        iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, schedule="cosine",
        warmup_iterations=min(100, args.iterations // 10), checkpoint_every=max(args.iterations // 4, 1),
        weight_decay=1e-4 if args.backbone != "tiny" else 5e-4, seed=args.seed,
    )  # fmt: skip
    summary = pretrain(args.backbone, train_set, len(train_set.class_names), cfg, args.out, val_set=val_set, resume=args.resume,
                       overwrite=args.overwrite)
    print(dumps_json({k: v for k, v in summary.items() if k != "losses"}))
    print(f"use it with: --set model.backbone={args.backbone} --set model.pretrained_backbone={summary['weights']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="pre-train a backbone on image classification",
        description="Train a backbone (and its box head) as an image classifier, from class folders or from "
        "the objects of a detection data set, and save it where model.pretrained_backbone can load it.",
    )
    parser.add_argument("--backbone", default="tiny", help="backbone name (default tiny)")
    parser.add_argument("--images", help="training images in class folders: DIR/<class>/<image>")
    parser.add_argument("--val-images", help="validation images in class folders")
    parser.add_argument("--data", help="a detection data set (COCO or VOC) whose objects are cropped")
    parser.add_argument("--split", default="train", help="split of --data to train on (default train)")
    parser.add_argument("--val-split", default="val", help="split of --data to measure accuracy on ('' for none)")
    parser.add_argument("--background", action="store_true",
                        help="with --data: add a background class of regions away from the objects (needed for one class)")
    parser.add_argument("--out", required=True, help="run directory; the weights go to OUT/backbone.safetensors")
    parser.add_argument("--size", type=int_range(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE), default=64,
                        help="crop / image side in pixels (default 64)")
    parser.add_argument("--iterations", type=int_range(1, 10**9), default=1000, help="training steps (default 1000)")
    parser.add_argument("--batch-size", type=int_range(1, 1024), default=64, help="images per step (default 64)")
    parser.add_argument("--lr", type=float_range(0.0, 10.0, low_open=True), default=0.02,
                        help="learning rate (default 0.02)")
    parser.add_argument("--seed", type=int_range(0, MAX_SEED), default=0, help="random seed (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last")
    parser.add_argument("--overwrite", action="store_true", help="OUT holds an earlier run: delete it and start over")
    parser.set_defaults(func=run)
