"""Box operations and the BoxCoder: hand-computed values, laws, degenerate input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcnn.core.boxes import BoxCoder, box_area, box_iou, check_boxes, clip_boxes, cxcywh_to_xyxy, remove_small_boxes, xyxy_to_cxcywh


def test_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 5.0, 10.0]])
    # overlap 5x5 = 25, union 100 + 100 - 25 = 175; identical; disjoint; half contained
    expected = torch.tensor([[25 / 175, 1.0, 0.0, 0.5]])
    torch.testing.assert_close(box_iou(a, b), expected)


def test_iou_degenerate_and_empty():
    zero = torch.tensor([[3.0, 3.0, 3.0, 8.0]])  # zero width
    assert box_iou(zero, zero).item() == 0.0
    assert box_iou(torch.zeros(0, 4), torch.rand(3, 4)).shape == (0, 3)
    assert box_iou(torch.rand(2, 4), torch.zeros(0, 4)).shape == (2, 0)
    with pytest.raises(ValueError, match="NaN"):
        box_iou(torch.tensor([[0.0, float("nan"), 1.0, 1.0]]), zero)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        box_iou(torch.zeros(3), zero)


# sides within [1, 50]: size ratios stay below the coder's 62.5x clamp
boxes_strategy = st.lists(
    st.tuples(
        st.floats(0, 100), st.floats(0, 100), st.floats(1, 50), st.floats(1, 50)
    ),
    min_size=1,
    max_size=8,
).map(lambda rows: torch.tensor([[x, y, x + w, y + h] for x, y, w, h in rows], dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(boxes_strategy, boxes_strategy)
def test_iou_symmetric_and_bounded(a, b):
    iou = box_iou(a, b)
    torch.testing.assert_close(iou, box_iou(b, a).T)
    assert bool(((iou >= 0) & (iou <= 1 + 1e-12)).all())
    torch.testing.assert_close(box_iou(a, a).diagonal(), torch.ones(len(a), dtype=torch.float64))


def test_area_clip_remove_small():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 2.0], [-5.0, -5.0, 50.0, 8.0], [1.0, 1.0, 1.5, 9.0]])
    torch.testing.assert_close(box_area(boxes[:1]), torch.tensor([8.0]))
    torch.testing.assert_close(clip_boxes(boxes, (6, 40))[1], torch.tensor([0.0, 0.0, 40.0, 6.0]))
    assert remove_small_boxes(boxes, 1.0).tolist() == [0, 1]
    assert remove_small_boxes(torch.tensor([[0.0, float("nan"), 5.0, 5.0]]), 1.0).numel() == 0


def test_check_boxes_messages():
    check_boxes(torch.zeros(0, 4))
    check_boxes(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))  # degenerate but valid
    with pytest.raises(ValueError, match=r"gt\[1\].*x2 < x1"):
        check_boxes(torch.tensor([[0.0, 0.0, 1.0, 1.0], [5.0, 0.0, 2.0, 1.0]]), "gt")
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_boxes(torch.tensor([[0.0, 0.0, float("inf"), 1.0]]))
    with pytest.raises(ValueError, match="floating-point"):
        check_boxes(torch.zeros(1, 4, dtype=torch.int64))


def test_conversions_invert():
    boxes = torch.tensor([[1.0, 2.0, 5.0, 10.0]])
    torch.testing.assert_close(xyxy_to_cxcywh(boxes), torch.tensor([[3.0, 6.0, 4.0, 8.0]]))
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(boxes)), boxes)


def test_box_coder_seed_formulas_by_hand():
    # proposal p: centre (15, 20), w 10, h 20; ground truth g: centre (18, 16), w 20, h 10
    p = torch.tensor([[10.0, 10.0, 20.0, 30.0]])
    g = torch.tensor([[8.0, 11.0, 28.0, 21.0]])
    t = BoxCoder().encode(g, p)
    expected = torch.tensor([[(18 - 15) / 10, (16 - 20) / 20, math.log(20 / 10), math.log(10 / 20)]])
    torch.testing.assert_close(t, expected)
    weighted = BoxCoder(weights=(10, 10, 5, 5)).encode(g, p)
    torch.testing.assert_close(weighted, expected * torch.tensor([10.0, 10.0, 5.0, 5.0]))
    torch.testing.assert_close(BoxCoder().decode(t, p), g)


@settings(max_examples=80, deadline=None)
@given(boxes_strategy, st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]))
def test_box_coder_round_trip(boxes, weights):
    coder = BoxCoder(weights)
    proposals = boxes.flip(0)
    deltas = coder.encode(boxes, proposals)
    torch.testing.assert_close(coder.decode(deltas, proposals), boxes, rtol=1e-9, atol=1e-7)


def test_box_coder_multi_class_decode_and_clamp():
    p = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0]])  # two classes
    out = BoxCoder().decode(deltas, p)
    assert out.shape == (1, 8)
    torch.testing.assert_close(out[0, 4:], torch.tensor([1.0, 0.0, 11.0, 10.0]))
    huge = BoxCoder().decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), p)
    assert bool(torch.isfinite(huge).all())
    assert huge[0, 2] - huge[0, 0] == pytest.approx(10 * 1000 / 16, rel=1e-4)


def test_box_coder_bad_input():
    with pytest.raises(ValueError, match="positive width and height"):
        BoxCoder().encode(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="4 positive numbers"):
        BoxCoder(weights=(1.0, 0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"\[N, 4\*C\]"):
        BoxCoder().decode(torch.zeros(2, 5), torch.zeros(2, 4))
    assert BoxCoder().encode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
