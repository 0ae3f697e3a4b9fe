"""``rcnn data``: make the synthetic shapes data set; check a COCO or VOC data set.

    rcnn data shapes ROOT --train 400 --val 100 --seed 0 --size 128
    rcnn data check PATH [--split SPLIT] [--images DIR] [--quick]
"""

from __future__ import annotations

import argparse
import time


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
    from rcnn.data.check import check_dataset, format_report

    reports = check_dataset(args.path, args.split, images_dir=args.images, decode_images=not args.quick)
    print(f"data set: {args.path}")
    print(format_report(reports))
    return 1 if any(r.errors for r in reports) else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``rcnn data shapes`` and ``rcnn data check``."""
    parser = subparsers.add_parser(
        "data",
        help="make the synthetic shapes data set; check a COCO or VOC data set",
        description="Make the built-in synthetic shapes data set, or validate and summarise a data set.",
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")

    shapes = actions.add_parser(
        "shapes",
        help="write the synthetic shapes data set (COCO layout)",
        description="Write ROOT/images/{train,val}/*.png and ROOT/annotations/instances_{train,val}.json. "
        "The same arguments give the same bytes.",
    )
    shapes.add_argument("root", help="output folder")
    shapes.add_argument("--train", type=int, default=400, help="training images (default 400)")
    shapes.add_argument("--val", type=int, default=100, help="validation images (default 100)")
    shapes.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    shapes.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    shapes.add_argument("--max-objects", type=int, default=5, help="objects per image at most (default 5)")
    shapes.add_argument(
        "--empty-fraction", type=float, default=0.0, help="fraction of images without objects (default 0)"
    )
    shapes.set_defaults(func=_run_shapes)

    check = actions.add_parser(
        "check",
        help="validate a COCO or VOC data set and print a summary",
        description="Validate a data set (COCO root, COCO .json file, or VOC root) and print images, "
        "instances per class, box sizes, images without objects and every problem found. "
        "Exits with status 1 when there are errors.",
    )
    check.add_argument("path", help="data set folder or COCO .json file")
    check.add_argument("--split", help="split to check (default: every split found)")
    check.add_argument("--images", help="images folder of a COCO .json file (default: found next to it)")
    check.add_argument("--quick", action="store_true", help="read image headers only instead of decoding every image")
    check.set_defaults(func=_run_check)

    def _usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_usage)
