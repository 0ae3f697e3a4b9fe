"""Drawing detections and grids: the pixels land where the boxes and masks are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcnn.data import CocoDetection, shapes_paths
from rcnn.viz import class_colour, draw_detections, save_grid


def _scene() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    image = torch.full((3, 64, 80), 0.5)
    masks = torch.zeros(2, 1, 64, 80)
    masks[0, 0, 20:40, 10:30] = 0.9
    masks[1, 0, 5:15, 50:70] = 0.9
    output = {
        "boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0], [50.0, 5.0, 70.0, 15.0]]),
        "labels": torch.tensor([1, 2]),
        "scores": torch.tensor([0.9, 0.2]),
        "masks": masks,
    }
    return image, output


def test_boxes_masks_and_threshold() -> None:
    image, output = _scene()
    drawn = np.asarray(draw_detections(image, output, ["__background__", "a", "b"], score_threshold=0.5))
    assert drawn.shape == (64, 80, 3)
    colour = np.array(class_colour(1))
    assert (drawn[30, 10] == colour).all() and (drawn[30, 29] == colour).all()  # left and right edges
    assert (drawn[39, 20] == colour).all()  # bottom edge (last pixel row inside the box)
    blended = np.round(0.55 * 127.5 + 0.45 * colour)  # translucent mask at 45%
    assert np.abs(drawn[30, 20].astype(float) - blended).max() <= 1
    assert (drawn[10, 60] == 128).all()  # the second detection scores 0.2: not drawn
    assert (drawn[55, 5] == 128).all()  # background untouched


def test_ground_truth_without_scores_is_drawn_whole() -> None:
    image, output = _scene()
    del output["scores"]
    drawn = np.asarray(draw_detections(image, output, ["__background__", "a", "b"], scale=2))
    assert drawn.shape == (128, 160, 3)
    assert (drawn[26, 100] == np.array(class_colour(2))).all()  # the second box's left edge, scaled x2


def test_grid_png_from_shapes(shapes_root: Path, tmp_path: Path) -> None:
    dataset = CocoDetection(*shapes_paths(shapes_root, "val"), with_masks=True)
    tiles = []
    for i in range(5):
        image, target = dataset[i]
        output = {**target, "masks": target["masks"][:, None], "scores": torch.full((len(target["labels"]),), 0.9)}
        tiles.append(draw_detections(image, output, dataset.class_names))
    path = save_grid(tiles, tmp_path / "grid.png", ncols=3, pad=4)
    with Image.open(path) as grid:
        assert grid.format == "PNG" and grid.size == (3 * 128 + 4 * 4, 2 * 128 + 3 * 4)
        pixels = np.asarray(grid)
    # the first object's box outline, at its position in the first cell
    _, target = dataset[0]
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0])
    colour = np.array(class_colour(int(target["labels"][0])))
    assert (pixels[4 + (y1 + y2) // 2, 4 + x1] == colour).all()
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="no images"):
        save_grid([], "unused.png")
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        draw_detections(torch.zeros(4, 8, 8), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}, [])
