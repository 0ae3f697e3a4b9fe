"""Matcher thresholds, the RPN's low-quality rule, balanced sampling and hard negatives."""

import pytest
import torch

from rcnn.core.matching import BalancedSampler, Matcher, hard_negatives

NEG, IGN = Matcher.BELOW_LOW_THRESHOLD, Matcher.BETWEEN_THRESHOLDS


def test_rpn_thresholds():
    iou = torch.tensor([[0.8, 0.5, 0.2, 0.0, 0.71], [0.1, 0.65, 0.29, 0.0, 0.72]])
    m = Matcher(0.7, 0.3)
    assert m(iou).tolist() == [0, IGN, NEG, NEG, 1]
    # low-quality rule: gt 1's best proposal (0.72) already matched; gt 0's best is 0.8
    iou2 = torch.tensor([[0.4, 0.1, 0.0], [0.2, 0.65, 0.0]])
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou2).tolist() == [0, 1, NEG]


def test_low_quality_ties_and_gt_without_overlap():
    iou = torch.tensor([[0.5, 0.5, 0.1], [0.0, 0.0, 0.0]])  # gt 1 overlaps nothing
    out = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    assert out.tolist() == [0, 0, NEG]  # ties both positive; gt 1 does not make everything positive


def test_fast_rcnn_background_interval():
    iou = torch.tensor([[0.55, 0.3, 0.05, 0.1]])
    m = Matcher(0.5, 0.5, min_negative=0.1)
    assert m(iou).tolist() == [0, NEG, IGN, NEG]


def test_empty_cases_and_errors():
    assert Matcher(0.7, 0.3)(torch.zeros(0, 4)).tolist() == [NEG] * 4
    assert Matcher(0.7, 0.3)(torch.zeros(2, 0)).numel() == 0
    with pytest.raises(ValueError, match="thresholds"):
        Matcher(0.3, 0.7)
    with pytest.raises(ValueError, match=r"\[G, P\]"):
        Matcher(0.7, 0.3)(torch.zeros(3))


def test_balanced_sampler_counts():
    labels = torch.tensor([1] * 10 + [0] * 100 + [-1] * 50)
    gen = torch.Generator().manual_seed(0)
    pos, neg = BalancedSampler(32, 0.25)(labels, gen)
    assert len(pos) == 8 and len(neg) == 24
    assert bool((labels[pos] == 1).all()) and bool((labels[neg] == 0).all())
    assert len(set(pos.tolist())) == 8 and len(set(neg.tolist())) == 24
    # too few positives: filled with negatives
    pos, neg = BalancedSampler(256, 0.5)(torch.tensor([1] * 3 + [0] * 300), gen)
    assert len(pos) == 3 and len(neg) == 253
    # reproducible with the same seed
    a = BalancedSampler(16, 0.5)(labels, torch.Generator().manual_seed(3))
    b = BalancedSampler(16, 0.5)(labels, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_hard_negatives():
    scores = torch.tensor([0.5, -2.0, -0.5, 2.0, -0.9, 3.0])
    negative = torch.tensor([True, True, True, True, True, False])
    assert hard_negatives(scores, negative).tolist() == [3, 0, 2, 4]
    assert hard_negatives(scores, negative, max_count=2).tolist() == [3, 0]
    assert hard_negatives(scores, negative, margin=0.0).tolist() == [3, 0]
    with pytest.raises(ValueError):
        hard_negatives(scores, negative[:3])
