"""Mask R-CNN end to end: construction, losses, eval outputs in the original size, and an overfit."""

import pytest
import torch

from rcnn.core.boxes import box_iou
from rcnn.config import TrainConfig
from rcnn.data.coco import CocoDetection
from rcnn.data.shapes import make_shapes, shapes_paths
from rcnn.evaluation import evaluate_coco
from rcnn.inference import predict_dataset
from rcnn.components.mask_heads import MaskRoIHeads, MaskSettings
from rcnn.models import FasterRCNN, MaskRCNN, mask_rcnn
from rcnn.training.loop import train

TINY_MASK = {"num_convs": 2, "channels": 64}


@pytest.fixture(scope="module")
def shapes_train(shapes_root):
    return CocoDetection(*shapes_paths(shapes_root, "train"), with_masks=True, train=True)


def tiny_model(num_classes=6, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("min_size", 128)
    kwargs.setdefault("max_size", 128)
    return mask_rcnn("tiny", num_classes, mask=kwargs.pop("mask", TINY_MASK), **kwargs)


def test_builder_composes_faster_rcnn_with_a_mask_branch():
    model = tiny_model()
    heads = model.roi_heads
    assert isinstance(model, FasterRCNN) and isinstance(heads, MaskRoIHeads)
    assert model.predicts_masks and not FasterRCNN.predicts_masks
    assert heads.pooler.kind == "align" and heads.mask_pooler.kind == "align"
    assert heads.mask_pooler.output_size == (14, 14)
    assert heads.mask_size == 28
    assert heads.mask_predictor.logits.out_channels == 5
    # the RoIPool ablation: both branches, or the mask branch alone
    both = tiny_model(pooler="pool")
    assert both.roi_heads.pooler.kind == "pool" and both.roi_heads.mask_pooler.kind == "pool"
    mask_only = tiny_model(mask={**TINY_MASK, "pooler": "pool"})
    assert mask_only.roi_heads.pooler.kind == "align" and mask_only.roi_heads.mask_pooler.kind == "pool"
    # the paper's head by default
    paper = MaskRCNN(tiny_model().backbone, 6, mask=MaskSettings())
    convs = [m for m in paper.roi_heads.mask_head.convs if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.out_channels == 256 for c in convs)
    with pytest.raises(ValueError, match=r"mask\.convs: unknown field"):
        mask_rcnn("tiny", 6, mask={"convs": 3})
    with pytest.raises(ValueError, match=r"mask\.channels: Input should be greater than 0"):
        mask_rcnn("tiny", 6, mask={"channels": 0})


def test_training_losses_and_mask_validation(shapes_train):
    model = tiny_model(min_size=96, max_size=96)  # the gt masks are resized with the images
    model.train()
    images, targets = zip(*(shapes_train[i] for i in range(2)))
    losses = model(list(images), list(targets))
    assert set(losses) == {"loss_objectness", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() == pytest.approx(0.693, abs=0.01)  # sigmoid starts at ~0.5
    sum(losses.values()).backward()
    assert model.roi_heads.mask_predictor.logits.weight.grad.abs().sum() > 0
    no_masks = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    with pytest.raises(ValueError, match=r"targets\[0\].*masks"):
        model(list(images), no_masks)
    wrong_size = [dict(t) for t in targets]
    wrong_size[1]["masks"] = wrong_size[1]["masks"][:, :64]
    with pytest.raises(ValueError, match=r"targets\[1\]\['masks'\]"):
        model(list(images), wrong_size)
    float_masks = [dict(t) for t in targets]
    float_masks[0]["masks"] = float_masks[0]["masks"].float()
    with pytest.raises(ValueError, match="uint8"):
        model(list(images), float_masks)


def test_training_with_an_image_without_objects():
    model = tiny_model(min_size=64, max_size=64).train()
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 12:30] = 1
    targets = [
        {"boxes": torch.tensor([[12.0, 10.0, 30.0, 40.0]]), "labels": torch.tensor([2]), "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": masks[:0]},
    ]
    losses = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], targets)
    assert all(torch.isfinite(v) for v in losses.values())
    losses = model([torch.rand(3, 64, 64)], targets[1:])  # no positive RoI at all: L_mask = 0
    assert losses["loss_mask"].item() == 0.0
    sum(losses.values()).backward()


def test_eval_outputs_masks_in_the_original_image_size(shapes_train):
    # min_size 96: the model works on 96 x 96 images and must paste masks back at 128 x 128
    model = tiny_model(min_size=96, max_size=96, roi={"score_thresh": 0.0, "detections_per_image": 20}).eval()
    images = [shapes_train[0][0], shapes_train[1][0][:, :, :100]]  # 128 x 128 and 128 x 100
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        count = len(out["boxes"])
        assert count > 0
        assert out["masks"].shape == (count, 1, *image.shape[1:])
        assert out["masks"].dtype == torch.uint8 and set(out["masks"].unique().tolist()) <= {0, 1}
        assert out["labels"].shape == (count,) and out["scores"].shape == (count,)
        assert "mask_probs" not in out
        assert float(out["boxes"][:, 2].max()) <= image.shape[2] and float(out["boxes"][:, 3].max()) <= image.shape[1]
    model.mask_probabilities = True
    with torch.no_grad():
        probs = model(images)
    assert probs[0]["masks"].dtype == torch.float32
    assert 0.0 <= float(probs[0]["masks"].min()) and float(probs[0]["masks"].max()) <= 1.0
    assert torch.equal((probs[0]["masks"] >= 0.5).to(torch.uint8), outputs[0]["masks"])


def test_no_detections_give_empty_masks(shapes_train):
    model = tiny_model(roi={"score_thresh": 1.0}).eval()
    with torch.no_grad():
        out = model([shapes_train[0][0]])[0]
    assert out["boxes"].shape == (0, 4)
    assert out["masks"].shape == (0, 1, 128, 128) and out["masks"].dtype == torch.uint8


def mean_mask_iou(items, outputs):
    """Mean over gt objects of the IoU of the gt mask with the mask of the best-overlapping detection."""
    ious = []
    for (_, target), out in zip(items, outputs):
        overlap = box_iou(target["boxes"], out["boxes"])  # [G, D]
        for g in range(len(target["boxes"])):
            if overlap.shape[1] == 0:
                ious.append(0.0)
                continue
            predicted = out["masks"][int(overlap[g].argmax()), 0].bool()
            truth = target["masks"][g].bool()
            ious.append(((predicted & truth).sum() / (predicted | truth).sum()).item())
    return sum(ious) / len(ious)


@pytest.mark.parametrize(
    "device,amp",
    [("cpu", "off"), pytest.param("cuda", "on", marks=pytest.mark.cuda)],
)
def test_overfit_a_few_shapes_images(device, amp, tmp_path, one_thread):
    # 4 images with 1-4 unoccluded objects of at least 16 px (two stride-8 cells): enough for the
    # tiny backbone to learn their masks in 200 steps (lowest mask AP@0.5 over 8 seeds 0.99; at 150
    # steps one seed in six missed an object, 0.75). (Occluded objects, whose visible part is the
    # target, take longer; the shapes benchmark covers them.)
    root = make_shapes(tmp_path / "shapes", n_train=4, n_val=0, seed=0, max_objects=4, min_object_size=16, max_occlusion=0)
    dataset = CocoDetection(*shapes_paths(root, "train"), with_masks=True, train=True)
    torch.manual_seed(0)
    model = mask_rcnn(
        "tiny", dataset.num_classes, min_size=128, max_size=128, anchor_sizes=((16.0, 32.0, 64.0),),
        rpn={"pre_nms_top_n_train": 600, "post_nms_top_n_train": 300, "pre_nms_top_n_test": 500,
             "post_nms_top_n_test": 100},
        mask=TINY_MASK,
    )  # fmt: skip
    cfg = TrainConfig(
        iterations=200, batch_size=2, lr=1e-3, optimizer="adamw", schedule="step", steps=[0.8],
        warmup_iterations=10, checkpoint_every=10_000, log_every=50, device=device, amp=amp,
    )  # fmt: skip
    result = train(model, dataset, cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert result.skipped_steps == 0
    outputs, _ = predict_dataset(model, dataset)
    metrics = evaluate_coco(outputs, dataset, ("bbox", "segm"))
    assert metrics["segm"]["AP50"] >= 0.9, metrics["summary"]
    items = [dataset[i] for i in range(len(dataset))]
    assert mean_mask_iou(items, [outputs[target["image_id"]] for _, target in items]) >= 0.8
