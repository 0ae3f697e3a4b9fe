"""Every architecture that ``rcnn convert torchvision`` accepts exports through the CLI with its default
settings and runs in every backend, as a user holding torchvision's checkpoint would do it.

No download: each architecture is torchvision's model with random weights (its BatchNorm statistics
and score layers set as in tests/test_convert.py, so that it detects), saved as the ``.pth`` a user
has, converted with ``rcnn convert torchvision``, exported with ``rcnn export`` (uint8 input, the
converted model's own settings: 800 / 1333 resize, 1000 proposals) and run in ONNX Runtime and
OpenVINO against the converted eager model. The image is 80 px high and as wide as the model's
``max_size``: the resize rule keeps it at its size (the longer side is at the limit), so the
networks run on a small image with the models' default settings.
"""

from __future__ import annotations

import json

import pytest
import torch

from rcnn.cli import main
from rcnn.deploy.backends import load_detector
from rcnn.deploy.torchvision import TORCHVISION_ARCHS
import test_convert
from test_export import mask_iou

pytestmark = pytest.mark.usefixtures("one_thread")

# the ResNet-50 exports take a minute or more each on 2 cores: slow, still part of make test
ARCHS = [pytest.param(a, marks=pytest.mark.slow) if "resnet50" in a else a for a in TORCHVISION_ARCHS]


def picture(height: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return (torch.rand(3, height, width, generator=g) * 255).round() / 255  # exactly representable as uint8


def assert_twins(expected, got, iou=0.95, score_tol=1e-3, strays=2):
    """The same detections, but for ``strays``: each of the eager model's has a twin of the same label,
    box IoU > ``iou`` and score within ``score_tol``. Random weights made to detect give boxes of a
    fraction of a pixel and scores at 1.0, where float rounding between runtimes moves a box by a
    few hundredths of a pixel and can swap near-tied detections at NMS (trained models are held to
    1e-2 px in tests/test_export.py and tests/test_openvino.py)."""
    from torchvision.ops import box_iou

    assert abs(len(got["boxes"]) - len(expected["boxes"])) <= strays and got["boxes"].shape[1:] == (4,)
    same = (expected["labels"][:, None] == got["labels"][None]) & (box_iou(expected["boxes"], got["boxes"]) > iou)
    same &= (expected["scores"][:, None] - got["scores"][None]).abs() < score_tol
    unmatched = expected["scores"][~same.any(1)]
    assert len(unmatched) <= strays, f"{len(unmatched)} detections with no twin, scores {unmatched.tolist()}"


@pytest.mark.parametrize("arch", ARCHS)
def test_a_converted_checkpoint_exports_and_runs_in_every_backend(arch, tmp_path, monkeypatch, capsys):
    image = picture(80, {"fasterrcnn_mobilenet_v3_large_320_fpn": 640}.get(arch, 1333))  # at max_size: not resized
    with monkeypatch.context() as patch:  # calibrated at torchvision's own settings, on this picture: scores spread
        patch.setattr(test_convert, "SIZE", {})
        patch.setattr(test_convert, "PROPOSALS", {})
        torch.save(test_convert.calibrated(arch, [image]).state_dict(), tmp_path / f"{arch}.pth")
    run, onnx_file = tmp_path / "run", tmp_path / f"{arch}.onnx"
    assert main(["convert", "torchvision", str(tmp_path / f"{arch}.pth"), "--arch", arch, "--out", str(run)]) == 0
    assert main(["export", "--weights", str(run), "--format", "onnx", "--out", str(onnx_file)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["onnx"] == str(onnx_file) and summary["classes"] == 90
    eager = load_detector(run)
    assert image.shape[2] == eager.config.model.max_size
    with torch.inference_mode():
        (expected,) = eager.model([image])
    assert len(expected["boxes"]) > 0
    for backend in ("onnxruntime", "openvino"):
        loaded = load_detector(model_file=onnx_file, backend=backend)
        assert loaded.model.backend == backend and loaded.class_names == eager.class_names
        (got,) = loaded.model([image])
        assert_twins(expected, got)
        if "masks" in expected:
            assert got["masks"].shape[1:] == (1, *image.shape[1:]) and got["masks"].dtype == torch.uint8
            twins = [max(mask_iou(e, g) for g in got["masks"]) for e in expected["masks"][:10]]
            assert min(twins) > 0.95, twins
