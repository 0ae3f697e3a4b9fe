"""Arguments and helpers shared by the sub-commands.

Every numeric option has a range, checked when the command line is parsed: its ``type=`` is one of
:func:`int_range` / :func:`float_range`, which refuse NaN, infinities and values out of range with
argparse's one line naming the option (``rcnn predict: error: argument --overlap: expected a number
in [0, 0.9], got 0.999``) and exit status 2.

Every output file a command writes where a user's file may lie goes through
:func:`guard_output`: an existing file is overwritten only if it is one that rcnn wrote (a COCO
results list, a predictions record, a metrics file, ...) or with ``--force``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: it imports the models (seconds), which most commands' parsers never need
    from rcnn.config import Config

# Bounds shared by several commands (each with its reason).
MAX_THREADS = 1024  # CPU threads: beyond any machine's cores
MAX_CALIBRATION_IMAGES = 100_000  # int8 calibration: a few hundred images suffice (docs/export.md)


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class _Range:
    """An argparse ``type=``: the text as an int or a finite float within bounds, else an
    ``ArgumentTypeError`` that argparse reports naming the option."""

    def __init__(self, kind: type, low: float | None, high: float | None, *, low_open: bool = False,
                 high_open: bool = False, special: dict[int, str] | None = None) -> None:  # fmt: skip
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.special = special or {}  # values allowed outside the range, with their meaning (0: no limit)
        self.__name__ = "integer" if kind is int else "number"  # argparse's name for the type

    def describe(self) -> str:
        noun = "a whole number" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            if self.kind is int:
                text = f"{noun} in {_number(self.low)}..{_number(self.high)}"
            else:
                text = f"{noun} in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{noun} {'>' if self.low_open else '>='} {_number(self.low)}"
        elif self.high is not None:
            text = f"{noun} {'<' if self.high_open else '<='} {_number(self.high)}"
        else:
            text = f"a finite {'whole ' if self.kind is int else ''}number"
        extras = ", ".join(f"or {k} ({meaning})" for k, meaning in self.special.items())
        return f"{text}{', ' + extras if extras else ''}"

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        if self.kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r} (NaN and infinities are refused)")
        if value in self.special:
            return value
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text}")
        return value

    def __repr__(self) -> str:  # argparse's fallback name of a type
        return self.describe()


def int_range(low: int | None = None, high: int | None = None, *, special: dict[int, str] | None = None) -> _Range:
    """An argparse ``type=`` for a whole number in ``low..high`` (``special``: values allowed
    besides, e.g. ``{0: "no limit"}``)."""
    return _Range(int, low, high, special=special)


def float_range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False) -> _Range:  # fmt: skip
    """An argparse ``type=`` for a finite number in ``[low, high]`` (``low_open``/``high_open``:
    the bound itself excluded); NaN and infinities are always refused."""
    return _Range(float, low, high, low_open=low_open, high_open=high_open)


# A score threshold: any finite number here; the range a model's scores have (probabilities in
# [0, 1]; R-CNN's SVM margins unbounded) is checked once the model is known
# (:func:`rcnn.inference.check_score_thresh`).
score_threshold = float_range()


# -- output files --------------------------------------------------------------------------------
def _json_prefix(path: Path, size: int = 4096) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read(size).decode("utf-8", errors="replace").lstrip()
    except OSError:
        return ""


def small_json(path: Path, limit: int = 64 << 20) -> object:
    """The JSON in ``path`` (None if it is larger than ``limit`` bytes or not JSON)."""
    try:
        if path.stat().st_size > limit:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_coco_results(path: Path) -> bool:
    """A COCO results file: a JSON list of detections (``image_id``, ``category_id``, ``score``, ...),
    as ``rcnn predict --coco-results`` writes; a ground-truth file is an object with ``images``."""
    head = _json_prefix(path)
    if not head.startswith("["):
        return False
    rest = head[1:].lstrip()
    return rest.startswith("]") or (rest.startswith("{") and '"image_id"' in rest and '"category_id"' in rest)


def is_prediction_record(path: Path) -> bool:
    """``OUT/N.json`` of ``rcnn predict``: ``{"image", "source", ..., "detections"}``."""
    data = small_json(path)
    return isinstance(data, dict) and {"image", "source", "detections"} <= data.keys()


def is_video_records(path: Path) -> bool:
    """``OUT/N.jsonl`` of ``rcnn predict`` on a video: one ``{"video", "frame", "detections"}`` per line."""
    lines = _json_prefix(path, 1 << 20).splitlines()
    if not lines:
        return path.stat().st_size == 0 if path.is_file() else False
    try:
        first = json.loads(lines[0])
    except ValueError:
        return False
    return isinstance(first, dict) and {"video", "frame", "detections"} <= first.keys()


def is_images_list(path: Path) -> bool:
    """``OUT/images.json`` of ``rcnn predict --coco-results``: ``{"images", "categories"}``, no annotations."""
    data = small_json(path)
    return isinstance(data, dict) and set(data) == {"images", "categories"}


def is_metrics(path: Path) -> bool:
    """``rcnn evaluate --out``: the metrics object (``bbox`` and ``voc`` among its keys)."""
    data = small_json(path)
    return isinstance(data, dict) and {"bbox", "voc"} <= data.keys()


def is_our_png(path: Path) -> bool:
    """A picture rcnn drew (:func:`rcnn.viz.save_png` marks it)."""
    from rcnn.viz import is_rcnn_png

    return is_rcnn_png(path)


def is_our_onnx(path: Path) -> bool:
    """An ONNX file of ``rcnn export`` (its metadata says so)."""
    from rcnn.deploy.export import onnx_metadata

    try:
        return bool(onnx_metadata(path))
    except (ValueError, OSError):
        return False


def guard_output(path: str | Path, ours: Callable[[Path], bool], option: str, what: str, force: bool = False) -> None:
    """Refuse (``ValueError``, one line naming ``option`` and the file) to write ``path`` over an
    existing file that ``ours`` does not recognise as ``what`` written by rcnn, unless ``force``."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir():
        raise ValueError(f"{option}: {path} is a folder; give a file name")
    if force or ours(path):
        return
    raise ValueError(f"{option}: {path} exists and is not {what} written by rcnn (it may be your own data: it is "
                     "left as it is); choose another name, or give --force to overwrite it")  # fmt: skip


def guard_outputs(files: Iterable[tuple[Path, Callable[[Path], bool], str]], option: str, force: bool = False) -> None:
    """:func:`guard_output` for each ``(path, ours, what)``."""
    for path, ours, what in files:
        guard_output(path, ours, option, what, force)


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    """``--force``: write over existing files that rcnn did not write."""
    parser.add_argument("--force", action="store_true",
                        help="overwrite output files even where a file that rcnn did not write is in the way "
                        "(default: refuse, naming it)")  # fmt: skip


def add_config_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--config", required=required, help="config YAML file, or the name of a packaged config (see configs/)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.lr=0.01 (repeatable)",
    )  # fmt: skip


def config_from_args(args: argparse.Namespace) -> Config:
    from rcnn.config import load_config

    return load_config(args.config, args.overrides)


BACKEND_CHOICES = ("auto", "eager", "onnxruntime", "openvino")  # rcnn.deploy.backends.BACKEND_CHOICES
BACKEND_ENV = "RCNN_BACKEND"  # the default --backend of a run folder in fp32 (auto where it is not set)
PRECISION_CHOICES = ("fp32", "bf16", "int8")  # rcnn.deploy.backends.PRECISIONS


def add_backend_arguments(parser: argparse.ArgumentParser, *, weights_required: bool = False) -> None:
    """``--weights RUN | --model FILE``, ``--backend``, ``--threads`` (see :mod:`rcnn.deploy.backends`)."""
    parser.add_argument("--weights", required=weights_required,
                        help="checkpoint: run directory, step_* directory or model.safetensors")  # fmt: skip
    parser.add_argument("--model", dest="model_file", metavar="FILE",
                        help="an exported file instead of --weights: an ONNX file from rcnn export (runs in ONNX "
                        "Runtime, or OpenVINO with --backend openvino) or an OpenVINO IR .xml from rcnn export "
                        "--format openvino")  # fmt: skip
    add_backend_argument(parser)
    parser.add_argument("--threads", type=int_range(1, MAX_THREADS), help="CPU threads for inference (default: all cores)")
    add_precision_arguments(parser)


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """``--backend auto|eager|onnxruntime|openvino``."""
    parser.add_argument(
        "--backend", choices=BACKEND_CHOICES,
        help="who runs the model: PyTorch (eager), ONNX Runtime or OpenVINO (with --weights the run is exported once "
        "and cached beside its weights), or auto: the fastest of them on this CPU, timed on first use and remembered "
        f"(default: auto for --weights in fp32, eager on CUDA; ${BACKEND_ENV} sets another; the file's runtime for "
        "--model, the precision's for --precision bf16 or int8)",
    )  # fmt: skip


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """``--precision fp32|bf16|int8`` with int8's calibration (``--calibrate DATA``, ``--calibrate-images N``)."""
    parser.add_argument(
        "--precision", choices=PRECISION_CHOICES,
        help="bf16: run the fp32 graph in OpenVINO with bf16 arithmetic (CPUs with AVX-512 BF16 or AMX); int8: run an "
        "int8 graph in ONNX Runtime (or OpenVINO with --backend openvino); a run folder is quantised once (calibrated "
        "on --calibrate, default the run's own training data) and cached beside its weights (default: fp32; an "
        "--model file as it is)",
    )  # fmt: skip
    parser.add_argument("--calibrate", metavar="DATA",
                        help="data set root or folder of images to calibrate --precision int8 on")  # fmt: skip
    parser.add_argument("--calibrate-images", type=int_range(1, MAX_CALIBRATION_IMAGES), default=200,
                        help="images to calibrate --precision int8 on (default 200)")  # fmt: skip


def precision_options(args: argparse.Namespace) -> dict:
    """The ``load_detector`` keywords of :func:`add_precision_arguments`."""
    return {"precision": args.precision, "calibrate": args.calibrate, "calibrate_images": args.calibrate_images}


def default_backend(backend: str | None, *, model_file: str | None = None, precision: str | None = None) -> str | None:
    """The backend a command runs a model with: ``--backend`` where given; for a run folder in fp32,
    ``$RCNN_BACKEND`` or else ``auto`` (the fastest on this CPU, timed once and remembered; on CUDA the
    eager backend); for a file or a lower precision, None (the file's runtime, the precision's backend)."""
    if backend is not None or model_file is not None or precision not in (None, "fp32"):
        return backend
    value = os.environ.get(BACKEND_ENV, "").strip() or "auto"
    if value not in BACKEND_CHOICES:
        raise ValueError(f"${BACKEND_ENV}={value!r}: choose one of {', '.join(BACKEND_CHOICES)} (or unset it: auto)")
    return value


def runs_on_cpu_only(args: argparse.Namespace) -> bool:
    """Whether the backend arguments ask for a runtime of exported graphs (ONNX Runtime, OpenVINO: the CPU,
    whatever the device)."""
    return (args.backend in ("onnxruntime", "openvino") or bool(getattr(args, "model_file", None))
            or args.precision in ("int8", "bf16"))  # fmt: skip


def detector_from_args(args: argparse.Namespace, device: str = "cpu"):
    """The detector the backend arguments ask for (``rcnn.deploy.backends.load_detector``)."""
    from rcnn.deploy.backends import load_detector

    if args.weights is None and args.model_file is None:
        raise ValueError("give --weights RUN (a run folder) or --model FILE (an ONNX file or OpenVINO IR from rcnn export)")
    backend = default_backend(args.backend, model_file=args.model_file, precision=args.precision)
    if (runs_on_cpu_only(args) or backend in ("onnxruntime", "openvino")) and device != "cpu":
        device = "cpu"  # the runtimes' CPU builds; CUDA stays for the eager backend
    return load_detector(args.weights, model_file=args.model_file, backend=backend, device=device,
                         threads=args.threads, progress=True, **precision_options(args))  # fmt: skip
