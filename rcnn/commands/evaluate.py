"""``rcnn evaluate``: COCO box (and mask) AP and VOC mAP of a trained model on a data set split.

    rcnn evaluate --weights runs/frcnn/last [--data PATH] [--split val] [--out metrics.json]
                  [--coco-evaluator pycocotools|faster-coco-eval]

The detections are streamed image by image to the metrics (COCO's on disk), in bounded memory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rcnn.commands.options import (
    add_backend_arguments,
    add_config_arguments,
    add_force_argument,
    guard_output,
    guard_outputs,
    int_range,
    is_metrics,
    is_our_png,
    score_threshold,
    small_json,
)

MAX_WORST = 1000  # images in the --analysis gallery (one picture of them all)
# --coco-evaluator: rcnn.evaluation.coco.BACKENDS (named here: the command line starts without pycocotools)
COCO_EVALUATORS = ("pycocotools", "faster-coco-eval")
# What ``--analysis DIR`` writes (rcnn.evaluation.analysis.analyse); the folder is rcnn's when its
# analysis.json is (the plots are matplotlib's, unmarked).
ANALYSIS_FILES = ("pr_curves.png", "confusion_matrix.png", "confusion_matrix.csv", "tide.png", "worst_images.png",
                  "analysis.json", "summary.txt")  # fmt: skip


def _is_analysis(path: Path) -> bool:
    """``analysis.json`` of ``rcnn evaluate --analysis``."""
    data = small_json(path)
    return isinstance(data, dict) and {"tide", "confusion_matrix", "worst_images"} <= data.keys()


def _guard(args: argparse.Namespace) -> None:
    """Refuse, before the evaluation runs, to write over files in the way that rcnn did not write."""
    if args.out:
        guard_output(args.out, is_metrics, "--out", "a metrics file", args.force)
    if args.analysis is not None:
        folder = Path(args.analysis)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--analysis: {folder} is a file; give a folder")
        guard_output(folder / "analysis.json", _is_analysis, "--analysis", "an error analysis", args.force)
        ours = (folder / "analysis.json").is_file() and _is_analysis(folder / "analysis.json")
        guard_outputs([(folder / name, lambda p: ours or (p.suffix == ".png" and is_our_png(p)),
                        "a file of an error analysis") for name in ANALYSIS_FILES], "--analysis", args.force)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import yaml

    from rcnn.commands.options import detector_from_args
    from rcnn.config import apply_overrides, config_from_dict, config_to_yaml, load_config
    from rcnn.data.reading import build_dataset
    from rcnn.evaluation.coco import check_backend
    from rcnn.inference import Predictor, check_score_thresh, evaluate_model
    from rcnn.io.checkpoints import find_checkpoint
    from rcnn.io.files import write_json
    from rcnn.components.proposals.io import proposal_source

    _guard(args)
    check_backend(args.coco_evaluator, "--coco-evaluator")  # installed, before the model loads
    loaded = detector_from_args(args)
    config, class_names = loaded.config, loaded.class_names
    check_score_thresh(args.score_thresh, loaded.model, "--score-thresh")
    if args.config is not None or args.overrides:  # data settings from another config / --set
        base = args.config or (find_checkpoint(args.weights) / "config.yaml" if args.weights else None)
        if base is None and config is None:
            raise ValueError(f"--set needs --config: {args.model_file} carries no config")
        if base is not None:
            config = load_config(base, args.overrides)
        else:  # the ONNX file's own config, with --set applied
            data = apply_overrides(yaml.safe_load(config_to_yaml(config)), args.overrides)
            config = config_from_dict(data, f"{args.model_file} (with --set overrides)")
    if config is None and (args.data is None or args.split is None):
        raise ValueError(f"{args.model_file} carries no config (exported by an older rcnn): give --data and --split")
    data_root = args.data or config.data.root
    split = args.split or config.data.val_split
    reader_options = config.data.reader_options() if config is not None else {}
    proposals_file = args.proposals or (config.data.proposals_val if config is not None else None)
    predictor = Predictor(loaded.model, proposals=proposal_source(proposals_file) if proposals_file else None)
    detector = predictor.detector
    dataset = build_dataset(data_root, split, with_masks=detector.predicts_masks, **reader_options)
    metrics = evaluate_model(predictor, dataset, limit=args.limit, progress=True, class_names=class_names,
                             keep_outputs=args.analysis is not None, coco_backend=args.coco_evaluator)  # fmt: skip
    outputs = metrics.pop("outputs", None)
    print(metrics.pop("summary", ""))
    if metrics.get("classes_dropped"):
        print(f"the model's classes absent from the data set (their detections not scored): {metrics['classes_dropped']}")
    print(f"VOC mAP@0.5 (area): {metrics['voc']['mAP']:.4f}   seconds/image: {metrics['seconds_per_image']:.3f}")
    if args.analysis is not None:
        from rcnn.evaluation.analysis import analyse

        threshold = args.score_thresh if args.score_thresh is not None else detector.display_score_thresh
        report = analyse(outputs, dataset, args.analysis, image_ids=list(outputs), score_thresh=threshold, worst=args.worst)
        print(report["summary"])
        metrics["analysis"] = {k: report[k] for k in ("tide", "worst_images")}
    if args.out:
        out = Path(args.out)
        write_json(out, metrics)
        print(f"metrics written to {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="COCO AP and VOC mAP of a trained model",
        description="Evaluate a checkpoint (its run directory, step directory or model.safetensors) on a "
        "data set split: COCO box AP (and mask AP for Mask R-CNN) through pycocotools, and VOC mAP@0.5. "
        "The detections are streamed to disk image by image (bounded memory).",
    )
    add_backend_arguments(parser)
    add_config_arguments(parser, required=False)
    parser.add_argument("--data", help="data set path (default: the config's data.root)")
    parser.add_argument("--split", help="split to evaluate (default: the config's data.val_split)")
    parser.add_argument("--proposals", help="proposals file for Fast R-CNN / R-CNN (default: data.proposals_val)")
    parser.add_argument("--limit", type=int_range(1), help="evaluate only the first N images (N >= 1)")
    parser.add_argument("--coco-evaluator", choices=COCO_EVALUATORS, default="pycocotools",
                        help="who scores COCO AP: pycocotools (default: its own numbers, a chunk of images at a time) "
                        "or faster-coco-eval (its C++ evaluation: the same numbers, faster, all detections in memory "
                        "while scoring; pip install faster-coco-eval)")  # fmt: skip
    parser.add_argument("--out", help="write all metrics to this JSON file (an existing file is replaced only if it "
                        "is a metrics file)")  # fmt: skip
    parser.add_argument("--analysis", metavar="DIR", help="write the error analysis into DIR: PR curves, confusion "
                        "matrix, TIDE breakdown, worst images (see docs/evaluation.md)")  # fmt: skip
    parser.add_argument("--score-thresh", type=score_threshold, help="with --analysis: the confusion matrix's and the "
                        "gallery's score threshold, in [0, 1] (default 0.5; R-CNN: any number, default 0)")  # fmt: skip
    parser.add_argument("--worst", type=int_range(0, MAX_WORST), default=8,
                        help=f"with --analysis: images in the gallery, 0..{MAX_WORST} (default 8)")  # fmt: skip
    add_force_argument(parser)
    parser.set_defaults(func=run)
