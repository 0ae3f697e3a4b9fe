"""Fast R-CNN: the paper's defaults, the [u >= 1] indicator through the model, training from a
proposals file, truncated SVD of fc6/fc7, clear errors for missing proposals."""

import copy
import json

import pytest
import torch
from torch import nn

from rcnn.cli import main
from rcnn.config import load_config
from rcnn.data.reading import build_dataset
from rcnn.inference import evaluate_model
from rcnn.models import FastRCNN, fast_rcnn
from rcnn.models.fast_rcnn import compress_box_head
from rcnn.components.proposals.io import MissingProposalsError, load_proposals, save_proposals
from rcnn.build import load_model
from rcnn.components.proposals.io import proposal_source
from rcnn.training.run import run_training

QUIET = dict(progress=False, log=lambda s: None)
pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(shapes_root, proposals, *overrides):
    return load_config(
        "fast_rcnn_tiny_shapes",
        [
            f"data.root={shapes_root}", f"data.proposals_train={proposals['train']}",
            f"data.proposals_val={proposals['val']}", "train.iterations=30", "train.warmup_iterations=5",
            "model.min_size=64", "model.max_size=64", "model.roi.batch_size_per_image=32",
            "train.log_every=1", "train.checkpoint_every=40", "data.hflip=0", *overrides,
        ],
    )  # fmt: skip


def test_defaults_are_the_papers():
    model = fast_rcnn("tiny", 6)
    assert isinstance(model, FastRCNN) and model.rpn is None
    s = model.roi_heads.settings
    assert (s.batch_size_per_image, s.positive_fraction, s.fg_iou_thresh) == (64, 0.25, 0.5)
    assert (s.bg_iou_thresh_lo, s.bg_iou_thresh_hi, s.nms_thresh) == (0.1, 0.5, 0.3)
    assert model.roi_heads.pooler.kind == "pool" and model.roi_heads.pooler.output_size == (7, 7)
    assert model.roi_heads.predictor.bbox_pred.out_features == 4 * 5


def test_box_loss_ignores_background_rois():
    """d loss_box / d deltas is zero on background RoIs and, on a foreground RoI of class u, non-zero
    only in u's four columns; the classification loss reaches every RoI."""
    torch.manual_seed(0)
    model = fast_rcnn("tiny", 4, min_size=96, max_size=96, roi={"batch_size_per_image": 32})
    model.train()
    captured = {}
    sample = model.roi_heads.sample

    def recording_sample(*args):
        captured["sampled"] = sample(*args)
        return captured["sampled"]

    def keep_outputs(module, inputs, outputs):
        for tensor in outputs:
            tensor.retain_grad()
        captured["outputs"] = outputs

    model.roi_heads.sample = recording_sample
    model.roi_heads.predictor.register_forward_hook(keep_outputs)
    image = torch.rand(3, 96, 96)
    target = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 50.0], [50.0, 40.0, 90.0, 80.0]]), "labels": torch.tensor([1, 3])}
    jitter = target["boxes"].repeat(6, 1) + torch.randn(12, 4) * 2
    far = torch.tensor([[0.0, 60.0, 20.0, 95.0], [60.0, 0.0, 95.0, 30.0], [0.0, 0.0, 96.0, 96.0]])
    losses = model([image], [target], proposals=[torch.cat((jitter, far))])
    losses["loss_box"].backward(retain_graph=True)
    labels = torch.cat(captured["sampled"].labels)
    class_logits, deltas = captured["outputs"]
    grad = deltas.grad.reshape(len(labels), -1, 4)  # [R, K, 4]
    assert (labels == 0).any() and (labels > 0).any()
    assert torch.count_nonzero(grad[labels == 0]) == 0
    for row in (labels > 0).nonzero().flatten():
        u = int(labels[row])
        others = torch.cat((grad[row, : u - 1], grad[row, u:]))
        assert torch.count_nonzero(others) == 0 and torch.count_nonzero(grad[row, u - 1]) > 0
    assert class_logits.grad is None or torch.count_nonzero(class_logits.grad) == 0  # box loss only so far
    losses["loss_cls"].backward()
    assert (class_logits.grad.abs().sum(dim=1) > 0).all()


def test_trains_from_a_proposals_file_and_the_loss_drops(shapes_root, proposals, tmp_path):
    torch.manual_seed(0)
    config = small_config(shapes_root, proposals)
    summary = run_training(config, tmp_path / "run", evaluate=False, **QUIET)
    assert summary["iterations"] == 30
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    totals = [r["train/loss_cls"] + r["train/loss_box"] for r in lines if "train/loss_cls" in r]
    assert len(totals) == 30
    first, last = sum(totals[:5]) / 5, sum(totals[-5:]) / 5
    assert last < 0.75 * first, (first, last)

    loaded = load_model(tmp_path / "run")
    model, loaded_config, class_names = loaded.model, loaded.config, loaded.class_names
    assert isinstance(model, FastRCNN) and loaded_config.model.name == "fast_rcnn"
    val = build_dataset(shapes_root, "val")
    metrics = evaluate_model(model, val, proposals=proposal_source(proposals["val"]))
    assert metrics["images"] == len(val) and 0.0 <= metrics["bbox"]["AP50"] <= 1.0


def test_truncated_svd_known_answer():
    linear = nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        linear.bias.copy_(torch.tensor([0.5, -0.5]))
    head = nn.Sequential(linear)
    (report,) = compress_box_head(head, (1,))
    first, second = head[0]
    assert first.bias is None and first.weight.shape == (1, 3) and second.weight.shape == (2, 1)
    # rank 1 keeps the singular value 3: W ≈ [[3, 0, 0], [0, 0, 0]], the bias unchanged
    x = torch.tensor([[1.0, 2.0, 4.0]])
    assert torch.allclose(head(x), torch.tensor([[3.5, -0.5]]), atol=1e-6)
    assert report["params_before"] == 8 and report["params_after"] == 3 + 2 + 2
    assert report["energy_kept"] == pytest.approx(9 / 10)
    with pytest.raises(ValueError, match="rank must lie in 1..256"):
        fast_rcnn("tiny", 3).compress_fc()  # the paper's 1024 / 256; the tiny head's fc6 is 3136 -> 256


def test_compress_fc_full_rank_keeps_outputs_low_rank_shrinks():
    torch.manual_seed(0)
    model = fast_rcnn("tiny", 4, min_size=96, max_size=96).eval()
    with torch.no_grad():  # a trained-looking predictor, so that scores differ between classes
        model.roi_heads.predictor.cls_score.weight.normal_(std=0.3)
    image = torch.rand(3, 96, 96)
    boxes = torch.tensor([[5.0, 5.0, 40.0, 45.0], [30.0, 20.0, 90.0, 70.0], [10.0, 50.0, 60.0, 95.0]])
    with torch.inference_mode():
        reference = model([image], proposals=[boxes])[0]
        pooled = torch.randn(7, 64, 7, 7)
        head_ref = model.roi_heads.box_head(pooled)

    full = copy.deepcopy(model)
    reports = full.compress_fc(256, 256)  # min(3136, 256) and min(256, 256): exact
    assert [r["layer"] for r in reports] == ["fc6", "fc7"] and all(r["energy_kept"] == pytest.approx(1.0) for r in reports)
    with torch.inference_mode():
        assert torch.allclose(full.roi_heads.box_head(pooled), head_ref, atol=1e-4)
        out = full([image], proposals=[boxes])[0]
    assert torch.equal(out["labels"], reference["labels"])
    assert torch.allclose(out["scores"], reference["scores"], atol=1e-5)
    assert torch.allclose(out["boxes"], reference["boxes"], atol=1e-3)

    low = copy.deepcopy(model)
    before = sum(p.numel() for p in low.roi_heads.box_head.parameters())
    reports = low.compress_fc(32, 16)
    after = sum(p.numel() for p in low.roi_heads.box_head.parameters())
    assert before == 3136 * 256 + 256 + 256 * 256 + 256
    assert after == (3136 * 32 + 32 * 256 + 256) + (256 * 16 + 16 * 256 + 256)
    assert [r["params_after"] for r in reports] == [3136 * 32 + 32 * 256 + 256, 256 * 16 + 16 * 256 + 256]
    assert not any("box_head" in k for k in low.backbone.state_dict())  # one head, held by the RoI heads
    with torch.inference_mode():
        assert low([image], proposals=[boxes])[0]["boxes"].shape[1] == 4


def test_missing_proposals_are_clear_errors(shapes_root, proposals, tmp_path, capsys):
    model = fast_rcnn("tiny", 6).eval()
    with pytest.raises(ValueError, match="needs proposals"):
        model([torch.rand(3, 64, 64)])

    # a proposals file that lacks images of the split: the error names the file and the ids
    train_ids = build_dataset(shapes_root, "train").image_ids
    partial = load_proposals(proposals["train"])
    path = tmp_path / "partial.safetensors"
    save_proposals(path, {i: partial[i] for i in train_ids[2:]})
    config = small_config(shapes_root, {"train": path, "val": proposals["val"]})
    with pytest.raises(MissingProposalsError, match=f"{path}.*ids {train_ids[0]}, {train_ids[1]}"):
        run_training(config, tmp_path / "run", **QUIET)

    # the command line: a missing proposals file is one line naming it
    run_training(small_config(shapes_root, proposals, "train.iterations=1"), tmp_path / "ok", evaluate=False, **QUIET)
    missing = tmp_path / "nowhere.safetensors"
    assert main(["evaluate", "--weights", str(tmp_path / "ok"), "--proposals", str(missing)]) == 2
    assert f"{missing}: proposals file not found" in capsys.readouterr().err
