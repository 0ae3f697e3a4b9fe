"""The fine-tuning recipe users know: load a trained model, replace its predictor for a new class
count, train, evaluate, predict (before, evaluation failed with a reshape error)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rcnn.build import load_model
from rcnn.config import TrainConfig, load_config
from rcnn.components.roi_heads import BoxPredictor
from rcnn.data.coco import CocoDetection
from rcnn.data.shapes import shapes_paths
from rcnn.data.transforms import RandomHorizontalFlip
from rcnn.inference import evaluate_model, predict_images
from rcnn.models import mask_rcnn
from rcnn.training.datasets import TrainingSet
from rcnn.training.loop import train
from rcnn.training.run import run_training

QUIET = dict(progress=False, log=lambda s: None)
SMALL = ["train.batch_size=2", "model.min_size=64", "model.max_size=64", "train.checkpoint_every=100"]


def two_class_subset(shapes_root: Path, split: str, out: Path) -> CocoDetection:
    """The shapes split with only its circles and squares: a data set of 2 classes (+ background)."""
    images_dir, ann_file = shapes_paths(shapes_root, split)
    coco = json.loads(Path(ann_file).read_text())
    coco["categories"] = [c for c in coco["categories"] if c["id"] in (1, 2)]
    coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] in (1, 2)]
    path = out / f"two_{split}.json"
    path.write_text(json.dumps(coco))
    return CocoDetection(images_dir, path, train=split == "train")


def test_replace_the_predictor_train_evaluate_predict(shapes_root, tmp_path):
    config = load_config("faster_rcnn_tiny_shapes", [f"data.root={shapes_root}", "data.shapes=null",
                                                    "train.iterations=4", *SMALL])  # fmt: skip
    run_training(config, tmp_path / "source", evaluate=False, **QUIET)
    loaded = load_model(tmp_path / "source", for_inference=False)
    model, names = loaded.model, loaded.class_names
    assert model.num_classes == 6 and len(names) == 6

    train_set, val_set = (two_class_subset(shapes_root, s, tmp_path) for s in ("train", "val"))
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    replaced = model.replace_predictor(train_set.num_classes)
    assert replaced == ["roi_heads.predictor"] and model.num_classes == 3
    # everything but the class-specific layers is what was trained
    for key, value in model.state_dict().items():
        if not key.startswith("roi_heads.predictor."):
            assert torch.equal(value, kept[key]), key
    cfg = TrainConfig(iterations=3, batch_size=2, warmup_iterations=0, checkpoint_every=100, log_every=1)
    train(model, TrainingSet(train_set, RandomHorizontalFlip(0.5)), cfg, tmp_path / "tuned", **QUIET)
    model.roi_heads.settings = model.roi_heads.settings.model_copy(update={"score_thresh": 0.0})
    metrics = evaluate_model(model, val_set)
    assert set(metrics["bbox"]["per_class_AP"]) == {"circle", "square"}
    images = sorted((Path(shapes_root) / "images" / "val").glob("*.png"))[:2]
    for _, _, out in predict_images(model, images):
        assert all(1 <= int(v) <= 2 for v in out["labels"]) and out["boxes"].shape[1] == 4

    # the same by hand, as torchvision's recipe writes it: a new predictor on the box head's features
    model.roi_heads.predictor = BoxPredictor(model.roi_heads.box_head.out_features, 4)
    assert model.num_classes == 4
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 64, 64)])
    assert all(1 <= int(v) <= 3 for v in out["labels"])


def test_mask_rcnn_replaces_box_and_mask_predictors():
    torch.manual_seed(0)
    model = mask_rcnn("tiny", 6, min_size=64, max_size=64, mask={"num_convs": 1, "channels": 8})
    assert model.replace_predictor(3) == ["roi_heads.predictor", "roi_heads.mask_predictor"]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 12:30] = 1
    target = {"boxes": torch.tensor([[12.0, 10.0, 30.0, 40.0]]), "labels": torch.tensor([2]), "masks": masks}
    model.train()
    losses = model([torch.rand(3, 64, 64)], [target])
    sum(losses.values()).backward()
    assert model.roi_heads.mask_predictor.logits.weight.grad is not None
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 64, 64)])
    assert out["masks"].shape[1:] == (1, 64, 64)
