"""Arguments and helpers shared by the sub-commands."""

from __future__ import annotations

import argparse

from rcnn.config import Config, load_config


def add_config_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--config", required=required, help="config YAML file, or the name of a packaged config (see configs/)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.lr=0.01 (repeatable)",
    )  # fmt: skip


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def add_backend_arguments(parser: argparse.ArgumentParser, *, weights_required: bool = False) -> None:
    """``--weights RUN | --model FILE.onnx``, ``--backend``, ``--threads`` (see :mod:`rcnn.backends`)."""
    parser.add_argument("--weights", required=weights_required,
                        help="checkpoint: run directory, step_* directory or model.safetensors")  # fmt: skip
    parser.add_argument("--model", dest="model_file", metavar="FILE.onnx",
                        help="an ONNX file from rcnn export, instead of --weights (runs in ONNX Runtime)")  # fmt: skip
    parser.add_argument(
        "--backend", choices=["eager", "onnxruntime"],
        help="run the model in PyTorch (eager; the default for --weights) or in ONNX Runtime (the default for "
        "--model; with --weights the run is exported once and cached beside its weights)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, help="CPU threads for inference (default: all cores)")
    add_precision_arguments(parser)


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """``--precision fp32|int8`` with int8's calibration (``--calibrate DATA``, ``--calibrate-images N``)."""
    parser.add_argument(
        "--precision", choices=["fp32", "int8"],
        help="int8: run an int8 graph in ONNX Runtime; a run folder is quantised once (calibrated on --calibrate, "
        "default the run's own training data) and cached beside its weights (default: fp32; an --model file as it is)",
    )  # fmt: skip
    parser.add_argument("--calibrate", metavar="DATA",
                        help="data set root or folder of images to calibrate --precision int8 on")  # fmt: skip
    parser.add_argument("--calibrate-images", type=int, default=200,
                        help="images to calibrate --precision int8 on (default 200)")  # fmt: skip


def precision_options(args: argparse.Namespace) -> dict:
    """The ``load_detector`` keywords of :func:`add_precision_arguments`."""
    return {"precision": args.precision, "calibrate": args.calibrate, "calibrate_images": args.calibrate_images}


def runs_in_onnxruntime(args: argparse.Namespace) -> bool:
    """Whether the backend arguments ask for ONNX Runtime (on the CPU, whatever the device)."""
    return args.backend == "onnxruntime" or bool(getattr(args, "model_file", None)) or args.precision == "int8"


def detector_from_args(args: argparse.Namespace, device: str = "cpu"):
    """The detector the backend arguments ask for (``rcnn.backends.load_detector``)."""
    from rcnn.backends import load_detector

    if args.weights is None and args.model_file is None:
        raise ValueError("give --weights RUN (a run folder) or --model FILE.onnx (from rcnn export)")
    if runs_in_onnxruntime(args) and device != "cpu" and not getattr(args, "cpu", False):
        device = "cpu"  # ONNX Runtime's CPU build; CUDA stays for the eager backend
    return load_detector(args.weights, model_file=args.model_file, backend=args.backend, device=device,
                         threads=args.threads, progress=True, **precision_options(args))  # fmt: skip
