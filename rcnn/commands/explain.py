"""``rcnn explain``: a trained detector on one image, stage by stage, as one HTML page.

    rcnn explain image.png --weights runs/frcnn --out explain_out [--gt annotations.json] [--score-thresh S]
    rcnn explain --weights runs/frcnn --data data/shapes --split val --index 3 --out explain_out

Besides the page, ``OUT/detections.json`` lists the final detections as ``rcnn predict``'s
``OUT/N.json`` does (the same record, the same values: explain runs the image through the same
predictor).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rcnn.commands.options import (
    add_force_argument,
    guard_output,
    int_range,
    is_our_png,
    is_prediction_record,
    score_threshold,
)

MAX_INDEX = 100_000_000  # --index: beyond any data set's size (the split's own size is checked when it is read)


def _is_page(path: Path) -> bool:
    """``explain.html`` of ``rcnn explain`` (it carries the generator tag)."""
    from rcnn.explain.report import GENERATOR

    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return GENERATOR in fh.read(4096)
    except OSError:
        return False


def _guard(out: Path, force: bool) -> None:
    """Refuse to write the page or its pictures over files in ``out`` that rcnn did not write."""
    guard_output(out / "explain.html", _is_page, "--out", "an explanation page", force)
    guard_output(out / "detections.json", is_prediction_record, "--out", "a predictions file", force)
    if out.is_dir():
        for picture in sorted(out.glob("[0-9][0-9]_*.png")):
            guard_output(picture, is_our_png, "--out", "a picture of an explanation", force)


def run(args: argparse.Namespace) -> int:
    import torch

    from rcnn.build import load_model
    from rcnn.explain import dataset_ground_truth, explain_model, load_ground_truth, write_page
    from rcnn.inference import Predictor, check_score_thresh, image_record
    from rcnn.io.files import write_json

    if (args.image is None) == (args.data is None):
        raise ValueError("give either an IMAGE file or --data ROOT [--split S] --index N (an image of a data set)")
    if args.data is not None and args.gt is not None:
        raise ValueError("--gt is for an IMAGE file; an image of --data brings its own annotation")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out: {args.out} is a file; give a folder")
    _guard(Path(args.out), args.force)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    loaded = load_model(args.weights, device)
    predictor, class_names = Predictor(loaded.model), loaded.class_names  # as rcnn predict runs it
    check_score_thresh(args.score_thresh, predictor.detector, "--score-thresh")
    gt = None
    if args.data is not None:
        from rcnn.data.reading import build_dataset

        dataset = build_dataset(args.data, args.split)
        path, gt = dataset_ground_truth(dataset, args.index, class_names)
    else:
        path = args.image
        if args.gt is not None:
            gt = load_ground_truth(args.gt, class_names, image_name=str(path))
    image = predictor.read(path)  # decoded as rcnn predict decodes it
    explanation = explain_model(predictor, image, class_names, gt=gt, score_thresh=args.score_thresh)
    page = write_page(explanation, args.out, title=Path(path).name)
    write_json(Path(args.out) / "detections.json", image_record(
        Path(path).name, Path(path).resolve(), 1, explanation.image_size, explanation.detections, class_names,
        explanation.score_thresh))  # fmt: skip
    print(f"{path}: {page}")
    print(json.dumps({"page": str(page), "gt_objects": None if gt is None else len(gt.boxes)}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="show a model's stages on one image (proposals, features, pooling, scores, NMS, masks) as an HTML page",
        description="Run a trained detector on one image stage by stage and write OUT/explain.html (self-contained: "
        "every picture embedded, opens offline), its pictures OUT/NN_<stage>.png and its final detections "
        "OUT/detections.json (rcnn predict's record: the same detections). With ground truth (--gt, or an "
        "image of --data) it also says at which stage each missed object was lost and what each false positive is.",
    )
    parser.add_argument("image", nargs="?", help="image file (or use --data/--split/--index)")
    parser.add_argument("--weights", required=True, help="checkpoint: run directory, step_* directory or model.safetensors")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--gt", help="ground truth of IMAGE: a COCO json (the image picked by its file name), a VOC xml, or a JSON "
        '{"boxes": [[x1, y1, x2, y2], ...], "labels": [class name or label, ...]}',
    )  # fmt: skip
    parser.add_argument("--data", help="a data set (COCO or VOC root, or COCO json) to take the image and its annotation from")
    parser.add_argument("--split", default="val", help="split of --data (default val)")
    parser.add_argument("--index", type=int_range(0, MAX_INDEX), default=0, help="image index in --data's split (default 0)")
    parser.add_argument(
        "--score-thresh", type=score_threshold,
        help="detections scoring at least this count as found, in [0, 1] (default 0.5; R-CNN: any number, default 0, "
        "its scores are SVM values)",
    )  # fmt: skip
    add_force_argument(parser)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.set_defaults(func=run)
