"""Anchors from the data: ``suggest_anchors`` and ``rcnn data check --suggest-anchors``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from layout_sets import Img, Obj, write_labelimg
from rcnn.cli import main
from rcnn.data.anchors import best_anchor_iou, default_anchor_sizes, scaled_box_shapes, suggest_anchors
from rcnn.data.records import ImageRecord


def _records(boxes: list[list[float]], height: int = 600, width: int = 800, n: int = 5) -> list[ImageRecord]:
    arrays = {**ImageRecord.empty_arrays(len(boxes)), "boxes": np.asarray(boxes, dtype=np.float32)}
    return [ImageRecord(i, Path(f"{i}.jpg"), height, width, **arrays) for i in range(n)]


def test_best_anchor_iou_by_hand() -> None:
    # a 64x64 box: a 64 anchor of ratio 1 is the box itself; a 128 one holds it in a quarter of its area
    assert best_anchor_iou(np.array([64.0]), np.array([64.0]), [64], [1.0]).tolist() == pytest.approx([1.0])
    assert best_anchor_iou(np.array([64.0]), np.array([64.0]), [128], [1.0]).tolist() == pytest.approx([0.25])
    # a 32 wide, 128 high box against a 64 anchor of h/w 4 (32 x 128): exact
    assert best_anchor_iou(np.array([32.0]), np.array([128.0]), [64], [0.5, 4.0]).tolist() == pytest.approx([1.0])


def test_boxes_are_scaled_as_the_model_rescales_the_image() -> None:
    records = _records([[0, 0, 32, 16]], height=300, width=400, n=1)  # 300 -> 600: a scale of 2
    widths, heights = scaled_box_shapes(records, 600, 1000)
    assert widths.tolist() == [64.0] and heights.tolist() == [32.0]


@pytest.mark.parametrize("levels", [1, 5])
def test_square_64_boxes_get_a_64_anchor_and_none_uncovered(levels: int) -> None:
    suggestion = suggest_anchors(_records([[10, 10, 74, 74], [300, 200, 364, 264]]), levels=levels)
    sizes = [s for level in suggestion.anchor_sizes for s in level]
    assert 64.0 in sizes and len(suggestion.anchor_sizes) == levels
    assert suggestion.aspect_ratios[1] == 1.0
    assert suggestion.uncovered == 0 and suggestion.num_objects == 10
    if levels == 1:
        assert suggestion.default_sizes == [[128.0, 256.0, 512.0]]
        assert suggestion.default_uncovered == 10  # 64 px objects: 128 px anchors reach IoU 0.25
    else:
        assert suggestion.anchor_sizes == [[16.0], [32.0], [64.0], [128.0], [256.0]]  # the median in the middle
    assert "--set model.anchor_sizes=" in " ".join(suggestion.set_flags())


def test_defaults_are_the_backbones_general_rule() -> None:
    from rcnn.components.backbones import default_anchor_sizes as backbone_defaults
    from torch import nn

    for levels in (1, 5):
        assert default_anchor_sizes(levels) == backbone_defaults(nn.Identity(), levels)


def test_check_prints_the_suggestion(tmp_path: Path, capsys) -> None:
    images = [Img(f"{i}.png", 300, 400, [Obj("cat", box=(10, 10, 42, 42))]) for i in range(4)]  # 32 px -> 64 px
    write_labelimg(tmp_path, images, images_folder=None, xml_folder=None)
    assert main(["data", "check", str(tmp_path), "--suggest-anchors", "--levels", "1",
                 "--min-size", "600", "--max-size", "1000"]) == 0
    out = capsys.readouterr().out
    assert "suggested: anchor_sizes [[45, 64, 91]], aspect_ratios [0.71, 1, 1.41]" in out
    assert "--set model.anchor_sizes='[[45, 64, 91]]' --set model.aspect_ratios='[0.71, 1, 1.41]'" in out
    found = re.search(r"IoU >= 0.7: (\d+) of 4 with the suggested anchors; (\d+) of 4 with the defaults", out)
    assert found and found.groups() == ("0", "4")
    assert "best case" in out
