"""The OpenVINO backend (rcnn.deploy.openvino): the exported graph compiled by OpenVINO gives the eager
model's detections (fp32, within test_backends.py's tolerances; Mask R-CNN's masks; an image with no
detection), is cached, runs from the commands, exports to the OpenVINO IR and back, and runs bf16
(where the CPU has it; refused clearly where not) and the calibrated int8 graph."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torchvision.ops import box_iou

from rcnn.cli import main
from rcnn.data.reading import build_dataset
from rcnn.deploy import openvino as ov_backend
from rcnn.deploy.backends import load_detector, weights_digest
from rcnn.deploy.export import export_onnx, onnx_metadata
from rcnn.deploy.openvino import OpenVinoDetector, bf16_supported, ir_metadata
from rcnn.inference import evaluate_model
from rcnn.models import mask_rcnn
from test_export import NAMES, mask_iou
from tiny_runs import tiny_run

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

# bf16 keeps 8 bits of mantissa: on `trained` below, its 36 confident detections (score > 0.5) moved
# by at most 0.013 in score, and their boxes kept IoU >= 0.986 with fp32's; the same objects
BF16_SCORE_TOL = 0.05
BF16_IOU = 0.9


@pytest.fixture(scope="module")
def run(shapes_root, tmp_path_factory):
    return tiny_run("faster_rcnn", shapes_root, tmp_path_factory)


@pytest.fixture(scope="module")
def mask_run(shapes_root, tmp_path_factory):
    return tiny_run("mask_rcnn", shapes_root, tmp_path_factory)


@pytest.fixture(scope="module")
def val(shapes_root):
    return build_dataset(shapes_root, "val", with_masks=True)


def assert_same(eager, other):
    """test_backends.py's fp32 tolerances: the same labels, boxes within 1e-2 px, scores within 1e-4."""
    assert len(eager["boxes"]) == len(other["boxes"])
    assert torch.equal(eager["labels"], other["labels"])
    torch.testing.assert_close(other["boxes"], eager["boxes"], rtol=0, atol=1e-2)
    torch.testing.assert_close(other["scores"], eager["scores"], rtol=0, atol=1e-4)


def test_openvino_gives_the_eager_detections_on_every_val_image(run, val):
    eager, ov = load_detector(run), load_detector(run, backend="openvino")
    assert isinstance(ov.model, OpenVinoDetector) and ov.model.backend == "openvino" and ov.model.precision == "fp32"
    assert ov.class_names == eager.class_names and ov.config.model.name == "faster_rcnn"
    detections = 0
    for index in range(len(val)):
        image, _ = val[index]
        with torch.inference_mode():
            (a,) = eager.model([image])
        (b,) = ov.model([image])
        assert_same(a, b)
        detections += len(a["boxes"])
    assert detections > 0
    a = evaluate_model(eager.model, val, class_names=eager.class_names)
    b = evaluate_model(ov.model, val, class_names=ov.class_names)
    assert b["bbox"]["AP"] == pytest.approx(a["bbox"]["AP"], abs=1e-3)


def test_mask_rcnn_masks_agree(mask_run, val):
    eager, ov = load_detector(mask_run), load_detector(mask_run, backend="openvino")
    assert ov.model.predicts_masks
    masks = 0
    for index in range(3):
        image, _ = val[index]
        with torch.inference_mode():
            (a,) = eager.model([image])
        (b,) = ov.model([image])
        assert_same(a, b)
        assert b["masks"].shape == a["masks"].shape and b["masks"].dtype == torch.uint8
        assert all(mask_iou(x, y) > 0.99 for x, y in zip(a["masks"], b["masks"]))
        masks += len(a["masks"])
    assert masks > 0


def test_an_image_with_no_detection_gives_empty_outputs(tmp_path):
    torch.manual_seed(2)
    model = mask_rcnn("tiny", 4, min_size=128, max_size=160, mask={"num_convs": 1, "channels": 8}).eval()
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.bias[0] = 100.0  # everything is background
    detector = OpenVinoDetector(export_onnx(model, tmp_path / "none.onnx", NAMES, example_size=(100, 140)))
    (out,) = detector([torch.zeros(3, 120, 90)])
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,) and out["scores"].shape == (0,)
    assert out["masks"].shape == (0, 1, 120, 90) and out["masks"].dtype == torch.uint8


def test_the_compiled_graph_is_cached_with_the_onnx_graph(run, val, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree((run / "last").resolve(), copy)  # with the graph the first test cached, if it ran
    first = load_detector(copy, backend="openvino")
    assert first.checkpoint == copy / "onnx" / "model.onnx"  # the ONNX Runtime backend's cached graph
    assert onnx_metadata(first.checkpoint)["weights_sha256"] == weights_digest(copy)
    blobs = sorted((copy / "onnx" / "openvino").iterdir())
    assert blobs, "OpenVINO's compiled graph is not cached"
    stamp = first.checkpoint.stat().st_mtime_ns
    again = load_detector(copy, backend="openvino")
    assert again.checkpoint.stat().st_mtime_ns == stamp and sorted((copy / "onnx" / "openvino").iterdir()) == blobs
    # new weights: exported and compiled afresh
    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")
    next(w for w in weights.values() if w.is_floating_point()).mul_(1.01)
    save_file(weights, copy / "model.safetensors")
    renewed = load_detector(copy, backend="openvino")
    assert onnx_metadata(renewed.checkpoint)["weights_sha256"] == weights_digest(copy)
    image, _ = val[0]  # the new weights' detections, not a stale compiled graph's
    with torch.inference_mode():
        (expected,) = load_detector(copy).model([image])
    (got,) = renewed.model([image])
    assert_same(expected, got)


def test_the_commands_run_openvino(run, mask_run, shapes_root, tmp_path, capsys):
    picture = sorted((shapes_root / "images" / "val").glob("*.png"))[0]
    outputs = {}
    for name, flags in {"eager": ["--backend", "eager"], "openvino": ["--backend", "openvino"]}.items():
        assert main(["predict", str(picture), "--weights", str(run), *flags, "--out", str(tmp_path / name),
                     "--score-thresh", "0"]) == 0  # fmt: skip
        outputs[name] = json.loads(next((tmp_path / name).glob("*.json")).read_text())["detections"]
    assert [d["label"] for d in outputs["openvino"]] == [d["label"] for d in outputs["eager"]]
    for a, b in zip(outputs["eager"], outputs["openvino"]):
        assert abs(a["score"] - b["score"]) <= 2e-4 and max(abs(x - y) for x, y in zip(a["box"], b["box"])) <= 0.02
    capsys.readouterr()
    assert main(["evaluate", "--weights", str(mask_run), "--backend", "openvino", "--data", str(shapes_root),
                 "--out", str(tmp_path / "m.json")]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["images"] == 8 and "segm" in metrics
    # rcnn serve: the model runs in OpenVINO and says it cannot be explained stage by stage
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
        from fastapi.testclient import TestClient
    from rcnn.serve import ServedModel, create_app

    with TestClient(create_app([ServedModel.load(run, "ov", backend="openvino")])) as client:
        png = picture.read_bytes()
        body = client.post("/predict", files={"image": ("x.png", png, "image/png")}).json()
        assert body["results"][0]["detections"] and not body["results"][0]["explainable"]
        assert client.get("/model").json()["models"][0]["backend"] == "openvino"
        refused = client.post("/explain?model=ov", files={"image": ("x.png", png, "image/png")})
        assert refused.status_code == 400 and "runs in openvino" in refused.json()["detail"]


def test_export_format_openvino_writes_an_ir_that_loads_back(run, shapes_root, tmp_path, capsys):
    out = tmp_path / "ir" / "frcnn.xml"
    assert main(["export", "--weights", str(run), "--format", "openvino", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["openvino"] == str(out) and summary["bin"] == str(out.with_suffix(".bin"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["frcnn.bin", "frcnn.xml"]  # no ONNX file left beside it
    meta = ir_metadata(out)
    assert meta["class_names"] == load_detector(run).class_names and meta["input"] == "uint8"
    assert meta["graph_num_classes"] == len(meta["class_names"])
    ir = load_detector(model_file=out)  # an .xml runs in OpenVINO
    assert ir.model.backend == "openvino" and ir.config.model.name == "faster_rcnn"
    image, _ = build_dataset(shapes_root, "val")[0]
    (a,) = load_detector(run, backend="onnxruntime").model([image])  # the same graph, float input, in ONNX Runtime
    (b,) = ir.model([image])
    assert_same(a, b)
    capsys.readouterr()
    assert main(["predict", str(shapes_root / "images" / "val"), "--model", str(out), "--out", str(tmp_path / "p")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 8
    # an IR does not run in ONNX Runtime; the wrong suffix, a damaged IR and a user's file are refused in one line
    assert main(["predict", str(shapes_root / "images" / "val"), "--model", str(out), "--backend", "onnxruntime",
                 "--out", str(tmp_path / "q")]) == 2  # fmt: skip
    assert "runs with --backend openvino only" in capsys.readouterr().err
    assert main(["export", "--weights", str(run), "--format", "openvino", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "--format openvino writes a .xml file" in capsys.readouterr().err
    (tmp_path / "bad.xml").write_text("<net>not a model</net>")
    (tmp_path / "bad.bin").write_bytes(b"")
    assert main(["predict", str(shapes_root / "images" / "val"), "--model", str(tmp_path / "bad.xml"),
                 "--out", str(tmp_path / "r")]) == 2  # fmt: skip
    assert "bad.xml" in capsys.readouterr().err
    (tmp_path / "mine.xml").write_text("<mine/>")
    assert main(["export", "--weights", str(run), "--format", "openvino", "--out", str(tmp_path / "mine.xml")]) == 2
    assert "is not an OpenVINO IR written by rcnn" in capsys.readouterr().err
    assert (tmp_path / "mine.xml").read_text() == "<mine/>"


@pytest.fixture(scope="module")
def trained(shapes_root, tmp_path_factory):
    """A tiny Faster R-CNN fitted to the 12 training images (300 steps, ~40 s on one core): box AP
    about 0.3 on them, detections whose scores mean something (a 4-step run's all tie near 0.16)."""
    from rcnn.config import load_config
    from rcnn.training.run import run_training

    out = tmp_path_factory.mktemp("trained") / "run"
    settings = [f"data.root={shapes_root}", "data.shapes=null", "train.iterations=300", "train.batch_size=4",
                "train.lr=0.04", "train.schedule=constant", "train.warmup_iterations=20", "train.checkpoint_every=10000",
                "train.log_every=100", "model.min_size=128", "model.max_size=128", "model.roi.batch_size_per_image=64"]  # fmt: skip
    torch.manual_seed(0)
    run_training(load_config("faster_rcnn_tiny_shapes", settings), out, evaluate=False, progress=False, log=lambda s: None)
    return out


def box_ap(loaded, dataset) -> tuple[float, float]:
    metrics = evaluate_model(loaded.model, dataset, class_names=loaded.class_names)
    return metrics["bbox"]["AP"], metrics["bbox"]["AP50"]


# the AP tolerances of the lower precisions on `trained` (measured: bf16 +0.003, int8 in OpenVINO
# -0.009 box AP of fp32's 0.296; ONNX Runtime's int8 +0.008): a few hundredths, as rounding moves
# the ranks of near-tied detections on 12 images
BF16_AP_TOL = 0.02
INT8_AP_TOL = 0.03


def test_int8_in_openvino(trained, shapes_root, tmp_path):
    train = build_dataset(shapes_root, "train")
    fp32 = load_detector(trained, backend="openvino")
    int8 = load_detector(trained, backend="openvino", precision="int8", calibrate_images=12)
    assert int8.model.precision == "int8" and int8.checkpoint.name == "model-int8.onnx"  # the library's QDQ graph
    assert load_detector(trained, precision="int8").checkpoint == int8.checkpoint  # ONNX Runtime's, the same file
    (ap, ap50), (ap8, ap8_50) = box_ap(fp32, train), box_ap(int8, train)
    assert ap > 0.2 and abs(ap8 - ap) <= INT8_AP_TOL and abs(ap8_50 - ap50) <= 2 * INT8_AP_TOL, (ap, ap8, ap50, ap8_50)
    # the IR of an int8 export, and its float twin
    out = tmp_path / "int8.xml"
    assert main(["export", "--weights", str(trained), "--format", "openvino", "--out", str(out), "--int8",
                 "--calibrate", str(shapes_root), "--calibrate-images", "4"]) == 0  # fmt: skip
    assert ir_metadata(out)["precision"] == "int8" and ir_metadata(tmp_path / "int8-fp32.xml")["precision"] == "fp32"
    assert load_detector(model_file=out, precision="int8").model.precision == "int8"
    with pytest.raises(ValueError, match="this graph is int8, not fp32"):
        load_detector(model_file=out, precision="fp32")


@pytest.mark.skipif(not bf16_supported(), reason="this CPU has no bf16 instructions (OpenVINO's capabilities)")
def test_bf16_agrees_within_its_tolerance(trained, shapes_root):
    train = build_dataset(shapes_root, "train")
    fp32 = load_detector(trained, backend="openvino")
    bf16 = load_detector(trained, precision="bf16")  # bf16 runs in OpenVINO
    assert bf16.model.backend == "openvino" and bf16.model.precision == "bf16"
    (ap, ap50), (ap16, ap16_50) = box_ap(fp32, train), box_ap(bf16, train)
    assert ap > 0.2 and abs(ap16 - ap) <= BF16_AP_TOL and abs(ap16_50 - ap50) <= 2 * BF16_AP_TOL, (ap, ap16)
    matched = 0  # the confident detections: the same objects, scores within a few hundredths
    for index in range(4):
        image, _ = train[index]
        (a,) = fp32.model([image])
        (b,) = bf16.model([image])
        confident = a["scores"] > 0.5
        for box, label, score in zip(a["boxes"][confident], a["labels"][confident], a["scores"][confident]):
            iou = box_iou(box[None], b["boxes"])[0]
            twin = int(iou.argmax())
            assert float(iou[twin]) > BF16_IOU and int(b["labels"][twin]) == int(label)
            assert abs(float(b["scores"][twin]) - float(score)) < BF16_SCORE_TOL
            matched += 1
    assert matched > 0


def test_bf16_is_refused_where_the_cpu_lacks_it(run, shapes_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ov_backend, "cpu_capabilities", lambda: ["FP32", "INT8", "BIN", "EXPORT_IMPORT"])
    monkeypatch.setattr(ov_backend, "cpu_name", lambda: "an old CPU")
    with pytest.raises(ValueError, match=r"--precision bf16: this CPU \(an old CPU\) has no bf16 instructions"):
        load_detector(run, precision="bf16")
    picture = sorted((shapes_root / "images" / "val").glob("*.png"))[0]
    assert main(["predict", str(picture), "--weights", str(run), "--precision", "bf16", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no bf16 instructions" in err and "use --precision fp32 or int8" in err
    with pytest.raises(ValueError, match="--precision bf16 runs in OpenVINO"):
        load_detector(run, precision="bf16", backend="onnxruntime")
