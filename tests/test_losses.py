"""Losses against hand-computed values; gradients flow only where the seed says."""

import math

import pytest
import torch

from rcnn.core.losses import binary_log_loss, fast_rcnn_loss, mask_loss, rpn_loss, smooth_l1, softmax_log_loss


def test_smooth_l1_values():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    torch.testing.assert_close(smooth_l1(x), torch.tensor([2.5, 0.5, 0.125, 0.0, 0.125, 0.5, 2.5]))
    # beta generalisation: 0.5 x^2 / beta inside, |x| - beta/2 outside
    torch.testing.assert_close(smooth_l1(torch.tensor([0.05, 1.0]), beta=0.1), torch.tensor([0.0125, 0.95]))
    torch.testing.assert_close(smooth_l1(x, beta=0.0), x.abs())
    with pytest.raises(ValueError):
        smooth_l1(x, beta=-1.0)


def test_log_losses_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    torch.testing.assert_close(softmax_log_loss(logits, torch.tensor([1])), torch.tensor(-math.log(0.75)))
    torch.testing.assert_close(binary_log_loss(torch.tensor([0.0]), torch.tensor([1.0])), torch.tensor(math.log(2.0)))
    assert softmax_log_loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)).item() == 0.0


def test_fast_rcnn_loss_by_hand_and_background_gets_no_box_gradient():
    K = 2
    class_logits = torch.zeros(3, K + 1, requires_grad=True)  # uniform: -log(1/3) each
    box_deltas = torch.zeros(3, 4 * K, requires_grad=True)
    labels = torch.tensor([2, 0, 1])
    targets = torch.tensor([[0.5, 0.0, 2.0, 0.0], [9.0, 9.0, 9.0, 9.0], [1.0, 0.0, 0.0, 0.0]])
    losses = fast_rcnn_loss(class_logits, box_deltas, labels, targets)
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(math.log(3.0)))
    # RoI 0 (class 2): 0.125 + 1.5 ; RoI 2 (class 1): 0.5 ; averaged over all 3 RoIs
    torch.testing.assert_close(losses["loss_box"], torch.tensor((0.125 + 1.5 + 0.5) / 3))
    losses["loss_box"].backward()
    grad = box_deltas.grad.reshape(3, K, 4)
    assert bool((grad[1] == 0).all())  # background RoI: no box gradient
    assert bool((grad[0, 0] == 0).all()) and bool((grad[2, 1] == 0).all())  # other classes' deltas
    assert bool((grad[0, 1] != 0).any()) and bool((grad[2, 0] != 0).any())


def test_fast_rcnn_loss_all_background():
    losses = fast_rcnn_loss(torch.zeros(2, 3), torch.zeros(2, 8, requires_grad=True), torch.zeros(2, dtype=torch.int64), torch.zeros(2, 4))
    assert losses["loss_box"].item() == 0.0
    losses["loss_box"].backward()


def test_rpn_loss_normalisations():
    objectness = torch.tensor([0.0, 0.0, 0.0, 0.0])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    deltas = torch.zeros(4, 4)
    targets = torch.tensor([[2.0, 0, 0, 0], [5.0, 5, 5, 5], [0.0, 0, 0, 0], [0.5, 0, 0, 0]])
    paper = rpn_loss(objectness, labels, deltas, targets, num_locations=100)
    torch.testing.assert_close(paper["loss_objectness"], torch.tensor(math.log(2.0)))
    torch.testing.assert_close(paper["loss_rpn_box"], torch.tensor(10 * (1.5 + 0.125) / 100))
    batch = rpn_loss(objectness, labels, deltas, targets, num_locations=100, normalization="batch")
    torch.testing.assert_close(batch["loss_rpn_box"], torch.tensor((1.5 + 0.125) / 4))
    with pytest.raises(ValueError, match="normalization"):
        rpn_loss(objectness, labels, deltas, targets, 100, normalization="other")


def test_mask_loss_only_gt_class_channel():
    logits = torch.zeros(2, 3, 4, 4, requires_grad=True)
    labels = torch.tensor([3, 1])
    targets = torch.zeros(2, 4, 4)
    targets[0, :2] = 1.0
    loss = mask_loss(logits, labels, targets)
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))  # sigmoid(0) = 0.5 everywhere
    loss.backward()
    g = logits.grad
    assert bool((g[0, :2] == 0).all()) and bool((g[0, 2] != 0).all())
    assert bool((g[1, 1:] == 0).all()) and bool((g[1, 0] != 0).all())
    assert mask_loss(torch.zeros(0, 3, 4, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4, 4)).item() == 0.0
