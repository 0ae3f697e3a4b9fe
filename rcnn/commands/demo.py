"""``rcnn demo``: the whole pipeline offline in a few minutes on a CPU.

Generates the synthetic shapes data set (if absent), trains a detector on it from scratch,
evaluates it on the validation split (COCO AP, VOC mAP) and draws its predictions on validation
images next to the ground truth.

    rcnn demo [--model faster_rcnn|mask_rcnn|fast_rcnn|rcnn] [--out demo_out] [--iterations N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rcnn.config import SHAPES_CONFIGS


def run(args: argparse.Namespace) -> int:
    from rcnn.build import load_model, model_class
    from rcnn.config import load_config
    from rcnn.io.files import write_json
    from rcnn.components.proposals.io import proposal_source
    from rcnn.training.folder import draw_val_predictions
    from rcnn.training.run import prepare_data, run_training

    out = Path(args.out)
    overrides = [f"data.root={out / 'shapes'}", *args.overrides]
    if args.iterations:
        overrides.append(f"train.iterations={args.iterations}")
    config = load_config(SHAPES_CONFIGS[args.model], overrides)
    if model_class(config.model.name).needs_proposals:
        # selective search proposals: computed by run_training on the first run, then read from here
        config.data.proposals_train = str(out / f"selective_search_{config.data.train_split}.safetensors")
        config.data.proposals_val = str(out / f"selective_search_{config.data.val_split}.safetensors")
    start = time.perf_counter()
    summary = run_training(config, out / "run", resume=args.resume, overwrite=not args.resume)  # a demo starts over
    summary["total_seconds"] = time.perf_counter() - start

    # pictures: predictions beside the ground truth on the first validation images
    loaded = load_model(out / "run")
    model, config, class_names = loaded.model, loaded.config, loaded.class_names
    data = prepare_data(config, need_train=False)
    proposals = proposal_source(config.data.proposals_val) if config.data.proposals_val else None
    picture = draw_val_predictions(model, data.val, class_names, out / "predictions.png", count=args.pictures,
                                   proposals=proposals)  # fmt: skip
    summary["pictures"] = str(picture)
    write_json(out / "summary.json", summary)

    metrics = summary["metrics"]
    lines = [
        f"model: {summary['model']} ({summary['backbone']} backbone), {summary['iterations']} iterations "
        f"in {summary['train_seconds']:.0f} s",
        f"box AP {metrics['bbox']['AP']:.3f}   AP@0.5 {metrics['bbox']['AP50']:.3f}   "
        f"VOC mAP {metrics['voc']['mAP']:.3f}   {1000 * metrics['seconds_per_image']:.1f} ms/image",
    ]
    if "segm" in metrics:
        lines.append(f"mask AP {metrics['segm']['AP']:.3f}   AP@0.5 {metrics['segm']['AP50']:.3f}")
    lines.append(f"pictures (left: ground truth, right: predictions): {picture}")
    lines.append(f"summary: {out / 'summary.json'}   checkpoint: {summary['checkpoint']}")
    print("\n".join(lines))
    print(json.dumps({"AP50": round(metrics["bbox"]["AP50"], 4)}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train and evaluate on the built-in shapes data, draw predictions (offline, CPU)",
        description="Generate the shapes data set, train a detector on it from scratch, evaluate it and "
        "write pictures of its predictions. Runs offline on a CPU in minutes.",
    )
    parser.add_argument("--model", choices=sorted(SHAPES_CONFIGS), default="faster_rcnn", help="which generation")
    parser.add_argument("--out", default="demo_out", help="output folder (data, run, pictures, summary)")
    parser.add_argument("--iterations", type=int, help="training iterations (default: the demo config's)")
    parser.add_argument("--pictures", type=int, default=8, help="validation images to draw")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted demo run")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    parser.set_defaults(func=run)
