"""``rcnn export``: a trained detector as an ONNX file, pre- and post-processing included.

    rcnn export --weights runs/frcnn --format onnx --out frcnn.onnx [--input uint8|float]
"""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from rcnn.build import load_model
    from rcnn.export import export_onnx

    if args.format != "onnx":
        raise ValueError(f"--format {args.format}: only onnx is supported")
    loaded = load_model(args.weights, for_inference=False)  # unfolded BatchNorm: ONNX Runtime fuses it itself
    path = export_onnx(loaded.model, args.out, loaded.class_names, input_format=args.input,
                       example_size=tuple(args.example_size), categories=loaded.categories, config=loaded.config)  # fmt: skip
    print(json.dumps({"onnx": str(path), "model": type(loaded.model).name, "input": args.input,
                      "classes": len(loaded.class_names) - 1}))  # fmt: skip
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained detector to ONNX (pre- and post-processing inside)",
        description="Write one ONNX graph that takes an image of any size (uint8 [H, W, 3], or float [3, H, W] in "
        "0..1 with --input float; Fast R-CNN: and its proposals [P, 4]) and gives boxes, labels, scores (and masks) "
        "at the image's size. The class names are in the file's metadata. Run it with rcnn predict --backend "
        "onnxruntime --model FILE.",
    )
    parser.add_argument("--weights", required=True, help="run folder, step_* folder or model.safetensors")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="the format (onnx)")
    parser.add_argument("--out", required=True, help="file to write (.onnx)")
    parser.add_argument("--input", default="uint8", choices=["uint8", "float"], help="the image input's format")
    parser.add_argument("--example-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"),
                        help="size of the example image the capture runs on (any size works afterwards)")  # fmt: skip
    parser.set_defaults(func=run)
