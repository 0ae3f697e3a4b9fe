"""ONNX export: one graph from image to detections, run by ONNX Runtime, equal to the eager model.

The models have random weights with their score layers scaled so that scores spread (an untrained
model's scores tie, and tied detections have no defined order at the 100-detection cut).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from torchvision.ops.misc import FrozenBatchNorm2d

from rcnn.deploy.export import OnnxDetector, export_onnx, onnx_metadata
from rcnn.models import fast_rcnn, faster_rcnn, mask_rcnn, rcnn

NAMES = ["__background__", "circle", "square", "triangle"]
SIZES = [(100, 140), (210, 90), (64, 64)]  # the example's size and two others: the graph is not specialised


def spread(model):
    """Scores and mask probabilities that spread: the untrained output layers scaled up."""
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.weight.mul_(300)
        model.roi_heads.predictor.bbox_pred.weight.mul_(30)
        if model.rpn is not None:
            model.rpn.head.cls_logits.weight.mul_(100)
        if model.predicts_masks:  # mask logits start at std 0.001: every pixel would sit at p = 0.5
            model.roi_heads.mask_predictor.logits.weight.mul_(3000)
    return model.eval()


def calibrate(model, picture):
    """Batch-norm statistics from one picture (a randomly initialised MobileNet's features vanish
    through its 46 normalisation layers with the default statistics, and every score ties)."""
    def set_statistics(layer, args):
        x = args[0]
        layer.running_mean.copy_(x.mean((0, 2, 3)))
        layer.running_var.copy_(x.var((0, 2, 3)) + 1e-3)

    norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
    hooks = [m.register_forward_pre_hook(set_statistics) for m in norms]
    with torch.no_grad():
        model.eval()([picture])
    for hook in hooks:
        hook.remove()
    return model


def image(size, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, *size, generator=g) * 255).round() / 255  # exactly representable as uint8


def mask_iou(a, b):
    a, b = a.bool(), b.bool()
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def assert_equal_detections(eager, onnx, box_tol=1e-3):
    assert len(onnx["boxes"]) == len(eager["boxes"])
    assert torch.equal(onnx["labels"], eager["labels"])
    torch.testing.assert_close(onnx["boxes"], eager["boxes"], rtol=0, atol=box_tol)
    torch.testing.assert_close(onnx["scores"], eager["scores"], rtol=0, atol=1e-4)
    if "masks" in eager:
        assert onnx["masks"].shape == eager["masks"].shape and onnx["masks"].dtype == torch.uint8
        assert all(mask_iou(a, b) > 0.99 for a, b in zip(eager["masks"], onnx["masks"]))


def assert_same_detections(eager, onnx, box_tol, score_tol=1e-3, strays=2):
    """Equal as sets, but for ``strays``: a deep network's float sums differ in the last bits between
    PyTorch and ONNX Runtime, so detections whose scores differ by less than that swap places, and an
    untrained model's many overlapping boxes of near-equal score can tip an NMS decision (or the cut at
    100) the other way."""
    from torchvision.ops import box_iou

    assert len(onnx["boxes"]) == len(eager["boxes"])
    same = (eager["labels"][:, None] == onnx["labels"][None]) & ((eager["scores"][:, None] - onnx["scores"][None]).abs() < score_tol)
    close = ((eager["boxes"][:, None] - onnx["boxes"][None]).abs().amax(-1) <= box_tol) & same
    close &= box_iou(eager["boxes"], onnx["boxes"]) > 0.99
    unmatched = eager["scores"][~close.any(1)]
    assert len(unmatched) <= strays, f"{len(unmatched)} eager detections with no ONNX twin, scores {unmatched.tolist()}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Tiny Faster R-CNN (uint8 input) and Mask R-CNN (float input), exported once for the module."""
    out = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    faster = spread(faster_rcnn("tiny", 4, min_size=128, max_size=160, roi={"score_thresh": 0.0}))
    torch.manual_seed(1)
    masks = spread(mask_rcnn("tiny", 4, min_size=128, max_size=160, mask={"num_convs": 1, "channels": 8}))
    return {
        "faster": (faster, export_onnx(faster, out / "faster.onnx", NAMES, example_size=(100, 140))),
        "mask": (masks, export_onnx(masks, out / "mask.onnx", NAMES, input_format="float", example_size=(100, 140))),
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_onnx_runtime_equals_eager_at_any_size(exported, kind):
    model, path = exported[kind]
    detector = OnnxDetector(path)
    assert detector.class_names == NAMES and detector.predicts_masks == (kind == "mask")
    for seed, size in enumerate(SIZES):
        picture = image(size, seed)
        with torch.no_grad():
            (eager,) = model([picture])
        (onnx,) = detector([picture])
        assert len(eager["boxes"]) > 0
        assert_equal_detections(eager, onnx)


@pytest.mark.slow
def test_no_detection_gives_empty_outputs_of_the_right_shapes(tmp_path):
    """The peers' exported Mask R-CNN crashes when nothing is detected: here it gives empty outputs."""
    torch.manual_seed(2)
    model = mask_rcnn("tiny", 4, min_size=128, max_size=160, mask={"num_convs": 1, "channels": 8}).eval()
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.bias[0] = 100.0  # everything is background
    detector = OnnxDetector(export_onnx(model, tmp_path / "none.onnx", NAMES, example_size=(100, 140)))
    blank = torch.zeros(3, 120, 90)
    (onnx,) = detector([blank])
    with torch.no_grad():
        (eager,) = model([blank])
    assert onnx["boxes"].shape == (0, 4) and onnx["labels"].shape == (0,) and onnx["scores"].shape == (0,)
    assert onnx["masks"].shape == (0, 1, 120, 90) and onnx["masks"].dtype == torch.uint8
    assert_equal_detections(eager, onnx)


@pytest.mark.slow
def test_fast_rcnn_takes_proposals_as_a_second_input(tmp_path):
    torch.manual_seed(3)
    model = spread(fast_rcnn("tiny", 4, min_size=128, max_size=160, roi={"score_thresh": 0.0}))
    detector = OnnxDetector(export_onnx(model, tmp_path / "fast.onnx", NAMES, example_size=(100, 140)))
    assert detector.needs_proposals and [i.name for i in detector.session.get_inputs()] == ["image", "proposals"]
    g = torch.Generator().manual_seed(4)
    for count, size in ((30, (100, 140)), (7, (180, 90))):
        xy = torch.rand(count, 2, generator=g) * 50
        props = [torch.cat((xy, xy + 5 + torch.rand(count, 2, generator=g) * 40), dim=1)]
        picture = image(size, count)
        with torch.no_grad():
            (eager,) = model([picture], proposals=props)
        (onnx,) = detector([picture], proposals=props)
        assert_equal_detections(eager, onnx)
    with pytest.raises(ValueError, match="needs proposals"):
        detector([image((50, 50), 0)])


@pytest.mark.slow
def test_mobilenet_v3_fpn_exports(tmp_path):
    torch.manual_seed(4)
    model = faster_rcnn("mobilenet_v3_fpn", 4, min_size=160, max_size=224, roi={"score_thresh": 0.0})
    calibrate(model, image((150, 200), 9))
    with torch.no_grad():
        assert len(set(model([image((150, 200), 0)])[0]["scores"].tolist())) > 50  # no ties
    detector = OnnxDetector(export_onnx(model, tmp_path / "mobile.onnx", NAMES, example_size=(150, 200)))
    for seed, size in enumerate(((150, 200), (240, 180))):
        picture = image(size, seed)
        with torch.no_grad():
            (eager,) = model([picture])
        (onnx,) = detector([picture])
        assert len(eager["boxes"]) == 100
        assert_same_detections(eager, onnx, box_tol=1e-2)


def test_rcnn_is_refused_with_the_reason(tmp_path):
    model = rcnn("tiny", 4, warp_size=32, context_padding=2)
    with pytest.raises(ValueError, match="R-CNN cannot be exported to ONNX: it runs the CNN once per warped region"):
        export_onnx(model, tmp_path / "r.onnx", NAMES)
    with pytest.raises(ValueError, match="3 class names for a model of 4 classes"):
        export_onnx(faster_rcnn("tiny", 4), tmp_path / "f.onnx", NAMES[:3])
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_exports_a_run_with_its_class_names(shapes_root, tmp_path, capsys):
    from rcnn.build import load_model
    from rcnn.cli import main

    run = tmp_path / "run"
    train = ["train", "--config", "faster_rcnn_tiny_shapes", "--out", str(run), "--no-eval",
             "--set", f"data.root={shapes_root}", "--set", "data.shapes=null", "--set", "train.iterations=2",
             "--set", "train.batch_size=2", "--set", "model.min_size=96", "--set", "model.max_size=96"]  # fmt: skip
    assert main(train) == 0
    assert main(["export", "--weights", str(run), "--out", str(tmp_path / "m.onnx"), "--example-size", "96", "96"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["model"] == "faster_rcnn" and printed["classes"] == 5
    meta = onnx_metadata(tmp_path / "m.onnx")
    assert meta["class_names"] == load_model(run).class_names and meta["input"] == "uint8"
    (onnx,) = OnnxDetector(tmp_path / "m.onnx")([image((128, 128), 0)])
    assert onnx["boxes"].shape[1] == 4 and onnx["labels"].dtype == torch.int64
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="bad.onnx"):
        OnnxDetector(tmp_path / "bad.onnx")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxDetector(Path(tmp_path / "missing.onnx"))


RACCOON = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raccoon"  # ../shared/data/raccoon


@pytest.mark.slow
@pytest.mark.skipif(not (RACCOON / "images").is_dir(), reason=f"the raccoon photographs are not at {RACCOON}")
def test_parity_on_real_photographs(exported):
    """Real photographs of their own sizes (JPEG, EXIF applied), through the exported Faster and Mask R-CNN."""
    from rcnn.io.images import load_image

    photos = sorted((RACCOON / "images").glob("*.jpg"))[:3]
    for kind in ("faster", "mask"):
        model, path = exported[kind]
        detector = OnnxDetector(path)
        for photo in photos:
            picture = load_image(photo)
            with torch.no_grad():
                (eager,) = model([picture])
            (onnx,) = detector([picture])
            assert len(eager["boxes"]) > 0, photo
            assert_equal_detections(eager, onnx, box_tol=1e-2)


def _mixed_clamp_weights(start, stop, cells, size, dtype):
    """``rcnn.core.masks._torchvision_weights`` as it was when a converted torchvision Mask R-CNN could not
    be exported: a float lower bound beside an integer upper one, which the exporter cannot decompose."""
    pixels = torch.arange(size, device=start.device)
    length = (stop - start + 1).clamp(min=1)
    offset = (pixels[None, :] - start[:, None]).to(dtype)
    source = ((offset + 0.5) * (cells / length.to(dtype))[:, None] - 0.5).clamp(min=0.0, max=cells - 1)
    weights = (1.0 - (source[..., None] - torch.arange(cells, dtype=dtype)).abs()).clamp(min=0.0)
    return weights * ((pixels[None, :] >= start[:, None]) & (pixels[None, :] <= stop[:, None]))[..., None].to(dtype)


@pytest.mark.slow
def test_torchvision_compat_mask_rcnn_exports_and_a_failing_export_says_where(tmp_path, monkeypatch, capsys):
    """A converted torchvision Mask R-CNN pastes masks by torchvision's rule: it exports and equals the
    eager model. Where the exporter fails, rcnn export says in one line which model failed at which
    step, writes the exporter's log beside --out and exits 1."""
    from rcnn.build import build_model, load_model, resolved_config
    from rcnn.cli import main
    from rcnn.config import config_from_dict, config_to_yaml
    from rcnn.core import masks
    from rcnn.io.checkpoints import save_checkpoint
    from rcnn.io.runs import claim_run_folder

    config = config_from_dict({"model": {"name": "mask_rcnn", "backbone": "tiny", "num_classes": 4, "min_size": 128,
                                         "max_size": 160, "torchvision_compat": True,
                                         "mask": {"num_convs": 1, "channels": 8}}}, "the test's model")  # fmt: skip
    torch.manual_seed(5)
    model = spread(build_model(config.model))
    run = tmp_path / "run"
    with claim_run_folder(run):
        save_checkpoint(run, 0, model, config_yaml=config_to_yaml(resolved_config(config, model)), class_names=NAMES)
    out = tmp_path / "mask.onnx"
    with monkeypatch.context() as patch:
        patch.setattr(masks, "_torchvision_weights", _mixed_clamp_weights)
        assert main(["export", "--weights", str(run), "--out", str(out), "--example-size", "100", "140"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err + captured.out
    assert captured.err.startswith(f"rcnn export: error: {run}: mask_rcnn (tiny): the ONNX exporter failed at step 2/3")
    assert "aten.clamp" in captured.err and f"its full log is in {out}.log" in captured.err
    log = (tmp_path / "mask.onnx.log").read_text()
    assert log.startswith("rcnn export log: mask_rcnn (tiny)") and "Traceback" in log and "aten.clamp" in log
    assert not out.exists()
    # the library's own pasting as matrices exports, and equals the eager model
    assert main(["export", "--weights", str(run), "--out", str(out), "--example-size", "100", "140"]) == 0
    detector, eager = OnnxDetector(out), load_model(run).model
    for seed, size in enumerate(SIZES[:2]):
        picture = image(size, seed)
        with torch.no_grad():
            (expected,) = eager([picture])
        (onnx,) = detector([picture])
        assert len(expected["boxes"]) > 0
        assert_equal_detections(expected, onnx, box_tol=1e-2)
