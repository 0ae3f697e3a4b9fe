"""``rcnn proposals``: compute, inspect and convert region proposal files (docs/proposals.md).

    rcnn proposals selective-search DATASET --split train --out FILE [--mode fast|quality]
        [--max-proposals 2000] [--min-size 4] [--max-side 500] [--workers 2]
    rcnn proposals stats FILE [--dataset DATASET --split val]
    rcnn proposals convert SOURCE --out FILE [--method NAME]
"""

from __future__ import annotations

import argparse
import json
import time

from rcnn.commands.options import add_force_argument, float_range, guard_output, int_range

MAX_PROPOSALS = 100_000  # boxes per image: selective search's quality mode gives ~10k
MAX_REGION_SIDE = 4096.0  # --min-size: a box side in pixels (the largest image side a model takes)
MAX_SEARCH_SIDE = 8192  # --max-side: selective search's time grows with the pixels
MAX_SEARCH_WORKERS = 256


def _run_selective_search(args: argparse.Namespace) -> int:
    from rcnn.data import build_dataset
    from rcnn.components.proposals.selective_search import SelectiveSearch, ensure_dataset_proposals

    dataset = build_dataset(args.dataset, args.split, images_dir=args.images)
    search = SelectiveSearch(
        mode=args.mode,
        max_proposals=args.max_proposals,
        min_size=args.min_size,
        max_side=args.max_side if args.max_side > 0 else None,
    )
    start = time.perf_counter()
    proposals = ensure_dataset_proposals(dataset, args.out, search, workers=args.workers, progress=not args.quiet)
    elapsed = time.perf_counter() - start
    counts = [proposals[i].shape[0] for i in dataset.image_ids]
    print(
        f"{args.out}: {len(counts)} images, {sum(counts) / max(len(counts), 1):.0f} boxes per image "
        f"(selective search {args.mode}, max {args.max_proposals}), {elapsed:.1f} s"
    )
    return 0


def _run_stats(args: argparse.Namespace) -> int:
    from rcnn.components.proposals.io import load_proposals, proposal_stats

    proposals = load_proposals(args.file)
    dataset = None
    if args.dataset:
        from rcnn.data import build_dataset

        dataset = build_dataset(args.dataset, args.split, images_dir=args.images)
    stats = proposal_stats(proposals, dataset)
    per_image = stats["boxes_per_image"]
    print(f"file: {args.file}")
    print(f"settings: {json.dumps(stats['settings'], sort_keys=True) if stats['settings'] else '(none recorded)'}")
    print(
        f"images: {stats['images']}   boxes per image: min {per_image['min']}, mean {per_image['mean']:.1f}, "
        f"median {per_image['median']:.0f}, max {per_image['max']}"
    )
    if dataset is not None:
        recall = "   ".join(f"recall@{t:g} {r:.3f}" for t, r in stats["recall"].items())
        print(f"ground-truth boxes: {stats['gt_boxes']}   {recall}   mean best IoU {stats['mean_best_iou']:.3f}")
    return 0


def _is_proposals(path) -> bool:  # noqa: ANN001
    from rcnn.components.proposals.io import load_proposals

    try:
        load_proposals(path)
    except (ValueError, OSError):
        return False
    return path.suffix.lower() == ".safetensors"


def _run_convert(args: argparse.Namespace) -> int:
    from rcnn.components.proposals.io import convert_proposals, load_proposals

    guard_output(args.out, _is_proposals, "--out", "a proposals file", args.force)
    settings = {"method": args.method} if args.method else None
    out = convert_proposals(args.source, args.out, settings)
    print(f"{out}: {len(load_proposals(out))} images")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``rcnn proposals selective-search | stats | convert``."""
    parser = subparsers.add_parser(
        "proposals",
        help="compute (selective search), inspect and convert region proposal files",
        description="Region proposals for R-CNN and Fast R-CNN: one file per data set split "
        "(see docs/proposals.md).",
    )
    actions = parser.add_subparsers(dest="proposals_command", metavar="ACTION")

    search = actions.add_parser(
        "selective-search",
        help="run selective search over a data set split into a proposals file",
        description="Run OpenCV's selective search on every image of a data set split, in worker "
        "processes, into one proposals file. The file is a cache: a rerun with the same settings "
        "reads it, an interrupted run resumes, other settings are refused (choose another --out).",
    )
    search.add_argument("dataset", help="data set folder (COCO root, VOC root) or COCO .json file")
    search.add_argument("--split", default="train", help="split (default train)")
    search.add_argument("--images", help="images folder of a COCO .json file (default: found next to it)")
    search.add_argument("--out", required=True, help="proposals file to write (.safetensors)")
    search.add_argument("--mode", choices=("fast", "quality"), default="fast", help="strategy set (default fast, as R-CNN)")
    search.add_argument("--max-proposals", type=int_range(1, MAX_PROPOSALS), default=2000,
                        help=f"boxes per image at most, 1..{MAX_PROPOSALS} (default 2000)")  # fmt: skip
    search.add_argument("--min-size", type=float_range(0.0, MAX_REGION_SIDE), default=4.0,
                        help="drop boxes smaller than this, px (default 4)")  # fmt: skip
    search.add_argument(
        "--max-side", type=int_range(32, MAX_SEARCH_SIDE, special={0: "never"}), default=500,
        help=f"shrink larger images to this longer side first, 32..{MAX_SEARCH_SIDE} (default 500; 0: never)",
    )  # fmt: skip
    search.add_argument("--workers", type=int_range(0, MAX_SEARCH_WORKERS), default=2,
                        help="worker processes (default 2; 0: in this process)")  # fmt: skip
    search.add_argument("--quiet", action="store_true", help="no progress bar")
    search.set_defaults(func=_run_selective_search)

    stats = actions.add_parser(
        "stats",
        help="boxes per image and recall of a data set's objects",
        description="Print the settings and boxes per image of a proposals file and, with --dataset, "
        "the recall of the split's ground-truth boxes at IoU 0.5 and 0.7.",
    )
    stats.add_argument("file", help="proposals file (.safetensors, .json or .npz)")
    stats.add_argument("--dataset", help="data set whose ground truth to measure recall against")
    stats.add_argument("--split", default="val", help="split of --dataset (default val)")
    stats.add_argument("--images", help="images folder of a COCO .json file (default: found next to it)")
    stats.set_defaults(func=_run_stats)

    convert = actions.add_parser(
        "convert",
        help="convert a .json or .npz proposals file to the library's .safetensors format",
        description='Read {"<image_id>": [[x1, y1, x2, y2], ...]} (.json) or boxes/<image_id> arrays '
        "(.npz), validate every box and write a .safetensors proposals file.",
    )
    convert.add_argument("source", help="proposals file to read")
    convert.add_argument("--out", required=True, help=".safetensors file to write")
    convert.add_argument("--method", help="record this method name in the file's settings")
    add_force_argument(convert)
    convert.set_defaults(func=_run_convert)

    def _usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_usage)
