"""Anchors: the published py-faster-rcnn table, and anchors on a grid written out by hand."""

import pytest
import torch

from rcnn.core.anchors import AnchorGenerator, cell_anchors, generate_anchors

# What py-faster-rcnn's generate_anchors() prints for base 16, ratios (0.5, 1, 2), scales (8, 16, 32).
PY_FASTER_RCNN_TABLE = torch.tensor(
    [
        [-84.0, -40.0, 99.0, 55.0],
        [-176.0, -88.0, 191.0, 103.0],
        [-360.0, -184.0, 375.0, 199.0],
        [-56.0, -56.0, 71.0, 71.0],
        [-120.0, -120.0, 135.0, 135.0],
        [-248.0, -248.0, 263.0, 263.0],
        [-36.0, -80.0, 51.0, 95.0],
        [-80.0, -168.0, 95.0, 183.0],
        [-168.0, -344.0, 183.0, 359.0],
    ]
)


def test_legacy_table_exact():
    assert torch.equal(generate_anchors(legacy=True), PY_FASTER_RCNN_TABLE)


def test_modern_anchors_match_legacy_up_to_convention():
    modern = generate_anchors()
    w, h = modern[:, 2] - modern[:, 0], modern[:, 3] - modern[:, 1]
    torch.testing.assert_close(w * h, torch.tensor([128.0, 256, 512] * 3) ** 2)
    torch.testing.assert_close(h / w, torch.tensor([0.5] * 3 + [1.0] * 3 + [2.0] * 3))
    # same centres: legacy pixel 7.5 under "+1" is continuous coordinate 8.0
    legacy = PY_FASTER_RCNN_TABLE
    torch.testing.assert_close((modern[:, :2] + modern[:, 2:]) / 2, (legacy[:, :2] + legacy[:, 2:] + 1) / 2)
    # and the legacy widths are the modern ones rounded (within the 1-pixel rounding of the original)
    legacy_w = legacy[:, 2] - legacy[:, 0] + 1
    assert float((legacy_w - w).abs().max()) <= 0.5 * 32 + 1e-4  # rounding at base size, times scale


def test_grid_anchors_by_hand():
    # a 2x3 feature map, stride 5, one anchor of size 10 and ratio 1, centred on the cells
    gen = AnchorGenerator(sizes=((10.0,),), aspect_ratios=((1.0,),))
    (anchors,) = gen.grid_anchors([(2, 3)], [5])
    expected = torch.tensor(
        [
            [-2.5, -2.5, 7.5, 7.5], [2.5, -2.5, 12.5, 7.5], [7.5, -2.5, 17.5, 7.5],
            [-2.5, 2.5, 7.5, 12.5], [2.5, 2.5, 12.5, 12.5], [7.5, 2.5, 17.5, 12.5],
        ]
    )
    torch.testing.assert_close(anchors, expected)


def test_grid_order_is_location_then_anchor():
    gen = AnchorGenerator(sizes=((8.0, 16.0),), aspect_ratios=((0.5, 1.0, 2.0),))
    assert gen.num_anchors_per_location == [6]
    feats = [torch.zeros(1, 4, 3, 4)]
    (anchors,) = gen(feats, [8])
    assert anchors.shape == (3 * 4 * 6, 4)
    per_cell = anchors.reshape(3, 4, 6, 4)
    torch.testing.assert_close(per_cell[1, 2] - torch.tensor([20.0, 12.0, 20.0, 12.0]), cell_anchors((8, 16), (0.5, 1, 2)))


def test_fpn_levels_and_errors():
    gen = AnchorGenerator(sizes=((32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),))
    a, b = gen([torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)], [4, 8])
    assert a.shape == (48, 4) and b.shape == (12, 4)
    with pytest.raises(ValueError, match="levels"):
        gen([torch.zeros(1, 1, 4, 4)], [4])
    with pytest.raises(ValueError, match="positive"):
        AnchorGenerator(sizes=((0.0,),))
    with pytest.raises(ValueError, match="aspect_ratios"):
        AnchorGenerator(sizes=((8,), (16,), (32,)), aspect_ratios=((1.0,), (1.0,)))
