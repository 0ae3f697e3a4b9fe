"""NMS, RoI pooling and RoIAlign against slow reference versions; FPN level assignment."""

import pytest
import torch
import torchvision

from rcnn.core import fastpaths
from rcnn.core.fastpaths import float_threshold
from rcnn.core.ops import (
    RoIPooler,
    assign_fpn_levels,
    batched_nms,
    nms,
    nms_reference,
    roi_align,
    roi_align_reference,
    roi_pool,
    roi_pool_reference,
    to_rois,
)


def random_boxes(n, size=64.0, generator=None):
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 2 + 1
    return torch.cat((xy, xy + wh), dim=1)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_reference(seed, threshold):
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(60, generator=g)
    scores = torch.rand(60, generator=g)
    assert nms(boxes, scores, threshold).tolist() == nms_reference(boxes, scores, threshold).tolist()


def test_nms_by_hand_and_edge_cases():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
    zero_area = torch.tensor([[5.0, 5, 5, 5], [5.0, 5, 5, 5]])
    assert sorted(nms(zero_area, torch.tensor([0.5, 0.4]), 0.5).tolist()) == [0, 1]
    with pytest.raises(ValueError, match="NaN"):
        nms(torch.tensor([[0.0, 0, float("nan"), 1]]), torch.tensor([1.0]), 0.5)
    with pytest.raises(ValueError, match="scores"):
        nms(boxes, scores[:2], 0.5)


def test_batched_nms_groups_do_not_interact():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [1, 1, 11, 11]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 1]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, torch.tensor([0, 0, 0]), 0.5).tolist() == [0]


@pytest.mark.parametrize(
    "n,groups,max_kept",
    [(3000, 90, 100), (3000, 3, 100), (2000, 1, 512), (2000, 4, 512), (500, 5, 400), (200, 1, 300), (50, 2, 1), (10, 1, 0)],
)
@pytest.mark.parametrize("iou_threshold", [0.5, 0.7, 0.3])
@pytest.mark.parametrize("fast", [True, False])
def test_batched_nms_max_kept_is_the_head_of_the_full_result(n, groups, max_kept, iou_threshold, fast):
    """Per-class NMS on only the best-scoring candidates (growing until enough are kept, or, on the
    CPU fast path, in chunks when all boxes would be needed at once) gives the first ``max_kept`` of
    the full result, whether few or many boxes survive; with the fast paths on and off."""
    g = torch.Generator().manual_seed(n + groups + max_kept)
    with fastpaths.enabled_as(fast):
        for size in (60, 150, 400):  # crowded (most boxes suppressed), about half kept, sparse
            boxes = random_boxes(n, size, g)
            scores = torch.rand(n, generator=g)
            labels = torch.randint(0, groups, (n,), generator=g)
            full = torchvision.ops.batched_nms(boxes, scores, labels, iou_threshold)
            kept = batched_nms(boxes, scores, labels, iou_threshold, max_kept=max_kept)
            assert kept.tolist() == full[:max_kept].tolist()


def test_fast_path_switch(monkeypatch):
    """The switch decides which path runs: the fast paths when on (the default), torchvision's
    kernels when off; the environment variable sets it at import."""
    import subprocess
    import sys

    calls = []
    monkeypatch.setattr(fastpaths, "chunked_nms", lambda *a: calls.append("nms") or torch.arange(1))
    monkeypatch.setattr(fastpaths, "roi_align", lambda *a: calls.append("align") or torch.zeros(1))
    boxes, scores = random_boxes(20), torch.rand(20)
    feats, rois = torch.randn(1, 2, 8, 8), torch.tensor([[0.0, 1.0, 1.0, 20.0, 20.0]])
    assert fastpaths.enabled()
    batched_nms(boxes, scores, torch.zeros(20, dtype=torch.int64), 0.5, max_kept=10)
    roi_align(feats, rois, 2, 0.25, 2)
    assert calls == ["nms", "align"]
    with fastpaths.enabled_as(False):
        assert not fastpaths.enabled()
        batched_nms(boxes, scores, torch.zeros(20, dtype=torch.int64), 0.5, max_kept=10)
        roi_align(feats, rois, 2, 0.25, 2)
    assert calls == ["nms", "align"] and fastpaths.enabled()
    code = "import rcnn.core.fastpaths as f; print(f.enabled())"
    env = {**__import__("os").environ, "RCNN_FAST_PATHS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_chunked_nms_threshold_compares_as_torchvision_does():
    """torchvision compares a float32 IoU with the threshold in double; the vectorised comparison
    must agree also where float32 rounds the threshold up (0.3) or down (0.7)."""
    for threshold in (0.3, 0.7, 0.5, 0.1):
        t = float_threshold(threshold, torch.float32)
        x = torch.tensor(threshold, dtype=torch.float32)
        around = torch.stack([x, torch.nextafter(x, torch.tensor(2.0)), torch.nextafter(x, torch.tensor(-2.0))])
        assert ((around > t) == (around.double() > threshold)).all(), threshold
    assert float_threshold(0.3, torch.float64) == 0.3


def random_rois(n, num_images, size, generator):
    boxes = random_boxes(n, size, generator)
    idx = torch.randint(0, num_images, (n, 1), generator=generator).float()
    return torch.cat((idx, boxes), dim=1)


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25])
def test_roi_pool_equals_reference_exactly(scale):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 3, 20, 24, generator=g, dtype=torch.float64)
    rois = random_rois(12, 2, 70.0, g).double()
    fast = roi_pool(feats, rois, (3, 4), scale)
    torch.testing.assert_close(fast, roi_pool_reference(feats, rois, (3, 4), scale), rtol=0, atol=0)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_equals_reference(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    rois = random_rois(10, 2, 70.0, g).double()
    fast = roi_align(feats, rois, 4, 0.25, sampling_ratio, aligned)
    ref = roi_align_reference(feats, rois, 4, 0.25, sampling_ratio, aligned)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_roi_align_gradient_equals_torchvision(aligned, sampling_ratio):
    # the CPU fast path's forward and backward (a sparse map) against torchvision's own: RoIs inside,
    # across and outside the map, a zero-size one, several per image, a rectangular map and output
    assert fastpaths.roi_align_applies(torch.zeros(1, 1, 2, 2), sampling_ratio)
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(3, 4, 12, 17, generator=g, dtype=torch.float64, requires_grad=True)
    rois = random_rois(40, 3, 90.0, g).double()
    rois[:3, 1:] = torch.tensor([[30.0, 30.0, 30.0, 30.0], [-20.0, -10.0, 40.0, 100.0], [75.0, 52.0, 95.0, 60.0]])
    out = roi_align(feats, rois, (3, 5), 0.2, sampling_ratio, aligned)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (ours,) = torch.autograd.grad(out, feats, grad_out)
    peer = torchvision.ops.roi_align(feats, rois, (3, 5), 0.2, sampling_ratio, aligned)
    (theirs,) = torch.autograd.grad(peer, feats, grad_out)
    torch.testing.assert_close(out, peer, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert theirs.abs().sum() > 0


@pytest.mark.parametrize("grad", [True, False])
def test_roi_align_float32_equals_torchvision(grad):
    # detector-sized float32 input, in training (autograd) and at inference (inference_mode)
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 64, 32, 40, generator=g)
    rois = random_rois(300, 2, 340.0, g)
    rois[:2, 1:] = torch.tensor([[-40.0, -30.0, 60.0, 50.0], [300.0, 200.0, 420.0, 300.0]])  # across the border
    with torch.inference_mode(not grad):
        for size in (7, 14):
            ours = roi_align(feats.requires_grad_(grad), rois, size, 1 / 8, 2, True)
            assert ours.is_contiguous() and ours.requires_grad == grad
            peer = torchvision.ops.roi_align(feats, rois, size, 1 / 8, 2, True)
            # sample positions are computed in another order, so float32 rounding differs a little
            torch.testing.assert_close(ours, peer, rtol=1e-4, atol=5e-5)


def test_roi_align_gradcheck_and_empty():
    feats = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 18.0], [1, -3.0, -2.0, 10.0, 30.0], [0, 0.0, 0.0, 0.5, 0.5]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: roi_align(x, rois, 3, 0.25, 2, True), (feats,))
    roi_align(feats, rois[:0], 3, 0.25, 2).sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() == 0


def test_roi_align_no_quantisation():
    # a linear ramp: RoIAlign's average of bilinear samples equals the ramp at the bin centre
    ramp = torch.arange(16.0).repeat(16, 1)[None, None]  # value = x + 0 at cell centre x + 0.5
    rois = torch.tensor([[0.0, 2.3, 2.3, 6.3, 6.3]])
    out = roi_align(ramp, rois, 2, 1.0, 2, True)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([2.3 - 0.5 + 1.0, 2.3 - 0.5 + 3.0]))


def test_roi_inputs_list_form_and_errors():
    feats = torch.randn(2, 1, 8, 8)
    boxes = [torch.tensor([[0.0, 0, 4, 4]]), torch.tensor([[1.0, 1, 5, 5], [2.0, 2, 6, 6]])]
    rois = to_rois(boxes)
    assert rois[:, 0].tolist() == [0, 1, 1]
    torch.testing.assert_close(roi_align(feats, boxes, 2, 1.0), roi_align(feats, rois, 2, 1.0))
    with pytest.raises(ValueError, match="batch indices"):
        roi_pool(feats, torch.tensor([[5.0, 0, 0, 1, 1]]), 2, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        roi_align(feats, torch.tensor([[0.0, 0, float("nan"), 1, 1]]), 2, 1.0)
    with pytest.raises(ValueError, match=r"\[R, 5\]"):
        roi_align(feats, torch.zeros(3, 4), 2, 1.0)
    assert roi_align(feats, torch.zeros(0, 5), 2, 1.0).shape == (0, 1, 2, 2)


def test_fpn_level_assignment():
    sides = torch.tensor([10.0, 112.0, 223.0, 224.0, 447.0, 448.0, 2000.0])
    boxes = torch.stack((torch.zeros(7), torch.zeros(7), sides, sides), dim=1)
    assert assign_fpn_levels(boxes, 2, 5).tolist() == [2, 3, 3, 4, 4, 5, 5]


def test_multilevel_pooler_uses_assigned_level():
    feats = [torch.full((1, 1, 32, 32), 4.0), torch.full((1, 1, 16, 16), 8.0), torch.full((1, 1, 8, 8), 16.0)]
    pooler = RoIPooler(2, strides=(4, 8, 16), kind="align")
    boxes = [torch.tensor([[0.0, 0, 20, 20], [0.0, 0, 112, 112], [0.0, 0, 120, 120]])]
    out = pooler(feats, boxes)
    assert out[:, 0, 0, 0].tolist() == [4.0, 8.0, 8.0]
    single = RoIPooler(2, strides=(8,), kind="pool")
    assert single([feats[1]], boxes).shape == (3, 1, 2, 2)
    with pytest.raises(ValueError, match="double"):
        RoIPooler(2, strides=(4, 16))
    with pytest.raises(ValueError, match="'align' or 'pool'"):
        RoIPooler(2, strides=(4,), kind="max")


def test_multilevel_pooler_keeps_the_rois_order():
    """RoIs of the levels interleaved, and levels with none: the same as torchvision's
    MultiScaleRoIAlign, row for row."""
    from torchvision.ops import MultiScaleRoIAlign

    g = torch.Generator().manual_seed(0)
    feats = [torch.rand(1, 3, 64 // 2**i, 64 // 2**i, generator=g) for i in range(3)]
    sides = torch.tensor([300.0, 20.0, 120.0, 30.0, 250.0, 10.0, 90.0])  # levels 4, 2, 3, 2, 4, 2, 2
    xy = torch.rand(len(sides), 2, generator=g) * 50
    boxes = torch.cat((xy, xy + sides[:, None]), dim=1)
    pooler = RoIPooler(7, strides=(4, 8, 16), kind="align", sampling_ratio=2, aligned=False)
    peer = MultiScaleRoIAlign(["0", "1", "2"], 7, 2, canonical_scale=224, canonical_level=4)
    expected = peer({str(i): f for i, f in enumerate(feats)}, [boxes], [(256, 256)])
    torch.testing.assert_close(pooler(feats, [boxes]), expected, rtol=0, atol=1e-5)
    small = boxes[sides < 50]  # no RoI on levels 3 and 4
    expected = peer({str(i): f for i, f in enumerate(feats)}, [small], [(256, 256)])
    torch.testing.assert_close(pooler(feats, [small]), expected, rtol=0, atol=1e-5)
    assert pooler(feats, [boxes[:0]]).shape == (0, 3, 7, 7)
