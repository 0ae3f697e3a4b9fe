"""Inference backends behind one interface, :class:`Detector`: the same detector run by PyTorch, ONNX Runtime or OpenVINO.

    loaded = load_detector("runs/frcnn")                              # eager PyTorch (the default in Python)
    loaded = load_detector("runs/frcnn", backend="onnxruntime")       # exported once, then cached
    loaded = load_detector("runs/frcnn", backend="openvino")          # the same graph compiled by OpenVINO
    loaded = load_detector("runs/frcnn", backend="auto")              # the fastest here (timed once, remembered)
    loaded = load_detector("runs/frcnn", precision="bf16")            # OpenVINO in bf16, where the CPU has it
    loaded = load_detector(model_file="frcnn.onnx")                   # a file from ``rcnn export``
    loaded = load_detector(model_file="frcnn-int8.onnx")              # ... quantised: ``rcnn export --int8``
    loaded = load_detector(model_file="frcnn.xml")                    # ... as OpenVINO IR: ``--format openvino``
    detector = as_detector(loaded.model)                              # a Detector, whatever the backend
    outputs = detector([image])                                       # [{"boxes", "labels", "scores"(, "masks")}]

Every backend implements :class:`Detector` (a ``typing.Protocol``): the call ``detector(images,
proposals=None, recorder=None)`` (images float ``[3, H, W]`` in 0..1 on ``detector.device``; boxes
in the image's pixels) and the capabilities the predictor reads (``needs_proposals``,
``predicts_masks``, ``num_classes``, ``input_size``, ``device``, ...). :class:`EagerDetector` is
the eager backend (a model of :mod:`rcnn.models` in PyTorch); :class:`rcnn.deploy.export.OnnxDetector`
the ONNX Runtime one; :class:`rcnn.deploy.openvino.OpenVinoDetector` the OpenVINO one.
:class:`rcnn.inference.Predictor` runs any of them, so ``rcnn predict``, ``rcnn evaluate``,
``rcnn serve`` and the Python functions of :mod:`rcnn.inference` run any (``--backend
auto|eager|onnxruntime|openvino``, ``--model FILE``). In fp32 their outputs agree within the
tolerances that ``tests/test_backends.py`` and ``tests/test_openvino.py`` pin (boxes to 1e-2 px,
scores to 1e-4); bf16 and int8 change the numbers (their tolerances are stated in those tests,
their AP in ``docs/export.md``).

- ``eager``: the run folder's model in PyTorch (CPU or CUDA), BatchNorm folded for inference.
- ``onnxruntime``: the graph of :func:`rcnn.deploy.export.export_onnx` in ONNX Runtime on the CPU. Given
  a run folder, the graph is exported on first use and cached beside the weights
  (``<checkpoint>/onnx/model.onnx``, or under ``~/.cache/rcnn/onnx`` where the run folder is
  read-only), keyed by the weights' SHA-256: a retrained checkpoint is exported afresh. The cached
  graph takes the float ``[3, H, W]`` image the backend is given (``input_format="float"``).
  R-CNN has no ONNX form (see :mod:`rcnn.deploy.export`); it runs eager only.
- ``openvino``: the same cached graph (or a file: ONNX, or the IR of ``rcnn export --format
  openvino``) compiled by OpenVINO for this CPU, the compiled graph cached in
  ``<checkpoint>/onnx/openvino`` (``~/.cache/rcnn/openvino`` for a file); fp32, bf16 and int8
  (:mod:`rcnn.deploy.openvino`).
- ``auto``: the fastest of these on this machine for this model (:func:`choose_backend`).

A new backend is one class that implements :class:`Detector` and one branch of :func:`load_detector`.

An exported file is checked when it is loaded (:func:`rcnn.deploy.export.check_graph`, run by
:class:`rcnn.deploy.export.ExportedDetector` for every way in: ``--model``, ``rcnn serve``, the cache): rcnn
metadata that does not fit the graph — fewer or more class names than its classifier has classes,
a foreign graph with other inputs or outputs given rcnn's metadata — is one ``ValueError`` naming
the file and what does not fit, never an ``IndexError`` or ``KeyError`` in the middle of a prediction.

Shape shorthand:
    N: images;  D: detections of an image;  P: proposals of an image;  H, W: image size
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from rcnn.build import LoadedModel, load_model, model_class
from rcnn.models import DetectorCapabilities, TwoStageDetector, model_device

__all__ = ["BACKENDS", "BACKEND_CHOICES", "BACKEND_PRECISIONS", "PRECISIONS", "Detector", "EagerDetector", "as_detector",
           "cached_onnx_file", "choose_backend", "cpu_info", "load_detector", "model_device", "set_threads",
           "weights_digest"]  # fmt: skip

BACKENDS = ("eager", "onnxruntime", "openvino")
BACKEND_CHOICES = ("auto", *BACKENDS)  # auto: the fastest of them on this machine (choose_backend)
PRECISIONS = ("fp32", "bf16", "int8")
BACKEND_PRECISIONS = {"eager": ("fp32",), "onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}
_NAMES = {"eager": "PyTorch (eager)", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}


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
    backend: str  # "eager", "onnxruntime" or "openvino"
    precision: str  # "fp32", "bf16" or "int8"
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
        folder = _user_cache() / "onnx" / digest[:16]
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

    if precision not in ("fp32", "int8"):
        raise ValueError(f"--precision {precision!r}: an exported graph is fp32 or int8 (bf16 is how OpenVINO runs fp32)")
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
    """Use ``threads`` CPU threads for PyTorch's operators (ONNX Runtime's and OpenVINO's are set per session)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def _default_backend(model_file: str | os.PathLike | None, precision: str | None) -> str:
    """The backend when none is asked for: a file's runtime (an IR's OpenVINO, an ONNX file's ONNX
    Runtime), the one of a precision the eager model lacks, else eager."""
    if model_file is not None:
        return "openvino" if str(model_file).endswith(".xml") else "onnxruntime"
    return {"int8": "onnxruntime", "bf16": "openvino"}.get(precision or "fp32", "eager")


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
    class_names, checkpoint, categories)`` where ``model`` is the eager ``nn.Module``, an
    :class:`rcnn.deploy.export.OnnxDetector` or an :class:`rcnn.deploy.openvino.OpenVinoDetector`
    (:func:`as_detector` makes any of them a :class:`Detector`).

    ``weights``: a run folder, ``step_*`` folder or ``model.safetensors``; ``model_file``: an ONNX
    file from ``rcnn export`` or an OpenVINO IR ``.xml`` from ``rcnn export --format openvino`` (the
    class names, categories and config travel in its metadata). ``backend``: ``eager``,
    ``onnxruntime``, ``openvino`` or ``auto`` (the fastest of them on this machine, timed on first
    use and remembered: :func:`choose_backend`); default: a file's own runtime (ONNX Runtime for
    ``.onnx``, OpenVINO for ``.xml``), else eager (or the backend of a precision the eager model
    lacks). ONNX Runtime and OpenVINO run on the CPU; ``device`` is for the eager backend.

    ``precision``: ``fp32``, ``bf16`` (OpenVINO, where the CPU has bf16 instructions) or ``int8``
    (ONNX Runtime or OpenVINO). A run folder is exported on first use, and for int8 quantised,
    calibrated on ``calibrate_images`` images of ``calibrate`` (default: the run's own training
    data), and cached (:func:`cached_onnx_file`); a ``model_file`` must be of that precision (bf16:
    an fp32 file). ``None`` takes a file as it is and a run folder in fp32.
    """
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if backend is not None and backend not in BACKEND_CHOICES:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    if calibrate is not None and precision != "int8":
        raise ValueError("--calibrate is for --precision int8")
    if weights is None and model_file is None:
        raise ValueError("give --weights (a run folder) or --model (an ONNX file or OpenVINO IR from rcnn export)")
    if weights is not None and model_file is not None:
        raise ValueError("give either --weights or --model, not both (the exported file holds the weights)")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    backend = backend or _default_backend(model_file, precision)
    if backend == "auto":
        backend, chosen = _choose(weights, model_file, device, threads, precision, calibrate, calibrate_images, progress,
                                  print if progress else (lambda line: None))  # fmt: skip
        if chosen is not None:  # loaded while timing
            return chosen
    if precision is not None and precision not in BACKEND_PRECISIONS[backend]:
        runs = [b for b in BACKENDS if precision in BACKEND_PRECISIONS[b]]
        raise ValueError(f"--precision {precision} runs in {' or '.join(_NAMES[b] for b in runs)}: use --backend "
                         f"{' or --backend '.join(runs)} (or leave --backend out)")  # fmt: skip
    if backend == "eager":
        if model_file is not None:
            raise ValueError(f"--model {model_file}: an exported file runs with --backend onnxruntime or openvino only")
        set_threads(threads)
        return load_model(weights, device)
    if torch.device(device).type != "cpu":
        raise ValueError(f"--backend {backend} runs on the CPU (the {backend} package is the CPU build); "
                         "on CUDA use --backend eager")  # fmt: skip
    if backend == "onnxruntime" and model_file is not None and str(model_file).endswith(".xml"):
        raise ValueError(f"--model {model_file}: an OpenVINO IR runs with --backend openvino only")
    from rcnn.deploy.export import OnnxDetector

    if backend == "openvino" and precision is not None:  # bf16 where the CPU lacks it: refused before any export
        from rcnn.deploy.openvino import check_precision

        check_precision(precision)
    cache_dir = None
    if model_file is None:
        _graph_checkpoint(weights)
        graph_precision = "int8" if precision == "int8" else "fp32"
        model_file = cached_onnx_file(weights, precision=graph_precision, calibrate=calibrate,
                                      calibrate_images=calibrate_images, progress=progress)  # fmt: skip
        cache_dir = Path(model_file).parent / "openvino"
    if backend == "openvino":
        from rcnn.deploy.openvino import OpenVinoDetector

        if cache_dir is None:
            cache_dir = _user_cache() / "openvino"
        detector = OpenVinoDetector(model_file, threads=threads, precision=precision,
                                    cache_dir=cache_dir if _writable(cache_dir) else None)  # fmt: skip
    else:
        detector = OnnxDetector(model_file, threads=threads)
        if precision is not None and detector.precision != precision:
            raise ValueError(f"--model {model_file}: this graph is {detector.precision}, not {precision} "
                             f"(rcnn export{' --int8 --calibrate DATA' if precision == 'int8' else ''} makes one)")  # fmt: skip
    return LoadedModel(detector, detector.config, list(detector.class_names), Path(model_file), detector.categories)


def _graph_checkpoint(weights: str | os.PathLike) -> None:
    """Refuse (one line) a run whose model has no exported form (R-CNN)."""
    if _has_no_graph(weights):
        raise ValueError(f"{weights}: R-CNN has no ONNX form (it runs the CNN once per warped region); "
                         "use --backend eager")  # fmt: skip


# -- --backend auto ------------------------------------------------------------------------------
AUTO_ROUNDS = 3  # timed calls per backend (after one warm-up call each); the best counts
AUTO_CHOICES_FILE = "backend-choices.json"  # in the user's cache folder (_user_cache)


def cpu_info() -> dict[str, Any]:
    """The CPU this process runs on: ``model`` (its name), ``flags`` (its instruction-set flags, as the
    kernel lists them; empty where it does not) and ``cores``."""
    import platform

    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in (platform.processor(), platform.machine()):
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = value.split()
    except OSError:
        pass
    return {"model": model, "flags": flags, "cores": os.cpu_count()}


def _machine_key(threads: int | None) -> dict[str, Any]:
    """What a timed choice holds for: the CPU's model and instruction set, the threads, the runtimes' versions."""
    import onnxruntime

    info = cpu_info()
    versions = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import openvino

        versions["openvino"] = openvino.__version__
    except ImportError:
        pass
    return {"cpu": info["model"], "flags": hashlib.sha256(" ".join(sorted(info["flags"])).encode()).hexdigest()[:16],
            "threads": threads or torch.get_num_threads(), **versions}  # fmt: skip


def _user_cache() -> Path:
    """The library's cache folder of this user: ``$XDG_CACHE_HOME/rcnn`` (default ``~/.cache/rcnn``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rcnn"


def _seconds(call: Callable[[], Any]) -> float:
    """Wall seconds of one call (what ``--backend auto`` compares; tests replace it)."""
    tic = time.perf_counter()
    call()
    return time.perf_counter() - tic


def _timing_inputs(config: Any, needs_proposals: bool) -> tuple[Tensor, Tensor | None]:
    """An image of the model's input size (``min_size`` high, a 4:3 photograph's width within
    ``max_size``; 480 x 640 where the size is not known) and, for a model that needs them,
    proposals: what ``--backend auto`` times the backends on."""
    model = getattr(config, "model", None)
    short = int(getattr(model, "min_size", None) or 480)
    long = int(getattr(model, "max_size", None) or 640)
    height, width = short, min(long, round(short * 4 / 3))
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, height, width, generator=g) * 255).round() / 255
    proposals = None
    if needs_proposals:  # selective search gives about 2,000 boxes of an image
        xy = torch.rand(2000, 2, generator=g) * torch.tensor([width * 0.8, height * 0.8])
        proposals = torch.cat((xy, xy + 16 + torch.rand(2000, 2, generator=g) * torch.tensor([width, height]) / 5), 1)
    return image, proposals


def choose_backend(
    weights: str | os.PathLike | None = None,
    *,
    model_file: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    precision: str | None = None,
    calibrate: str | os.PathLike | None = None,
    calibrate_images: int = 200,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> str:
    """The fastest backend for this model on this machine (``--backend auto``).

    On CUDA, and for R-CNN (which has no exported form), the eager backend. Otherwise every
    backend that runs ``precision`` (fp32 by default: eager, ONNX Runtime, OpenVINO; an exported
    file: its runtimes) is loaded and timed on an image of the model's input size (one warm-up
    call, then :data:`AUTO_ROUNDS` interleaved calls, the best wall time counting); the choice and
    its timings are printed once (``log``) and kept in ``~/.cache/rcnn/backend-choices.json``, keyed
    by the weights' SHA-256 (or the file's), the precision, the CPU model and its instruction set,
    the threads and the runtimes' versions: a retrained model, another machine or other threads are
    timed afresh. fp32 backends agree within the tested tolerances, so the choice changes the
    speed, not the detections.
    """
    return _choose(weights, model_file, device, threads, precision, calibrate, calibrate_images, progress, log)[0]


def _choose(weights, model_file, device, threads, precision, calibrate, calibrate_images, progress,
            log) -> tuple[str, LoadedModel | None]:  # fmt: skip
    """:func:`choose_backend`, and the chosen backend's model where timing loaded it (else None)."""
    from rcnn.io.files import read_json, write_json

    if torch.device(device).type != "cpu":
        return "eager", None
    if model_file is not None:
        if not Path(model_file).is_file():
            raise FileNotFoundError(f"--model {model_file}: not found")
        digest = _file_digest(Path(model_file))
        candidates = ["openvino"] if str(model_file).endswith(".xml") else ["onnxruntime", "openvino"]
    else:
        from rcnn.io.checkpoints import find_checkpoint

        checkpoint = find_checkpoint(weights)
        if _has_no_graph(checkpoint):
            return "eager", None
        digest, candidates = weights_digest(checkpoint), list(BACKENDS)
    candidates = [b for b in candidates if (precision or "fp32") in BACKEND_PRECISIONS[b]]
    if len(candidates) == 1:
        return candidates[0], None
    key = json.dumps({"model": digest, "precision": precision or "fp32", **_machine_key(threads)}, sort_keys=True)
    store = _user_cache() / AUTO_CHOICES_FILE
    try:
        choices = read_json(store) if store.is_file() else {}
    except (OSError, ValueError):
        choices = {}  # a damaged record is timed afresh
    if not isinstance(choices, dict):
        choices = {}
    known = choices.get(key)
    if isinstance(known, dict) and known.get("backend") in candidates:
        return known["backend"], None
    loaded = {backend: load_detector(weights, model_file=model_file, backend=backend, device=device, threads=threads,
                                     precision=precision, calibrate=calibrate, calibrate_images=calibrate_images,
                                     progress=progress) for backend in candidates}  # fmt: skip
    first = next(iter(loaded.values()))
    detectors = {name: as_detector(one.model) for name, one in loaded.items()}
    image, proposals = _timing_inputs(first.config, detectors[candidates[0]].needs_proposals)
    calls = {name: functools.partial(d, [image], None if proposals is None else [proposals]) for name, d in detectors.items()}
    with torch.inference_mode():
        for call in calls.values():  # a warm-up call each: first-call allocations, lazy initialisation
            call()
        best = {name: float("inf") for name in calls}
        for r in range(AUTO_ROUNDS):
            for name in candidates if r % 2 == 0 else candidates[::-1]:
                best[name] = min(best[name], _seconds(calls[name]))
    chosen = min(candidates, key=lambda name: best[name])
    size = f"{image.shape[1]}x{image.shape[2]}"
    timings = ", ".join(f"{name} {best[name]:.3f}" for name in candidates)
    log(f"--backend auto: {chosen} (seconds per image at {size}, best of {AUTO_ROUNDS}: {timings}; "
        f"remembered in {store} for this model on this machine)")  # fmt: skip
    choices[key] = {"backend": chosen, "seconds": best, "size": size, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if _writable(store.parent):
        write_json(store, choices)
    return chosen, loaded[chosen]


def _has_no_graph(weights: str | os.PathLike) -> bool:
    """Whether the model of a run folder's checkpoint has no exported form (R-CNN, which trains in
    stages); a checkpoint without its config is taken to have one."""
    from rcnn.config import load_config
    from rcnn.io.checkpoints import find_checkpoint

    config_file = find_checkpoint(weights) / "config.yaml"
    return config_file.is_file() and model_class(load_config(config_file).model.name).trains_in_stages


def _file_digest(path: Path) -> str:
    """SHA-256 of a file (an IR: of its ``.xml`` and ``.bin``)."""
    digest = hashlib.sha256()
    for part in [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]:
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
