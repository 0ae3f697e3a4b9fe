"""One inference path: ``rcnn predict``, ``rcnn explain`` and ``rcnn serve`` run an image through the
same predictor (rcnn.inference.Predictor) and say the same thing about it, in one JSON schema; every
backend is a rcnn.deploy.backends.Detector; detections (masks too) come back in the original's pixels."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from rcnn.deploy.backends import Detector, EagerDetector, as_detector, load_detector
from rcnn.build import load_model
from rcnn.cli import main
from rcnn.inference import Predictor
from rcnn.serve import ServedModel, create_app
from tiny_runs import tiny_run

with warnings.catch_warnings():  # the pinned httpx is deprecated for starlette's test client, and works
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.usefixtures("one_thread")

THRESH = "0.05"  # low enough that the barely trained runs detect something


@pytest.fixture(scope="module")
def runs(shapes_root, tmp_path_factory):
    return {kind: tiny_run(kind, shapes_root, tmp_path_factory) for kind in ("faster_rcnn", "mask_rcnn")}


@pytest.fixture(scope="module")
def photo(shapes_root, tmp_path_factory):
    """A shapes picture enlarged to 384 x 320: larger than the runs' 128-pixel input, so decoded reduced."""
    source = sorted((shapes_root / "images" / "val").glob("*.png"))[1]
    path = tmp_path_factory.mktemp("photo") / "big.png"
    Image.open(source).convert("RGB").resize((320, 384), Image.BILINEAR).save(path)
    return path


def predicted(run, image, out, capsys):
    """``rcnn predict``'s per-image record of ``image``."""
    assert main(["predict", "--weights", str(run), str(image), "--out", str(out), "--score-thresh", THRESH, "--quiet"]) == 0
    capsys.readouterr()
    return json.loads((out / f"{image.name}.json").read_text())


@pytest.mark.parametrize("kind", ["faster_rcnn", "mask_rcnn"])
def test_explain_detects_what_predict_detects(kind, runs, photo, tmp_path, capsys):
    record = predicted(runs[kind], photo, tmp_path / "predict", capsys)
    assert main(["explain", str(photo), "--weights", str(runs[kind]), "--out", str(tmp_path / "explain"),
                 "--score-thresh", THRESH]) == 0  # fmt: skip
    capsys.readouterr()
    explained = json.loads((tmp_path / "explain" / "detections.json").read_text())
    assert explained["size"] == record["size"] == [384, 320]
    assert record["detections"] and explained["detections"] == record["detections"]
    assert all(("mask" in d) == (kind == "mask_rcnn") for d in record["detections"])


@pytest.mark.parametrize("kind", ["faster_rcnn", "mask_rcnn"])
def test_serve_answers_what_predict_writes(kind, runs, photo, tmp_path, capsys):
    record = predicted(runs[kind], photo, tmp_path / "predict", capsys)
    with TestClient(create_app([ServedModel.load(runs[kind])])) as client:
        body = client.post(f"/predict?score_thresh={THRESH}", files={"image": ("big.png", photo.read_bytes(), "image/png")}).json()
    assert body["image"] == {"width": record["size"][1], "height": record["size"][0]}
    (result,) = body["results"]
    assert result["detections"] == record["detections"]  # same schema, same values
    assert set(record["detections"][0]) == {"box", "label", "class_name", "score"} | ({"mask"} if kind == "mask_rcnn" else set())


def test_the_upload_may_come_as_the_field_file(runs, photo):
    data = photo.read_bytes()
    with TestClient(create_app([ServedModel.load(runs["faster_rcnn"])])) as client:
        as_image = client.post("/predict", files={"image": ("big.png", data, "image/png")})
        as_file = client.post("/predict", files={"file": ("big.png", data, "image/png")})
        other = client.post("/explain", files={"upload": ("big.png", data, "image/png")})  # any one file field
    assert as_image.status_code == as_file.status_code == other.status_code == 200, as_file.text
    assert [r["detections"] for r in as_file.json()["results"]] == [r["detections"] for r in as_image.json()["results"]]


def test_masks_come_back_in_the_originals_pixels(runs, photo):
    predictor = Predictor(load_model(runs["mask_rcnn"]).model)
    decoded = predictor.read(photo)
    assert tuple(decoded.image.shape[1:]) == (128, 107) and decoded.original_size == (384, 320)  # decoded at a third
    output = predictor.predict(decoded).output
    assert len(output["masks"]) > 0 and output["masks"].shape[1:] == (1, 384, 320) and output["masks"].dtype == torch.uint8
    assert float(output["boxes"][:, 2].max()) <= 320 + 1e-3 and float(output["boxes"][:, 3].max()) <= 384 + 1e-3
    # each mask lies in its box (a mask pasted at the decoded size, then brought to the original's)
    for box, mask in zip(output["boxes"], output["masks"][:, 0]):
        ys, xs = np.nonzero(mask.numpy())
        if len(xs):
            assert xs.min() >= float(box[0]) - 3 and xs.max() <= float(box[2]) + 3
            assert ys.min() >= float(box[1]) - 3 and ys.max() <= float(box[3]) + 3
    # the JSON schema's RLE has the original's size
    rle = predictor.predict(decoded).output["masks"][0, 0].numpy()
    encoded = mask_utils.encode(np.asfortranarray(rle))
    assert list(encoded["size"]) == [384, 320]


@pytest.mark.slow
def test_every_backend_is_a_detector(runs, tmp_path):
    from rcnn.deploy.export import OnnxDetector, export_onnx

    loaded = load_model(runs["faster_rcnn"], for_inference=False)
    eager = as_detector(loaded.model)
    assert isinstance(eager, EagerDetector) and isinstance(eager, Detector)
    assert eager.backend == "eager" and eager.records and eager.input_size == (128, 128)
    assert eager.device == torch.device("cpu") and eager.num_classes == 6 and not eager.needs_proposals
    # export_onnx without class names: the names a run folder without classes.json gets
    path = export_onnx(loaded.model, tmp_path / "m.onnx", input_format="float", example_size=(128, 128))
    onnx = OnnxDetector(path)
    assert isinstance(onnx, Detector) and as_detector(onnx) is onnx
    assert onnx.class_names == [f"class_{i}" for i in range(6)] and onnx.backend == "onnxruntime" and not onnx.records
    image = torch.rand(3, 128, 128)
    (a,), (b,) = Predictor(eager).detect([image]), Predictor(onnx).detect([image])
    assert len(a["boxes"]) == len(b["boxes"]) and torch.equal(a["labels"], b["labels"])
    torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-2)
    assert isinstance(as_detector(load_detector(runs["faster_rcnn"]).model), Detector)
