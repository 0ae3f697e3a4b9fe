"""torchvision detection checkpoints converted into rcnn run folders reproduce torchvision's outputs.

No download: each architecture is built with random weights, its BatchNorm statistics set from
random images and its score layers scaled so that scores spread as a trained model's do (random
weights otherwise saturate the sigmoids, and tied scores have no defined order); its state dict is
saved, converted, and both models detect on the same images.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from rcnn.build import load_model
from rcnn.cli import main
from rcnn.deploy.torchvision import TORCHVISION_ARCHS, convert_torchvision
from rcnn.core import fastpaths

# small images and fewer proposals (the v2 box head's convolutions cost ~115 GFLOP per 1000
# RoIs): the same computation, less of it; the converted model is given the same settings
SIZE = dict(min_size=192, max_size=256)
PROPOSALS = dict(rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100)


def freeze_batchnorm(module: torch.nn.Module) -> None:
    """The body's BatchNorm as torchvision's trained detectors have it (FrozenBatchNorm2d), as ours."""
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)


@torch.no_grad()
def calibrated(arch: str, images: list[torch.Tensor]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models.detection, arch)(weights=None, weights_backbone=None, **SIZE, **PROPOSALS).eval()

    def set_stats(bn, inputs):  # each BatchNorm normalises what it receives
        x = inputs[0].transpose(0, 1).flatten(1)
        if x.shape[1] < 2:  # no RoI reached this head
            return
        bn.running_mean.copy_(x.mean(1))
        bn.running_var.copy_(x.var(1))

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model(images)
    for hook in hooks:
        hook.remove()
    # the largest output of each score layer becomes `limit`; stage by stage, as each stage's
    # scaling changes what the next one sees (the layers of one stage see the same inputs)
    stages = [[(model.rpn.head.cls_logits, 6.0), (model.rpn.head.bbox_pred, 1.0)],
              [(model.roi_heads.box_predictor.cls_score, 8.0), (model.roi_heads.box_predictor.bbox_pred, 2.0)]]  # fmt: skip
    if model.roi_heads.has_mask():
        stages.append([(model.roi_heads.mask_predictor.mask_fcn_logits, 8.0)])
    for stage in stages:
        seen: dict[torch.nn.Module, list[torch.Tensor]] = {layer: [] for layer, _ in stage}
        hooks = [layer.register_forward_hook(lambda m, i, o: seen[m].append(o.abs().max())) for layer, _ in stage]
        model(images)
        for hook in hooks:
            hook.remove()
        for layer, limit in stage:
            scale = limit / max(seen[layer]).clamp(min=1e-12)
            layer.weight.mul_(scale)
            layer.bias.mul_(scale)
    return model


def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.rand(3, 180, 240, generator=g), torch.rand(3, 150, 250, generator=g)]


def compare(theirs: list[dict], ours: list[dict], box_tol: float, score_tol: float) -> None:
    for t, o in zip(theirs, ours):
        assert len(t["boxes"]) > 0 and len(o["boxes"]) == len(t["boxes"])
        assert torch.equal(o["labels"], t["labels"])
        torch.testing.assert_close(o["boxes"], t["boxes"], rtol=0, atol=box_tol)
        torch.testing.assert_close(o["scores"], t["scores"], rtol=0, atol=score_tol)
        if "masks" in t:
            assert o["masks"].dtype == torch.uint8
            # equal but where torchvision's soft mask is at the threshold (rounding decides those)
            differ = o["masks"] != (t["masks"] >= 0.5).to(torch.uint8)
            assert differ.float().mean() < 1e-4, f"{int(differ.sum())} mask pixels differ"
            if differ.any():
                assert (t["masks"][differ] - 0.5).abs().max().item() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(TORCHVISION_ARCHS))
def test_converted_models_reproduce_torchvision(arch, tmp_path):
    data = images()
    peer = calibrated(arch, data)
    torch.save(peer.state_dict(), tmp_path / "peer.pth")
    report = convert_torchvision(tmp_path / "peer.pth", arch, tmp_path / "run", log=lambda s: None)
    assert report.num_classes == 91 and report.tensors > 200
    freeze_batchnorm(peer.backbone.body)
    with torch.no_grad():
        expected = peer(data)
    ours = load_model(tmp_path / "run", for_inference=False).model
    ours.transform.min_sizes, ours.transform.max_size = (SIZE["min_size"],), SIZE["max_size"]
    ours.rpn.settings = ours.rpn.settings.model_copy(update={"pre_nms_top_n_test": 300, "post_nms_top_n_test": 100})
    with torch.no_grad():
        with fastpaths.enabled_as(False):  # torchvision's kernels: the same numbers
            compare(expected, ours(data), box_tol=1e-3, score_tol=1e-4)
        # the CPU fast paths differ by float rounding only (RoIAlign summed in another order)
        compare(expected, ours(data), box_tol=1e-3, score_tol=1e-4)
    # the run folder: COCO's names and ids, the settings that reproduce torchvision
    loaded = load_model(tmp_path / "run")
    assert loaded.class_names[1] == "person" and loaded.categories[90] == {"id": 90, "name": "toothbrush"}
    assert loaded.config.model.torchvision_compat and loaded.config.model.backbone_norm == "frozen"
    assert json.loads((tmp_path / "run" / "conversion.json").read_text())["arch"] == arch


def test_wrong_architecture_is_refused_naming_the_tensor(tmp_path):
    peer = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    torch.save(peer.state_dict(), tmp_path / "mobile.pth")
    with pytest.raises(ValueError, match=r"mobile.pth: tensor 'backbone.body.0.0.weight' .* is the file a fasterrcnn_resnet50_fpn"):
        convert_torchvision(tmp_path / "mobile.pth", "fasterrcnn_resnet50_fpn", tmp_path / "run", log=lambda s: None)
    v1 = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    torch.save({"model": v1.state_dict()}, tmp_path / "v1.pth")  # a training script's wrapper
    with pytest.raises(ValueError, match="is the file a fasterrcnn_resnet50_fpn_v2 checkpoint"):
        convert_torchvision(tmp_path / "v1.pth", "fasterrcnn_resnet50_fpn_v2", tmp_path / "run", log=lambda s: None)
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision Faster / Mask R-CNN checkpoint"):
        convert_torchvision(tmp_path / "other.pth", "fasterrcnn_resnet50_fpn", tmp_path / "run", log=lambda s: None)
    with pytest.raises(ValueError, match="unknown torchvision architecture 'yolo'"):
        convert_torchvision(tmp_path / "v1.pth", "yolo", tmp_path / "run", log=lambda s: None)


def test_cli_converts_a_checkpoint_with_its_own_classes(tmp_path, capsys):
    """A torchvision model fine-tuned by its user on 3 classes: class names from a file."""
    peer = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=4)
    torch.save(peer.state_dict(), tmp_path / "mine.pth")
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    code = main(["convert", "torchvision", str(tmp_path / "mine.pth"), "--arch", "fasterrcnn_mobilenet_v3_large_320_fpn",
                 "--out", str(tmp_path / "run"), "--classes", str(tmp_path / "classes.txt")])  # fmt: skip
    assert code == 0 and "matched by name and shape (4 classes)" in capsys.readouterr().out
    loaded = load_model(tmp_path / "run")
    assert loaded.class_names == ["__background__", "cat", "dog", "bird"] and loaded.categories is None
    assert loaded.model.num_classes == 4 and loaded.config.model.min_size == 320
    code = main(["convert", "torchvision", str(tmp_path / "nope.pth"), "--arch", "fasterrcnn_resnet50_fpn",
                 "--out", str(tmp_path / "run2")])  # fmt: skip
    assert code == 2 and "nope.pth" in capsys.readouterr().err


def coco_subset(shapes_root, out, categories: dict[int, str], split: str = "train"):
    """The shapes split relabelled: shape category id -> (new id, name); other objects removed."""
    from rcnn.data.shapes import shapes_paths

    images_dir, ann_file = shapes_paths(shapes_root, split)
    coco = json.loads(Path(ann_file).read_text())
    coco["annotations"] = [dict(a, category_id=categories[a["category_id"]][0]) for a in coco["annotations"]
                           if a["category_id"] in categories]  # fmt: skip
    coco["categories"] = [{"id": new_id, "name": name} for new_id, name in categories.values()]
    path = out / f"{split}.json"
    path.write_text(json.dumps(coco))
    return path, images_dir


def test_fine_tune_a_converted_coco_model_on_3_classes(shapes_root, tmp_path, capsys):
    peer = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    torch.save(peer.state_dict(), tmp_path / "coco.pth")
    run = tmp_path / "coco"
    assert main(["convert", "torchvision", str(tmp_path / "coco.pth"), "--arch", "fasterrcnn_mobilenet_v3_large_320_fpn",
                 "--out", str(run)]) == 0  # fmt: skip
    # evaluated on data of some COCO classes: matched by name, the model's other classes dropped
    coco_ann, images = coco_subset(shapes_root, tmp_path, {1: (18, "dog"), 2: (1, "person")}, "val")
    assert main(["evaluate", "--weights", str(run), "--data", str(coco_ann), "--set", f"data.images={images}",
                 "--limit", "2"]) == 0  # fmt: skip
    assert "their detections not scored" in capsys.readouterr().out
    # data with a class the model does not know: refused with both lists
    (tmp_path / "o").mkdir()
    other_ann, _ = coco_subset(shapes_root, tmp_path / "o", {1: (1, "circle")}, "val")
    assert main(["evaluate", "--weights", str(run), "--data", str(other_ann), "--set", f"data.images={images}"]) == 2
    assert "classes the model does not know: ['circle']" in capsys.readouterr().err
    # fine-tuning on 3 classes: all but the predictor loads
    train_ann, _ = coco_subset(shapes_root, tmp_path, {1: (1, "circle"), 2: (2, "square"), 3: (3, "triangle")})
    (tmp_path / "v").mkdir()
    val_ann, _ = coco_subset(shapes_root, tmp_path / "v", {1: (1, "circle"), 2: (2, "square"), 3: (3, "triangle")}, "val")
    tuned = tmp_path / "tuned"
    args = ["train", "--config", str(run / "last" / "config.yaml"), "--init-from", str(run), "--out", str(tuned),
            "--set", f"data.root={train_ann}", "--set", f"data.images={images.parent / 'train'}",
            "--set", "train.iterations=2", "--set", "train.batch_size=2", "--set", "train.warmup_iterations=0",
            "--set", "data.workers=0", "--set", "model.min_size=128", "--set", "model.max_size=128", "--no-eval"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "roi_heads.predictor newly initialised (3 classes instead of the source's)" in out
    tuned_model = load_model(tuned)
    assert tuned_model.model.num_classes == 4 and tuned_model.class_names[1:] == ["circle", "square", "triangle"]
    assert main(["evaluate", "--weights", str(tuned), "--data", str(val_ann), "--set", f"data.images={images}"]) == 0
    assert main(["predict", "--weights", str(tuned), str(next(images.glob("*.png"))), "--out", str(tmp_path / "p")]) == 0
