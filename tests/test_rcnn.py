"""R-CNN: the fine-tuning batch, the inference order (SVM scores -> NMS 0.3 -> box regression) on
a crafted case, the four training stages end to end, the feature cache, save / load, the command
line, and clear errors."""

import importlib
import json
import shutil

import numpy as np
import pytest
import torch

from rcnn.components.ridge import BoxRegressors
from rcnn.cli import main
from rcnn.build import build_model
from rcnn.config import load_config
from rcnn.data.reading import build_dataset
from rcnn.inference import evaluate_model, predict_dataset
from rcnn.models import RCNN, rcnn
from rcnn.components.proposals.io import MissingProposalsError, load_proposals, save_proposals
from rcnn.components.svm import ClassSVMs
from rcnn.build import load_model
from rcnn.io.checkpoints import load_checkpoint
from rcnn.training.rcnn_stages import FeatureCache, extract_features
from rcnn.components.proposals.io import proposal_source
from rcnn.training.run import run_training

QUIET = dict(progress=False, log=lambda s: None)
pytestmark = pytest.mark.usefixtures("one_thread")
rcnn_module = importlib.import_module("rcnn.models.rcnn")  # the attribute rcnn.models.rcnn is the builder


def small_config(shapes_root, proposals, *overrides):
    return load_config(
        "rcnn_tiny_shapes",
        [
            f"data.root={shapes_root}", f"data.proposals_train={proposals['train']}",
            f"data.proposals_val={proposals['val']}", "model.extra.warp_size=32", "model.extra.context_padding=2",
            "model.extra.batch_size=64", "train.iterations=6", "train.batch_size=4", "train.warmup_iterations=2",
            "train.log_every=1", "train.checkpoint_every=3", *overrides,
        ],
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(shapes_root, proposals, tmp_path_factory):
    """A tiny R-CNN through all four stages: (run directory, summary, log lines, config)."""
    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("rcnn_run")
    config = small_config(shapes_root, proposals)
    logs: list[str] = []
    summary = run_training(config, run_dir, progress=False, log=logs.append)
    return run_dir, summary, logs, config


def test_finetuning_batch_is_32_foreground_and_96_background(monkeypatch):
    torch.manual_seed(0)
    model = rcnn("tiny", 3, warp_size=32, context_padding=2).train()
    captured = []
    monkeypatch.setattr(rcnn_module, "softmax_log_loss", lambda logits, labels: captured.append(labels) or logits.sum())
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 100)]
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[40.0, 20.0, 90.0, 70.0]]), "labels": torch.tensor([1])},
    ]
    near = [t["boxes"].repeat(30, 1) + torch.rand(30, 4) * 4 for t in targets]  # IoU >= 0.5: foreground
    far = [torch.tensor([[60.0, 60.0, 90.0, 90.0]]).repeat(80, 1), torch.tensor([[0.0, 0.0, 30.0, 15.0]]).repeat(80, 1)]
    model(images, targets, proposals=[torch.cat(p) for p in zip(near, far)])
    labels = captured[-1]
    assert len(labels) == 128 and int((labels > 0).sum()) == 32  # drawn from both images
    assert set(labels[labels > 0].tolist()) == {1, 2}
    # too few positives: all of them, and background fills the batch
    model([images[0]], [targets[0]], proposals=[torch.cat((near[0][:4], far[0]))])
    labels = captured[-1]
    assert int((labels > 0).sum()) == 5 and len(labels) == 85  # 4 near + the gt box; 80 background


def crafted_rcnn():
    """A one-class R-CNN whose SVM score is fc7[0] and whose regressor shifts a box by fc7[1] widths."""
    model = rcnn("tiny", 2, warp_size=32, context_padding=2, regression_features="fc7").eval()
    svms = ClassSVMs(2)
    svms.weights = np.zeros((256, 1), dtype=np.float32)
    svms.weights[0, 0] = 1.0
    svms.biases = np.zeros(1, dtype=np.float32)
    model.set_svms(svms)
    regressors = BoxRegressors(2)
    regressors.weights = np.zeros((1, 256, 4), dtype=np.float32)
    regressors.weights[0, 1, 0] = 1.0  # tx = fc7[1]
    model.set_box_regressors(regressors)
    return model


def test_inference_is_svm_scores_then_nms_then_box_regression(monkeypatch):
    model = crafted_rcnn()
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [4.0, 0.0, 14.0, 10.0], [40.0, 40.0, 60.0, 60.0]])
    fc7 = torch.zeros(3, 256)
    fc7[:, 0] = torch.tensor([2.0, 1.0, -3.0])  # SVM scores: A 2, B 1, C below the -1 threshold
    fc7[:, 1] = torch.tensor([0.2, 1.0, 0.0])  # A moves 2 px right, B 10 px
    monkeypatch.setattr(model, "batched_region_features", lambda images, regions, rows=None: [(fc7, fc7)])
    (out,) = model([torch.rand(3, 64, 64)], proposals=[boxes])
    # IoU(A, B) = 0.43 > 0.3: NMS on the proposal boxes removes B. (Regressed first, B would have
    # moved to [14, 24] and survived.) Then A alone is regressed.
    assert out["labels"].tolist() == [1]
    assert out["scores"].tolist() == pytest.approx([2.0])
    assert out["boxes"].tolist() == [pytest.approx([2.0, 0.0, 12.0, 10.0])]
    model.use_box_regression = False
    (out,) = model([torch.rand(3, 64, 64)], proposals=[boxes])
    assert out["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0]]

    # the SVMs and regressors travel in the state dict
    copy = rcnn("tiny", 2, warp_size=32, context_padding=2, regression_features="fc7").eval()
    assert copy.svms() is None and copy.box_regressors() is None
    copy.load_state_dict(crafted_rcnn().state_dict())
    monkeypatch.setattr(copy, "batched_region_features", lambda images, regions, rows=None: [(fc7, fc7)])
    (again,) = copy([torch.rand(3, 64, 64)], proposals=[boxes])
    assert again["boxes"].tolist() == [pytest.approx([2.0, 0.0, 12.0, 10.0])]


def test_stages_run_end_to_end(trained, shapes_root, proposals):
    run_dir, summary, logs, _ = trained
    assert summary["model"] == "rcnn" and summary["iterations"] == 6
    for name in ("finetune/last", "features/cache.json", "svms.safetensors", "box_regressors.safetensors", "last"):
        assert (run_dir / name).exists(), name
    stages = json.loads((run_dir / "rcnn_stages.json").read_text())
    assert set(stages["stages"]) == {"finetune", "features", "svms", "box_regression"}
    assert stages["feature_cache"] == {"computed": 12, "reused": 0}
    assert int(stages["negatives_per_round"]["0"]) > 0 and "1" in stages["negatives_per_round"]
    assert any(line.startswith("SVMs, round 1:") and "hard negatives added" in line for line in logs)
    assert ClassSVMs.load(run_dir / "svms.safetensors").history[-1].round == 1
    assert 0.0 <= summary["metrics"]["bbox"]["AP50"] <= 1.0

    loaded = load_model(run_dir)
    model, config, class_names = loaded.model, loaded.config, loaded.class_names
    assert isinstance(model, RCNN) and bool(model.trained_parts.all()) and len(class_names) == 6
    val = build_dataset(shapes_root, "val")
    outputs, _ = predict_dataset(model, val, proposals=proposal_source(proposals["val"]))
    for image_id, out in outputs.items():
        height, width = val.annotation(val.index_of(image_id))["orig_size"]
        boxes, labels, scores = out["boxes"], out["labels"], out["scores"]
        assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4) and len(labels) <= 100
        assert labels.dtype == torch.int64 and bool(((labels >= 1) & (labels <= 5)).all())
        assert bool((boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all())
        assert bool((boxes >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all())
        assert bool(torch.isfinite(scores).all() and (scores[:-1] >= scores[1:]).all())  # NMS order
        assert bool((scores > -1.0).all())  # SVM scores above the margin
    metrics = evaluate_model(model, val, proposals=proposal_source(proposals["val"]))
    assert metrics["bbox"]["AP50"] == pytest.approx(summary["metrics"]["bbox"]["AP50"], abs=1e-6)


def test_feature_cache_is_read_back_and_resumes(trained, shapes_root, proposals, tmp_path):
    run_dir, _, _, config = trained
    train_set = build_dataset(shapes_root, "train", train=True)
    model = build_model(config.model, train_set.num_classes)
    load_checkpoint(run_dir / "last", model)
    cache_dir = tmp_path / "features"
    shutil.copytree(run_dir / "features", cache_dir)
    source = proposal_source(proposals["train"])
    cache, counts = extract_features(model, train_set, source, cache_dir, **QUIET)
    assert counts == {"computed": 0, "reused": 12}
    regions = cache[0]
    assert isinstance(regions.features, np.memmap) and regions.features.shape[1] == 256
    gt = train_set[0][1]
    assert torch.equal(regions.boxes[: len(gt["boxes"])], gt["boxes"]) and torch.equal(regions.gt_labels[: len(gt["labels"])], gt["labels"])
    features, boxes, targets, classes = cache.regression_examples()
    assert features.shape == (len(boxes), 64 * 7 * 7) and bool((classes >= 1).all())

    # an interrupted run: one image missing is computed, the rest read
    first_id = train_set.image_ids[0]
    for path in cache.paths(first_id):
        path.unlink()
    _, counts = extract_features(model, train_set, source, cache_dir, **QUIET)
    assert counts == {"computed": 1, "reused": 11}
    # other proposals for one image: that image is recomputed
    changed = lambda image_id: source(image_id)[:-1] if image_id == first_id else source(image_id)  # noqa: E731
    _, counts = extract_features(model, train_set, changed, cache_dir, **QUIET)
    assert counts == {"computed": 1, "reused": 11}
    # another CNN: the whole cache is rebuilt
    with torch.no_grad():
        model.box_head.fc7.bias.add_(1.0)
    logs = []
    _, counts = extract_features(model, train_set, source, cache_dir, progress=False, log=logs.append)
    assert counts == {"computed": 12, "reused": 0} and "rebuilding" in logs[0]

    # a damaged entry is an error naming the file
    index_file = cache.paths(first_id)[2]
    index_file.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=str(index_file)):
        cache[0]


def test_command_line_evaluate_and_predict(trained, shapes_root, tmp_path, capsys):
    run_dir = trained[0]
    assert main(["evaluate", "--weights", str(run_dir), "--out", str(tmp_path / "metrics.json")]) == 0
    assert "AP50" in json.loads((tmp_path / "metrics.json").read_text())["bbox"]
    image = build_dataset(shapes_root, "val").image_path(0)
    assert main(["predict", "--weights", str(run_dir), str(image), "--out", str(tmp_path / "pred"), "--score-thresh", "-1"]) == 0
    result = json.loads((tmp_path / "pred" / f"{image.name}.json").read_text())
    assert result["source"] == str(image.resolve()) and all(len(d["box"]) == 4 for d in result["detections"])
    assert (tmp_path / "pred" / f"{image.name}.png").is_file()


def test_bad_inputs_are_clear_errors(shapes_root, proposals, tmp_path):
    model = rcnn("tiny", 3, warp_size=32, context_padding=2)
    with pytest.raises(ValueError, match="R-CNN needs proposals"):
        model.eval()([torch.rand(3, 32, 32)])
    with pytest.raises(ValueError, match="do not fit this R-CNN"):
        wrong = ClassSVMs(3)
        wrong.weights, wrong.biases = np.zeros((10, 2), np.float32), np.zeros(2, np.float32)
        model.set_svms(wrong)
    with pytest.raises(ValueError, match="RCNN: warp_sise: unknown field"):
        rcnn("tiny", 3, warp_sise=32)
    with pytest.raises(ValueError, match="warp_mode: Input should be 'anisotropic'"):
        rcnn("tiny", 3, warp_mode="stretch")
    with pytest.raises(ValueError, match="model.roi: not an option of rcnn"):
        small_config(shapes_root, proposals, "model.roi.nms_thresh=0.5")

    # a proposals file without some of the training images: the file and the ids are named
    train_ids = build_dataset(shapes_root, "train").image_ids
    full = load_proposals(proposals["train"])
    partial = tmp_path / "partial.safetensors"
    save_proposals(partial, {i: full[i] for i in train_ids[1:]})
    config = small_config(shapes_root, {"train": partial, "val": proposals["val"]})
    with pytest.raises(MissingProposalsError, match=f"{partial}.*ids {train_ids[0]}"):
        run_training(config, tmp_path / "run", **QUIET)
    with pytest.raises(FileNotFoundError, match="no cached features for image id"):
        FeatureCache(tmp_path / "empty", [7])[0]


def test_regions_of_several_images_share_cnn_batches_and_give_the_same_features():
    torch.manual_seed(0)
    model = rcnn("tiny", 3, warp_size=32, context_padding=2, feature_batch_size=4).eval()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 40, 50, generator=g), torch.rand(3, 30, 30, generator=g)]
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [5.0, 5.0, 40.0, 30.0], [10.0, 2.0, 30.0, 25.0]]),
             torch.tensor([[1.0, 1.0, 12.0, 28.0], [0.0, 0.0, 30.0, 30.0], [3.0, 4.0, 9.0, 9.0], [2.0, 2.0, 20.0, 10.0]])]
    calls = []
    original = model.cnn
    model.cnn = lambda crops: calls.append(crops.shape[0]) or original(crops)
    with torch.inference_mode():
        together = model.batched_region_features(images, boxes, [torch.tensor([2, 0]), None])
        assert calls == [4, 3]  # 7 regions: one full batch spanning both images, then the rest
        alone = [model.region_features(images[0], boxes[0], torch.tensor([2, 0])), model.region_features(images[1], boxes[1])]
        detections = model(images, proposals=boxes)
        one_by_one = [model([image], proposals=[b])[0] for image, b in zip(images, boxes)]
    for (fc7, reg), (fc7_1, reg_1) in zip(together, alone):
        torch.testing.assert_close(fc7, fc7_1)
        torch.testing.assert_close(reg, reg_1)
    assert together[0][1].shape == (2, 64 * model.pool_size**2) and together[1][1].shape[0] == 4
    for a, b in zip(detections, one_by_one):
        torch.testing.assert_close(a["scores"], b["scores"])
        torch.testing.assert_close(a["boxes"], b["boxes"])
