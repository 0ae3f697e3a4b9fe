"""rcnn serve through its HTTP API (FastAPI's TestClient): every endpoint, every kind of bad upload,
the bounded queue, the timeout, masks as COCO RLE."""

from __future__ import annotations

import io
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from rcnn.serve import ServedModel, ServeSettings, create_app
from rcnn.serve.app import decode_upload
from tiny_runs import tiny_run

with warnings.catch_warnings():  # the pinned httpx is deprecated for starlette's test client, and works
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def served(shapes_root, tmp_path_factory):
    return [ServedModel.load(tiny_run(kind, shapes_root, tmp_path_factory)) for kind in ("faster_rcnn", "mask_rcnn")]


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served)) as c:
        yield c


@pytest.fixture(scope="module")
def png(client):
    return client.get("/samples/shapes_1.png").content


def upload(data, name="x.png", kind="image/png"):
    return {"files": {"image": (name, data, kind)}}


def predicted(served, png):
    """What the served model's predictor finds in ``png``, decoded as the server decodes it."""
    return served.predictor.predict(decode_upload(png, "x.png", 10**8, served.predictor)).output


def test_model_health_samples_and_the_page(client):
    models = client.get("/model").json()["models"]
    assert [m["id"] for m in models] == ["faster_rcnn", "mask_rcnn"]
    faster, mask = models
    assert faster["generation"] == "Faster R-CNN" and faster["architecture"] == "FasterRCNN"
    assert faster["classes"] == ["circle", "square", "triangle", "star", "hexagon"] and faster["score_thresh"] == 0.5
    assert faster["input_size"] == {"min_size": 128, "max_size": 128} and mask["predicts_masks"] and not faster["predicts_masks"]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["queue"] == {"running": 0, "waiting": 0, "concurrency": 1, "queue_size": 8}
    samples = client.get("/samples").json()["samples"]
    assert len(samples) == 3
    image = Image.open(io.BytesIO(client.get(samples[0]["url"]).content))
    assert image.size == (128, 128) and image.mode == "RGB"
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "http" not in page.text.split("<script>")[1]


def test_predict_multipart_and_raw_body(client, png, served):
    both = client.post("/predict", **upload(png))
    assert both.status_code == 200
    body = both.json()
    assert body["image"] == {"width": 128, "height": 128}
    assert [r["model"] for r in body["results"]] == ["faster_rcnn", "mask_rcnn"]
    for result in body["results"]:
        t = result["time_ms"]
        assert t["proposals"] > 0 and t["rest"] > 0 and t["total"] == pytest.approx(t["proposals"] + t["rest"], abs=0.02)
    raw = client.post("/predict?model=faster_rcnn", content=png, headers={"content-type": "image/png"}).json()
    assert [r["model"] for r in raw["results"]] == ["faster_rcnn"]
    output = predicted(served[0], png)
    got = raw["results"][0]["detections"]
    assert len(got) == len(output["scores"])
    for d, box, label, score in zip(got, output["boxes"], output["labels"], output["scores"]):
        assert d["box"] == pytest.approx(box.tolist(), abs=0.01) and d["label"] == int(label)
        assert d["class_name"] == served[0].class_names[int(label)] and d["score"] == pytest.approx(float(score), abs=1e-4)
    floor = client.post("/predict?model=faster_rcnn&score_thresh=0.15", **upload(png)).json()["results"][0]["detections"]
    assert len(floor) == int((output["scores"] >= 0.15).sum())


def test_masks_are_coco_rle_of_the_models_masks(client, png, served):
    result = client.post("/predict?model=mask_rcnn", **upload(png)).json()["results"][0]
    output = predicted(served[1], png)
    assert len(result["detections"]) == len(output["masks"]) > 0
    for d, mask in zip(result["detections"], output["masks"]):
        rle = {"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()}
        assert d["mask"]["size"] == [128, 128]
        assert np.array_equal(mask_utils.decode(rle), mask[0].numpy())


def test_explain_endpoint_returns_the_page(client, png):
    page = client.post("/explain?model=mask_rcnn", **upload(png, "mine.png"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Mask R-CNN on mine.png" in page.text and 'id="stage-masks"' in page.text


BAD = {
    "not an image": (upload(b"this is text, not pixels", "notes.png"), 400, "not_an_image"),
    "truncated": (None, 400, "truncated_image"),
    "zero bytes": (upload(b"", "empty.png"), 400, "empty_upload"),
    # any one file field is the image ("file", as most clients send it: tests/test_one_path.py); two are ambiguous
    "two file fields": ({"files": [("a", ("x.png", b"\x89PNG", "image/png")), ("b", ("y.png", b"\x89PNG", "image/png"))]},
                        422, "missing_field"),
    "text field": ({"files": {"image": (None, b"hello")}}, 422, "missing_field"),
    "form, not multipart": ({"data": {"image": "hello"}}, 415, "unsupported_media_type"),
    "wrong content type": ({"content": b"{}", "headers": {"content-type": "application/json"}}, 415, "unsupported_media_type"),
    "raw empty": ({"content": b"", "headers": {"content-type": "image/jpeg"}}, 400, "empty_upload"),
    "unknown model": ("model", 404, "unknown_model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_uploads_get_a_json_error_and_the_server_lives_on(client, png, case):
    kwargs, status, code = BAD[case]
    url = "/predict"
    if case == "truncated":
        kwargs = upload(png[: len(png) // 2])
    if case == "unknown model":
        kwargs, url = upload(png), "/predict?model=nope"
    response = client.post(url, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and len(body["detail"]) > 20 and "/tmp" not in body["detail"]
    assert client.get("/health").json()["status"] == "ok"
    if case not in ("unknown model",):  # the explain endpoint reads uploads the same way
        again = client.post("/explain" if url == "/predict" else url, **kwargs)
        assert again.status_code == status and again.json()["error"] == code


def test_size_limits(served, png):
    settings = ServeSettings(max_upload_bytes=len(png) - 1, max_pixels=100 * 100)
    with TestClient(create_app(served[:1], settings)) as client:
        declared = client.post("/predict", **upload(png))
        assert declared.status_code == 413 and declared.json()["error"] == "too_large"

        def chunks():  # no Content-Length: the limit holds while reading
            yield png[:100]
            yield png[100:]

        streamed = client.post("/predict", content=chunks(), headers={"content-type": "image/png"})
        assert streamed.status_code == 413 and "exceeds the limit" in streamed.json()["detail"]
        small = io.BytesIO()
        Image.new("RGB", (200, 120)).save(small, format="PNG")
        many = client.post("/predict", **upload(small.getvalue()))
        assert many.status_code == 413 and many.json()["error"] == "too_many_pixels" and "200x120" in many.json()["detail"]
        assert client.get("/health").status_code == 200


def test_a_full_queue_answers_503_and_a_slow_request_504(served, png):
    settings = ServeSettings(concurrency=1, queue_size=1, request_timeout_s=30.0)
    app = create_app(served[:1], settings)
    model = served[0]
    with TestClient(app) as client:
        results = {}

        def send(name):
            results[name] = client.post("/predict", **upload(png))

        model.lock.acquire()  # the worker blocks inside the model: one running, one waiting
        try:
            threads = [threading.Thread(target=send, args=(n,)) for n in ("first", "second")]
            for t in threads:
                t.start()
                deadline = time.monotonic() + 10
                while sum(client.get("/health").json()["queue"][k] for k in ("running", "waiting")) < threads.index(t) + 1:
                    assert time.monotonic() < deadline, "the request never reached the queue"
                    time.sleep(0.01)
            assert client.get("/health").json()["queue"] == {"running": 1, "waiting": 1, "concurrency": 1, "queue_size": 1}
            busy = client.post("/predict", **upload(png))
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and busy.json()["error"] == "busy"
        finally:
            model.lock.release()
        for t in threads:
            t.join(timeout=60)
        assert results["first"].status_code == 200 and results["second"].status_code == 200
        assert client.get("/health").json()["queue"]["running"] == 0

    app = create_app(served[:1], ServeSettings(request_timeout_s=0.3))
    with TestClient(app) as client:
        with model.lock:
            slow = client.post("/predict", **upload(png))
        assert slow.status_code == 504 and slow.json()["error"] == "timeout"
        deadline = time.monotonic() + 30  # the abandoned inference finishes in its thread, then gives its place back
        while client.get("/health").json()["queue"]["waiting"] + client.get("/health").json()["queue"]["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.post("/predict", **upload(png)).status_code == 200


def test_openapi_documents_the_schema(client):
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "image/*"}
    assert {"400", "413", "415", "422", "503", "504"} <= set(predict["responses"])
    schemas = spec["components"]["schemas"]
    assert {"PredictResponse", "ModelResult", "Detection", "RLEMask", "TimeSplit", "ErrorBody"} <= set(schemas)
    assert set(schemas["Detection"]["properties"]) == {"box", "label", "class_name", "score", "mask"}
    assert {"/model", "/health", "/explain"} <= set(spec["paths"])


def test_ids_and_the_command_line(served, tmp_path, capsys):
    from rcnn.cli import main
    from rcnn.commands.serve import served_models

    with pytest.raises(ValueError, match="model ids must be unique"):
        create_app([served[0], served[0]])
    run = served[0].run
    ids = [m.id for m in served_models([run, run, f"mine={run}"], "cpu")]
    assert ids == ["faster_rcnn", "faster_rcnn_2", "mine"]
    assert main(["serve", "--weights", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
