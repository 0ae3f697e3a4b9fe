"""Numbers and files a careless or hostile user gives the commands and the server, one test per
kind of mistake (each parametrized over the commands and options it concerns):

- a number that is NaN or infinite, or outside its option's range: argparse's exit 2 with one line
  naming the option, before anything is loaded or written;
- a score threshold outside the range of the model's scores (probabilities: [0, 1]) on the command
  line and in the server's query parameters: one line / a JSON 422 naming the parameter;
- a config field without a sane value (NaN, 12 TB images, a negative seed): refused when the config
  is read, naming the field;
- an output option pointed at a file of the user's (the ground truth): left as it was, unless
  ``--force``; files that rcnn wrote are replaced;
- images of extreme aspect ratio through explain; ONNX metadata that does not fit its graph;
  uploads aborted half-way; tile settings that would make thousands of model calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from rcnn.cli import main
from tiny_runs import SMALL, TWO_STAGE, tiny_run
from user_files import assert_unchanged, snapshot

with warnings.catch_warnings():  # the pinned httpx is deprecated for starlette's test client, and works
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(shapes_root, tmp_path_factory) -> Path:
    """The one trained run of the module (a tiny Faster R-CNN, a few iterations)."""
    return tiny_run("faster_rcnn", shapes_root, tmp_path_factory)


@pytest.fixture(scope="module")
def image(shapes_root) -> Path:
    return sorted((shapes_root / "images" / "val").glob("*.png"))[0]


@pytest.fixture(scope="module")
def onnx_file(run, tmp_path_factory) -> Path:
    """The run exported once (``rcnn export``)."""
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", "--weights", str(run), "--out", str(out), "--example-size", "128", "128"]) == 0
    return out


def one_error_line(err: str) -> str:
    """The one error line of a command (argparse's usage block and progress bars aside), no traceback."""
    lines = [line for line in re.split(r"[\r\n]+", err) if line.startswith("rcnn ") or "Error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def argparse_error(argv: list[str], capsys) -> str:
    """The line of an argparse error: ``SystemExit(2)``, before the command runs."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return one_error_line(capsys.readouterr().err)


def sets(*overrides: str) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


# ---------------------------------------------------------------------------------------------
# Numbers on the command line: NaN, infinities, out of range -> argparse's exit 2 naming the option

# (argv before the option, the option), with placeholder paths: the check comes first
OPTIONS = {
    "predict --score-thresh": (["predict", "--weights", "RUN", "x.png", "--out", "o"], "--score-thresh"),
    "predict --overlap": (["predict", "--weights", "RUN", "x.png", "--out", "o", "--tile", "128"], "--overlap"),
    "evaluate --score-thresh": (["evaluate", "--weights", "RUN"], "--score-thresh"),
    "explain --score-thresh": (["explain", "x.png", "--weights", "RUN", "--out", "o"], "--score-thresh"),
    "serve --timeout": (["serve", "--weights", "RUN"], "--timeout"),
    "serve --max-upload-mb": (["serve", "--weights", "RUN"], "--max-upload-mb"),
    "export --percentile": (["export", "--weights", "RUN", "--out", "m.onnx"], "--percentile"),
    "benchmark --budget": (["benchmark"], "--budget"),
    "proposals selective-search --min-size": (["proposals", "selective-search", "data", "--out", "p"], "--min-size"),
}  # fmt: skip


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
@pytest.mark.parametrize("where", list(OPTIONS))
def test_non_finite_numbers_are_refused_naming_the_option(where, value, capsys):
    argv, option = OPTIONS[where]
    line = argparse_error([*argv, f"{option}={value}"], capsys)  # "=": argparse takes "-inf" alone for an option
    assert f"argument {option}: expected" in line and repr(value) in line and "NaN and infinities are refused" in line


OUT_OF_RANGE = [
    (["evaluate", "--weights", "RUN", "--limit", "0"], "--limit", "a whole number >= 1"),  # item 7: AP -1, mAP nan
    (["evaluate", "--weights", "RUN", "--limit", "-3"], "--limit", "a whole number >= 1"),
    (["evaluate", "--weights", "RUN", "--worst", "-1"], "--worst", "0..1000"),
    (["predict", "--weights", "RUN", "x", "--out", "o", "--tile", "1"], "--tile", "64..4096"),  # item 17
    (["predict", "--weights", "RUN", "x", "--out", "o", "--tile", "32", "--overlap", "0.5"], "--tile", "64..4096"),
    (["predict", "--weights", "RUN", "x", "--out", "o", "--tile", "128", "--overlap", "0.999"], "--overlap", "[0, 0.9]"),
    (["predict", "--weights", "RUN", "x", "--out", "o", "--tile", "100000"], "--tile", "64..4096"),
    (["predict", "--weights", "RUN", "x", "--out", "o", "--batch-size", "0"], "--batch-size", "1..256"),
    (["predict", "--weights", "RUN", "x", "--out", "o", "--stride", "-2"], "--stride", "1..100000"),
    (["predict", "--weights", "RUN", "x", "--out", "o", "--max-pixels", "-1"], "--max-pixels", "or 0 (no limit)"),
    (["predict", "--weights", "RUN", "x", "--out", "o", "--max-tiles", "0"], "--max-tiles", "1..1000000"),
    (["predict", "--weights", "RUN", "x", "--out", "o", "--threads", "0"], "--threads", "1..1024"),
    (["predict", "--weights", "RUN", "x", "--out", "o", "--calibrate-images", "0"], "--calibrate-images", "1..100000"),
    (["predict", "--weights", "RUN", "x", "--out", "o", "--batch-size", "1.5"], "--batch-size", "got '1.5'"),
    (["explain", "x.png", "--weights", "RUN", "--out", "o", "--index", "-1"], "--index", "0..100000000"),
    (["serve", "--weights", "RUN", "--port", "0"], "--port", "1..65535"),
    (["serve", "--weights", "RUN", "--port", "70000"], "--port", "1..65535"),
    (["serve", "--weights", "RUN", "--workers", "0"], "--workers", "1..64"),
    (["serve", "--weights", "RUN", "--queue", "-1"], "--queue", "0..10000"),
    (["serve", "--weights", "RUN", "--timeout", "0"], "--timeout", "(0, 86400]"),
    (["serve", "--weights", "RUN", "--max-upload-mb", "0"], "--max-upload-mb", "(0, 1024]"),
    (["serve", "--weights", "RUN", "--max-upload-mb", "1e9"], "--max-upload-mb", "(0, 1024]"),
    (["export", "--weights", "RUN", "--out", "m.onnx", "--example-size", "10", "10"], "--example-size", "32..4096"),
    (["export", "--weights", "RUN", "--out", "m.onnx", "--example-size", "480", "100000"], "--example-size", "32..4096"),
    (["export", "--weights", "RUN", "--out", "m.onnx", "--percentile", "0"], "--percentile", "(0, 100]"),
    (["benchmark", "--threads", "0"], "--threads", "1..1024"),
    (["proposals", "selective-search", "d", "--out", "p", "--max-proposals", "0"], "--max-proposals", "1..100000"),
    (["proposals", "selective-search", "d", "--out", "p", "--max-side", "10"], "--max-side", "or 0 (never)"),
    (["proposals", "selective-search", "d", "--out", "p", "--workers", "-1"], "--workers", "0..256"),
    (["pretrain", "--out", "p", "--size", "5"], "--size", "32..4096"),
    (["pretrain", "--out", "p", "--iterations", "0"], "--iterations", "1..1000000000"),
    (["pretrain", "--out", "p", "--lr", "0"], "--lr", "(0, 10]"),
    (["pretrain", "--out", "p", "--batch-size", "100000"], "--batch-size", "1..1024"),
    (["data", "shapes", "d", "--size", "100000"], "--size", "32..4096"),
    (["data", "shapes", "d", "--train", "-1"], "--train", "0..1000000"),
    (["data", "shapes", "d", "--empty-fraction", "1.5"], "--empty-fraction", "[0, 1]"),
]  # fmt: skip


@pytest.mark.parametrize("argv, option, expected", OUT_OF_RANGE, ids=[" ".join(a[:1] + a[-2:]) for a, _, _ in OUT_OF_RANGE])
def test_numbers_out_of_range_are_refused_naming_the_option_and_the_range(argv, option, expected, capsys):
    line = argparse_error(argv, capsys)
    assert line.startswith(f"rcnn {argv[0]}") and f"argument {option}: expected" in line and expected in line, line


def test_values_at_the_bounds_are_accepted():
    from rcnn.commands.options import float_range, int_range

    assert int_range(64, 4096)("64") == 64 and int_range(64, 4096)("4096") == 4096
    assert float_range(0.0, 0.9)("0") == 0.0 and float_range(0.0, 0.9)("0.9") == 0.9
    assert int_range(1, 10, special={0: "no limit"})("0") == 0
    assert float_range(0.0, 1.0, low_open=True)("1") == 1.0


# ---------------------------------------------------------------------------------------------
# Score thresholds: the range of the model's scores (item 8)


@pytest.mark.parametrize("value", ["1.5", "-0.1", "1e6"])
@pytest.mark.parametrize("command", ["predict", "explain", "evaluate --analysis"])
def test_score_thresholds_outside_the_models_range_are_refused(command, value, run, image, tmp_path, capsys):
    out = tmp_path / "out"
    argv = {
        "predict": ["predict", "--weights", str(run), str(image), "--out", str(out), "--quiet"],
        "explain": ["explain", str(image), "--weights", str(run), "--out", str(out)],
        "evaluate --analysis": ["evaluate", "--weights", str(run), "--analysis", str(out), "--limit", "2"],
    }[command]  # fmt: skip
    assert main([*argv, "--score-thresh", value]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--score-thresh {float(value):g}" in line and "scores are probabilities" in line and "[0, 1]" in line, line
    assert not out.exists()  # refused before anything is written


def test_rcnn_svm_scores_take_any_finite_threshold():
    from rcnn.inference import check_score_thresh

    class Probabilities:
        name = "faster_rcnn"

    class SvmScores:  # R-CNN: trained in stages, scored by SVM margins
        name = "rcnn"
        trains_in_stages = True

    assert check_score_thresh(-0.5, SvmScores()) == -0.5 and check_score_thresh(3.0, SvmScores()) == 3.0
    assert check_score_thresh(None, Probabilities()) is None and check_score_thresh(1, Probabilities()) == 1.0
    for model in (Probabilities(), SvmScores()):
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValueError, match="score_thresh .*: a score threshold must be a finite number"):
                check_score_thresh(bad, model)
    with pytest.raises(ValueError, match=r"score_thresh 1.01: faster_rcnn's scores are probabilities"):
        check_score_thresh(1.01, Probabilities())


@pytest.fixture(scope="module")
def client(run):
    from rcnn.serve import ServedModel, create_app

    with TestClient(create_app([ServedModel.load(run)])) as c:
        yield c


@pytest.mark.parametrize("value, error", [("nan", "invalid_request"), ("inf", "invalid_request"), ("-inf", "invalid_request"),
                                          ("abc", "invalid_request"), ("1.5", "invalid_parameter"),
                                          ("-0.1", "invalid_parameter")])  # fmt: skip
@pytest.mark.parametrize("endpoint", ["/predict", "/explain"])
def test_server_query_parameters_out_of_range_get_a_json_error_naming_them(endpoint, value, error, client, image):
    response = client.post(f"{endpoint}?score_thresh={value}", files={"image": ("x.png", image.read_bytes(), "image/png")})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == error and "score_thresh" in body["detail"], body
    assert client.get("/health").json()["status"] == "ok"
    ok = client.post(f"{endpoint}?score_thresh=0.25", files={"image": ("x.png", image.read_bytes(), "image/png")})
    assert ok.status_code == 200


def test_serve_settings_have_ranges():
    from rcnn.serve import ServeSettings

    for field, value in [("request_timeout_s", math.nan), ("request_timeout_s", 0.0), ("max_upload_bytes", 0),
                         ("concurrency", 0), ("queue_size", -1), ("max_pixels", 10**12), ("max_upload_bytes", True)]:  # fmt: skip
        with pytest.raises(ValueError, match=f"ServeSettings.{field}: must be a number in"):
            ServeSettings(**{field: value})
    ServeSettings(request_timeout_s=0.3, queue_size=0)


# ---------------------------------------------------------------------------------------------
# Config fields: every number has a range, NaN refused, named when the config is read (item 11)

CONFIG_MISTAKES = [
    (["train.momentum=nan"], "train.momentum: Input should be a finite number"),
    (["train.weight_decay=.inf"], "train.weight_decay: Input should be a finite number"),
    (["train.lr=1e9"], "train.lr: Input should be less than or equal to 10"),
    (["train.seed=-1"], "train.seed: Input should be greater than or equal to 0"),
    (["train.iterations=10000000000"], "train.iterations: Input should be less than or equal to 1000000000"),
    (["data.workers=100000"], "data.workers: Input should be less than or equal to 256"),
    (["data.hflip=.nan"], "data.hflip: Input should be a finite number"),
    (["model.min_size=1000000", "model.max_size=1000000"], "model.min_size: Input should be less than or equal to 4096"),
    (["model.min_size=[128, 100000]"], "model.min_size.1: Input should be less than or equal to 4096"),
    (["model.min_size=8", "model.max_size=8"], "model.min_size: Input should be greater than or equal to 32"),
    (["model.max_size=100"], "model.max_size: max_size 100 is smaller than min_size 128"),
    (["model.rpn.nms_thresh=.nan"], "model.rpn.nms_thresh: Input should be a finite number"),
    (["model.roi.score_thresh=-1"], "model.roi.score_thresh: Input should be greater than or equal to 0"),
    (["model.rpn.min_size=.inf"], "model.rpn.min_size: Input should be a finite number"),
    (["data.shapes={image_size: 100000}"], "data.shapes.image_size: Input should be less than or equal to 4096"),
]  # fmt: skip


@pytest.mark.parametrize("overrides, message", CONFIG_MISTAKES, ids=[o[0] for o, _ in CONFIG_MISTAKES])
def test_config_numbers_without_a_sane_value_are_refused_naming_the_field(overrides, message, shapes_root, tmp_path, capsys):
    out = tmp_path / "run"
    shapes = [] if overrides[0].startswith("data.shapes") else ["data.shapes=null"]
    argv = ["train", "--config", "faster_rcnn_tiny_shapes", "--out", str(out), "--no-eval",
            *sets(f"data.root={shapes_root}", *shapes, *SMALL, *TWO_STAGE, "train.iterations=1", *overrides)]  # fmt: skip
    started = time.perf_counter()
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line, line
    assert time.perf_counter() - started < 20 and not out.exists()  # refused before anything is allocated or written


def test_evaluate_set_overrides_are_checked_too(run, capsys):
    assert main(["evaluate", "--weights", str(run), *sets("train.momentum=nan")]) == 2
    assert "train.momentum: Input should be a finite number" in one_error_line(capsys.readouterr().err)


def test_sizes_are_checked_in_python_too():
    from rcnn.components.transform import DetectionTransform
    from rcnn.models import faster_rcnn

    with pytest.raises(ValueError, match="min_size: Input should be less than or equal to 4096"):
        faster_rcnn("tiny", 3, min_size=1_000_000, max_size=1_000_000)
    with pytest.raises(ValueError, match="min_size: Input should be a finite number"):
        faster_rcnn("tiny", 3, min_size=math.nan)
    with pytest.raises(ValueError, match="max_size 64 is smaller than min_size 128"):
        faster_rcnn("tiny", 3, min_size=128, max_size=64)
    with pytest.raises(ValueError, match=r"max_size must be a whole number of pixels in 32\.\.4096"):
        DetectionTransform(600, 1_000_000)
    with pytest.raises(ValueError, match="max_size 100 is smaller than min_size 600"):
        DetectionTransform(600, 100)
    with pytest.raises(ValueError, match="min_size must be a whole number"):
        DetectionTransform(math.nan, 100)


# ---------------------------------------------------------------------------------------------
# Output files: a user's file is never overwritten without --force (item 9)


def _ground_truth(shapes_root: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "instances_val.json"
    target.write_bytes((shapes_root / "annotations" / "instances_val.json").read_bytes())
    return target


def _users_picture(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)  # a PNG, but not one rcnn drew
    return path


def _users_files(kind: str, shapes_root: Path, image: Path, folder: Path) -> tuple[list[str], str, Path]:
    """A folder holding a user's file in the way of one output; the argv (without --weights) and option."""
    gt = _ground_truth(shapes_root, folder / "data")
    out = folder / "out"
    if kind == "predict --coco-results":
        return ["predict", str(image), "--out", str(out), "--coco-results", str(gt), "--quiet"], "--coco-results", gt
    if kind == "predict --out (a record)":
        users = folder / "out" / f"{image.name}.json"
        users.parent.mkdir(parents=True)
        users.write_text(json.dumps({"my": "notes"}))
        return ["predict", str(image), "--out", str(out), "--quiet"], "--out", users
    if kind == "predict --out (a picture)":
        users = _users_picture(folder / "out" / f"{image.name}.png")
        return ["predict", str(image), "--out", str(out), "--quiet"], "--out", users
    if kind == "predict --out (images.json)":
        users = folder / "out" / "images.json"
        users.parent.mkdir(parents=True)
        users.write_bytes(gt.read_bytes())
        return ["predict", str(image), "--out", str(out), "--coco-results", str(out / "r.json"), "--quiet"], "--out", users
    if kind == "evaluate --out":
        return ["evaluate", "--limit", "2", "--out", str(gt)], "--out", gt
    if kind == "evaluate --analysis":
        users = folder / "data" / "summary.txt"
        users.write_text("my summary\n")
        return ["evaluate", "--limit", "2", "--analysis", str(users.parent)], "--analysis", users
    if kind == "export --out":
        return ["export", "--out", str(gt)], "--out", gt
    if kind == "explain --out":
        users = folder / "data" / "explain.html"
        users.write_text("<html>my page</html>")
        return ["explain", str(image), "--out", str(users.parent)], "--out", users
    if kind == "explain --out (a picture)":
        users = _users_picture(folder / "data" / "01_anchors.png")
        return ["explain", str(image), "--out", str(users.parent)], "--out", users
    raise AssertionError(kind)


OUTPUT_KINDS = ["predict --coco-results", "predict --out (a record)", "predict --out (a picture)",
                "predict --out (images.json)", "evaluate --out", "evaluate --analysis", "export --out",
                "explain --out", "explain --out (a picture)"]  # fmt: skip


@pytest.mark.parametrize("kind", OUTPUT_KINDS)
def test_an_output_option_never_overwrites_a_users_file(kind, run, shapes_root, image, tmp_path, capsys):
    argv, option, users = _users_files(kind, shapes_root, image, tmp_path / "user")
    before = snapshot(tmp_path / "user")
    assert main([argv[0], "--weights", str(run), *argv[1:]]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{option}: {users} exists and is not" in line and "--force" in line, line
    assert_unchanged(before, tmp_path / "user")  # nothing written, nothing replaced, nothing added


def test_force_overwrites_and_rcnns_own_files_are_replaced(run, shapes_root, image, tmp_path, capsys):
    gt = _ground_truth(shapes_root, tmp_path / "data")
    out = tmp_path / "out"
    argv = ["predict", "--weights", str(run), str(image), "--out", str(out), "--quiet", "--score-thresh", "0"]
    assert main([*argv, "--coco-results", str(gt), "--force"]) == 0
    assert isinstance(json.loads(gt.read_text()), list)  # the user asked for it
    results = out / "results.json"
    for _ in range(2):  # a second run replaces the first's files: they are rcnn's
        assert main([*argv, "--coco-results", str(results)]) == 0
    capsys.readouterr()
    assert isinstance(json.loads(results.read_text()), list) and json.loads((out / "images.json").read_text())["images"]
    from rcnn.viz import is_rcnn_png

    assert is_rcnn_png(out / f"{image.name}.png")
    for _ in range(2):
        assert main(["evaluate", "--weights", str(run), "--limit", "2", "--out", str(out / "metrics.json")]) == 0
        assert main(["explain", str(image), "--weights", str(run), "--out", str(out / "explain")]) == 0
    capsys.readouterr()


def test_proposals_convert_keeps_a_users_file(tmp_path, capsys):
    source = tmp_path / "p.json"
    source.write_text(json.dumps({"1": [[0, 0, 10, 10]]}))
    users = tmp_path / "mine.safetensors"
    users.write_bytes(b"my own bytes")
    before = snapshot(tmp_path)
    assert main(["proposals", "convert", str(source), "--out", str(users)]) == 2
    assert f"--out: {users} exists and is not a proposals file" in one_error_line(capsys.readouterr().err)
    assert_unchanged(before, tmp_path)
    assert main(["proposals", "convert", str(source), "--out", str(users), "--force"]) == 0
    assert main(["proposals", "convert", str(source), "--out", str(users)]) == 0  # now rcnn's: replaced
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# Explain on extreme aspect ratios (item 14)


@pytest.mark.parametrize("size", [(10000, 10), (10, 10000), (3, 2000)])
def test_explain_draws_images_of_extreme_aspect_ratio(size, run, tmp_path, client, capsys):
    path = tmp_path / "strip.png"
    Image.new("RGB", size, (120, 120, 120)).save(path)
    assert main(["explain", str(path), "--weights", str(run), "--out", str(tmp_path / "ex"), "--score-thresh", "0"]) == 0
    capsys.readouterr()
    pictures = sorted((tmp_path / "ex").glob("*.png"))
    assert pictures and all(min(Image.open(p).size) >= 1 for p in pictures)
    response = client.post("/explain", files={"image": ("strip.png", path.read_bytes(), "image/png")})
    assert response.status_code == 200 and "stage by stage" in response.text, response.text[:300]


def test_drawing_keeps_every_side_at_least_one_pixel():
    from rcnn.explain.drawing import View, upscale
    from rcnn.viz import draw_detections

    wide = torch.rand(3, 1, 10000)
    picture = draw_detections(wide, {"boxes": torch.tensor([[0.0, 0.0, 50.0, 1.0]]), "labels": torch.tensor([1]),
                                     "scores": torch.tensor([0.9])}, ["bg", "a"], 0.5, scale=420 / 10000)  # fmt: skip
    assert picture.size == (420, 1)
    assert View(wide).base.size == (420, 1) and upscale(torch.rand(3, 1, 5000), 112).size == (112, 1)


# ---------------------------------------------------------------------------------------------
# ONNX metadata that does not fit its graph (item 15)


def _edited(source: Path, out: Path, **props: str) -> Path:
    import onnx

    model = onnx.load(str(source))
    for prop in model.metadata_props:
        if prop.key in props:
            prop.value = props.pop(prop.key)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(out))
    return out


def _foreign(source: Path, out: Path, inputs: list[str], outputs: list[str]) -> Path:
    """An unrelated graph (identities) given the rcnn metadata of ``source``."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Identity", [inputs[0]], [name]) for name in outputs]
    graph = helper.make_graph(
        nodes, "foreign", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 4]) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 4]) for n in outputs],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    for prop in onnx.load(str(source)).metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(model, str(out))
    return out


ONNX_MISTAKES = {
    "fewer class names than the graph": (
        lambda src, out: _edited(src, out, **{"rcnn.class_names": json.dumps(["__background__", "circle"])}),
        "its rcnn.class_names metadata lists 2 names (background included) but the graph's classifier has 6 classes"),
    "more class names than the graph": (
        lambda src, out: _edited(src, out, **{"rcnn.class_names": json.dumps(["bg", *"abcdefghij"])}),
        "lists 11 names (background included) but the graph's classifier has 6 classes"),
    "class names that are not JSON": (
        lambda src, out: _edited(src, out, **{"rcnn.class_names": "circle, square"}),
        "its rcnn.class_names metadata is not valid JSON"),
    "categories that do not fit the names": (
        lambda src, out: _edited(src, out, **{"rcnn.categories": json.dumps([{"id": 1, "name": "circle"}])}),
        "its rcnn.categories metadata must hold one"),
    "a foreign graph (other inputs)": (
        lambda src, out: _foreign(src, out, ["x"], ["y"]),
        "describes a faster_rcnn graph with inputs ['image'], but the graph's inputs are ['x']"),
    "a foreign graph (other outputs)": (
        lambda src, out: _foreign(src, out, ["image"], ["boxes", "classes", "confidence"]),
        "with outputs ['boxes', 'labels', 'scores'], but the graph's outputs are ['boxes', 'classes', 'confidence']"),
    "masks the metadata does not promise": (
        lambda src, out: _foreign(src, out, ["image"], ["boxes", "labels", "scores", "masks"]),
        "with outputs ['boxes', 'labels', 'scores'], but the graph's outputs are"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ONNX_MISTAKES))
def test_onnx_metadata_that_does_not_fit_the_graph_is_refused_when_loaded(case, onnx_file, image, tmp_path, capsys):
    from rcnn.deploy.backends import load_detector

    make, message = ONNX_MISTAKES[case]
    path = make(onnx_file, tmp_path / "edited.onnx")
    with pytest.raises(ValueError) as info:
        load_detector(model_file=path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value), str(info.value)
    assert main(["predict", "--model", str(path), str(image), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"rcnn predict: error: {path}: ") and message in line
    assert not (tmp_path / "o").exists()


def test_the_untouched_export_loads_and_predicts(onnx_file, image, tmp_path, capsys):
    assert main(["predict", "--model", str(onnx_file), str(image), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# Aborted uploads: one line in the log, no traceback (item 16)


def _abort(app, body: bytes, content_type: str) -> list[dict]:
    """Send ``body`` as the first part of a larger upload to ``app`` (ASGI), then disconnect."""
    messages = [{"type": "http.request", "body": body, "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", content_type.encode()), (b"content-length", str(10 * len(body)).encode())],
             "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8000)}  # fmt: skip
    asyncio.run(app(scope, receive, send))  # raises if the disconnect escaped as an ASGI exception
    return sent


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("content_type", ["image/png", "multipart/form-data; boundary=xyz"])
def test_an_aborted_upload_costs_one_log_line(content_type, run, image):
    from rcnn.serve import ServedModel, create_app

    app = create_app([ServedModel.load(run)])
    handler, loggers = _Records(), [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "fastapi")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # the server's log, whatever an earlier test configured
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        for _ in range(3):
            sent = _abort(app, image.read_bytes()[:100], content_type)
            assert sent[0]["status"] == 400 and b"client_disconnected" in sent[1]["body"]
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    lines = {id(r): r for r in handler.records}.values()  # a record reaches the handler once per logger it passes
    assert len(lines) == 3 and all("disconnected during the upload (after 100 bytes)" in r.getMessage() for r in lines)
    assert not any(r.exc_info for r in lines)


# ---------------------------------------------------------------------------------------------
# Tiling: bounded tile size and overlap, a cap on the tiles of one image (item 17)


def test_tiling_that_would_make_too_many_tiles_is_refused_before_it_runs(run, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000), (60, 60, 60)).save(big)
    started = time.perf_counter()
    argv = ["predict", "--weights", str(run), str(big), "--out", str(tmp_path / "o"), "--quiet", "--tile", "64"]
    from rcnn.inference.tiling import tile_count

    assert main([*argv, "--overlap", "0.9"]) == 2
    line = one_error_line(capsys.readouterr().err)
    count = tile_count(2000, 3000, 64, 0.9)
    assert count > 100_000 and f"{big}: its 3000x2000 pixels cut into 64-px tiles overlapping by 0.9 make {count} tiles" in line
    assert "more than the limit of 2048" in line and "--tile" in line and "--overlap" in line and "--max-tiles" in line
    assert main([*argv, "--overlap", "0", "--max-tiles", "100"]) == 2  # 47 x 32 = 1504 tiles
    assert "make 1504 tiles, more than the limit of 100" in one_error_line(capsys.readouterr().err)
    assert time.perf_counter() - started < 30  # no tile was run
    assert not list((tmp_path / "o").glob("*.json"))


def test_tiling_settings_are_bounded_in_python_too():
    from rcnn.inference import Tiling
    from rcnn.inference.tiling import predict_tiled, tile_windows

    for tile, overlap, message in [(1, 0.2, "tile must be a whole number of pixels in 64..4096"),
                                   (32, 0.999, "tile must be"), (128, 0.999, r"overlap must be in \[0, 0.9\]"),
                                   (128, math.nan, "overlap must be in")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            Tiling(tile, overlap)
        with pytest.raises(ValueError, match=message):
            predict_tiled(lambda images: [], torch.zeros(3, 64, 64), tile, overlap)
    with pytest.raises(ValueError, match="makes 2500 tiles .* more than the limit of 2048"):
        tile_windows(3200, 3200, 64, 0.0)
    assert len(tile_windows(3200, 3200, 64, 0.0, max_tiles=None)) == 2500
    assert tile_windows(64, 64, 64, 0.9) == [(0, 0, 64, 64)]
