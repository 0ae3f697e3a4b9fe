"""OpenVINO on the CPU: the exported graph compiled by OpenVINO, and the OpenVINO IR for deploying without Python.

    detector = OpenVinoDetector("frcnn.onnx")                      # a file of rcnn export, compiled for this CPU
    detector = OpenVinoDetector("frcnn.onnx", precision="bf16")    # ... with bf16 inference precision
    detector = OpenVinoDetector("frcnn.xml")                       # the IR of rcnn export --format openvino
    export_openvino("frcnn.onnx", "frcnn.xml")                     # ONNX -> IR (frcnn.xml + frcnn.bin), metadata kept

OpenVINO compiles the same graph that ONNX Runtime runs (:func:`rcnn.deploy.export.export_onnx`:
pre- and post-processing inside, dynamic height and width, empty outputs where nothing is
detected) for the CPU it runs on, and gives the same outputs; :class:`OpenVinoDetector` is the
``openvino`` backend, a :class:`rcnn.deploy.backends.Detector` with the output contract of
:class:`rcnn.deploy.export.OnnxDetector`.

Precisions (``precision=``):

- ``fp32``: every operator in f32. OpenVINO's own default on a CPU with bf16 instructions is bf16,
  which moves scores by more than 1e-3: the backend asks for f32 explicitly (its inference
  precision hint), so that fp32 agrees with the eager model within the tested tolerances.
- ``bf16``: the fp32 graph with the inference precision hint bf16: convolutions and matrix
  products in bfloat16 (AVX-512 BF16 or AMX instructions), accumulations in f32. Refused, saying
  so, where the CPU has no bf16 instructions (OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU
  lacks ``BF16``): there OpenVINO would emulate it, slower than f32.
- ``int8``: the calibrated QDQ graph of :mod:`rcnn.deploy.quantize`, whose QuantizeLinear /
  DequantizeLinear pairs OpenVINO turns into int8 kernels; the layers kept float run in f32.

The compiled graph is cached (OpenVINO's model cache, ``CACHE_DIR``) in the folder the caller
gives (the run's ONNX cache folder, :func:`rcnn.deploy.backends.load_detector`): a compiled blob per
graph file and compile settings, which OpenVINO compiles afresh when the file has changed, so a new
graph (new weights, another int8 recipe) or another precision never runs a stale blob
(``tests/test_openvino.py``), and the same one loads in a fraction of the time.

The IR (``rcnn export --format openvino``) is OpenVINO's own format, an ``.xml`` (the graph) and a
``.bin`` (the weights) that OpenVINO's C++, C and Python APIs read without ONNX; the rcnn metadata
travels in its runtime information (``<rt_info><rcnn ...>``), so ``--model FILE.xml`` knows the
class names, the config and the precision as it does for an ONNX file.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from rcnn.deploy.export import ExportedDetector, metadata_from_props, onnx_metadata

__all__ = ["OPENVINO_PRECISIONS", "OpenVinoDetector", "bf16_supported", "cpu_capabilities", "export_openvino",
           "ir_metadata", "is_our_ir"]  # fmt: skip

OPENVINO_PRECISIONS = ("fp32", "bf16", "int8")
_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # the inference precision of each (int8: its float layers)
_RT_INFO = "rcnn"  # the IR's runtime information section that holds the rcnn metadata


@functools.cache
def _core() -> Any:
    """One OpenVINO runtime per process (it holds the plugins and the compiled-model cache)."""
    import openvino

    return openvino.Core()


def cpu_capabilities() -> list[str]:
    """What OpenVINO's CPU plugin says this CPU computes natively (``FP32``, ``BF16``, ``INT8``, ...)."""
    return [str(c) for c in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def cpu_name() -> str:
    """The CPU's model name, as OpenVINO reads it."""
    return str(_core().get_property("CPU", "FULL_DEVICE_NAME"))


def bf16_supported() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX), as OpenVINO's CPU plugin finds them."""
    return "BF16" in cpu_capabilities()


def check_precision(precision: str) -> None:
    """``ValueError`` for a precision OpenVINO does not run, or bf16 on a CPU without its instructions."""
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"--precision {precision!r}: OpenVINO runs {', '.join(OPENVINO_PRECISIONS)}")
    if precision == "bf16" and not bf16_supported():
        raise ValueError(f"--precision bf16: this CPU ({cpu_name()}) has no bf16 instructions (OpenVINO finds "
                         f"{', '.join(cpu_capabilities())}; bf16 needs AVX-512 BF16 or AMX), so bf16 would run "
                         "emulated, slower than fp32; use --precision fp32 or int8")  # fmt: skip


def _rt_props(model: Any) -> dict[str, str]:
    """The ``rcnn.*`` metadata kept in an OpenVINO model's runtime information."""
    if not model.has_rt_info([_RT_INFO]):
        return {}
    section = model.get_rt_info()[_RT_INFO]
    entries = section.astype(dict) if hasattr(section, "astype") else dict(section)
    return {f"rcnn.{key}": str(value.astype(str) if hasattr(value, "astype") else value) for key, value in entries.items()}


def _ir_num_classes(model: Any) -> int | None:
    """K + 1 of an IR's graph, from its box classifier's weights (the constant the converter names
    after ``...cls_score.weight`` / ``.bias``), or None where it cannot be told."""
    found: dict[str, list[int]] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant":
            continue
        name = op.get_friendly_name()
        for part in ("cls_score.bias", "cls_score.weight"):
            if part in name and part not in found:
                found[part] = [int(d) for d in op.get_output_shape(0)]
    if len(found.get("cls_score.bias", [])) == 1:
        return found["cls_score.bias"][0]
    if len(found.get("cls_score.weight", [])) == 2:
        return found["cls_score.weight"][0]
    return None


def _read_ir(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: OpenVINO IR not found")
    if not path.with_suffix(".bin").is_file():
        raise FileNotFoundError(f"{path}: its weights {path.with_suffix('.bin').name} are not beside it (an IR is "
                                "the .xml and the .bin of the same name)")  # fmt: skip
    try:
        return _core().read_model(str(path))
    except Exception as exc:  # a damaged or foreign file: name it
        raise ValueError(f"{path}: not an OpenVINO IR that OpenVINO reads ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def ir_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The rcnn metadata of an IR ``.xml`` of ``rcnn export --format openvino`` (as
    :func:`rcnn.deploy.export.onnx_metadata` gives an ONNX file's)."""
    path = Path(path)
    model = _read_ir(path)
    return metadata_from_props(_rt_props(model), path, _ir_num_classes(model), "an OpenVINO IR")


def is_our_ir(path: str | os.PathLike) -> bool:
    """An IR (``.xml``, or the ``.bin`` beside one) of ``rcnn export --format openvino``."""
    path = Path(path)
    try:
        return bool(ir_metadata(path.with_suffix(".xml")))
    except (ValueError, OSError):
        return False


def export_openvino(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Convert the exported ONNX file ``source`` (fp32 or int8) into the OpenVINO IR ``target``
    (``NAME.xml`` and ``NAME.bin`` beside it), the rcnn metadata kept. The weights stay in their
    precision (no compression to f16); the two files are written under temporary names and then
    moved into place, so a failed conversion leaves no half of an IR."""
    import openvino

    source, target = Path(source), Path(target)
    if target.suffix != ".xml":
        raise ValueError(f"{target}: an OpenVINO IR is a .xml file (and the .bin beside it)")
    meta = onnx_metadata(source)
    try:
        model = openvino.convert_model(str(source))
    except Exception as exc:
        raise ValueError(f"{source}: OpenVINO cannot convert it ({_first_line(exc)})") from None
    for key, value in meta["props"].items():
        model.set_rt_info(value, [_RT_INFO, key[len("rcnn."):]])
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.stem}.") as tmp:
        staged = Path(tmp) / "model.xml"
        openvino.save_model(model, str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), target.with_suffix(".bin"))
        os.replace(staged, target)
    return target


_PORT_NAMES = ("image", "proposals", "boxes", "labels", "scores", "masks")  # an rcnn graph's inputs and outputs


def _port_name(port: Any) -> str:
    """A graph input's or output's name: OpenVINO keeps every name a tensor had (an output can also
    carry the name of the operator that made it), so the name rcnn gave it where it has one."""
    names = port.get_names()
    return next((name for name in _PORT_NAMES if name in names), port.get_any_name())


class OpenVinoDetector(ExportedDetector):
    """An exported model compiled by OpenVINO for the CPU: the OpenVINO backend, a
    :class:`rcnn.deploy.backends.Detector` (see :class:`rcnn.deploy.export.ExportedDetector`).

    ``path``: an ONNX file of ``rcnn export`` (fp32 or int8) or its IR (``.xml``). ``precision``:
    ``None`` runs the file as it is (fp32 in f32, int8 as int8), ``"bf16"`` an fp32 file in bf16
    (see the module docstring); a precision that the file is not is refused. ``cache_dir``: where
    OpenVINO keeps the compiled graph (None: no cache). ``threads``: its inference threads.
    """

    backend = "openvino"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, precision: str | None = None,
                 cache_dir: str | os.PathLike | None = None) -> None:  # fmt: skip
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {'OpenVINO IR' if path.suffix == '.xml' else 'ONNX model'} not found")
        meta = ir_metadata(path) if path.suffix == ".xml" else onnx_metadata(path)
        stored = meta["precision"]
        precision = precision or stored
        if precision == "bf16" and stored != "fp32":
            raise ValueError(f"{path}: --precision bf16 runs an fp32 graph in bf16; this graph is {stored}")
        if precision != "bf16" and precision != stored:
            raise ValueError(f"--model {path}: this graph is {stored}, not {precision} (rcnn export"
                             f"{' --int8 --calibrate DATA' if precision == 'int8' else ''} makes one)")  # fmt: skip
        check_precision(precision)
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir is not None:
            config["CACHE_DIR"] = str(cache_dir)
        try:
            self.compiled = _core().compile_model(str(path), "CPU", config)
        except Exception as exc:  # a damaged or foreign file: name it
            raise ValueError(f"{path}: OpenVINO cannot compile it ({_first_line(exc)})") from None
        self._describe(path, meta, [_port_name(p) for p in self.compiled.inputs], [_port_name(p) for p in self.compiled.outputs])
        self.precision = precision
        self.cache_dir = cache_dir

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = self.compiled.create_infer_request()  # one per call: the server runs models from threads
        request.infer(feeds)
        # copies: the request's output buffers are its own
        return [np.array(request.get_tensor(name).data) for name in self.outputs]
