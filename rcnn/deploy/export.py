"""Exporting a trained detector to ONNX, pre- and post-processing included, and running it.

``export_onnx(model, path[, class_names])`` (``rcnn export --weights RUN --format onnx --out
model.onnx``) writes one ONNX graph that takes an image and gives detections at the image's own
size: resizing, normalisation and padding, the backbone, the RPN with its anchors, NMS and the
proposal layer, RoI pooling / RoIAlign, the heads, per-class post-processing and, for Mask
R-CNN, the masks pasted into the image. Height and width are dynamic; an image where nothing is
detected gives empty outputs of the right shapes.

    input   image   uint8 [H, W, 3] (RGB, as decoded)        or, with input="float",
                    float32 [3, H, W] in 0..1 (the library's convention)
            proposals float32 [P, 4] (Fast R-CNN only: its proposals come from outside)
    outputs boxes   float32 [D, 4] (x1, y1, x2, y2, pixels of the input image)
            labels  int64 [D] (1..K; the class names are in the model's metadata)
            scores  float32 [D]
            masks   uint8 [D, H, W] (Mask R-CNN)

The exporter is PyTorch's recommended one, ``torch.onnx.export(..., dynamo=True)``: it captures
the model with ``torch.export`` (sizes stay symbolic, so one graph serves every image size)
where the TorchScript-based exporter, deprecated, traces one input's shapes. The model's own
``forward`` is what is exported: the code has no branch on data-dependent values and, while
exporting, uses the plain path (the CPU fast paths, the top-k growth of ``batched_nms`` and
the per-box mask pasting have no ONNX form; ``rcnn.core`` switches with
``torch.compiler.is_exporting()``). RoI max pooling is given ONNX's ``MaxRoiPool`` (the stock
translation of ``torchvision::roi_pool`` does not run).

The run folder's class names travel in the file's metadata (``rcnn.class_names``, JSON), with
the generation and the input format; a model exported without them is given the names a run
folder without ``classes.json`` gets (``class_0`` for the background, ``class_1..K``). A file is checked when it is loaded (:class:`OnnxDetector`):
metadata that does not fit the graph (fewer class names than its classifier has classes, other
inputs or outputs than an rcnn graph's, a foreign graph given rcnn's metadata) is refused with
one ``ValueError`` naming the file and what does not fit. R-CNN cannot be exported: it runs the CNN once per warped
region in chunks whose number depends on the proposals, and scores them with its SVMs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import traceback
import warnings
from collections.abc import Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from rcnn.io.files import atomic_write
from rcnn.viz import image_pixels

__all__ = ["ExportError", "ExportedDetector", "OnnxDetector", "check_graph", "export_onnx", "metadata_from_props",
           "onnx_metadata"]

_INPUTS = ("uint8", "float")


def _roi_pool_onnx(input, boxes, spatial_scale: float, pooled_height: int, pooled_width: int):  # noqa: A002
    """``torchvision::roi_pool`` as ONNX's MaxRoiPool (the same quantised bins; equal to the last bit)."""
    from onnxscript import opset18 as op

    out = op.MaxRoiPool(input, boxes, pooled_shape=[pooled_height, pooled_width], spatial_scale=spatial_scale)
    return out, op.Cast(out, to=7)  # the op's second output (argmax) is unused at inference


def _nms_first_onnx(boxes, scores, iou_threshold: float, max_kept: int):
    """``rcnn::nms_first`` as ONNX's NonMaxSuppression bounded at ``max_kept`` (one batch, one class)."""
    from onnxscript import opset18 as op

    selected = op.NonMaxSuppression(op.Unsqueeze(boxes, [0]), op.Unsqueeze(scores, [0, 1]), max_kept, iou_threshold)
    return op.Reshape(op.Slice(selected, axes=[1], starts=[2], ends=[3]), [-1])  # [M, 3] -> box indices [M]


class ExportError(ValueError):
    """The exporter could not make a graph of a model: one line naming the model and the step that
    failed; the exporter's full output and the traceback are in the file ``log``."""

    def __init__(self, message: str, log: Path) -> None:
        super().__init__(message)
        self.log = log


# the steps of torch.onnx.export(dynamo=True), as its errors number them
_EXPORT_STEPS = {
    "step 1/3": "step 1/3, capturing the model with torch.export",
    "step 2/3": "step 2/3, decomposing the captured graph into ONNX's operators",
    "step 3/3": "step 3/3, translating the graph to ONNX",
}
LOG_HEADER = "rcnn export log"  # the first line of an exporter's log that rcnn wrote


def export_log_path(path: Path) -> Path:
    """Where the exporter's log of a failed export to ``path`` goes: ``<path>.log`` beside it (or
    ``<path>.N.log`` where a file that rcnn did not write has that name)."""
    candidates = [path.with_name(path.name + ".log")] + [path.with_name(f"{path.name}.{n}.log") for n in range(1, 100)]
    for candidate in candidates:
        if not candidate.exists():
            return candidate
        try:
            with open(candidate, encoding="utf-8", errors="replace") as fh:
                if fh.readline().startswith(LOG_HEADER):
                    return candidate
        except OSError:
            continue
    return candidates[-1]


def _failure_reason(exc: BaseException) -> str:
    """The innermost cause of ``exc`` as one short line (what the exporter could not take)."""
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    text = f"{type(inner).__name__}: {lines[0]}" if lines else type(inner).__name__
    return text if len(text) <= 240 else text[:237] + "..."


@contextlib.contextmanager
def _exporter_log(path: Path, model: str) -> Iterator[None]:
    """Run the exporter quietly: its warnings, prints and log records are kept; if it fails, they and
    the traceback are written to :func:`export_log_path` and an :class:`ExportError` of one line
    naming ``model`` and the step is raised instead of the exporter's screen of internals."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setLevel(logging.INFO)  # (torch traces at DEBUG level to its own structured log)
    logger = logging.getLogger("torch")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            warnings.simplefilter("ignore")  # the exporter's notes on deprecations inside torch and torchvision
            yield
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        message = str(exc)
        step = next((text for key, text in _EXPORT_STEPS.items() if key in message), "while exporting")
        log = export_log_path(path)
        text = (f"{LOG_HEADER}: {model} to {path}\nfailed at {step}\n\n{buffer.getvalue()}\n"
                + "".join(traceback.format_exception(exc)))  # fmt: skip
        atomic_write(log, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        raise ExportError(f"{model}: the ONNX exporter failed at {step} ({_failure_reason(exc)}); its full log is in "
                          f"{log}", log) from None  # fmt: skip
    finally:
        logger.removeHandler(handler)


def describe(model: nn.Module, config: Any = None) -> str:
    """``mask_rcnn`` or ``mask_rcnn (resnet50_fpn)``: the model an export is of, for messages."""
    backbone = getattr(getattr(config, "model", None), "backbone", None)
    return f"{type(model).name} ({backbone})" if backbone else str(type(model).name)


def _heads_folded(model: nn.Module) -> nn.Module:
    """``model``, or a copy whose RoI heads' BatchNorm (torchvision's v2 box and mask heads) is folded
    into the convolutions before it: that BatchNorm's batch is the number of RoIs, known only at run
    time, and ``torch.export`` cannot capture ``batch_norm`` on such a batch (it guards on an empty
    one). Folding is the same arithmetic, done once (the runtimes would fuse it themselves); the
    model given is left as it is."""
    from rcnn.components.backbones import fold_batchnorm

    norms = (nn.BatchNorm2d, FrozenBatchNorm2d)
    if not any(isinstance(m, norms) for m in model.roi_heads.modules()):
        return model
    model = copy.deepcopy(model)
    fold_batchnorm(model.roi_heads)
    return model


class _Graph(nn.Module):
    """The model between one image (and its proposals) and its detections, as exported."""

    def __init__(self, model: nn.Module, input_format: str) -> None:
        super().__init__()
        self.model = model
        self.input_format = input_format
        self.needs_proposals = bool(model.needs_proposals)
        self.predicts_masks = bool(model.predicts_masks)

    def forward(self, image: Tensor, proposals: Tensor | None = None) -> tuple[Tensor, ...]:
        if self.input_format == "uint8":
            image = image.permute(2, 0, 1).to(torch.float32) / 255.0  # [H, W, 3] -> [3, H, W]
        kwargs = {"proposals": [proposals]} if self.needs_proposals else {}
        (out,) = self.model([image], **kwargs)
        results = (out["boxes"], out["labels"], out["scores"])
        if self.predicts_masks:
            results += (out["masks"][:, 0].to(torch.uint8),)
        return results


def onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The rcnn metadata of an exported ONNX file: class names, generation, input format, outputs (an
    OpenVINO IR's: :func:`rcnn.deploy.openvino.ir_metadata`)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and the like: name the file
        raise ValueError(f"{path}: not an ONNX file ({type(exc).__name__}: {exc})") from None
    props = {p.key: p.value for p in model.metadata_props}
    return metadata_from_props(props, path, _graph_num_classes(model))


def metadata_from_props(props: dict[str, str], path: str | os.PathLike, graph_num_classes: int | None,
                        what: str = "an ONNX file") -> dict[str, Any]:  # fmt: skip
    """:func:`onnx_metadata` from the file's ``rcnn.*`` string entries ``props`` (ONNX's metadata, or
    an OpenVINO IR's runtime information); ``graph_num_classes``: K + 1 as the graph itself tells it."""
    if "rcnn.class_names" not in props:
        raise ValueError(f"{path}: not {what} exported by rcnn (no rcnn metadata)")
    decoded = {}
    for key in ("rcnn.class_names", "rcnn.categories"):
        if key in props:
            try:
                decoded[key] = json.loads(props[key])
            except ValueError:
                raise ValueError(f"{path}: its {key} metadata is not valid JSON; export the model again") from None
    names = decoded["rcnn.class_names"]
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{path}: its rcnn.class_names metadata must list the background and at least one class "
                         f"name, got {props['rcnn.class_names'][:200]}")  # fmt: skip
    return {
        "class_names": names,
        "model": props.get("rcnn.model"),
        "input": props.get("rcnn.input", "uint8"),
        "needs_proposals": props.get("rcnn.needs_proposals") == "true",
        "predicts_masks": props.get("rcnn.predicts_masks") == "true",
        "categories": decoded.get("rcnn.categories"),
        "config": props.get("rcnn.config"),  # the run's config, YAML
        "precision": props.get("rcnn.precision", "fp32"),
        "has_rpn": props.get("rcnn.has_rpn", str(props.get("rcnn.model") in ("faster_rcnn", "mask_rcnn")).lower()) == "true",
        "weights_sha256": props.get("rcnn.weights_sha256"),
        "int8_recipe": props.get("rcnn.int8_recipe"),  # how an int8 graph was quantised (rcnn.deploy.quantize.recipe)
        "graph_num_classes": graph_num_classes,
        "props": {k: v for k, v in props.items() if k.startswith("rcnn.")},  # as written, for copies in other formats
    }


def _graph_num_classes(model: Any) -> int | None:
    """K + 1 of an exported graph, read from its box classifier (``...cls_score.bias [K + 1]``, or
    ``...cls_score.weight [K + 1, C]`` where the exporter folded away a bias of zeros); None where
    it cannot be told (no such initializer; the labels are then checked as they come)."""
    found = {}
    for init in model.graph.initializer:
        for part in ("cls_score.bias", "cls_score.weight"):
            if part in init.name and part not in found:
                found[part] = [int(d) for d in init.dims]
    if len(found.get("cls_score.bias", [])) == 1:
        return found["cls_score.bias"][0]
    if len(found.get("cls_score.weight", [])) == 2:  # Gemm's weight [out, in] (transB)
        return found["cls_score.weight"][0]
    return None


def check_graph(path: str | os.PathLike, meta: dict[str, Any], inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """``ValueError`` naming ``path`` when its rcnn metadata ``meta`` (:func:`onnx_metadata`) does not
    fit the graph: its input and output names, its number of classes, the categories."""
    again = "export the model again with rcnn export"
    model = meta.get("model") or "rcnn"
    expected_inputs = ["image", "proposals"] if meta["needs_proposals"] else ["image"]
    if sorted(inputs) != sorted(expected_inputs):
        raise ValueError(f"{path}: its rcnn metadata describes a {model} graph with inputs {expected_inputs}, but the "
                         f"graph's inputs are {list(inputs)}: not a graph of rcnn export, or its metadata was edited; "
                         f"{again}")  # fmt: skip
    expected_outputs = ["boxes", "labels", "scores", *(["masks"] if meta["predicts_masks"] else [])]
    if sorted(outputs) != sorted(expected_outputs):
        raise ValueError(f"{path}: its rcnn metadata describes a {model} graph with outputs {expected_outputs}, but the "
                         f"graph's outputs are {list(outputs)}: not a graph of rcnn export, or its metadata was edited; "
                         f"{again}")  # fmt: skip
    if meta["input"] not in _INPUTS:
        raise ValueError(f"{path}: its rcnn.input metadata is {meta['input']!r}, not one of {_INPUTS}; {again}")
    names, graph_classes = meta["class_names"], meta.get("graph_num_classes")
    if graph_classes is not None and graph_classes != len(names):
        raise ValueError(f"{path}: its rcnn.class_names metadata lists {len(names)} names (background included) but the "
                         f"graph's classifier has {graph_classes} classes; {again}")  # fmt: skip
    categories = meta.get("categories")
    if categories is not None and not (
        isinstance(categories, list) and len(categories) == len(names)
        and all(isinstance(c, dict) and "id" in c and "name" in c for c in categories)
    ):  # fmt: skip
        raise ValueError(f"{path}: its rcnn.categories metadata must hold one {{\"id\", \"name\"}} per class name "
                         f"({len(names)}, background included); {again}")  # fmt: skip


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    *,
    input_format: str = "uint8",
    example_size: tuple[int, int] = (480, 640),
    opset: int = 18,
    categories: Sequence[dict[str, Any]] | None = None,
    config: Any = None,
    metadata: dict[str, str] | None = None,
    log_beside: str | os.PathLike | None = None,
) -> Path:
    """Export ``model`` (a trained Fast / Faster / Mask R-CNN, in eval mode) to ``path`` (see the module docstring).

    ``example_size`` is the (H, W) of the example image the capture runs on; the graph takes any
    size from 32 to 8192 on a side. ``categories`` (the data's ``{"id", "name"}`` per label) and
    ``config`` (the run's :class:`rcnn.config.Config`) travel in the metadata too, so the file
    alone evaluates and writes COCO results with the data's category ids; ``metadata`` adds
    string entries. ``class_names`` (background first) default to ``class_0 .. class_K``, as a run
    folder without its ``classes.json`` names them.

    Where the exporter fails, its output and traceback are written to ``<path>.log`` (or beside
    ``log_beside``: :func:`export_log_path`) and an :class:`ExportError` of one line names the model,
    the step that failed and that file.
    """
    if input_format not in _INPUTS:
        raise ValueError(f"input_format must be one of {_INPUTS}, got {input_format!r}")
    if model.trains_in_stages:
        raise ValueError(
            "R-CNN cannot be exported to ONNX: it runs the CNN once per warped region, in chunks whose number "
            "depends on the proposals, and scores the regions with its SVMs; export Fast R-CNN (the same "
            "proposals and classes, one network) instead"
        )
    if class_names is None:
        class_names = [f"class_{i}" for i in range(model.num_classes)]
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model of {model.num_classes} classes (background included)")
    from torch.export import Dim

    model = _heads_folded(model.eval())
    graph = _Graph(model, input_format).eval()
    height, width = example_size
    gen = torch.Generator().manual_seed(0)
    if input_format == "uint8":
        image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=gen)
        image_dims = {0: Dim("height", min=32, max=8192), 1: Dim("width", min=32, max=8192)}
    else:
        image = torch.rand(3, height, width, generator=gen)
        image_dims = {1: Dim("height", min=32, max=8192), 2: Dim("width", min=32, max=8192)}
    args: tuple[Tensor, ...] = (image,)
    dynamic: tuple[Any, ...] = (image_dims,)
    names = ["image"]
    if graph.needs_proposals:
        xy = torch.rand(64, 2, generator=gen) * torch.tensor([width / 2, height / 2])
        args += (torch.cat((xy, xy + torch.tensor([width / 3, height / 3])), dim=1),)
        dynamic += ({0: Dim("proposals", min=0, max=100_000)},)
        names.append("proposals")
    outputs = ["boxes", "labels", "scores"] + (["masks"] if graph.predicts_masks else [])
    path = Path(path)
    with _exporter_log(Path(log_beside or path), describe(model, config)), torch.no_grad():
        program = torch.onnx.export(
            graph, args, dynamo=True, dynamic_shapes=dynamic, input_names=names, output_names=outputs,
            opset_version=opset, custom_translation_table={torch.ops.torchvision.roi_pool.default: _roi_pool_onnx,
                                      torch.ops.rcnn.nms_first.default: _nms_first_onnx},
            verbose=False,
        )  # fmt: skip
    program.model.metadata_props.update(
        {
            "rcnn.class_names": json.dumps(list(class_names)),
            "rcnn.model": type(model).name,
            "rcnn.input": input_format,
            "rcnn.needs_proposals": str(graph.needs_proposals).lower(),
            "rcnn.predicts_masks": str(graph.predicts_masks).lower(),
            "rcnn.precision": "fp32",
            "rcnn.has_rpn": str(bool(model.has_rpn)).lower(),
        }
    )
    if categories is not None:
        program.model.metadata_props["rcnn.categories"] = json.dumps(list(categories))
    if config is not None:
        from rcnn.config import config_to_yaml

        program.model.metadata_props["rcnn.config"] = config_to_yaml(config)
    program.model.metadata_props.update(metadata or {})
    atomic_write(path, lambda tmp: program.save(str(tmp)))
    return path


class ExportedDetector:
    """What the backends that run an exported graph share (a :class:`rcnn.deploy.backends.Detector`):
    the capabilities read from the file's metadata, and the call that feeds each image to the graph
    and checks what comes back. A backend adds its runtime: ``_load`` and ``_run``.

    ``detector([image]) -> [{"boxes", "labels", "scores"(, "masks")}]`` (images float ``[3, H, W]``
    in 0..1, as everywhere in the library; they are converted to the file's input format). Its
    capabilities (``class_names``, ``needs_proposals``, ``predicts_masks``, ``has_rpn``, ``name``,
    the run's ``config``) come from the file's metadata. The graph gives only detections: a
    ``recorder`` learns nothing of its stages (``records`` is false), and files are decoded whole
    for it (``input_size`` None: the graph resizes inside).
    """

    backend = ""
    records = False
    trains_in_stages = False  # R-CNN has no ONNX form
    display_score_thresh = 0.5
    device = torch.device("cpu")  # the runtimes run on the CPU
    input_size = None

    def _describe(self, path: Path, meta: dict[str, Any], inputs: Sequence[str], outputs: Sequence[str]) -> None:
        """Check the metadata ``meta`` against the graph's ``inputs`` and ``outputs`` names and take the capabilities."""
        check_graph(path, meta, inputs, outputs)
        self.path = path
        self.class_names: list[str] = meta["class_names"]
        self.input_format: str = meta["input"]
        self.needs_proposals: bool = meta["needs_proposals"]
        self.predicts_masks: bool = meta["predicts_masks"]
        self.name = meta["model"]
        self.num_classes = len(self.class_names)
        self.categories: list[dict[str, Any]] | None = meta["categories"]
        self.precision: str = meta["precision"]
        self.weights_sha256: str | None = meta["weights_sha256"]
        self.config = None  # the run's Config, when the file carries it
        if meta["config"]:
            import yaml

            from rcnn.config import config_from_dict

            self.config = config_from_dict(yaml.safe_load(meta["config"]), f"{path} (its rcnn.config metadata)")
        self.has_rpn: bool = meta["has_rpn"]
        self.outputs = list(outputs)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs (in :attr:`outputs`' order) for one image's ``feeds``."""
        raise NotImplementedError

    def __call__(
        self,
        images: Sequence[Tensor],
        proposals: Sequence[Tensor] | None = None,
        recorder: MutableMapping[str, Any] | None = None,
    ) -> list[dict[str, Tensor]]:
        if self.needs_proposals and proposals is None:
            raise ValueError(f"{self.path} is a {self.name} model: it needs proposals")
        results = []
        for i, image in enumerate(images):
            if self.input_format == "uint8":
                array = image_pixels(image)
            else:
                array = image.detach().cpu().to(torch.float32).numpy()
            feeds = {"image": np.ascontiguousarray(array)}
            if self.needs_proposals:
                feeds["proposals"] = np.ascontiguousarray(proposals[i].detach().cpu().to(torch.float32).numpy())
            values = self._run(feeds)
            out = {name: torch.from_numpy(np.asarray(v)) for name, v in zip(self.outputs, values)}
            if len(out["labels"]) and not 0 < int(out["labels"].min()) <= int(out["labels"].max()) < self.num_classes:
                raise ValueError(f"{self.path}: the graph gave labels {sorted(set(out['labels'].tolist()))[:10]} but its "
                                 f"metadata names {self.num_classes - 1} classes (1..{self.num_classes - 1})")  # fmt: skip
            if "masks" in out:
                out["masks"] = out["masks"][:, None]  # [D, 1, H, W], as the eager model's
            results.append(out)
        return results


class OnnxDetector(ExportedDetector):
    """An exported model run by ONNX Runtime on the CPU: the ONNX Runtime backend, a
    :class:`rcnn.deploy.backends.Detector` (see :class:`ExportedDetector`)."""

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ONNX model not found")
        if path.suffix == ".xml":
            raise ValueError(f"{path}: an OpenVINO IR runs with --backend openvino (ONNX Runtime runs .onnx files)")
        meta = onnx_metadata(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a damaged or foreign file: name it
            raise ValueError(f"{path}: ONNX Runtime cannot load it ({exc})") from None
        self._describe(path, meta, [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.outputs, feeds)
