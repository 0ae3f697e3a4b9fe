"""One detector, two backends (rcnn.deploy.backends): eager PyTorch and ONNX Runtime give the same
detections, through the Python API, rcnn predict, rcnn evaluate and rcnn serve."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from rcnn.deploy.backends import load_detector, weights_digest
from rcnn.cli import main
from rcnn.data.reading import build_dataset
from rcnn.deploy.export import OnnxDetector, onnx_metadata
from rcnn.inference import evaluate_model
from tiny_runs import tiny_run

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def run(shapes_root, tmp_path_factory):
    return tiny_run("faster_rcnn", shapes_root, tmp_path_factory)


@pytest.fixture(scope="module")
def both(run):
    """The run's model in PyTorch and in ONNX Runtime (exported on first use, cached)."""
    return load_detector(run), load_detector(run, backend="onnxruntime")


def assert_same(eager, onnx):
    assert len(eager["boxes"]) == len(onnx["boxes"])
    assert torch.equal(eager["labels"], onnx["labels"])
    torch.testing.assert_close(onnx["boxes"], eager["boxes"], rtol=0, atol=1e-2)
    torch.testing.assert_close(onnx["scores"], eager["scores"], rtol=0, atol=1e-4)


def test_the_backends_agree_on_every_val_image(both, shapes_root):
    eager, onnx = both
    assert isinstance(onnx.model, OnnxDetector) and isinstance(eager.model, torch.nn.Module)
    assert onnx.class_names == eager.class_names
    assert onnx.config.model.name == eager.config.model.name == "faster_rcnn"  # the config travels in the file
    dataset = build_dataset(shapes_root, "val")
    detections = 0
    for index in range(len(dataset)):
        image, _ = dataset[index]
        with torch.inference_mode():
            (a,) = eager.model([image])
        (b,) = onnx.model([image])
        assert_same(a, b)
        detections += len(a["boxes"])
    assert detections > 0


def test_the_export_is_cached_by_the_weights_digest(run, both):
    _, onnx = both
    cached = onnx.checkpoint
    assert cached.parent.name == "onnx" and cached.parent.parent == (run / "last").resolve()
    assert onnx_metadata(cached)["weights_sha256"] == weights_digest(cached.parent.parent)
    stamp = cached.stat().st_mtime_ns
    again = load_detector(run, backend="onnxruntime")
    assert again.checkpoint == cached and cached.stat().st_mtime_ns == stamp  # not exported twice


def test_a_stale_or_damaged_cache_is_exported_afresh(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree((run / "last").resolve(), copy)
    shutil.rmtree(copy / "onnx", ignore_errors=True)
    (copy / "onnx").mkdir()
    (copy / "onnx" / "model.onnx").write_bytes(b"not a graph")
    loaded = load_detector(copy, backend="onnxruntime")
    meta = onnx_metadata(loaded.checkpoint)
    assert meta["weights_sha256"] == weights_digest(copy) and meta["input"] == "float"  # the backend's images, as given
    # a cache of the same weights that takes uint8 images (made by an earlier version) is made again
    from rcnn.build import load_model
    from rcnn.deploy.export import export_onnx

    model = load_model(copy, for_inference=False)
    export_onnx(model.model, loaded.checkpoint, model.class_names, metadata={"rcnn.weights_sha256": weights_digest(copy)})
    assert onnx_metadata(loaded.checkpoint)["input"] == "uint8"
    again = load_detector(copy, backend="onnxruntime")
    assert onnx_metadata(again.checkpoint)["input"] == "float"


def test_evaluation_gives_the_same_numbers(both, shapes_root):
    eager, onnx = both
    dataset = build_dataset(shapes_root, "val")
    a = evaluate_model(eager.model, dataset, class_names=eager.class_names)
    b = evaluate_model(onnx.model, dataset, class_names=onnx.class_names)
    assert b["bbox"]["AP"] == pytest.approx(a["bbox"]["AP"], abs=1e-3)
    assert b["voc"]["mAP"] == pytest.approx(a["voc"]["mAP"], abs=1e-3)


def test_the_commands_take_a_backend_and_an_onnx_file(run, both, shapes_root, tmp_path, capsys):
    onnx_file = both[1].checkpoint
    picture = sorted(p for p in shapes_root.rglob("*") if p.suffix in (".png", ".jpg"))[0]
    outputs = {}
    for name, flags in {"eager": ["--weights", str(run), "--backend", "eager"],
                        "ort": ["--weights", str(run), "--backend", "onnxruntime"],
                        "file": ["--model", str(onnx_file)]}.items():  # fmt: skip
        assert main(["predict", str(picture), *flags, "--out", str(tmp_path / name), "--score-thresh", "0"]) == 0
        (found,) = [p for p in (tmp_path / name).glob("*.json")]
        outputs[name] = json.loads(found.read_text())["detections"]
    for other in ("ort", "file"):
        assert len(outputs[other]) == len(outputs["eager"])
        for a, b in zip(outputs["eager"], outputs[other]):
            assert a["label"] == b["label"] and abs(a["score"] - b["score"]) <= 2e-4
            assert max(abs(x - y) for x, y in zip(a["box"], b["box"])) <= 0.02
    capsys.readouterr()
    assert main(["evaluate", "--model", str(onnx_file), "--data", str(shapes_root), "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["images"] == 8


def test_wrong_combinations_are_refused_with_a_reason(run, both, tmp_path):
    onnx_file = both[1].checkpoint
    with pytest.raises(ValueError, match="either --weights or --model"):
        load_detector(run, model_file=onnx_file)
    with pytest.raises(ValueError, match="runs with --backend onnxruntime or openvino only"):
        load_detector(model_file=onnx_file, backend="eager")
    with pytest.raises(ValueError, match="runs on the CPU"):
        load_detector(run, backend="onnxruntime", device="cuda")
    with pytest.raises(ValueError, match="choose one of auto, eager, onnxruntime, openvino"):
        load_detector(run, backend="tensorrt")
    with pytest.raises(ValueError, match="--threads"):
        load_detector(run, threads=0)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    assert main(["predict", str(bad), "--model", str(bad), "--out", str(tmp_path / "o")]) == 2


def test_rcnn_runs_eager_only(shapes_root, tmp_path_factory, proposals):
    r = tiny_run("rcnn", shapes_root, tmp_path_factory, proposals)
    with pytest.raises(ValueError, match="R-CNN has no ONNX form"):
        load_detector(r, backend="onnxruntime")


def test_serve_runs_an_onnx_model_and_says_it_cannot_explain_it(run, both):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
        from fastapi.testclient import TestClient

    from rcnn.serve import ServedModel, create_app

    served = [ServedModel.load(run), ServedModel.load(both[1].checkpoint, "onnx")]
    with TestClient(create_app(served)) as client:
        png = client.get("/samples/shapes_1.png").content
        body = client.post("/predict", files={"image": ("x.png", png, "image/png")}).json()
        eager, onnx = body["results"]
        assert eager["explainable"] and not onnx["explainable"]
        assert onnx["time_ms"]["proposals"] is None and onnx["time_ms"]["total"] > 0
        assert [d["label"] for d in onnx["detections"]] == [d["label"] for d in eager["detections"]]
        models = {m["id"]: m for m in client.get("/model").json()["models"]}
        assert models["onnx"]["backend"] == "onnxruntime" and models["onnx"]["classes"] == models["faster_rcnn"]["classes"]
        assert models["onnx"]["precision"] == models["faster_rcnn"]["precision"] == "fp32"
        refused = client.post("/explain?model=onnx", files={"image": ("x.png", png, "image/png")})
        assert refused.status_code == 400 and refused.json()["error"] == "not_explainable"
        assert client.post("/explain?model=faster_rcnn", files={"image": ("x.png", png, "image/png")}).status_code == 200


def test_int8_export_calibrates_and_runs(run, shapes_root, tmp_path, capsys):
    import onnx

    out = tmp_path / "int8.onnx"
    assert main(["export", "--weights", str(run), "--out", str(out), "--int8", "--calibrate", str(shapes_root),
                 "--calibrate-images", "4"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["precision"] == "int8" and (tmp_path / "int8-fp32.onnx").is_file()
    meta = onnx_metadata(out)
    assert meta["precision"] == "int8" and meta["class_names"] == load_detector(run).class_names
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("Conv") > 0
    detector = load_detector(model_file=out)
    image, _ = build_dataset(shapes_root, "val")[0]
    (int8,) = detector.model([image])
    (fp32,) = load_detector(model_file=tmp_path / "int8-fp32.onnx").model([image])
    assert len(int8["boxes"]) > 0 and int8["boxes"].shape[1] == 4
    # int8 moves the numbers, not their meaning: the best detection stays where fp32 puts it
    from torchvision.ops import box_iou

    assert float(box_iou(int8["boxes"][:1], fp32["boxes"][:1])) > 0.5
    assert main(["export", "--weights", str(run), "--out", str(out), "--int8"]) == 2
    assert "--int8 needs --calibrate" in capsys.readouterr().err


def float_convolutions(path) -> list[str]:
    """The weights of an ONNX graph's convolutions that stay float (a quantised one's weight comes
    through a DequantizeLinear node, not straight from an initializer)."""
    import onnx

    graph = onnx.load(str(path)).graph
    initializers = {i.name for i in graph.initializer}
    return [n.input[1] for n in graph.node if n.op_type == "Conv" and n.input[1] in initializers]


def test_int8_calibration_methods_and_float_layers(run, both, shapes_root, tmp_path, capsys):
    from torchvision.ops import box_iou

    from rcnn.deploy.quantize import quantize_onnx, recipe

    fp32 = both[1].checkpoint
    val = build_dataset(shapes_root, "val")
    # images of different sizes: the calibration runs image by image, so every method takes them
    images = [val[0][0], torch.nn.functional.interpolate(val[1][0][None], size=(96, 160))[0], val[2][0]]
    (reference,) = both[1].model([val[3][0]])
    for method in ("minmax", "percentile", "entropy"):
        out = quantize_onnx(fp32, tmp_path / f"{method}.onnx", iter(images), method=method, keep_float=["rpn.head"])
        assert onnx_metadata(out)["int8_recipe"] == recipe(method=method, keep_float=["rpn.head"])
        kept = float_convolutions(out)
        assert kept and all(w.startswith("model.rpn.head.") for w in kept), kept
        (int8,) = OnnxDetector(out)([val[3][0]])
        assert len(int8["boxes"]) > 0 and float(box_iou(int8["boxes"][:1], reference["boxes"][:1])) > 0.5, method
    # the defaults: entropy, the FPN float where there is one (the tiny backbone has none: all int8)
    out = quantize_onnx(fp32, tmp_path / "default.onnx", iter(images[:1]))
    assert float_convolutions(out) == [] and onnx_metadata(out)["int8_recipe"] == recipe(method="entropy")
    with pytest.raises(ValueError, match="'backbone.fpn': no quantisable layer"):  # asked for by name: refused
        quantize_onnx(fp32, tmp_path / "x.onnx", iter(images[:1]), keep_float=["backbone.fpn"])
    with pytest.raises(ValueError, match="calibration method 'kl'"):
        quantize_onnx(fp32, tmp_path / "x.onnx", iter(images[:1]), method="kl")
    with pytest.raises(ValueError, match="at least one image"):
        quantize_onnx(fp32, tmp_path / "x.onnx", iter([]))
    # a glob pattern, from the command line
    out = tmp_path / "cli.onnx"
    assert main(["export", "--weights", str(run), "--out", str(out), "--int8", "--calibrate", str(shapes_root),
                 "--calibrate-images", "2", "--calibration-method", "percentile", "--keep-float", "rpn.*.bbox_pred"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert json.loads(printed.strip().splitlines()[-1])["calibration_method"] == "percentile"
    assert "histogram" not in printed  # ONNX Runtime's calibrator's own lines are not passed on
    assert float_convolutions(out) == ["model.rpn.head.bbox_pred.weight"]
    assert main(["export", "--weights", str(run), "--out", str(out), "--int8", "--calibrate", str(shapes_root),
                 "--keep-float", "roi_heads.nothing"]) == 2  # fmt: skip
    assert "'roi_heads.nothing': no quantisable layer" in capsys.readouterr().err


def test_precision_int8_quantises_a_run_once_and_caches_it(run, both, shapes_root, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    # the run's own training data calibrates by default (its config records data.root)
    loaded = load_detector(copy, precision="int8", calibrate_images=3)
    assert loaded.model.precision == "int8" and loaded.checkpoint.name == "model-int8.onnx"
    assert onnx_metadata(loaded.checkpoint)["weights_sha256"] == weights_digest((copy / "last").resolve())
    stamp = loaded.checkpoint.stat().st_mtime_ns
    assert load_detector(copy, precision="int8").checkpoint.stat().st_mtime_ns == stamp  # cached, not redone
    # a cached graph quantised by other settings than today's defaults is made again
    from rcnn.deploy.quantize import quantize_onnx, recipe

    images = [build_dataset(shapes_root, "val")[0][0]]
    quantize_onnx(loaded.checkpoint.with_name("model.onnx"), loaded.checkpoint, images, method="minmax")
    assert onnx_metadata(loaded.checkpoint)["int8_recipe"] != recipe()
    assert onnx_metadata(load_detector(copy, precision="int8", calibrate_images=2).checkpoint)["int8_recipe"] == recipe()
    image, _ = build_dataset(shapes_root, "val")[0]
    (int8,) = loaded.model([image])
    (fp32,) = both[1].model([image])
    from torchvision.ops import box_iou

    assert len(int8["boxes"]) > 0 and float(box_iou(int8["boxes"][:1], fp32["boxes"][:1])) > 0.5
    # through the commands: predict on the cached graph, and --model with the precision checked
    out = tmp_path / "preds"
    assert main(["predict", "--weights", str(copy), "--precision", "int8", str(shapes_root / "images" / "val"),
                 "--out", str(out)]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 8
    with pytest.raises(ValueError, match="this graph is fp32, not int8"):
        load_detector(model_file=both[1].checkpoint, precision="int8")
    with pytest.raises(ValueError, match="runs in ONNX Runtime"):
        load_detector(copy, precision="int8", backend="eager")
    with pytest.raises(ValueError, match="--calibrate is for --precision int8"):
        load_detector(copy, calibrate=shapes_root)
    # no data to calibrate on: the message says what to give
    (copy / "last" / "onnx" / "model-int8.onnx").unlink()
    config = (copy / "last").resolve() / "config.yaml"
    config.write_text(config.read_text().replace(str(shapes_root), str(tmp_path / "gone")))
    assert main(["evaluate", "--weights", str(copy), "--precision", "int8", "--data", str(shapes_root)]) == 2
    assert "give --calibrate DATA" in capsys.readouterr().err
    assert main(["evaluate", "--weights", str(copy), "--precision", "int8", "--calibrate", str(shapes_root),
                 "--calibrate-images", "2", "--data", str(shapes_root), "--out", str(tmp_path / "m.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "m.json").read_text())["images"] == 8


def test_backend_auto_times_once_and_remembers_per_model_and_machine(run, shapes_root, tmp_path, monkeypatch, capsys):
    """--backend auto: every fp32 backend timed on first use (here by a stand-in clock, not real
    timings), the fastest chosen, printed once, remembered; new weights or other threads are timed afresh."""
    import shutil

    from safetensors.torch import load_file, save_file

    from rcnn.deploy import backends

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    copy = tmp_path / "run"
    shutil.copytree((run / "last").resolve(), copy)
    seconds = {"eager": 0.30, "onnxruntime": 0.20, "openvino": 0.25}
    timed = []

    def clock(call):  # the backend of the timed call, and its stand-in time
        timed.append(call.func.backend)
        return seconds[call.func.backend]

    monkeypatch.setattr(backends, "_seconds", clock)
    monkeypatch.delenv("RCNN_BACKEND", raising=False)
    picture = sorted((shapes_root / "images" / "val").glob("*.png"))[0]
    # rcnn predict of a run folder on the CPU: auto by default
    assert main(["predict", str(picture), "--weights", str(copy), "--out", str(tmp_path / "p"), "--cpu"]) == 0
    assert sorted(timed) == sorted(list(seconds) * backends.AUTO_ROUNDS)
    printed = capsys.readouterr().out
    assert printed.count("--backend auto: onnxruntime") == 1
    assert "eager 0.300, onnxruntime 0.200, openvino 0.250" in printed
    record = json.loads((tmp_path / "cache" / "rcnn" / backends.AUTO_CHOICES_FILE).read_text())
    (entry,) = record.values()
    assert entry["backend"] == "onnxruntime" and entry["size"] == "128x128"  # the run's input size
    # a hit: nothing timed, nothing printed, the same backend
    timed.clear()
    assert main(["predict", str(picture), "--weights", str(copy), "--out", str(tmp_path / "p"), "--cpu"]) == 0
    seconds["onnxruntime"] = 9.0  # (a new timing would choose otherwise)
    assert load_detector(copy, backend="auto", progress=True).model.backend == "onnxruntime"
    assert timed == [] and "--backend auto" not in capsys.readouterr().out
    assert backends.choose_backend(copy) == "onnxruntime"
    # other threads: another machine setting, timed afresh
    assert backends.choose_backend(copy, threads=2, log=lambda line: None) == "openvino" and timed
    torch.set_num_threads(1)  # (the eager backend took 2 threads; the module runs on one)
    # new weights: timed afresh
    timed.clear()
    weights = load_file(copy / "model.safetensors")
    next(w for w in weights.values() if w.is_floating_point()).mul_(1.01)
    save_file(weights, copy / "model.safetensors")
    seconds.update(eager=0.1)
    assert load_detector(copy, backend="auto").model is not None and timed
    assert backends.choose_backend(copy) == "eager"
    assert len(json.loads((tmp_path / "cache" / "rcnn" / backends.AUTO_CHOICES_FILE).read_text())) == 3
    # on CUDA, and for an explicit precision that one backend runs, nothing is timed
    timed.clear()
    assert backends.choose_backend(copy, device="cuda") == "eager"
    assert backends.choose_backend(copy, precision="bf16") == "openvino" and timed == []


def test_the_default_backend_of_the_commands(monkeypatch):
    from rcnn.commands.options import BACKEND_CHOICES, PRECISION_CHOICES, default_backend
    from rcnn.deploy import backends

    assert BACKEND_CHOICES == backends.BACKEND_CHOICES and PRECISION_CHOICES == backends.PRECISIONS
    monkeypatch.delenv("RCNN_BACKEND", raising=False)
    assert default_backend(None) == "auto" and default_backend(None, precision="fp32") == "auto"
    assert default_backend("eager") == "eager"
    assert default_backend(None, model_file="m.onnx") is None  # a file runs in its own runtime
    assert default_backend(None, precision="int8") is None and default_backend(None, precision="bf16") is None
    monkeypatch.setenv("RCNN_BACKEND", "eager")
    assert default_backend(None) == "eager"
    monkeypatch.setenv("RCNN_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match=r"\$RCNN_BACKEND='tensorrt': choose one of auto, eager, onnxruntime, openvino"):
        default_backend(None)
