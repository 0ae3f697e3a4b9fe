"""``rcnn export``: a trained detector as an ONNX file (or an OpenVINO IR), pre- and post-processing included.

    rcnn export --weights runs/frcnn --format onnx --out frcnn.onnx [--input uint8|float]
    rcnn export --weights runs/frcnn --format openvino --out frcnn.xml      # frcnn.xml + frcnn.bin
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from rcnn.commands.options import (
    MAX_CALIBRATION_IMAGES,
    add_force_argument,
    float_range,
    guard_output,
    int_range,
    is_our_onnx,
)
from rcnn.components.settings import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE

FORMATS = ("onnx", "openvino")


def _is_our_ir(path: Path) -> bool:
    from rcnn.deploy.openvino import is_our_ir

    return is_our_ir(path)


def _guard(args: argparse.Namespace) -> tuple[Path, Path]:
    """The file the graph goes to and the float graph's (an int8 export writes both), refused before
    any work where a file in the way is not one that rcnn wrote."""
    out = Path(args.out)
    if args.format == "openvino" and out.suffix != ".xml":  # OpenVINO reads the weights from NAME.bin beside NAME.xml
        raise ValueError(f"--out {out}: --format openvino writes a .xml file (and the .bin of its weights beside it)")
    float_path = out.with_name(out.stem + ("-fp32.xml" if args.format == "openvino" else "-fp32.onnx")) if args.int8 else out
    for path in dict.fromkeys([out, float_path]):
        if args.format == "openvino":
            for part in (path, path.with_suffix(".bin")):
                guard_output(part, _is_our_ir, "--out", "an OpenVINO IR", args.force)
        else:
            guard_output(path, is_our_onnx, "--out", "an ONNX file", args.force)
    return out, float_path


def run(args: argparse.Namespace) -> int:
    from rcnn.build import load_model
    from rcnn.deploy.export import ExportError, export_onnx

    if args.int8 and not args.calibrate:
        raise ValueError("--int8 needs --calibrate DATA: the activations' ranges come from images like the model's own")
    if args.calibrate and not args.int8:
        raise ValueError("--calibrate is for --int8")
    out, float_path = _guard(args)
    loaded = load_model(args.weights, for_inference=False)  # unfolded BatchNorm: the runtimes fuse it themselves
    with tempfile.TemporaryDirectory(prefix="rcnn-export-") as tmp:
        # an IR is converted from the ONNX graph, made in a temporary folder
        onnx_float = float_path if args.format == "onnx" else Path(tmp) / "model.onnx"
        try:
            export_onnx(loaded.model, onnx_float, loaded.class_names, input_format=args.input,
                        example_size=tuple(args.example_size), categories=loaded.categories, config=loaded.config,
                        log_beside=out)  # fmt: skip
        except ExportError as exc:  # the exporter's own failure: one line, its log beside --out
            print(f"rcnn export: error: {args.weights}: {exc}", file=sys.stderr)
            return 1
        summary = {args.format: str(float_path), "model": type(loaded.model).name, "input": args.input,
                   "classes": len(loaded.class_names) - 1}  # fmt: skip
        onnx_out = onnx_float
        if args.int8:
            from rcnn.deploy.quantize import calibration_images, quantize_onnx

            images = calibration_images(args.calibrate, args.split, args.calibrate_images, loaded.config)
            onnx_out = out if args.format == "onnx" else Path(tmp) / "model-int8.onnx"
            quantize_onnx(onnx_float, onnx_out, images, fc=args.int8_fc, method=args.calibration_method,
                          percentile=args.percentile, keep_float=args.keep_float)  # fmt: skip
            summary.update({args.format: str(out), "fp32": str(float_path), "precision": "int8",
                            "calibration_images": args.calibrate_images, "calibration_method": args.calibration_method})  # fmt: skip
        if args.format == "openvino":
            from rcnn.deploy.openvino import export_openvino

            export_openvino(onnx_float, float_path)
            if args.int8:
                export_openvino(onnx_out, out)
            summary["bin"] = str(out.with_suffix(".bin"))
    print(json.dumps(summary))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from rcnn.deploy.quantize import CALIBRATION_METHODS, DEFAULT_METHOD, KEEP_FLOAT

    parser = subparsers.add_parser(
        "export",
        help="export a trained detector to ONNX or OpenVINO IR (pre- and post-processing inside)",
        description="Write one graph that takes an image of any size (uint8 [H, W, 3], or float [3, H, W] in 0..1 "
        "with --input float; Fast R-CNN: and its proposals [P, 4]) and gives boxes, labels, scores (and masks) at the "
        "image's size: an ONNX file (--format onnx) or OpenVINO's IR, FILE.xml and FILE.bin (--format openvino), for "
        "deploying without Python. The class names are in the file's metadata. Run it with rcnn predict --model FILE "
        "(ONNX Runtime for .onnx, OpenVINO for .xml; --backend openvino runs an .onnx file in OpenVINO). Where the "
        "exporter fails, its full log is written to OUT.log.",
    )
    parser.add_argument("--weights", required=True, help="run folder, step_* folder or model.safetensors")
    parser.add_argument("--format", default="onnx", choices=FORMATS, help="onnx (default) or openvino (IR: .xml + .bin)")
    parser.add_argument("--out", required=True, help="file to write (.onnx; .xml for --format openvino)")
    parser.add_argument("--input", default="uint8", choices=["uint8", "float"], help="the image input's format")
    parser.add_argument("--example-size", type=int_range(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE), nargs=2, default=(480, 640),
                        metavar=("H", "W"), help="size of the example image the capture runs on, each side "
                        f"{MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE} (any size works afterwards)")  # fmt: skip
    parser.add_argument("--int8", action="store_true",
                        help="also quantise to int8 (static, per-channel weights; the convolutions): --out gets the "
                        "int8 graph, OUT-fp32.onnx (OUT-fp32.xml) the float one")
    parser.add_argument("--calibrate", metavar="DATA", help="data set root (or a folder of images) to calibrate int8 on")
    parser.add_argument("--split", help="split of --calibrate to use (default: the run's train split)")
    parser.add_argument("--calibrate-images", type=int_range(1, MAX_CALIBRATION_IMAGES), default=200,
                        help="images to calibrate on (default 200)")  # fmt: skip
    parser.add_argument("--int8-fc", action="store_true", help="quantise the fully connected box head too")
    parser.add_argument("--calibration-method", default=DEFAULT_METHOD, choices=CALIBRATION_METHODS,
                        help=f"how each activation's int8 range is set from the calibration images (default {DEFAULT_METHOD})")
    parser.add_argument("--percentile", type=float_range(0.0, 100.0, low_open=True), default=99.999,
                        help="the percentile of --calibration-method percentile, in (0, 100] (default 99.999)")
    parser.add_argument("--keep-float", nargs="*", metavar="MODULE", default=None,
                        help="module paths or glob patterns whose layers stay float (default: "
                        f"{' '.join(KEEP_FLOAT)} where the model has it; --keep-float alone: none)")
    add_force_argument(parser)
    parser.set_defaults(func=run)
