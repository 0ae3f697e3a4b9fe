"""The load test's code path (benchmarks.serve_load) for a few requests: concurrent clients, no
failure, latencies and the server's memory read from /proc."""

from __future__ import annotations

import os

import pytest

from benchmarks.serve_load import markdown, read_rss_mb, run_load
from rcnn.serve import ServedModel, create_app
from server_thread import ServerThread
from tiny_runs import tiny_run

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc (Linux)")]  # fmt: skip


def test_load_path_for_twenty_requests(shapes_root, tmp_path_factory):
    app = create_app([ServedModel.load(tiny_run("faster_rcnn", shapes_root, tmp_path_factory))])
    server = ServerThread(app)
    with server:  # in this process: the RSS read is this process's
        result = run_load(server.port, os.getpid(), requests=20, clients=4, time_cap_s=120, rss_after=5)
    assert result["requests"] == 20 and result["failed"] == 0, result["failures"]
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert result["throughput_rps"] > 0 and result["rss_mb"]["after_5"] > 50 and result["rss_growth"] is not None
    assert read_rss_mb(os.getpid()) > 0
    text = markdown({**result, "model": "FasterRCNN (tiny)", "server": "in-process", "image": "128x128 shapes"})
    assert "| FasterRCNN (tiny) | 20 | 4 | 0 |" in text
