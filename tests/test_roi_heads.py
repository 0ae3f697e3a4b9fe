"""RoI heads: sampling statistics on crafted proposals, the predictor, post-processing."""

import pytest
import torch

from rcnn.components.box_heads import MLPHead
from rcnn.components.roi_heads import BoxPredictor, RoIHeads, RoIHeadSettings
from rcnn.core.ops import RoIPooler


def make_heads(**settings):
    pooler = RoIPooler(7, (8,), kind="pool")
    return RoIHeads(MLPHead(4, 7, 32), BoxPredictor(32, 3), pooler, settings=RoIHeadSettings(**settings))


def test_settings_are_typed_and_range_checked():
    with pytest.raises(ValueError, match="nms_thresh"):
        RoIHeadSettings(nms_thresh=1.5)
    with pytest.raises(ValueError, match="bg_iou_thresh_lo <= bg_iou_thresh_hi"):
        RoIHeadSettings(bg_iou_thresh_lo=0.6)
    with pytest.raises(ValueError, match="extra"):
        RoIHeadSettings(nms_threshold=0.5)
    merged = RoIHeadSettings().merged({"nms_thresh": "0.4"}, "roi")
    assert merged.nms_thresh == 0.4 and merged.batch_size_per_image == 64
    with pytest.raises(ValueError, match=r"roi\.nms_thresh: Input should be a valid number"):
        RoIHeadSettings().merged({"nms_thresh": "abc"}, "roi")


def test_num_classes_is_the_predictors():
    heads = make_heads()
    assert heads.num_classes == 3
    heads.predictor = BoxPredictor(32, 7)
    assert heads.num_classes == 7
    assert heads.replace_predictor(4) == ["predictor"] and heads.num_classes == 4


def test_sampling_thresholds_and_fractions():
    heads = make_heads(batch_size_per_image=16, positive_fraction=0.25, add_gt_as_proposals=False)
    gt = torch.tensor([[0.0, 0.0, 20.0, 20.0]])
    # IoU with gt: 1.0, 0.64, 0.36 (bg), 0.16 (bg), 0.0 (below 0.1: ignored), and 20 more backgrounds
    props = [torch.tensor([[0.0, 0, 20, 20], [0, 0, 16, 20], [0, 0, 20, 7.2], [0, 0, 8, 10], [50, 50, 60, 60]])]
    props[0] = torch.cat((props[0], torch.tensor([[0.0, 0, 20, 5]]).repeat(20, 1)))  # IoU 0.25
    sampled = heads.sample(props, [{"boxes": gt, "labels": torch.tensor([2])}])
    labels = sampled.labels[0]
    assert int((labels == 2).sum()) == 2  # both foreground RoIs (<= 25% of 16 = 4)
    assert int((labels == 0).sum()) == 14 and len(labels) == 16
    chosen = {tuple(b.tolist()) for b in sampled.proposals[0]}
    assert (50.0, 50.0, 60.0, 60.0) not in chosen  # IoU < 0.1 is neither fg nor bg
    fg = labels > 0
    assert torch.allclose(sampled.box_targets[0][fg][0], torch.zeros(4)) or torch.allclose(
        sampled.box_targets[0][fg][1], torch.zeros(4)
    )  # the exact-match proposal has zero targets


def test_gt_added_and_image_without_objects():
    heads = make_heads(batch_size_per_image=8)
    gt = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([1])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    props = [torch.tensor([[100.0, 100, 120, 120]]), torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20]])]
    sampled = heads.sample(props, [gt, empty])
    assert int((sampled.labels[0] == 1).sum()) == 1  # the gt itself became a foreground RoI
    assert sampled.labels[1].tolist() == [0, 0]


def test_predictor_init_and_shapes():
    pred = BoxPredictor(32, 4)
    cls, box = pred(torch.randn(5, 32))
    assert cls.shape == (5, 4) and box.shape == (5, 12)
    assert pred.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert pred.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.2)
    with pytest.raises(ValueError, match="background"):
        BoxPredictor(32, 1)
    torch.manual_seed(0)
    uniform = BoxPredictor(256, 6, init="uniform")  # PyTorch's default: U(-1/16, 1/16), std 1/(16 sqrt(3))
    for layer in (uniform.cls_score, uniform.bbox_pred):
        assert layer.weight.abs().max().item() <= 1 / 16
        assert layer.weight.std().item() == pytest.approx(1 / (16 * 3**0.5), rel=0.1)
    with pytest.raises(ValueError, match="predictor_init"):
        BoxPredictor(32, 4, init="zeros")


def test_postprocess_per_class_nms_threshold_and_limit():
    heads = make_heads(score_thresh=0.3, nms_thresh=0.5, detections_per_image=3)
    proposals = [torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [30, 30, 40, 40], [60, 60, 70, 70]])]
    logits = torch.log(torch.tensor([
        [0.1, 0.8, 0.1], [0.1, 0.7, 0.2], [0.2, 0.1, 0.7], [0.8, 0.1, 0.1],
    ]))  # fmt: skip
    deltas = torch.zeros(4, 8)
    (det,) = heads.postprocess(logits, deltas, proposals, [(50, 50)])
    # RoI 1 is suppressed for class 1 by RoI 0; RoI 3 is background; box 3 is clipped away
    assert det["labels"].tolist() == [1, 2]
    torch.testing.assert_close(det["scores"], torch.tensor([0.8, 0.7]))
    assert det["boxes"].shape == (2, 4) and det["labels"].dtype == torch.int64
