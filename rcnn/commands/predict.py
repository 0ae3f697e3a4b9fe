"""``rcnn predict``: detect objects in image files; write pictures and JSON.

    rcnn predict --weights runs/frcnn/last image1.png image2.jpg --out predictions/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rcnn.commands.common import add_backend_arguments


def run(args: argparse.Namespace) -> int:
    import torch

    from rcnn.commands.common import detector_from_args
    from rcnn.inference import predict_images
    from rcnn.io.files import write_json
    from rcnn.viz import draw_detections

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model, config, class_names = detector_from_args(args, device)
    proposals = None
    if model.needs_proposals:
        from rcnn.components.proposals.selective_search import selective_search_file

        proposals = {str(Path(p)): selective_search_file(p) for p in args.images}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # R-CNN's scores are SVM decision values, positive on the object side: its own default
    threshold = args.score_thresh if args.score_thresh is not None else model.display_score_thresh
    for path, image, output in predict_images(model, args.images, proposals=proposals):
        keep = output["scores"] >= threshold
        kept = {k: v[keep] for k, v in output.items()}
        picture = draw_detections(image, kept, class_names, score_threshold=threshold)
        picture.save(out / f"{path.stem}.png")
        detections = [
            {"label": class_names[int(label)], "score": round(float(score), 4),
             "box": [round(float(v), 2) for v in box]}
            for box, label, score in zip(kept["boxes"], kept["labels"], kept["scores"])
        ]  # fmt: skip
        write_json(out / f"{path.stem}.json", {"image": str(path), "detections": detections})
        print(f"{path}: {len(detections)} detections -> {out / (path.stem + '.png')}")
    print(json.dumps({"images": len(args.images), "out": str(out)}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="detect objects in images; write pictures and JSON",
        description="Run a trained detector on image files. For each image, OUT/<name>.png shows the "
        "detections (boxes, classes, scores, masks) and OUT/<name>.json lists them in original pixel "
        "coordinates (x1, y1, x2, y2).",
    )
    parser.add_argument("images", nargs="+", help="image files")
    add_backend_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--score-thresh", type=float,
        help="draw and list detections scoring at least this (default 0.5; 0 for R-CNN, whose scores are SVM values)",
    )  # fmt: skip
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.set_defaults(func=run)
