"""Load test of ``rcnn serve``: concurrent clients on the loopback, latency, throughput, memory.

    python -m benchmarks.serve_load                          # trains a tiny Faster R-CNN first (a few minutes)
    python -m benchmarks.serve_load --weights runs/frcnn     # or serves a given run
    python -m benchmarks.serve_load --requests 200 --clients 4 --quick

The server runs as its own process (``python -m rcnn.cli serve``, one inference at a time, the
default queue) on 127.0.0.1 only; ``--clients`` threads send the bundled sample images as raw
``POST /predict`` bodies, each waiting for its answer before sending the next, until
``--requests`` have been answered or ``--time-cap`` seconds have passed (the loop is bounded in
both). It records every request's latency and status, the throughput, and the server's resident
memory (``VmRSS`` of ``/proc/<pid>/status``) after 100 requests and at the end: a server that
leaks grows between the two. Writes ``benchmarks/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import command_line, table, write_result
from rcnn.serve import sample_images

__all__ = ["markdown", "read_rss_mb", "run_load", "start_server", "main"]

RSS_GROWTH_LIMIT = 0.10  # the end RSS within 10 % of the RSS after the warm-up requests


def read_rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (``VmRSS``, Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(weights: str, port: int, timeout_s: float = 120.0, queue: int = 16) -> subprocess.Popen:
    """``rcnn serve`` in a child process on 127.0.0.1:``port``; returns once ``/health`` answers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "rcnn.cli", "serve", "--weights", weights, "--host", "127.0.0.1", "--port", str(port),
         "--queue", str(queue), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"rcnn serve exited with {process.returncode}: {process.stderr.read().decode()[-2000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"rcnn serve did not answer on port {port} within {timeout_s:g} s")


def run_load(
    port: int,
    pid: int,
    requests: int = 1000,
    clients: int = 8,
    time_cap_s: float = 600.0,
    rss_after: int = 100,
) -> dict[str, Any]:
    """``clients`` threads POST the sample images to ``127.0.0.1:port/predict`` until ``requests``
    are answered or ``time_cap_s`` passes; the server's RSS (process ``pid``) after ``rss_after``
    answers and at the end. Returns the figures (latencies in ms)."""
    images = list(sample_images().values())
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    state = {"sent": 0, "done": 0, "rss_after": None}
    stop_at = time.monotonic() + time_cap_s

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < stop_at:
            with lock:
                if state["sent"] >= requests:
                    break
                n = state["sent"]
                state["sent"] += 1
            body = images[n % len(images)]
            tic = time.perf_counter()
            try:
                connection.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
                response = connection.getresponse()
                payload = response.read()
                ok = response.status == 200 and "results" in json.loads(payload)
                problem = None if ok else f"HTTP {response.status}: {payload[:200]!r}"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            elapsed = 1000 * (time.perf_counter() - tic)
            with lock:
                state["done"] += 1
                if problem is None:
                    latencies.append(elapsed)
                else:
                    failures.append(problem)
                if state["done"] == rss_after:
                    state["rss_after"] = read_rss_mb(pid)
        connection.close()

    rss_start = read_rss_mb(pid)
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    rss_end = read_rss_mb(pid)
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    rss_mid = state["rss_after"]
    growth = (rss_end - rss_mid) / rss_mid if rss_mid else None
    return {
        "requests": state["done"],
        "clients": clients,
        "failed": len(failures),
        "failures": failures[:5],
        "seconds": seconds,
        "throughput_rps": state["done"] / seconds if seconds > 0 else 0.0,
        "latency_ms": {q: float(np.percentile(lat, p)) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))}
        | {"mean": float(lat.mean()), "max": float(lat.max())},
        "rss_mb": {"start": rss_start, f"after_{rss_after}": rss_mid, "end": rss_end},
        "rss_growth": growth,
        "rss_within_limit": growth is not None and growth <= RSS_GROWTH_LIMIT,
        "time_capped": state["done"] < requests,
    }


def train_tiny_faster_rcnn(out: Path, iterations: int) -> Path:
    """A tiny Faster R-CNN trained on a small shapes set (200 images) in ``out``."""
    from rcnn.config import load_config
    from rcnn.training.run import run_training

    config = load_config("faster_rcnn_tiny_shapes", [
        f"data.root={out / 'shapes'}", "data.shapes.n_train=200", "data.shapes.n_val=20",
        f"train.iterations={iterations}", f"train.checkpoint_every={iterations}", "train.warmup_iterations=20",
    ])  # fmt: skip
    run_training(config, out / "run", overwrite=True, evaluate=False, progress=False, log=lambda s: None)
    return out / "run"


def markdown(result: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md."""
    lat, rss = result["latency_ms"], result["rss_mb"]
    after = next(k for k in rss if k.startswith("after_"))
    rows = [[result["model"], result["requests"], result["clients"], result["failed"], f"{lat['p50']:.0f}", f"{lat['p95']:.0f}",
             f"{lat['p99']:.0f}", f"{result['throughput_rps']:.1f}", f"{rss[after]:.0f}", f"{rss['end']:.0f}",
             f"{100 * result['rss_growth']:+.1f} %" if result["rss_growth"] is not None else "n/a"]]  # fmt: skip
    headers = ["model", "requests", "clients", "failed", "p50 ms", "p95 ms", "p99 ms", "req/s",
               f"RSS MB after {after.removeprefix('after_')}", "RSS MB at the end", "RSS growth"]  # fmt: skip
    lines = [
        table(headers, rows), "",
        f"`rcnn serve` ({result['server']}) on {result['image']} images sent as raw `POST /predict` bodies by "
        f"{result['clients']} concurrent clients on the loopback, each waiting for its answer before the next. "
        f"With one inference at a time the latency is mostly queueing: about {result['clients']} x the time of one "
        "inference. The server's resident memory after the last request is compared with that after the first "
        f"{after.removeprefix('after_')} (limit: +{100 * RSS_GROWTH_LIMIT:.0f} %).",
    ]  # fmt: skip
    if result["failed"]:
        lines.append(f"\nFailures: {result['failures']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a run to serve (default: train a tiny Faster R-CNN first)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--time-cap", type=float, default=900.0, help="stop sending after this many seconds")
    parser.add_argument("--rss-after", type=int, default=100, help="read the server's RSS after this many answers")
    parser.add_argument("--train-iterations", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="200 requests (for `make bench`)")
    args = parser.parse_args(argv)
    requests = 200 if args.quick and args.requests == 1000 else args.requests
    with tempfile.TemporaryDirectory(prefix="rcnn-serve-load-") as folder:
        weights = args.weights or str(train_tiny_faster_rcnn(Path(folder), args.train_iterations))
        port = free_port()
        server = start_server(weights, port)
        try:
            result = run_load(port, server.pid, requests, args.clients, args.time_cap, min(args.rss_after, requests))
        finally:
            server.terminate()
            server.wait(timeout=60)
    from rcnn.build import load_model

    loaded = load_model(weights)
    result.update(
        model=f"{type(loaded.model).__name__} ({loaded.config.model.backbone} backbone, {loaded.checkpoint.name})",
        server="one inference at a time, 16 waiting", image="128x128 shapes",
        weights=weights if args.weights else f"tiny Faster R-CNN, {args.train_iterations} iterations",
    )  # fmt: skip
    write_result("serve_load", result, command_line("benchmarks.serve_load", list(argv) if argv is not None else None))
    print(markdown(result))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
