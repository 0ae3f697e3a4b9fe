"""The photograph recipe's ingredients: scale and colour jitter, the GIoU box loss, the fine MobileNet FPN."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from rcnn.config import DataConfig
from rcnn.core.boxes import BoxCoder
from rcnn.core.losses import giou_box_loss
from rcnn.data.transforms import ColorJitter, Compose, RandomHorizontalFlip, ScaleJitter, augmentation


def _scene(height: int = 90, width: int = 120) -> tuple[torch.Tensor, dict]:
    """An image whose objects are solid rectangles, with their boxes and masks."""
    image = torch.zeros(3, height, width)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 70.0], [70.0, 5.0, 110.0, 40.0]])
    masks = torch.zeros(2, height, width, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        image[i, y1:y2, x1:x2] = 1.0
        masks[i, y1:y2, x1:x2] = 1
    target = {"boxes": boxes, "labels": torch.tensor([1, 2]), "iscrowd": torch.zeros(2, dtype=torch.int64), "masks": masks,
              "proposals": boxes + 1, "image_id": 7, "orig_size": (height, width)}  # fmt: skip
    return image, target


def _box_of(mask: torch.Tensor) -> list[float]:
    ys, xs = mask.nonzero(as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize("scale", [(0.5, 0.7), (1.4, 2.0), (0.5, 2.0)])
def test_scale_jitter_moves_boxes_and_masks_with_the_pixels(scale):
    torch.manual_seed(0)
    for _ in range(20):
        image, target = _scene()
        out, t = ScaleJitter(scale, min_visible=0.3)(image, target)
        assert out.shape[1:] == t["masks"].shape[1:]
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"]) == len(t["iscrowd"]) >= 1
        assert t["image_id"] == 7 and t["orig_size"] == (90, 120)  # the original image's size stays
        for box, mask, label in zip(t["boxes"], t["masks"], t["labels"]):
            channel = int(label) - 1
            assert torch.equal(out[channel] > 0.5, mask.bool())  # the pixels and the mask moved together
            assert box.tolist() == pytest.approx(_box_of(mask))  # and the box is the mask's extent
        height, width = out.shape[1:]
        assert (t["boxes"][:, 0::2] <= width).all() and (t["boxes"][:, 1::2] <= height).all() and (t["boxes"] >= 0).all()
        assert (t["proposals"][:, 2:] > t["proposals"][:, :2]).all()


def test_scale_jitter_drops_objects_cropped_away_but_never_all():
    torch.manual_seed(1)
    counts = set()
    for _ in range(200):
        image, target = _scene()
        _, t = ScaleJitter((1.5, 2.0), min_visible=0.9)(image, target)
        counts.add(len(t["boxes"]))
    assert counts <= {1, 2} and 1 in counts  # partly visible objects go, an empty crop is never taken


def test_scale_jitter_zoom_out_fills_with_the_mean_and_keeps_every_object():
    torch.manual_seed(2)
    image, target = _scene()
    out, t = ScaleJitter((0.5, 0.5))(image, target)
    assert tuple(out.shape[1:]) == (180, 240)
    assert len(t["boxes"]) == 2
    outside = torch.ones(out.shape[1:], dtype=torch.bool)
    x1, y1 = int(t["boxes"][0, 0]) - 10, int(t["boxes"][0, 1]) - 20  # where the original image went
    outside[y1 : y1 + 90, x1 : x1 + 120] = False
    assert torch.allclose(out[2][outside], torch.tensor(0.406))


def test_color_jitter_changes_pixels_only_and_stays_in_range():
    torch.manual_seed(3)
    image, target = _scene()
    image = image * 0.5 + 0.25
    out, t = ColorJitter(0.5, 0.5, 0.5, 0.1, p=1.0)(image, target)
    assert out.shape == image.shape and not torch.equal(out, image)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert t is target


def test_augmentation_follows_the_data_section():
    assert augmentation(0.0) is None
    steps = augmentation(0.5, (0.5, 1.5), 0.3).transforms
    assert [type(s) for s in steps] == [ScaleJitter, RandomHorizontalFlip, ColorJitter]
    assert steps[0].scale == (0.5, 1.5) and steps[2].brightness == 0.3
    assert isinstance(augmentation(0.5), Compose)
    assert DataConfig(scale_jitter=[0.5, 1.5]).scale_jitter == (0.5, 1.5)
    for bad in ([1.5, 0.5], [0.0, 1.0], [1.0, 20.0]):
        with pytest.raises(ValidationError, match="scale_jitter"):
            DataConfig(scale_jitter=bad)
    with pytest.raises(ValidationError, match="color_jitter"):
        DataConfig(color_jitter=2.0)
    with pytest.raises(ValueError, match="ScaleJitter"):
        ScaleJitter((2.0, 1.0))


def test_giou_box_loss_is_zero_on_the_ground_truth_and_pulls_towards_it():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 30.0], [0.0, 0.0, 4.0, 4.0]])
    gt = torch.tensor([[1.0, 1.0, 11.0, 12.0], [4.0, 6.0, 24.0, 28.0], [0.0, 0.0, 4.0, 4.0]])
    labels = torch.tensor([2, 1, 0])  # the last one is background: no box term
    deltas = torch.zeros(3, 8)
    exact = deltas.clone()
    exact[0, 4:] = coder.encode(gt[:1], proposals[:1])[0]
    exact[1, :4] = coder.encode(gt[1:2], proposals[1:2])[0]
    assert float(giou_box_loss(exact, labels, proposals, gt, coder.decode)) == pytest.approx(0.0, abs=1e-5)
    deltas.requires_grad_(True)
    loss = giou_box_loss(deltas, labels, proposals, gt, coder.decode, box_weight=10.0)
    assert loss.item() > 0
    loss.backward()
    assert deltas.grad[2].abs().sum() == 0 and deltas.grad[0, :4].abs().sum() == 0  # background / other class
    stepped = giou_box_loss(deltas.detach() - 0.1 * deltas.grad, labels, proposals, gt, coder.decode, box_weight=10.0)
    assert stepped.item() < loss.item()
    assert float(giou_box_loss(deltas.detach(), torch.zeros(3, dtype=torch.int64), proposals, gt, coder.decode)) == 0.0


def test_a_detector_trains_with_the_giou_loss_on_the_fine_mobilenet_fpn():
    from rcnn.models import faster_rcnn

    torch.manual_seed(0)
    model = faster_rcnn("mobilenet_v3_fpn_fine", 3, min_size=128, max_size=128,
                        roi={"box_loss": "giou", "box_loss_weight": 10.0, "batch_size_per_image": 32},
                        rpn={"pre_nms_top_n_train": 200, "post_nms_top_n_train": 50})  # fmt: skip
    assert model.backbone.strides == (8, 16, 32, 64)
    image, target = _scene(128, 128)
    model.train()
    losses = model([image], [{"boxes": target["boxes"], "labels": target["labels"]}])
    assert set(losses) >= {"loss_box", "loss_cls"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.inference_mode():
        (out,) = model([image])
    assert out["boxes"].shape[1] == 4
