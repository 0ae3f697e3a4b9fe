"""Inference backends behind one interface, :class:`Detector`: the same detector run by PyTorch or by ONNX Runtime.

    loaded = load_detector("runs/frcnn")                              # eager PyTorch (the default)
    loaded = load_detector("runs/frcnn", backend="onnxruntime")       # exported once, then cached
    loaded = load_detector(model_file="frcnn.onnx")                   # a file from ``rcnn export``
    loaded = load_detector(model_file="frcnn-int8.onnx")              # ... quantised: ``rcnn export --int8``
    detector = as_detector(loaded.model)                              # a Detector, whatever the backend
    outputs = detector([image])                                       # [{"boxes", "labels", "scores"(, "masks")}]

Every backend implements :class:`Detector` (a ``typing.Protocol``): the call ``detector(images,
proposals=None, recorder=None)`` (images float ``[3, H, W]`` in 0..1 on ``detector.device``; boxes
in the image's pixels) and the capabilities the predictor reads (``needs_proposals``,
``predicts_masks``, ``num_classes``, ``input_size``, ``device``, ...). :class:`EagerDetector` is
the eager backend (a model of :mod:`rcnn.models` in PyTorch); :class:`rcnn.deploy.export.OnnxDetector`
the ONNX Runtime one. :class:`rcnn.inference.Predictor` runs any of them, so ``rcnn predict``,
``rcnn evaluate``, ``rcnn serve`` and the Python functions of :mod:`rcnn.inference` run either
(``--backend eager|onnxruntime``, ``--model FILE``). Their outputs agree within the tolerances
that ``tests/test_backends.py`` pins (boxes to 1e-2 px, scores to 1e-4, for the fp32 graph; int8
changes the numbers, its AP is measured in ``docs/benchmarks.md``).

- ``eager``: the run folder's model in PyTorch (CPU or CUDA), BatchNorm folded for inference.
- ``onnxruntime``: the graph of :func:`rcnn.deploy.export.export_onnx` in ONNX Runtime on the CPU. Given
  a run folder, the graph is exported on first use and cached beside the weights
  (``<checkpoint>/onnx/model.onnx``, or under ``~/.cache/rcnn/onnx`` where the run folder is
  read-only), keyed by the weights' SHA-256: a retrained checkpoint is exported afresh. The cached
  graph takes the float ``[3, H, W]`` image the backend is given (``input_format="float"``): no
  conversion to uint8 and back, 3% less CPU time for R50-FPN at 800x1066 than a uint8 graph.
  R-CNN has no ONNX form (see :mod:`rcnn.deploy.export`); it runs eager only.

A new backend is one class that implements :class:`Detector` and one branch of :func:`load_detector`.

An ONNX file is checked when it is loaded (:func:`rcnn.deploy.export.check_graph`, run by
:class:`rcnn.deploy.export.OnnxDetector` for every way in: ``--model``, ``rcnn serve``, the cache): rcnn
metadata that does not fit the graph — fewer or more class names than its classifier has classes,
a foreign graph with other inputs or outputs given rcnn's metadata — is one ``ValueError`` naming
the file and what does not fit, never an ``IndexError`` or ``KeyError`` in the middle of a prediction.

Shape shorthand:
    N: images;  D: detections of an image;  P: proposals of an image;  H, W: image size
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from rcnn.build import LoadedModel, load_model
from rcnn.models import DetectorCapabilities, TwoStageDetector, model_device

__all__ = ["BACKENDS", "PRECISIONS", "Detector", "EagerDetector", "as_detector", "cached_onnx_file", "load_detector",
           "model_device", "set_threads", "weights_digest"]  # fmt: skip

BACKENDS = ("eager", "onnxruntime")
PRECISIONS = ("fp32", "int8")


@runtime_checkable
class Detector(Protocol):
    """What every backend is to the predictor (:class:`rcnn.inference.Predictor`), and all it reads.

    ``detector(images, proposals=None, recorder=None)``: ``images`` float ``[3, H, W]`` in 0..1 on
    ``device``; ``proposals`` ``[P, 4]`` per image (original pixels) when ``needs_proposals``;
    ``recorder`` a mapping the forward pass writes its intermediate results to (``batch``,
    ``features``, ``proposals``, ``detections``, ...; only where ``records``). Returns per image
    ``boxes [D, 4]`` (the image's pixels), ``labels [D]`` (1..K), ``scores [D]`` and, where
    ``predicts_masks``, ``masks [D, 1, H, W]``.
    """

    name: str  # the model's name in configs ("faster_rcnn"); a display name: rcnn.inference.GENERATIONS
    num_classes: int  # K + 1, background included
    needs_proposals: bool  # proposals come from outside (selective search or a proposals file)
    has_rpn: bool
    predicts_masks: bool
    trains_in_stages: bool  # R-CNN: its scores are SVM margins, not probabilities
    display_score_thresh: float
    device: torch.device  # where the images go
    input_size: tuple[int, int] | None  # (min_size, max_size) of its resize rule: files are decoded to it
    backend: str  # "eager" or "onnxruntime"
    precision: str  # "fp32" or "int8"
    records: bool  # a recorder receives the forward pass's stages (explain draws them); an eager model's

    def __call__(
        self,
        images: Sequence[Tensor],
        proposals: Sequence[Tensor] | None = None,
        recorder: MutableMapping[str, Any] | None = None,
    ) -> list[dict[str, Tensor]]: ...


class EagerDetector:
    """The eager backend: a model of :mod:`rcnn.models` run by PyTorch, as a :class:`Detector`.

    Each call runs the model in eval mode under ``torch.inference_mode`` and leaves it in the mode
    it was in. ``model`` is the ``nn.Module`` itself (what explain draws the parts of).
    """

    backend = "eager"
    precision = "fp32"
    records = True

    # the model class's capabilities (class attributes of rcnn.models: fixed for an instance)
    _CAPABILITIES = ("name", "needs_proposals", "has_rpn", "predicts_masks", "trains_in_stages", "display_score_thresh")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        for capability in self._CAPABILITIES:
            setattr(self, capability, getattr(type(model), capability))

    @property
    def num_classes(self) -> int:  # (a property of the model: replace_predictor changes it)
        return self.model.num_classes

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def input_size(self) -> tuple[int, int] | None:
        """``(min_size, max_size)`` of the model's resize rule; None for R-CNN, which warps each region."""
        if not isinstance(self.model, TwoStageDetector):
            return None
        return self.model.transform.min_sizes[-1], self.model.transform.max_size

    def __call__(
        self,
        images: Sequence[Tensor],
        proposals: Sequence[Tensor] | None = None,
        recorder: MutableMapping[str, Any] | None = None,
    ) -> list[dict[str, Tensor]]:
        if self.model.training:  # (a walk over every module: only when it is needed)
            self.model.eval()
            try:
                return self(images, proposals, recorder)
            finally:
                self.model.train()
        with torch.inference_mode():
            return self.model(images, proposals=proposals, recorder=recorder)


class TorchvisionDetector:
    """A detector of ``torchvision.models.detection`` (Faster / Mask R-CNN, the library's peer) as a
    :class:`Detector`, so that the same predictor and evaluation measure both (the benchmarks
    compare them like this). Its capabilities are read from torchvision's own structure: an RPN,
    masks where its RoI heads have a mask predictor, its transform's resize rule."""

    name = "torchvision"
    backend = "eager"
    precision = "fp32"
    records = False
    needs_proposals = False
    has_rpn = True
    trains_in_stages = False
    display_score_thresh = DetectorCapabilities.display_score_thresh

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.num_classes = int(model.roi_heads.box_predictor.cls_score.out_features)
        self.predicts_masks = bool(model.roi_heads.has_mask())

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def input_size(self) -> tuple[int, int] | None:
        return int(self.model.transform.min_size[-1]), int(self.model.transform.max_size)

    def __call__(
        self,
        images: Sequence[Tensor],
        proposals: Sequence[Tensor] | None = None,
        recorder: MutableMapping[str, Any] | None = None,
    ) -> list[dict[str, Tensor]]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                return self.model(list(images))
        finally:
            self.model.train(was_training)


def as_detector(model: Detector | nn.Module) -> Detector:
    """``model`` as a :class:`Detector`: a backend's detector as it is, a model of :mod:`rcnn.models`
    run by the eager backend (:class:`EagerDetector`), a torchvision detection model by
    :class:`TorchvisionDetector`; ``TypeError`` for anything else."""
    if isinstance(model, Detector):
        return model
    if isinstance(model, DetectorCapabilities):
        return EagerDetector(model)
    if isinstance(model, nn.Module) and hasattr(model, "roi_heads") and hasattr(model, "transform"):
        return TorchvisionDetector(model)
    raise TypeError(
        f"{type(model).__name__} is not a detector: give a model of rcnn.models, a torchvision detection model "
        "or a backend's detector (rcnn.deploy.backends.load_detector)"
    )


def weights_digest(checkpoint: Path) -> str:
    """SHA-256 of a checkpoint's ``model.safetensors`` (what an exported graph was made from)."""
    digest = hashlib.sha256()
    with open(checkpoint / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _cache_folder(checkpoint: Path, digest: str) -> Path:
    folder = checkpoint / "onnx"
    if not _writable(folder):
        folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rcnn" / "onnx" / digest[:16]
    return folder


def _current(path: Path, digest: str, precision: str) -> bool:
    """Whether ``path`` is a readable graph of these weights at this precision (else it is made again)."""
    from rcnn.deploy.export import onnx_metadata

    if not path.is_file():
        return False
    try:
        meta = onnx_metadata(path)
    except ValueError:
        return False  # a damaged cache file
    if precision == "int8":  # made by today's default quantisation settings
        from rcnn.deploy.quantize import recipe

        if meta.get("int8_recipe") != recipe():
            return False
    current = meta.get("weights_sha256") == digest and meta.get("precision") == precision
    return current and meta.get("input") == "float"  # older caches took uint8 images


def cached_onnx_file(
    weights: str | os.PathLike,
    *,
    precision: str = "fp32",
    calibrate: str | os.PathLike | None = None,
    calibrate_split: str | None = None,
    calibrate_images: int = 200,
    progress: bool = False,
) -> Path:
    """The ONNX graph of a run folder's checkpoint, exported (and for ``precision="int8"`` quantised)
    now unless a current one is cached.

    int8 calibrates on ``calibrate_images`` images of ``calibrate`` (a data set root or a folder of
    images; default: the data set the run was trained on, as its config records it) and is cached
    as ``model-int8.onnx`` beside the fp32 graph; a cached int8 graph is reused whatever
    ``calibrate`` says (delete it, or use ``rcnn export --int8``, to calibrate afresh).
    """
    from rcnn.deploy.export import export_onnx
    from rcnn.io.checkpoints import find_checkpoint

    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    checkpoint = find_checkpoint(weights)
    digest = weights_digest(checkpoint)
    folder = _cache_folder(checkpoint, digest)
    path = folder / "model.onnx"
    if precision == "int8":
        target = folder / "model-int8.onnx"
        if _current(target, digest, "int8"):
            return target
    if not _current(path, digest, "fp32"):
        loaded = load_model(checkpoint, for_inference=False)  # BatchNorm unfolded: ONNX Runtime fuses it itself
        if progress:
            print(f"exporting {checkpoint} to ONNX (once; cached as {path})", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        export_onnx(
            loaded.model, path, loaded.class_names, input_format="float", categories=loaded.categories,
            config=loaded.config, metadata={"rcnn.weights_sha256": digest},
        )  # fmt: skip
    if precision == "fp32":
        return path
    from rcnn.config import load_config
    from rcnn.deploy.quantize import calibration_images, quantize_onnx

    config = load_config(checkpoint / "config.yaml") if (checkpoint / "config.yaml").is_file() else None
    if calibrate is None:
        if config is None or not Path(config.data.root).exists():
            where = f"its data set {config.data.root} is not here" if config is not None else "it records no data set"
            raise ValueError(f"--precision int8 calibrates on images like the model's own, and {checkpoint}: {where}; "
                             "give --calibrate DATA (a data set root or a folder of images)")  # fmt: skip
        calibrate = config.data.root
    images = calibration_images(calibrate, calibrate_split, calibrate_images, config)
    if progress:
        print(f"quantising {path} to int8 on {calibrate_images} images of {calibrate} (once; cached as {target})",
              flush=True)  # fmt: skip
    return quantize_onnx(path, target, images)


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads for PyTorch's operators (ONNX Runtime's are set per session)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def load_detector(
    weights: str | os.PathLike | None = None,
    *,
    model_file: str | os.PathLike | None = None,
    backend: str | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    precision: str | None = None,
    calibrate: str | os.PathLike | None = None,
    calibrate_images: int = 200,
    progress: bool = False,
) -> LoadedModel:
    """A trained detector ready for inference, run by ``backend``: ``LoadedModel(model, config,
    class_names, checkpoint, categories)`` where ``model`` is the eager ``nn.Module`` or an
    :class:`rcnn.deploy.export.OnnxDetector` (:func:`as_detector` makes either a :class:`Detector`).

    ``weights``: a run folder, ``step_*`` folder or ``model.safetensors``; ``model_file``: an ONNX
    file from ``rcnn export`` (implies ``backend="onnxruntime"``; the class names, categories and
    config travel in its metadata). ``backend`` defaults to ``onnxruntime`` with a ``model_file``,
    else ``eager``. ONNX Runtime runs on the CPU; ``device`` is for the eager backend.

    ``precision="int8"`` (ONNX Runtime only; implies it): a run folder is quantised on first use,
    calibrated on ``calibrate_images`` images of ``calibrate`` (default: the run's own training
    data) and cached (:func:`cached_onnx_file`); a ``model_file`` must be an int8 one. ``None`` takes
    a file as it is and a run folder in fp32.
    """
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and backend == "eager":
        raise ValueError("--precision int8 runs in ONNX Runtime: use --backend onnxruntime (or leave --backend out)")
    if calibrate is not None and precision != "int8":
        raise ValueError("--calibrate is for --precision int8")
    backend = backend or ("onnxruntime" if model_file is not None or precision == "int8" else "eager")
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if weights is None and model_file is None:
        raise ValueError("give --weights (a run folder) or --model (an ONNX file from rcnn export)")
    if weights is not None and model_file is not None:
        raise ValueError("give either --weights or --model, not both (the ONNX file holds the weights)")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if backend == "eager":
        if model_file is not None:
            raise ValueError(f"--model {model_file}: an ONNX file runs with --backend onnxruntime only")
        set_threads(threads)
        return load_model(weights, device)
    if torch.device(device).type != "cpu":
        raise ValueError("--backend onnxruntime runs on the CPU (the onnxruntime package is the CPU build); "
                         "on CUDA use --backend eager")  # fmt: skip
    from rcnn.deploy.export import OnnxDetector

    if model_file is None:
        from rcnn.build import model_class
        from rcnn.config import load_config
        from rcnn.io.checkpoints import find_checkpoint

        checkpoint = find_checkpoint(weights)
        if (checkpoint / "config.yaml").is_file():
            name = load_config(checkpoint / "config.yaml").model.name
            if model_class(name).trains_in_stages:
                raise ValueError(f"{weights}: R-CNN has no ONNX form (it runs the CNN once per warped region); "
                                 "use --backend eager")  # fmt: skip
        model_file = cached_onnx_file(weights, precision=precision or "fp32", calibrate=calibrate,
                                      calibrate_images=calibrate_images, progress=progress)  # fmt: skip
    detector = OnnxDetector(model_file, threads=threads)
    if precision is not None and detector.precision != precision:
        raise ValueError(f"--model {model_file}: this graph is {detector.precision}, not {precision} "
                         f"(rcnn export{' --int8 --calibrate DATA' if precision == 'int8' else ''} makes one)")  # fmt: skip
    return LoadedModel(detector, detector.config, list(detector.class_names), Path(model_file), detector.categories)
