"""The HTTP server: FastAPI endpoints over one or several trained detectors.

    app = create_app([ServedModel.load("runs/frcnn")], ServeSettings())

Endpoints (see docs/serve.md; the OpenAPI spec is at ``/openapi.json``, its page at ``/docs``):

- ``POST /predict[?model=ID][&score_thresh=S]``: an image as a multipart file field (``image``,
  ``file`` or any other name: the one file of the form) or as the raw body (``Content-Type:
  image/...``) -> detections of each served model (or of ``ID``) in the library's one JSON schema
  (:func:`rcnn.inference.detection_records`, as ``rcnn predict`` writes them), with the time split
  into proposals and the rest;
- ``POST /explain?model=ID``: the same upload -> the model's stage-by-stage page (HTML);
- ``GET /model``, ``GET /health``, ``GET /samples``, ``GET /samples/{name}``, and ``GET /``: the page.

Each model is run by its :class:`rcnn.inference.Predictor`, the one ``rcnn predict`` uses: the
upload is decoded as ``rcnn predict`` decodes a file (reduced to the model's input size), and the
detections are in the upload's pixels.

Bounded work (:class:`rcnn.serve.limits.WorkQueue`): a request size limit, ``concurrency``
inferences at once in worker threads (one at a time per model: a model's timing hooks and
explain hooks are not shared between threads), ``queue_size`` waiting, a per-request timeout. Every
error is JSON ``{"error": code, "detail": what is wrong and how to fix it}`` with a 4xx/5xx status;
a bad request never stops the server. Query parameters are range-checked (``score_thresh``: a
finite number, in [0, 1] for models whose scores are probabilities): 422 naming the parameter.
A client that disconnects during its upload costs one line in the log, not a traceback.

Shape shorthand:
    D: detections;  H, W: image size
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from rcnn.data.shapes import render_shapes_image
from rcnn.explain import explain_html
from rcnn.inference import Predictor, check_score_thresh, detection_records, generation
from rcnn.io.files import write_bytes
from rcnn.io.images import DecodedImage, image_size
from rcnn.serve.limits import ApiError, WorkQueue

__all__ = ["ServeSettings", "ServedModel", "create_app", "sample_images"]

# The server's own log lines go where uvicorn's go (its "uvicorn.error" logger is the server log).
LOG = logging.getLogger("uvicorn.error")

# The bounds of the settings (rcnn serve's options): a request of at most 1 GiB (held in memory),
# images of at most 1 gigapixel (3 GB decoded), 64 inferences at once, 10000 waiting, a day per request.
MAX_UPLOAD_BYTES = 1 << 30
MAX_PIXELS = 1_000_000_000
MAX_CONCURRENCY = 64
MAX_QUEUE = 10_000
MAX_TIMEOUT_S = 86_400.0


@dataclass
class ServeSettings:
    """The server's limits.

    Attributes:
        max_upload_bytes: larger requests are refused with 413 (20 MB).
        max_pixels: larger images (by their header) are refused with 413 before decoding (40 MP).
        concurrency: inferences running at once, in worker threads (1: a 2-core machine).
        queue_size: requests waiting for a worker; beyond ``concurrency + queue_size`` -> 503.
        request_timeout_s: a request that waits and runs longer is answered 504.
        retry_after_s: the ``Retry-After`` of a 503.
    """

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    concurrency: int = 1
    queue_size: int = 8
    request_timeout_s: float = 60.0
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        ranges = {"max_upload_bytes": (1, MAX_UPLOAD_BYTES), "max_pixels": (1, MAX_PIXELS),
                  "concurrency": (1, MAX_CONCURRENCY), "queue_size": (0, MAX_QUEUE),
                  "request_timeout_s": (1e-3, MAX_TIMEOUT_S), "retry_after_s": (0, 3600)}  # fmt: skip
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:  # fmt: skip
                raise ValueError(f"ServeSettings.{name}: must be a number in [{low:g}, {high:g}], got {value!r}")


@dataclass
class ServedModel:
    """A trained detector the server runs (``model``: an eager model or any backend's detector, run by
    its :class:`rcnn.inference.Predictor`), under the id the API calls it by."""

    id: str
    model: Any
    class_names: list[str]
    run: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    predictor: Predictor = field(init=False)

    def __post_init__(self) -> None:
        self.predictor = Predictor(self.model, max_pixels=None)  # the server checks the pixels itself (max_pixels)

    @property
    def explainable(self) -> bool:
        """Whether the stage-by-stage page can be drawn: the detector records its forward pass (eager)."""
        return self.predictor.detector.records

    @classmethod
    def load(cls, run: str | os.PathLike, id: str | None = None, device: str = "cpu", backend: str | None = None,
             threads: int | None = None, **precision) -> ServedModel:  # fmt: skip
        """The model of a run folder or of an exported ONNX file (``rcnn.deploy.backends.load_detector``;
        ``backend`` None: ONNX Runtime for a ``.onnx`` file, else eager; ``precision``, ``calibrate``,
        ``calibrate_images`` as there), its id default its ``model.name``."""
        from rcnn.deploy.backends import load_detector

        is_onnx = str(run).endswith((".onnx", ".xml"))  # an exported file: ONNX, or OpenVINO IR
        loaded = load_detector(
            None if is_onnx else run, model_file=run if is_onnx else None, backend=backend,
            device="cpu" if is_onnx else device,  # ONNX Runtime's CPU build, beside eager models on CUDA
            threads=threads, progress=True, **precision,
        )  # fmt: skip
        served = cls(id or loaded.model.name, loaded.model, list(loaded.class_names), str(run))
        detector, config = served.predictor.detector, loaded.config
        served.info = {"backend": detector.backend, "precision": detector.precision}
        if config is not None:
            # the input the network sees: the image rescaled (two-stage detectors) or each region warped (R-CNN)
            options = config.model.model_dump()
            sizes = {k: options[k] for k in ("min_size", "max_size", "warp_size") if options.get(k) is not None}
            served.info.update(backbone=config.model.backbone, input_size=sizes)
        return served

    def describe(self) -> dict[str, Any]:
        """What ``GET /model`` says of this model."""
        m = self.predictor.detector
        return {
            "id": self.id,
            "generation": generation(m),
            "architecture": type(self.model).__name__,
            "name": m.name,
            "backbone": self.info.get("backbone"),
            "classes": self.class_names[1:],
            "num_classes": len(self.class_names),
            "input_size": self.info.get("input_size", {}),
            "score_thresh": float(m.display_score_thresh),
            "needs_proposals": bool(m.needs_proposals),
            "has_rpn": bool(m.has_rpn),
            "predicts_masks": bool(m.predicts_masks),
            "run": self.run,
            "backend": self.info.get("backend", "eager"),
            "precision": self.info.get("precision", "fp32"),
            "explainable": self.explainable,
        }


# -- the JSON schema (also the OpenAPI spec's) -------------------------------------------------
class ErrorBody(BaseModel):
    error: str = Field(description="a short code: empty_upload, not_an_image, truncated_image, too_large, ...")
    detail: str = Field(description="what is wrong and how to fix it")


class RLEMask(BaseModel):
    size: list[int] = Field(description="[H, W] of the image")
    counts: str = Field(description="COCO run-length encoding (pycocotools' compressed string, column-major)")


class Detection(BaseModel):
    """One detection, in the library's one JSON schema (``rcnn predict``'s records too)."""

    box: list[float] = Field(description="[x1, y1, x2, y2] in the uploaded image's pixels")
    label: int = Field(description="class index 1..K (0 is the background)")
    class_name: str = Field(description="the class's name (the run's classes.json)")
    score: float = Field(description="a probability; R-CNN's are SVM values (0 is its decision boundary)")
    mask: RLEMask | None = Field(default=None, description="Mask R-CNN only (absent otherwise): the binary mask at the image's size")


class TimeSplit(BaseModel):
    proposals: float | None = Field(
        description="ms: selective search, or the RPN inside the model (null where the RPN runs inside an ONNX Runtime graph)"
    )
    rest: float = Field(description="ms: everything else of the model call (resize and post-processing included)")
    total: float


class ModelResult(BaseModel):
    model: str = Field(description="the served model's id")
    generation: str
    score_thresh: float = Field(description="the model's default display threshold")
    explainable: bool = Field(description="whether POST /explain can draw this model's stages (eager models)")
    time_ms: TimeSplit
    detections: list[Detection]


class ImageSize(BaseModel):
    width: int
    height: int


class PredictResponse(BaseModel):
    image: ImageSize
    results: list[ModelResult]


ERRORS = {code: {"model": ErrorBody} for code in (400, 404, 413, 415, 422, 503, 504)}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "the image: a multipart form with the file in the field `image` (or `file`: any one file "
        "field), or the raw bytes with an image content type (image/png, image/jpeg, ...)",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"},
                                                            "file": {"type": "string", "format": "binary"}}}
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


# -- uploads -----------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (by Content-Length, then while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"the request has {int(declared)} bytes; the limit is {limit} (max_upload_bytes)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too_large", f"the request exceeds the limit of {limit} bytes (max_upload_bytes)")
            chunks.append(chunk)
    except ClientDisconnect:  # an aborted upload: one line in the log, no traceback, the server goes on
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        LOG.info("%s %s: %s disconnected during the upload (after %d bytes); request dropped",
                 request.method, request.url.path, client, size)  # fmt: skip
        raise ApiError(400, "client_disconnected", f"the client disconnected during the upload (after {size} bytes)") from None
    return b"".join(chunks)


async def _one_chunk(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


def _upload_part(form: Any) -> UploadFile:
    """The file of a multipart form: the field ``image``, else the form's one file field (``file``, or
    any name); 422 ``missing_field`` for none, several, or a text value where the file should be."""
    part = form.get("image")
    if isinstance(part, UploadFile):
        return part
    files = sorted(key for key, value in form.multi_items() if isinstance(value, UploadFile))
    if part is None and len(files) == 1:
        return form.get(files[0])
    if part is not None:
        what = "a text value, not a file"
    elif files:
        what = f"missing, and the form has {len(files)} file fields ({files}): which is the image?"
    else:
        what = f"missing (fields sent: {sorted(form.keys()) or 'none'})"
    raise ApiError(422, "missing_field", f"the multipart field 'image' is {what}; send the one image file as 'image' "
                   "(or 'file')")  # fmt: skip


async def upload_bytes(request: Request, limit: int) -> tuple[bytes, str]:
    """The uploaded image's bytes and a name for it, from a multipart form's file (:func:`_upload_part`)
    or a raw image body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await _read_body(request, limit)
    if content_type == "multipart/form-data":
        parser = MultiPartParser(request.headers, _one_chunk(body), max_files=4, max_fields=16)
        parser.spool_max_size = limit + 1  # keep the file in memory: the body is already bounded
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed ({exc})") from None
        try:
            part = _upload_part(form)
        except ApiError:
            await form.close()
            raise
        data = await part.read()
        name = part.filename or "upload"
        await form.close()
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        data, name = body, "upload"
    else:
        raise ApiError(
            415, "unsupported_media_type",
            f"Content-Type {content_type or 'missing'!r}: send multipart/form-data with the file in the field 'image', "
            "or the raw image with Content-Type image/png, image/jpeg, ...",
        )  # fmt: skip
    if not data:
        raise ApiError(400, "empty_upload", "the uploaded file has zero bytes; choose an image file")
    return data, name


@contextlib.contextmanager
def uploaded_file(data: bytes, name: str, max_pixels: int) -> Iterator[Path]:
    """The uploaded bytes as a temporary image file, its header read (``not_an_image``) and its pixels
    counted (``too_many_pixels``) before anything is decoded; removed after the block."""
    suffix = Path(name).suffix.lower()[:8] if Path(name).suffix else ""
    with tempfile.TemporaryDirectory(prefix="rcnn-serve-") as folder:
        path = write_bytes(Path(folder) / f"upload{suffix}", data)
        try:
            height, width = image_size(path)  # the header only
        except ValueError as exc:
            raise ApiError(400, "not_an_image", f"'{name}' is not an image file that can be read ({_why(exc, path, name)})") from None
        if height * width > max_pixels:
            raise ApiError(413, "too_many_pixels", f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} (max_pixels)")
        yield path


def read_upload(predictor: Predictor, path: Path, name: str) -> DecodedImage:
    """An uploaded file (:func:`uploaded_file`) decoded for ``predictor`` as ``rcnn predict`` decodes a
    file (:meth:`rcnn.inference.Predictor.read`: the library's one reader, its conversion rules)."""
    try:
        return predictor.read(path)
    except ValueError as exc:
        raise ApiError(400, "truncated_image", f"'{name}' is an image but its pixels cannot be decoded ({_why(exc, path, name)}); it may be truncated or corrupt") from None


def decode_upload(data: bytes, name: str, max_pixels: int, predictor: Predictor) -> DecodedImage:
    """The uploaded bytes decoded for ``predictor``: :func:`uploaded_file`, then :func:`read_upload`."""
    with uploaded_file(data, name, max_pixels) as path:
        return read_upload(predictor, path, name)


def _why(exc: Exception, path: Path, name: str) -> str:
    """The reason in an ``rcnn.io.images`` error, naming the upload rather than the temporary file."""
    text = str(exc).replace(f"{path}: ", "").replace(str(path), name)
    start, end = text.find("("), text.rfind(")")
    return text[start + 1 : end] if 0 <= start < end else text


# -- results -----------------------------------------------------------------------------------
def predict_one(served: ServedModel, image: DecodedImage, score_thresh: float | None) -> dict[str, Any]:
    """One model on one image: the ``ModelResult`` JSON."""
    with served.lock:
        prediction, times = served.predictor.timed(image)
    output = prediction.output
    keep = None if score_thresh is None else output["scores"] >= score_thresh
    rest = 1000 * times["rest_s"]
    proposals = None if times["proposals_s"] is None else 1000 * times["proposals_s"]  # None: inside an ONNX graph
    return {
        "model": served.id,
        "generation": generation(served.predictor.detector),
        "score_thresh": float(served.predictor.detector.display_score_thresh),
        "explainable": served.explainable,
        "time_ms": {"proposals": None if proposals is None else round(proposals, 2), "rest": round(rest, 2),
                    "total": round((proposals or 0.0) + rest, 2)},
        "detections": detection_records(output, served.class_names, keep),
    }


def sample_images(count: int = 3, size: int = 128) -> dict[str, bytes]:
    """``count`` shapes images (PNG bytes) drawn by the shapes data set's generator, seeds 1.."""
    samples = {}
    for seed in range(1, count + 1):
        pixels, _ = render_shapes_image(np.random.default_rng(1000 + seed), (size, size), max_objects=4, min_object_size=16.0)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
        samples[f"shapes_{seed}.png"] = buffer.getvalue()
    return samples


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def create_app(models: Sequence[ServedModel], settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``models`` (at least one; ids must be unique)."""
    if not models:
        raise ValueError("serve: give at least one model (--weights RUN [RUN ...])")
    ids = [m.id for m in models]
    if len(set(ids)) != len(ids):
        raise ValueError(f"serve: model ids must be unique, got {ids}; name them with --weights ID=RUN")
    settings = settings or ServeSettings()
    queue = WorkQueue(settings.concurrency, settings.queue_size, settings.request_timeout_s, settings.retry_after_s)
    by_id = {m.id: m for m in models}
    samples = sample_images()
    page = resources.files("rcnn.serve").joinpath("page.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        queue.shutdown()  # waits for the running inferences

    app = FastAPI(
        lifespan=lifespan,
        title="rcnn serve",
        version="1",
        description="The R-CNN family on your own images: detections as JSON (boxes, classes, scores, COCO RLE "
        "masks, the time split into proposals and the rest) and each model's stage-by-stage explanation.",
    )
    app.state.queue, app.state.models, app.state.settings = queue, by_id, settings

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = f"{request.method} {request.url.path}: {exc.detail}; see /docs for the endpoints"
        return _error(exc.status_code, code, detail)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error(422, "invalid_request", problems)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    def checked_thresh(value: float | None, target: ServedModel) -> float | None:
        try:
            return check_score_thresh(value, target.model, "score_thresh")
        except ValueError as exc:
            raise ApiError(422, "invalid_parameter", f"query parameter {exc} (model {target.id!r})") from None

    def chosen(model: str | None) -> list[ServedModel]:
        if model is None:
            return list(models)
        if model not in by_id:
            raise ApiError(404, "unknown_model", f"no model {model!r}; served: {ids} (GET /model)")
        return [by_id[model]]

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=UPLOAD_BODY,
              summary="Detect objects in an uploaded image")  # fmt: skip
    async def predict(
        request: Request,
        model: str | None = Query(None, description="a served model's id (GET /model); default: every model"),
        score_thresh: float | None = Query(
            None, allow_inf_nan=False,
            description="return only detections scoring at least this, in [0, 1] (R-CNN: any number; default: all)",
        ),
    ) -> dict[str, Any]:
        targets = chosen(model)
        for target in targets:
            checked_thresh(score_thresh, target)
        data, name = await upload_bytes(request, settings.max_upload_bytes)

        def work() -> dict[str, Any]:
            with uploaded_file(data, name, settings.max_pixels) as path:
                images = [read_upload(m.predictor, path, name) for m in targets]  # each model's decode size
            height, width = images[0].original_size
            results = [predict_one(m, image, score_thresh) for m, image in zip(targets, images)]
            return {"image": {"width": int(width), "height": int(height)}, "results": results}

        # as built: the schema is the OpenAPI spec's, and a detection without a mask has no "mask" (not null),
        # as rcnn predict writes it
        return JSONResponse(await queue.run(work))

    @app.post("/explain", response_class=HTMLResponse, responses=ERRORS, openapi_extra=UPLOAD_BODY,
              summary="The model's stage-by-stage explanation of an uploaded image (HTML)")  # fmt: skip
    async def explain(
        request: Request,
        model: str | None = Query(None, description="a served model's id; default: the first"),
        score_thresh: float | None = Query(
            None, allow_inf_nan=False,
            description="detections scoring at least this count, in [0, 1] (R-CNN: any number; default: the model's)",
        ),
    ) -> HTMLResponse:
        target = chosen(model)[0]
        checked_thresh(score_thresh, target)
        if not target.explainable:
            raise ApiError(400, "not_explainable", f"model {target.id!r} runs in {target.info.get('backend')}, which gives only its detections; "
                           "serve the run folder with --backend eager to explain it stage by stage")  # fmt: skip
        data, name = await upload_bytes(request, settings.max_upload_bytes)

        def work() -> str:
            with uploaded_file(data, name, settings.max_pixels) as path:
                image = read_upload(target.predictor, path, name)
            with target.lock:
                html, _ = explain_html(target.predictor, image, target.class_names, score_thresh=score_thresh,
                                       title=Path(name).name)  # fmt: skip
            return html

        return HTMLResponse(await queue.run(work))

    @app.get("/model", summary="The served models: classes, architecture, generation, input sizes, score threshold")
    async def model_info() -> dict[str, Any]:
        return {"models": [m.describe() for m in models]}

    @app.get("/health", summary="Liveness and the queue's load")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": ids, "queue": queue.load}

    @app.get("/samples", summary="The bundled sample images (shapes, drawn at start-up)")
    async def sample_list() -> dict[str, Any]:
        return {"samples": [{"name": n, "url": f"/samples/{n}"} for n in samples]}

    @app.get("/samples/{name}", responses={404: {"model": ErrorBody}}, summary="One sample image (PNG)")
    async def sample(name: str) -> Response:
        if name not in samples:
            raise ApiError(404, "unknown_sample", f"no sample {name!r}; samples: {sorted(samples)}")
        return Response(samples[name], media_type="image/png")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app
