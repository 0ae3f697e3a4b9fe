"""Mask branch parts: mask targets by hand, the head's shapes, L_mask's gradients, pasting masks."""

import pytest
import torch
import torch.nn.functional as F

from rcnn.components.box_heads import MLPHead
from rcnn.components.mask_heads import MaskHead, MaskPredictor, MaskRoIHeads
from rcnn.components.roi_heads import BoxPredictor, SampledRoIs
from rcnn.core import fastpaths
from rcnn.core.masks import mask_targets, paste_masks
from rcnn.core.ops import RoIPooler


def mask_heads(in_channels, num_classes, strides, pool_size=7, num_convs=1, channels=8):
    """Mask R-CNN's RoI heads with a small box branch, for the mask branch's tests."""
    box_head = MLPHead(in_channels, 7, 16)
    return MaskRoIHeads(
        box_head, BoxPredictor(16, num_classes), RoIPooler(7, strides),
        RoIPooler(pool_size, strides), MaskHead(in_channels, num_convs, channels),
        MaskPredictor(channels if num_convs else in_channels, num_classes, channels),
    )  # fmt: skip


def square_mask(size=32, lo=8, hi=24):
    mask = torch.zeros(1, size, size, dtype=torch.uint8)
    mask[0, lo:hi, lo:hi] = 1  # pixels 8..23: the continuous square [8, 24] x [8, 24]
    return mask


def test_mask_targets_of_a_square_by_hand():
    proposals = torch.tensor(
        [
            [0.0, 0.0, 32.0, 32.0],  # whole image: cells of 8 px, the square is cells 1..2
            [8.0, 8.0, 24.0, 24.0],  # the square's own box: all foreground
            [0.0, 0.0, 16.0, 16.0],  # top-left quarter: the square starts at cell 2 of 4
            [4.0, 4.0, 20.0, 20.0],  # shifted: the first cell [4, 8) is background
            [16.0, 0.0, 48.0, 32.0],  # half outside the image: columns beyond x = 32 are background
        ]
    )
    expected = torch.tensor(
        [
            [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]],
            [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]],
            [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]],
            [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]],
            [[0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]],
        ],
        dtype=torch.float32,
    )
    targets = mask_targets(square_mask(), proposals, torch.zeros(5, dtype=torch.int64), 4)
    assert targets.dtype == torch.float32
    assert torch.equal(targets, expected)


def test_mask_targets_threshold_at_half_coverage_and_matching():
    # two objects; each RoI must read the mask of its matched object
    masks = torch.zeros(2, 16, 16, dtype=torch.uint8)
    masks[0, :, :6] = 1  # object 0 covers columns 0..5
    masks[1, :, 10:] = 1  # object 1 covers columns 10..15
    box = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    # 2 x 2 cells of 8 px: column cell 0 is 6/8 covered by object 0 (>= 0.5), cell 1 not at all
    t0 = mask_targets(masks, box, torch.tensor([0]), 2)
    assert t0[0].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    # object 1 covers 6/8 of column cell 1
    t1 = mask_targets(masks, box, torch.tensor([1]), 2)
    assert t1[0].tolist() == [[0.0, 1.0], [0.0, 1.0]]
    # exactly half covered counts as foreground; less than half does not
    half = torch.zeros(1, 8, 8, dtype=torch.uint8)
    half[0, :, :4] = 1
    assert mask_targets(half, torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([0]), 1).item() == 1.0
    half[0, :, 3] = 0
    assert mask_targets(half, torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([0]), 1).item() == 0.0


def test_mask_targets_empty_and_bad_input():
    assert mask_targets(square_mask(), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 28).shape == (0, 28, 28)
    with pytest.raises(ValueError, match="matched_gt"):
        mask_targets(square_mask(), torch.tensor([[0.0, 0, 8, 8]]), torch.tensor([3]), 4)
    with pytest.raises(ValueError, match=r"\[G, H, W\]"):
        mask_targets(square_mask()[0], torch.tensor([[0.0, 0, 8, 8]]), torch.tensor([0]), 4)


def test_mask_head_shapes_and_init():
    head, predictor = MaskHead(in_channels=16, num_convs=2, channels=8), MaskPredictor(8, num_classes=4, channels=8)
    out = predictor(head(torch.randn(3, 16, 14, 14)))
    assert out.shape == (3, 3, 28, 28)  # K = 3 foreground masks of 2 x 14
    assert len([m for m in head.convs if isinstance(m, torch.nn.Conv2d)]) == 2
    assert predictor.num_classes == 4
    # the logits start near zero: every mask probability starts near 0.5
    assert predictor.logits.weight.std() < 0.01
    assert predictor(head(torch.randn(0, 16, 14, 14))).shape == (0, 3, 28, 28)
    with pytest.raises(ValueError, match="num_classes"):
        MaskPredictor(16, 1)


def test_mask_loss_trains_only_the_gt_class_channel():
    torch.manual_seed(0)
    num_classes = 5  # K = 4 masks
    branch = mask_heads(8, num_classes, (8,), pool_size=7, num_convs=1, channels=8)
    features = [torch.randn(1, 8, 8, 8)]
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 4:30, 4:30] = 1
    masks[1, 30:60, 20:50] = 1
    targets = [{"boxes": torch.tensor([[4.0, 4, 30, 30], [20, 30, 50, 60]]), "masks": masks}]
    sampled = SampledRoIs(
        proposals=[torch.tensor([[2.0, 2, 32, 32], [18, 28, 52, 62], [0, 40, 20, 64]])],
        labels=[torch.tensor([2, 4, 0])],  # the third RoI is background and gets no mask loss
        box_targets=[torch.zeros(3, 4)],
        matched_gt=[torch.tensor([0, 1, 0])],
    )
    logits = []

    def keep_logits(module, inputs, output):
        output.retain_grad()
        logits.append(output)

    branch.mask_predictor.register_forward_hook(keep_logits)
    losses = branch.branch_losses(features, sampled, targets)
    assert set(losses) == {"loss_mask"}
    losses["loss_mask"].backward()
    grad = logits[0].grad  # [2 positive RoIs, K, m, m]
    assert grad.shape == (2, 4, 14, 14)
    # RoI 0 (class 2) has gradient only in channel 1, RoI 1 (class 4) only in channel 3
    assert grad[0, 1].abs().sum() > 0 and grad[1, 3].abs().sum() > 0
    assert grad[0, [0, 2, 3]].abs().sum() == 0 and grad[1, [0, 1, 2]].abs().sum() == 0
    # so the predictor's filters of classes 1 and 3 (no positive RoI) get no gradient at all
    weight_grad = branch.mask_predictor.logits.weight.grad.flatten(1).abs().sum(1)  # [K]
    assert weight_grad[[0, 2]].sum() == 0 and (weight_grad[[1, 3]] > 0).all()
    # the loss is BCE between the chosen channel and the RoIAlign-ed targets
    goal = torch.stack(
        [
            mask_targets(masks, sampled.proposals[0][:1], torch.tensor([0]), 14)[0],
            mask_targets(masks, sampled.proposals[0][1:2], torch.tensor([1]), 14)[0],
        ]
    )
    chosen = torch.stack((logits[0][0, 1], logits[0][1, 3]))
    assert torch.allclose(losses["loss_mask"], F.binary_cross_entropy_with_logits(chosen, goal))


def test_mask_loss_without_positives_is_zero_with_a_graph():
    branch = mask_heads(8, 3, (8,), pool_size=7, num_convs=1, channels=8)
    sampled = SampledRoIs([torch.tensor([[0.0, 0, 10, 10]])], [torch.tensor([0])], [torch.zeros(1, 4)], [torch.tensor([0])])
    targets = [{"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 32, 32, dtype=torch.uint8)}]
    loss = branch.branch_losses([torch.randn(1, 8, 4, 4)], sampled, targets)["loss_mask"]
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="masks"):
        branch.branch_losses([torch.randn(1, 8, 4, 4)], sampled, [{"boxes": torch.zeros(0, 4)}])


def test_predict_keeps_the_predicted_class_channel():
    torch.manual_seed(0)
    branch = mask_heads(8, 4, (8,), pool_size=7, num_convs=1, channels=8).eval()
    features = [torch.randn(2, 8, 8, 8)]
    boxes = torch.tensor([[0.0, 0, 30, 30], [10, 10, 50, 40]])
    detections = [
        {"boxes": boxes, "labels": torch.tensor([3, 1]), "scores": torch.tensor([0.9, 0.8])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)},
    ]
    branch.branch_outputs(features, detections)
    logits = branch.mask_logits(features, [boxes, torch.zeros(0, 4)])  # [2, 3, 14, 14]
    assert detections[0]["masks"].shape == (2, 1, 14, 14)  # box-frame probabilities until finalize
    assert torch.allclose(detections[0]["masks"][0, 0], logits[0, 2].sigmoid())
    assert torch.allclose(detections[0]["masks"][1, 0], logits[1, 0].sigmoid())
    assert detections[1]["masks"].shape == (0, 1, 14, 14)
    branch.finalize(detections, [(40, 60), (20, 20)])  # pasted into the original images
    assert detections[0]["masks"].shape == (2, 1, 40, 60) and detections[0]["masks"].dtype == torch.uint8
    assert detections[1]["masks"].shape == (0, 1, 20, 20)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}]
    branch.branch_outputs([torch.randn(1, 8, 8, 8)], empty)
    assert empty[0]["masks"].shape == (0, 1, 14, 14)


def test_mismatched_mask_predictor_is_refused():
    branch = mask_heads(8, 4, (8,))
    branch.predictor = BoxPredictor(16, 6)  # a new box predictor, the old mask predictor
    with pytest.raises(ValueError, match="replace both"):
        branch.mask_logits([torch.randn(1, 8, 8, 8)], [torch.tensor([[0.0, 0, 30, 30]])])
    assert branch.replace_predictor(6) == ["predictor", "mask_predictor"]
    assert branch.mask_logits([torch.randn(1, 8, 8, 8)], [torch.tensor([[0.0, 0, 30, 30]])]).shape == (1, 5, 14, 14)


def mask_iou(a, b):
    a, b = a.bool(), b.bool()
    return ((a & b).sum() / (a | b).sum()).item()


def test_paste_full_mask_gives_the_box():
    ones = torch.ones(2, 28, 28)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [3.3, 5.6, 17.8, 60.2]])
    pasted = paste_masks(ones, boxes, (64, 80), threshold=0.5)
    assert pasted.shape == (2, 64, 80) and pasted.dtype == torch.uint8
    expected = torch.zeros(64, 80, dtype=torch.uint8)
    expected[20:40, 10:50] = 1
    assert torch.equal(pasted[0], expected)  # integer box: exactly its pixels
    box_region = torch.zeros(64, 80, dtype=torch.uint8)
    box_region[6:60, 3:18] = 1  # pixels whose centres lie in the fractional box
    assert torch.equal(pasted[1], box_region)
    assert mask_iou(pasted[1], box_region) >= 0.95


def test_paste_left_half_mask_and_probabilities():
    probs = torch.zeros(1, 4, 4)
    probs[0, :, :2] = 1.0  # left half of the box
    pasted = paste_masks(probs, torch.tensor([[8.0, 8.0, 24.0, 24.0]]), (32, 32))
    assert pasted.dtype == torch.float32
    # cell centres at x = 10, 14 (ones) and 18, 22 (zeros): bilinear in between, 0.5 at x = 16
    assert pasted[0, 16, 13].item() == pytest.approx(1.0)
    assert pasted[0, 16, 15].item() == pytest.approx(0.625)
    assert pasted[0, 16, 16].item() == pytest.approx(0.375)
    binary = paste_masks(probs, torch.tensor([[8.0, 8.0, 24.0, 24.0]]), (32, 32), threshold=0.5)
    row = torch.zeros(32, dtype=torch.uint8)
    row[8:16] = 1
    assert torch.equal(binary[0, 16], row)  # columns 8..15 through the middle
    column = torch.zeros(32, dtype=torch.uint8)
    column[8:24] = 1
    assert torch.equal(binary[0, :, 12], column)  # rows 8..23
    # with cells of 4 px the weights 0.625 x 0.625 at the corner pixels fall below 0.5: corners are rounded
    assert binary[0, 8, 8] == 0 and binary[0, 9, 9] == 1


def grid_sample_paste(probs, boxes, size):
    """Reference: grid_sample over the whole image per mask (the memory-hungry way)."""
    height, width = size
    xs, ys = torch.arange(width) + 0.5, torch.arange(height) + 0.5
    out = []
    for mask, (x1, y1, x2, y2) in zip(probs, boxes.tolist()):
        if x2 <= x1 or y2 <= y1:
            out.append(torch.zeros(height, width))
            continue
        gx, gy = (xs - x1) / (x2 - x1) * 2 - 1, (ys - y1) / (y2 - y1) * 2 - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]  # [1, H, W, 2]
        out.append(F.grid_sample(mask[None, None], grid, align_corners=False)[0, 0])
    return torch.stack(out)


def test_paste_matches_grid_sample_including_boxes_outside_the_image():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(7, 28, 28, generator=g)
    boxes = torch.tensor(
        [
            [3.2, 4.7, 20.1, 30.3],
            [-5.0, -3.0, 10.0, 8.0],  # partly outside, top-left
            [40.0, 30.0, 70.0, 50.0],  # partly outside, bottom-right
            [60.0, 40.0, 80.0, 60.0],  # wholly outside
            [10.0, 10.0, 10.0, 20.0],  # zero width
            [0.0, 0.0, 53.0, 37.0],  # the whole image
            [5.5, 6.5, 6.0, 7.0],  # smaller than a pixel
        ]
    )
    pasted = paste_masks(probs, boxes, (37, 53))
    assert torch.allclose(pasted, grid_sample_paste(probs, boxes, (37, 53)), atol=1e-5)
    assert pasted[3].sum() == 0 and pasted[4].sum() == 0


def test_paste_partly_outside_box_keeps_the_inside_part():
    pasted = paste_masks(torch.ones(1, 28, 28), torch.tensor([[-10.0, 20.0, 10.0, 50.0]]), (40, 40), threshold=0.5)
    expected = torch.zeros(40, 40, dtype=torch.uint8)
    expected[20:40, 0:10] = 1
    assert torch.equal(pasted[0], expected)


def test_paste_empty_and_bad_input():
    assert paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (20, 30)).shape == (0, 20, 30)
    with pytest.raises(ValueError, match="mask_probs"):
        paste_masks(torch.zeros(2, 28, 28), torch.zeros(3, 4), (20, 30))


@pytest.mark.parametrize("rois,channels", [(5, 8), (1, 6), (0, 4)])
def test_mask_predictor_fast_path_equals_the_layers(rois, channels):
    """On the CPU the mask predictor runs deconv + 1x1 conv as matrix products (the fast path);
    values and gradients are those of the plain layers (the fast paths switched off)."""
    torch.manual_seed(0)
    predictor = MaskPredictor(6, 4, channels=channels).double()
    torch.nn.init.normal_(predictor.logits.weight)
    torch.nn.init.normal_(predictor.deconv.bias)
    x = torch.randn(rois, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    assert fastpaths.mask_predictor_applies(x, predictor.deconv, predictor.logits)
    fast = predictor(x)
    x_ref = x.detach().clone().requires_grad_()
    with fastpaths.enabled_as(False):
        reference = predictor(x_ref)
    assert fast.shape == reference.shape == (rois, 3, 14, 14)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    if rois:
        weights = torch.randn_like(fast)
        params = [predictor.deconv.weight, predictor.logits.weight]
        grads = torch.autograd.grad((fast * weights).sum(), [x, *params])
        expected = torch.autograd.grad((reference * weights).sum(), [x_ref, *params])
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_mask_predictor_hooks_and_swapped_layers_run_the_layers():
    """A forward hook on the deconvolution, or a layer swapped for another, is honoured: the fast
    path only stands in for the library's own layers without hooks."""
    predictor = MaskPredictor(6, 4, channels=8)
    x = torch.randn(2, 6, 7, 7)
    seen = []
    handle = predictor.deconv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    predictor(x)
    assert seen == [torch.Size([2, 8, 14, 14])]
    handle.remove()
    predictor.deconv = torch.nn.Sequential(predictor.deconv)  # a user's wrapper
    assert predictor(x).shape == (2, 3, 14, 14)
    assert not fastpaths.mask_predictor_applies(x, predictor.deconv, predictor.logits)
