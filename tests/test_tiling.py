"""Tiled prediction: tiles cover the image, boxes come back to the image's pixels, the merge removes
objects cut by a tile edge, and tiles find the small objects a downscaled whole-image pass misses.

The recall test needs a detector whose only limit is resolution: ``BrightSquares`` resizes its
input with the library's own ``DetectionTransform`` (to 256 pixels, as the tiny configs do) and
reports each bright connected region of at least 3x3 pixels of the resized image, scoring the
larger ones higher; it follows the model API (``model(images) -> [{"boxes", "labels", "scores"}]``)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from rcnn.components.transform import DetectionTransform
from rcnn.core.boxes import box_iou
from rcnn.inference.tiling import merge_detections, predict_tiled, tile_windows


class BrightSquares(nn.Module):
    """A stand-in detector (``rcnn.deploy.backends.Detector``): a box around each bright square."""

    name = "bright_squares"
    num_classes = 2
    needs_proposals = False
    has_rpn = False
    predicts_masks = False
    trains_in_stages = False
    display_score_thresh = 0.5
    device = torch.device("cpu")
    backend, precision, records = "eager", "fp32", False

    def __init__(self, size: int = 256) -> None:
        super().__init__()
        self.transform = DetectionTransform(size, size, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
        self.calls = 0

    @property
    def input_size(self) -> tuple[int, int]:
        return self.transform.min_sizes[-1], self.transform.max_size

    def forward(self, images, proposals=None, recorder=None):  # noqa: ANN001, ANN201
        self.calls += len(images)
        batch, _, _ = self.transform(images)
        detections = []
        for tensor, (h, w) in zip(batch.tensors, batch.image_sizes):
            bright = (tensor[:, :h, :w].mean(0) > 0.5).numpy().astype(np.uint8)
            n, _, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=4)
            keep = [s for s in stats[1:] if s[2] >= 3 and s[3] >= 3]
            boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh, _ in keep], dtype=torch.float32).reshape(-1, 4)
            detections.append({"boxes": boxes, "labels": torch.ones(len(keep), dtype=torch.int64),
                               "scores": torch.tensor([1 - 1 / (1 + s[4] / 100) for s in keep], dtype=torch.float32).reshape(-1)})  # fmt: skip
        return self.transform.postprocess(detections, batch)


def _scene(size: int = 2000, count: int = 120, side: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dark ``size x size`` uint8 image with ``count`` bright ``side``-pixel squares apart from each other."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 20, dtype=np.uint8)
    boxes: list[list[int]] = []
    while len(boxes) < count:
        x, y = (int(v) for v in rng.integers(0, size - side, 2))
        if all(abs(x - bx) > 2 * side or abs(y - by) > 2 * side for bx, by, _, _ in boxes):
            boxes.append([x, y, x + side, y + side])
            image[y : y + side, x : x + side] = 235
    return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.tensor(boxes, dtype=torch.float32)


def _recall(found: torch.Tensor, truth: torch.Tensor, iou: float = 0.5) -> float:
    if not len(found):
        return 0.0
    return float((box_iou(truth, found).max(dim=1).values >= iou).float().mean())


def test_tiles_cover_the_image_with_the_overlap() -> None:
    windows = tile_windows(1000, 700, 256, 0.25)
    assert windows[0] == (0, 0, 256, 256) and windows[-1] == (744, 444, 1000, 700)
    covered = np.zeros((1000, 700), dtype=bool)
    for y0, x0, y1, x1 in windows:
        assert (y1 - y0, x1 - x0) == (256, 256)
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    xs = sorted({x0 for _, x0, _, _ in windows})
    assert xs == [0, 192, 384, 444] and min(b - a for a, b in zip(xs, xs[1:])) <= 192  # step 256 * 0.75
    assert tile_windows(100, 80, 256, 0.2) == [(0, 0, 100, 80)]  # smaller than a tile: one window
    with pytest.raises(ValueError, match="overlap"):
        tile_windows(100, 100, 64, 1.0)


def test_tiles_find_the_small_objects_a_downscaled_pass_misses() -> None:
    image, truth = _scene()
    model = BrightSquares()
    (whole,) = model([image.float() / 255])  # 2000 -> 256: a 12-pixel square becomes 1.5 pixels
    tiled = predict_tiled(model, image, 256, 0.2, batch_size=4)
    whole_recall, tiled_recall = _recall(whole["boxes"], truth), _recall(tiled["boxes"], truth)
    assert whole_recall < 0.05 and tiled_recall >= 0.99, (whole_recall, tiled_recall)
    assert model.calls == 1 + len(tile_windows(2000, 2000, 256, 0.2))
    # squares cut by a tile edge leave a sliver beside the whole square in the next tile: NMS keeps
    # the slivers (IoU with the whole < 0.5), the intersection-over-smaller merge removes them
    ios = predict_tiled(model, image, 256, 0.2, merge="ios")
    assert _recall(ios["boxes"], truth) >= 0.99 and len(ios["boxes"]) == len(truth) < len(tiled["boxes"])


def test_merge_removes_cut_copies_of_an_object() -> None:
    image = torch.full((3, 400, 400), 20, dtype=torch.uint8)
    image[:, 100:140, 190:250] = 235  # 60 px wide, across the edge x = 200 of the first column of tiles
    model = BrightSquares(size=200)
    nms = predict_tiled(model, image, 200, 0.5, merge="nms")  # tiles at x = 0, 100, 200
    ios = predict_tiled(model, image, 200, 0.5, merge="ios")
    assert len(ios["boxes"]) == 1
    torch.testing.assert_close(ios["boxes"][0], torch.tensor([190.0, 100, 250, 140]))
    assert len(nms["boxes"]) == 2  # the 10-px part cut at x = 200 overlaps the whole at IoU 1/6 only
    half = torch.nn.functional.interpolate(image[None].float() / 255, scale_factor=0.5, mode="bilinear")[0]
    with_whole = predict_tiled(model, image, 200, 0.5, merge="ios", whole=half)  # found again at half size: merged
    assert len(with_whole["boxes"]) == 1
    torch.testing.assert_close(with_whole["boxes"][0], torch.tensor([190.0, 100, 250, 140]), atol=2.0, rtol=0)


def test_merge_detections_is_per_class() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [2, 2, 6, 6]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([1, 1, 2, 1])
    assert merge_detections(boxes, scores, labels).tolist() == [0, 2, 3]
    assert merge_detections(boxes, scores, labels, merge="ios").tolist() == [0, 2]  # the inner box goes
    with pytest.raises(ValueError, match="merge must be"):
        merge_detections(boxes, scores, labels, merge="wbf")


def test_tiled_masks_are_pasted_at_their_tiles(shapes_root, tmp_path_factory) -> None:
    from rcnn.build import load_model
    from tiny_runs import tiny_run

    model = load_model(tiny_run("mask_rcnn", shapes_root, tmp_path_factory)).model
    image = (torch.rand(3, 300, 260) * 255).to(torch.uint8)
    out = predict_tiled(model, image, 128, 0.25)
    assert out["masks"].shape[1:] == (1, 300, 260) and out["masks"].dtype == torch.uint8
    assert len(out["boxes"]) == len(out["scores"]) == len(out["masks"])
    assert bool((out["boxes"][:, 2] <= 260 + 1e-3).all() and (out["boxes"][:, 3] <= 300 + 1e-3).all())
