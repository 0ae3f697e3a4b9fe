"""``rcnn data``: make the synthetic shapes data set; check, split and convert a data set.

    rcnn data shapes ROOT --train 400 --val 100 --seed 0 --size 128
    rcnn data check PATH [--split SPLIT] [--images DIR] [--quick | --decode] [--skip-broken]
                         [--val-fraction F --seed S] [--suggest-anchors --min-size 600 --max-size 1000 --levels 5]
    rcnn data split PATH [--val-fraction 0.2] [--seed 0] [--out DIR] [--force]
    rcnn data convert SRC OUT --to coco|voc|yolo [--split SPLIT ...] [--link] [--skip-broken] [--force]
"""

from __future__ import annotations

import argparse
import time

from rcnn.commands.options import float_range, int_range
from rcnn.components.settings import MAX_IMAGE_SIDE, MAX_SEED, MIN_IMAGE_SIDE

MAX_SHAPES_IMAGES = 1_000_000  # per split of the synthetic set: far beyond a demo or a test
MAX_LEVELS = 8  # feature levels of a pyramid: the FPN backbones have 5; 8 reach stride 512


def _run_shapes(args: argparse.Namespace) -> int:
    from rcnn.data.shapes import make_shapes, shapes_paths

    start = time.perf_counter()
    root = make_shapes(
        args.root,
        n_train=args.train,
        n_val=args.val,
        seed=args.seed,
        image_size=args.size,
        max_objects=args.max_objects,
        empty_fraction=args.empty_fraction,
    )
    elapsed = time.perf_counter() - start
    for split, count in (("train", args.train), ("val", args.val)):
        images_dir, ann_file = shapes_paths(root, split)
        print(f"{split}: {count} images in {images_dir}, annotations {ann_file}")
    print(f"made in {elapsed:.1f} s (seed {args.seed}, {args.size}x{args.size})")
    return 0


def _run_check(args: argparse.Namespace) -> int:
    from rcnn.data.anchors import format_anchor_suggestion, suggest_anchors
    from rcnn.data.check import check_dataset, format_report

    reports = check_dataset(
        args.path,
        args.split,
        images_dir=args.images,
        decode_images=args.decode,
        headers_only=args.quick,
        val_fraction=args.val_fraction,
        split_seed=args.seed,
        skip_broken=args.skip_broken,
        progress=True,  # on a terminal only (tqdm leaves a pipe alone)
    )
    print(f"data set: {args.path}")
    print(format_report(reports))
    if args.suggest_anchors:
        records = list({str(r.path): r for report in reports for r in report.records}.values())  # each image once
        print()
        print(format_anchor_suggestion(
            suggest_anchors(records, min_size=args.min_size, max_size=args.max_size, levels=args.levels)
        ))
    return 1 if any(r.errors for r in reports) else 0


def _run_split(args: argparse.Namespace) -> int:
    from rcnn.data.make_splits import make_splits

    report = make_splits(args.path, val_fraction=args.val_fraction, seed=args.seed, out=args.out,
                         images_dir=args.images, force=args.force)
    print("\n".join(report.lines()))
    root = args.out if args.out else args.path
    print(f"train with: --set data.root={root}   (data.train_split=train, data.val_split=val)")
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from rcnn.data.writing import convert_dataset

    start = time.perf_counter()
    report = convert_dataset(
        args.source,
        args.out,
        args.to,
        splits=args.split,
        link=args.link,
        images_dir=args.images,
        val_fraction=args.val_fraction,
        split_seed=args.seed,
        skip_broken=args.skip_broken,
        force=args.force,
    )
    print("\n".join(report.lines()))
    print(f"{'linked' if args.link else 'copied'} the images; done in {time.perf_counter() - start:.1f} s")
    return 0


def _split_arguments(parser: argparse.ArgumentParser, default_fraction: float | None) -> None:
    """``--val-fraction`` and ``--seed``: the split drawn on the fly (check, convert) or written (split)."""
    if default_fraction is None:
        help_text = "split the data set on the fly into train and val, this fraction for val (as data.val_fraction)"
    else:
        help_text = f"fraction of the images for val (default {default_fraction})"
    parser.add_argument(
        "--val-fraction", type=float_range(0.0, 1.0, low_open=True, high_open=True), default=default_fraction,
        help=help_text + " (between 0 and 1)",
    )
    parser.add_argument("--seed", type=int_range(0, MAX_SEED), default=0, help="seed of the split (default 0)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``rcnn data shapes``, ``check``, ``split`` and ``convert``."""
    parser = subparsers.add_parser(
        "data",
        help="make the synthetic shapes data set; check, split or convert a data set",
        description="Make the built-in synthetic shapes data set; validate and summarise a data set (COCO, VOC, "
        "LabelImg, YOLO, LabelMe, VIA, CVAT); write split files for one without; convert one to COCO, VOC or YOLO.",
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")

    shapes = actions.add_parser(
        "shapes",
        help="write the synthetic shapes data set (COCO layout)",
        description="Write ROOT/images/{train,val}/*.png and ROOT/annotations/instances_{train,val}.json. "
        "The same arguments give the same bytes.",
    )
    shapes.add_argument("root", help="output folder")
    shapes.add_argument("--train", type=int_range(0, MAX_SHAPES_IMAGES), default=400, help="training images (default 400)")
    shapes.add_argument("--val", type=int_range(0, MAX_SHAPES_IMAGES), default=100, help="validation images (default 100)")
    shapes.add_argument("--seed", type=int_range(0, MAX_SEED), default=0, help="random seed (default 0)")
    shapes.add_argument("--size", type=int_range(32, MAX_IMAGE_SIDE), default=128, help="image side in pixels (default 128)")
    shapes.add_argument("--max-objects", type=int_range(1, 100), default=5, help="objects per image at most (default 5)")
    shapes.add_argument(
        "--empty-fraction", type=float_range(0.0, 1.0), default=0.0, help="fraction of images without objects (default 0)"
    )
    shapes.set_defaults(func=_run_shapes)

    check = actions.add_parser(
        "check",
        help="validate a data set and print a summary",
        description="Validate a data set (COCO root or .json file, VOC root, LabelImg folder, YOLO folder, LabelMe "
        "folder, VIA .json, CVAT .xml; see docs/data.md) and print images, instances per class, box sizes, images "
        "without objects and every problem found. Exits with status 1 when there are errors.",
    )
    check.add_argument("path", help="data set folder or file")
    check.add_argument("--split", help="split to check (default: every split found; 'all' for a folder without splits)")
    check.add_argument("--images", help="images folder of a COCO .json file (default: found next to it)")
    reading = check.add_mutually_exclusive_group()
    reading.add_argument(
        "--quick", action="store_true",
        help="read each image's header only (its size; default: also its end, which finds a file cut short)",
    )
    reading.add_argument(
        "--decode", action="store_true",
        help="decode every pixel of every image (also finds corrupt data inside a file; slow on a large data set)",
    )
    check.add_argument(
        "--skip-broken", action="store_true",
        help="show unreadable images and annotations as the images a reader with skip_broken would leave out",
    )
    _split_arguments(check, default_fraction=None)
    anchors = check.add_argument_group("anchors")
    anchors.add_argument(
        "--suggest-anchors", action="store_true",
        help="suggest model.anchor_sizes and model.aspect_ratios for these boxes, after the model's rescaling",
    )
    side = int_range(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE)  # as model.min_size / model.max_size
    anchors.add_argument("--min-size", type=side, default=600, help="model.min_size the anchors are for (default 600)")
    anchors.add_argument("--max-size", type=side, default=1000, help="model.max_size the anchors are for (default 1000)")
    anchors.add_argument(
        "--levels", type=int_range(1, MAX_LEVELS), default=5,
        help="feature levels: 5 for an FPN backbone (one size per level), 1 for a single map (3 sizes); default 5",
    )
    check.set_defaults(func=_run_check)

    split = actions.add_parser(
        "split",
        help="write seeded, stratified train/val split files for a data set without them",
        description="Split the images of a LabelImg / YOLO / LabelMe / VIA / CVAT data set into train and val, "
        "stratified by class and seeded (the same seed gives the same files), and write train.txt and val.txt beside "
        "the data, or into --out DIR with an rcnn_dataset.json naming the data (then --set data.root=DIR).",
    )
    split.add_argument("path", help="data set folder or file")
    _split_arguments(split, default_fraction=0.2)
    split.add_argument("--out", help="folder for the split files (default: beside the data)")
    split.add_argument("--images", help="images folder, where it is not found by itself")
    split.add_argument("--force", action="store_true", help="replace existing split files with other contents")
    split.set_defaults(func=_run_split)

    convert = actions.add_parser(
        "convert",
        help="write a data set as COCO, VOC or YOLO",
        description="Read a data set in any format `rcnn data check` reads and write it as COCO "
        "(annotations/instances_{split}.json + images/{split}/), Pascal VOC (Annotations/, JPEGImages/, "
        "ImageSets/Main/) or YOLO (images/{split}/, labels/{split}/, data.yaml), so that other tools read what "
        "rcnn reads. Images are copied (or symlinked with --link).",
    )
    convert.add_argument("source", help="data set folder or file")
    convert.add_argument("out", help="output folder (new or empty)")
    convert.add_argument("--to", required=True, choices=("coco", "voc", "yolo"), help="output format")
    convert.add_argument("--split", action="append", help="split to convert (repeat for several; default: every split)")
    convert.add_argument("--images", help="images folder of the source, where it is not found by itself")
    convert.add_argument("--link", action="store_true", help="symlink the images instead of copying them")
    convert.add_argument("--skip-broken", action="store_true", help="leave out unreadable images and annotations")
    convert.add_argument("--force", action="store_true", help="write into an output folder that is not empty")
    _split_arguments(convert, default_fraction=None)
    convert.set_defaults(func=_run_convert)

    def _usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_usage)
