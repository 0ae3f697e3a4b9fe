"""``rcnn serve``: detections and explanations over HTTP, with a web page.

    rcnn serve --weights runs/frcnn                      # http://127.0.0.1:8000/
    rcnn serve --weights rcnn=runs/a fast=runs/b faster=runs/c mask=runs/d --port 8080
"""

from __future__ import annotations

import argparse

from rcnn.commands.options import MAX_THREADS, add_backend_argument, add_precision_arguments, float_range, int_range

# The ranges of the options are those of rcnn.serve.ServeSettings (kept here as numbers: the
# server's module loads FastAPI, which ``rcnn --help`` need not).
MAX_UPLOAD_MB = 1024.0  # a request is held in memory: 1 GiB at most
MAX_WORKERS = 64
MAX_QUEUE = 10_000
MAX_TIMEOUT_S = 86_400.0  # a day


def served_models(specs: list[str], device: str, backend: str | None = None, threads: int | None = None,
                  **precision) -> list:  # fmt: skip
    """``RUN`` or ``ID=RUN`` (a run folder, or an ONNX file or OpenVINO IR from ``rcnn export``) -> loaded
    models; ids default to the model's name, made unique. ``backend``: as given, else a run folder's
    default (:func:`rcnn.commands.options.default_backend`: auto); ``precision``, ``calibrate``,
    ``calibrate_images``: see :func:`rcnn.deploy.backends.load_detector`."""
    from rcnn.commands.options import default_backend
    from rcnn.serve import ServedModel

    models, taken = [], set()
    for spec in specs:
        given, _, run = spec.rpartition("=") if "=" in spec else ("", "", spec)
        exported = run if run.endswith((".onnx", ".xml")) else None
        chosen = default_backend(backend, model_file=exported, precision=precision.get("precision"))
        served = ServedModel.load(run, given or None, device, backend=chosen, threads=threads, **precision)
        if not given:
            base, n = served.id, 2
            while served.id in taken:
                served.id, n = f"{base}_{n}", n + 1
        if served.id in taken:
            raise ValueError(f"--weights: the id {served.id!r} is given twice")
        taken.add(served.id)
        models.append(served)
    return models


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from rcnn.serve import ServeSettings, create_app

    from rcnn.commands.options import precision_options, runs_on_cpu_only

    device = "cuda" if torch.cuda.is_available() and not args.cpu and not runs_on_cpu_only(args) else "cpu"
    settings = ServeSettings(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), concurrency=args.workers, queue_size=args.queue,
        request_timeout_s=args.timeout,
    )  # fmt: skip
    app = create_app(served_models(args.weights, device, args.backend, args.threads, **precision_options(args)), settings)
    print(f"rcnn serve: http://{args.host}:{args.port}/ ({', '.join(app.state.models)})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve detections and explanations over HTTP, with a web page",
        description="Serve one or several trained detectors: POST /predict (an image -> JSON detections, masks as COCO "
        "RLE, the time split), POST /explain (the stage-by-stage page), GET /model, GET /health, and a web page at / "
        "that shows the same upload through each model side by side. Binds to localhost unless --host says otherwise.",
    )
    parser.add_argument("--weights", nargs="+", required=True, metavar="[ID=]RUN",
                        help="run folders (or checkpoints, or ONNX files or OpenVINO IRs from rcnn export) to serve")
    add_backend_argument(parser)  # ONNX Runtime and OpenVINO give detections only: no stage-by-stage page
    parser.add_argument("--threads", type=int_range(1, MAX_THREADS), help="CPU threads per model (default: all cores)")
    add_precision_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int_range(1, 65535), default=8000, help="TCP port, 1..65535 (default 8000)")
    parser.add_argument("--max-upload-mb", type=float_range(0.0, MAX_UPLOAD_MB, low_open=True), default=20.0,
                        help=f"largest request accepted, in (0, {MAX_UPLOAD_MB:g}] MB (default 20 MB)")  # fmt: skip
    parser.add_argument("--workers", type=int_range(1, MAX_WORKERS), default=1,
                        help=f"inferences running at once, 1..{MAX_WORKERS} (default 1)")  # fmt: skip
    parser.add_argument("--queue", type=int_range(0, MAX_QUEUE), default=8,
                        help=f"requests waiting beyond those, 0..{MAX_QUEUE}; more get 503 (default 8)")  # fmt: skip
    parser.add_argument("--timeout", type=float_range(0.0, MAX_TIMEOUT_S, low_open=True), default=60.0,
                        help="seconds per request before a 504, at most a day (default 60)")  # fmt: skip
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.set_defaults(func=run)
