"""int8 post-training static quantisation of an exported detector (ONNX Runtime's quantisation tools).

    quantize_onnx("frcnn.onnx", "frcnn-int8.onnx", calibration_images)   # rcnn export --int8 --calibrate DATA

The convolutions of the backbone's trunk, the RPN head and the mask head — most of a two-stage
detector's time — get int8 weights, per output channel, and int8 activations whose ranges are
calibrated on images like those the model will see (a few hundred training images, run one at a
time through the float graph; each activation's range is the one whose int8 histogram loses least
information, entropy calibration, by default). The FPN's convolutions stay float by default: on a
trained MobileNetV3-FPN they held most of int8's accuracy loss (``keep_float`` chooses). The graph
stays in ONNX's QDQ form (QuantizeLinear / DequantizeLinear pairs around each quantised operator),
which ONNX Runtime fuses into int8 kernels; everything data-dependent (anchors, NMS, RoIAlign, box
decoding, pasting) stays float, so the outputs keep their meaning. The fully connected box head is
quantised too with ``fc=True``, where it measures faster.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rcnn.io.files import atomic_write
from rcnn.viz import image_pixels

__all__ = ["calibration_images", "quantize_onnx", "recipe"]


def calibration_images(source: str | os.PathLike, split: str | None, count: int, config=None) -> Iterator[Tensor]:
    """Up to ``count`` images of a data set split (or of a folder of image files), evenly spread.

    The data set is read (and a missing root or split refused) now; the images are decoded one at a
    time as the calibration asks for them. ``config`` gives the reader's options and the default
    split (the run's training split).
    """
    from rcnn.data.reading import build_dataset
    from rcnn.io.images import load_image
    from rcnn.io.sources import IMAGE_EXTENSIONS

    if count < 1:
        raise ValueError(f"--calibrate-images must be at least 1, got {count}")
    root = Path(source)
    if not root.exists():
        raise FileNotFoundError(f"--calibrate {root}: not found")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if root.is_dir() else []
    if files:  # a plain folder of images
        step = max(len(files) // count, 1)
        return (load_image(path) for path in files[::step][:count])
    options = config.data.reader_options() if config is not None else {}
    dataset = build_dataset(root, split or (config.data.train_split if config is not None else "train"), **options)
    step = max(len(dataset) // count, 1)
    return (dataset[index][0] for index in range(0, len(dataset), step)[:count])


def _image_array(image: Tensor, input_format: str) -> np.ndarray:
    """A float ``[3, H, W]`` image in 0..1 as the exported graph's input."""
    if input_format == "uint8":
        array = image_pixels(image)
    else:
        array = image.to(torch.float32).numpy()
    return np.ascontiguousarray(array)


class _OneImage:
    """ONNX Runtime's calibration data reader of one image (the calibration runs image by image)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array: np.ndarray | None = array

    def get_next(self) -> dict[str, np.ndarray] | None:
        array, self.array = self.array, None
        return None if array is None else {"image": array}


CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
DEFAULT_METHOD = "entropy"
# the module paths whose layers stay float by default, where a model has them: the FPN. Measured on
# MobileNetV3-FPN trained on the raccoon photographs (docs/export.md, "int8"): keeping the FPN's
# convolutions float moves int8's box AP from 0.145 to 0.162 (fp32: 0.166) with entropy
# calibration, from 0.149 to 0.163 with the 99.999th percentile; MinMax calibration was the worst
KEEP_FLOAT = ("backbone.fpn",)


def quantize_onnx(
    source: str | os.PathLike,
    target: str | os.PathLike,
    images: Iterable[Tensor],
    *,
    fc: bool = False,
    method: str = DEFAULT_METHOD,
    percentile: float = 99.999,
    keep_float: Sequence[str] | None = None,
) -> Path:
    """Write an int8 copy of the exported model ``source`` to ``target``, calibrated on ``images``.

    ``method`` sets each activation's range from what calibration saw: ``"minmax"`` (the extremes),
    ``"percentile"`` (the ``percentile`` of the magnitudes, clipping rare outliers) or ``"entropy"``
    (the range whose int8 histogram loses least information, KL divergence). ``keep_float`` names
    model parts by module path (``"rpn.head.bbox_pred"``, ``"backbone.body.0"``: that module and
    everything inside it) or glob pattern (``"backbone.body.*.fc1"``) whose layers stay float;
    default :data:`KEEP_FLOAT` (where the model has them; a path given that matches no quantisable
    layer is refused).

    Refuses a model that needs proposals (Fast R-CNN: its calibration would need them too) and a
    calibration set without images.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from rcnn.deploy.export import onnx_metadata

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r}: expected one of {', '.join(CALIBRATION_METHODS)}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    source, target = Path(source), Path(target)
    meta = onnx_metadata(source)
    if meta["precision"] != "fp32":
        raise ValueError(f"{source}: already quantised ({meta['precision']})")
    if meta["needs_proposals"]:
        raise ValueError(f"{source}: int8 export covers Faster and Mask R-CNN (Fast R-CNN's calibration would need its proposals)")
    op_types = ["Conv", "Gemm", "MatMul"] if fc else ["Conv"]
    keep = tuple(KEEP_FLOAT if keep_float is None else keep_float)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:  # shape inference and graph clean-up before quantising, as ONNX Runtime advises
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        except Exception:  # the pre-processing is an optimisation; the original graph quantises too
            prepared = source
        excluded = _layers_of(onnx.load(str(prepared), load_external_data=False), keep, op_types,
                              strict=keep_float is not None)  # fmt: skip
        calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                     "entropy": CalibrationMethod.Entropy}[method]  # fmt: skip
        # calibrated image by image: one image's activations in memory at a time, images of any
        # size (the histogram methods stack the activations of one pass); the ranges (minima and
        # maxima, or histograms) merge across images
        calibrator = create_calibrator(
            prepared, op_types, augmented_model_path=str(Path(tmp) / "augmented.onnx"), calibrate_method=calibrate,
            extra_options={"moving_average": False} if method == "minmax" else {"percentile": percentile},
        )  # fmt: skip
        count = 0
        quiet = contextlib.redirect_stdout(io.StringIO())  # ONNX Runtime's calibrators print a line per pass
        for image in images:
            with quiet:
                calibrator.collect_data(_OneImage(_image_array(image, meta["input"])))
            count += 1
        if count == 0:
            raise ValueError("int8 calibration needs at least one image (--calibrate DATA gave none)")
        ranges = Path(tmp) / "ranges.json"
        with quiet:
            save_tensors_data(calibrator.compute_data(), ranges)
        del calibrator
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared), str(quantized), None, calibration_cache_path=ranges, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types, per_channel=True, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=calibrate, nodes_to_exclude=excluded,
        )  # fmt: skip
        model = onnx.load(str(quantized))
        props = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
        props.update({"rcnn.precision": "int8", "rcnn.calibration_images": str(count),
                      "rcnn.int8_recipe": recipe(fc=fc, method=method, percentile=percentile, keep_float=keep)})  # fmt: skip
        del model.metadata_props[:]
        for key, value in props.items():
            model.metadata_props.add(key=key, value=value)
        atomic_write(target, lambda tmp_path: onnx.save(model, str(tmp_path)))
    return target


def recipe(*, fc: bool = False, method: str = DEFAULT_METHOD, percentile: float = 99.999,
           keep_float: Sequence[str] | None = None) -> str:  # fmt: skip
    """The quantisation settings of :func:`quantize_onnx` as one line (kept in the int8 file's
    metadata; a cached int8 graph made by other settings than today's defaults is made again)."""
    keep = list(KEEP_FLOAT if keep_float is None else keep_float)
    settings = {"method": method, "fc": fc, "keep_float": keep}
    if method == "percentile":
        settings["percentile"] = percentile
    return json.dumps(settings, sort_keys=True)


def _layers_of(model, paths: Sequence[str], op_types: Sequence[str], strict: bool = True) -> list[str]:
    """The names of the graph's nodes (of ``op_types``) whose weights belong to the modules that
    ``paths`` name: a module path (that module and everything in it) or a glob pattern of module
    paths (``"backbone.body.*.fc1"``). The exporter names a weight after its parameter
    (``model.<module path>.weight``). ``strict``: a path that matches no layer is refused (the
    defaults apply where a model has those parts)."""
    layers = {}  # node name -> the module path of its weight
    for node in model.graph.node:
        if node.op_type in op_types and len(node.input) > 1 and node.input[1].startswith("model."):
            layers[node.name] = node.input[1][len("model."):].rsplit(".", 1)[0]
    names = []
    for path in paths:
        path = path.strip(".")
        found = [name for name, module in layers.items()
                 if module == path or module.startswith(path + ".") or fnmatch.fnmatchcase(module, path)]  # fmt: skip
        if not found and strict:
            raise ValueError(f"keep float {path!r}: no quantisable layer ({', '.join(op_types)}) of the model is in it")
        names += found
    return names
