"""int8 post-training static quantisation of an exported detector (ONNX Runtime's quantisation tools).

    quantize_onnx("frcnn.onnx", "frcnn-int8.onnx", calibration_images)   # rcnn export --int8 --calibrate DATA

The convolutions (backbone, FPN, RPN head, mask head) — most of a two-stage detector's time — get
int8 weights, per output channel, and int8 activations whose ranges are calibrated on images like
those the model will see (a few hundred training images; each one is run through the float graph
and the range of every convolution's input and output recorded). The graph stays in ONNX's QDQ form
(QuantizeLinear / DequantizeLinear pairs around each quantised operator), which ONNX Runtime fuses
into int8 kernels; everything data-dependent (anchors, NMS, RoIAlign, box decoding, pasting) stays
float, so the outputs keep their meaning. The fully connected box head is quantised too with
``fc=True``, where it measures faster.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rcnn.io.files import atomic_write

__all__ = ["calibration_images", "quantize_onnx"]


def calibration_images(source: str | os.PathLike, split: str | None, count: int, config=None) -> Iterator[Tensor]:
    """Up to ``count`` images of a data set split (or of a folder of image files), evenly spread.

    The data set is read (and a missing root or split refused) now; the images are decoded one at a
    time as the calibration asks for them. ``config`` gives the reader's options and the default
    split (the run's training split).
    """
    from rcnn.data.build import build_dataset
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


class _Images:
    """ONNX Runtime's calibration data reader over images (float ``[3, H, W]`` in 0..1)."""

    def __init__(self, images: Iterable[Tensor], input_format: str) -> None:
        self.images = iter(images)
        self.input_format = input_format
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self.images, None)
        if image is None:
            return None
        self.count += 1
        if self.input_format == "uint8":
            array = (image.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
        else:
            array = image.to(torch.float32).numpy()
        return {"image": np.ascontiguousarray(array)}


def quantize_onnx(
    source: str | os.PathLike,
    target: str | os.PathLike,
    images: Iterable[Tensor],
    *,
    fc: bool = False,
) -> Path:
    """Write an int8 copy of the exported model ``source`` to ``target``, calibrated on ``images``.

    Refuses a model that needs proposals (Fast R-CNN: its calibration would need them too) and a
    calibration set without images.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from rcnn.export import onnx_metadata

    source, target = Path(source), Path(target)
    meta = onnx_metadata(source)
    if meta["precision"] != "fp32":
        raise ValueError(f"{source}: already quantised ({meta['precision']})")
    if meta["needs_proposals"]:
        raise ValueError(f"{source}: int8 export covers Faster and Mask R-CNN (Fast R-CNN's calibration would need its proposals)")
    reader = _Images(images, meta["input"])
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:  # shape inference and graph clean-up before quantising, as ONNX Runtime advises
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        except Exception:  # the pre-processing is an optimisation; the original graph quantises too
            prepared = source
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared), str(quantized), reader, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "Gemm", "MatMul"] if fc else ["Conv"],
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, extra_options={"CalibMovingAverage": False},
        )  # fmt: skip
        if reader.count == 0:
            raise ValueError("int8 calibration needs at least one image (--calibrate DATA gave none)")
        model = onnx.load(str(quantized))
        props = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
        props.update({"rcnn.precision": "int8", "rcnn.calibration_images": str(reader.count)})
        del model.metadata_props[:]
        for key, value in props.items():
            model.metadata_props.add(key=key, value=value)
        atomic_write(target, lambda tmp_path: onnx.save(model, str(tmp_path)))
    return target
