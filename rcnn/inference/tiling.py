"""Tiled prediction: a large image cut into overlapping tiles, each run through the model at full
resolution, the detections mapped back and merged.

A detector resizes its input to its own scale (``model.min_size`` / ``max_size``): a 6000-pixel
aerial photograph shown whole to a model of 800 pixels is shrunk 7.5 times, and a 20-pixel car
becomes 3 pixels, below anything the backbone's stride-8 features can resolve. Cut into tiles of
the model's input size, the image reaches the model unshrunk.

Objects that a tile boundary cuts are seen whole in a neighbouring tile when the overlap is at
least their size; the cut copies are removed by the merge:

- ``"nms"``: per-class NMS on IoU over all tiles' detections (the one NMS entry point);
- ``"ios"``: per-class greedy suppression by *intersection over the smaller box*, which also
  removes a cut part lying inside the whole object's box (its IoU with it is small, its
  intersection over its own area close to 1), as SAHI's merge does.

Optionally the whole image, downscaled as the model's resize does, adds the large objects that no
tile holds whole; its detections join the merge.

The settings are bounded, as the cost is the number of tiles, one model call each:

- a tile is 64..4096 px: 64 is twice the coarsest feature stride (32), the least that gives the
  deepest map more than one cell in each direction (a smaller tile is only upscaled by the model's
  resize: no detail is gained, the calls multiply); 4096 is the largest model input
  (``rcnn.components.settings.MAX_IMAGE_SIDE``);
- the overlap is 0..0.9 of a tile: at 0.9 each pixel is already seen by 100 tiles;
- an image is cut into at most ``max_tiles`` tiles (2048 by default: ~17 min at 0.5 s a tile);
  more is refused before any is run, saying how many the settings would make.

Shape shorthand:
    H, W: image height and width;  D: detections;  T: tiles
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rcnn.components.settings import MAX_IMAGE_SIDE
from rcnn.core.boxes import box_area
from rcnn.core.ops import batched_nms
from rcnn.io.images import as_float

__all__ = ["MAX_OVERLAP", "MAX_TILE", "MAX_TILES", "MERGES", "MIN_TILE", "check_tiling", "merge_detections",
           "predict_tiled", "tile_count", "tile_windows"]  # fmt: skip

MERGES = ("nms", "ios")
MIN_TILE = 64  # px: twice the coarsest feature stride (module docstring)
MAX_TILE = MAX_IMAGE_SIDE
MAX_OVERLAP = 0.9
MAX_TILES = 2048  # per image, by default


def _starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    return [*starts, length - tile]  # the last tile flush with the far edge


def check_tiling(tile: int, overlap: float, max_tiles: int = MAX_TILES) -> None:
    """``ValueError`` unless ``tile`` (px), ``overlap`` (fraction of a tile) and ``max_tiles`` are in
    their ranges (module docstring)."""
    if isinstance(tile, bool) or not isinstance(tile, int) or not MIN_TILE <= tile <= MAX_TILE:
        raise ValueError(f"tile must be a whole number of pixels in {MIN_TILE}..{MAX_TILE}, got {tile}")
    if not (isinstance(overlap, (int, float)) and 0.0 <= overlap <= MAX_OVERLAP):  # NaN fails too
        raise ValueError(f"overlap must be in [0, {MAX_OVERLAP}] (a fraction of a tile), got {overlap}")
    if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1:
        raise ValueError(f"max_tiles must be a whole number >= 1, got {max_tiles}")


def tile_windows(
    height: int, width: int, tile: int, overlap: float, max_tiles: int | None = MAX_TILES
) -> list[tuple[int, int, int, int]]:
    """Tiles ``(y0, x0, y1, x1)`` of ``tile x tile`` pixels covering an ``H x W`` image, neighbours
    overlapping by at least ``overlap`` of a tile (the last row and column flush with the edges;
    one tile of the image's size on a side shorter than ``tile``).

    ``ValueError`` for settings out of range (:func:`check_tiling`) or when the image would make
    more than ``max_tiles`` tiles (None: no cap), saying how many and what to change."""
    check_tiling(tile, overlap, max_tiles if max_tiles is not None else MAX_TILES)
    step = max(1, int(tile * (1.0 - overlap)))
    rows, columns = _starts(height, tile, step), _starts(width, tile, step)
    count = len(rows) * len(columns)
    if max_tiles is not None and count > max_tiles:
        raise ValueError(
            f"a {width}x{height} image cut into {tile}-px tiles overlapping by {overlap:g} makes {count} tiles "
            f"({len(columns)} x {len(rows)}), more than the limit of {max_tiles} per image (one model call each); "
            f"use larger tiles or less overlap, or raise the limit (rcnn predict: --tile, --overlap, --max-tiles)"
        )
    return [(y0, x0, min(y0 + tile, height), min(x0 + tile, width)) for y0 in rows for x0 in columns]


def _suppress_ios(boxes: Tensor, scores: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """Greedy per-class suppression by intersection over the smaller area: ``[D, 4], [D], [D] -> [K]``
    kept indices by decreasing score."""
    order = scores.argsort(descending=True, stable=True)
    boxes, labels = boxes[order], labels[order]
    top_left = torch.max(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.min(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)  # [D, D]
    area = box_area(boxes)
    smaller = torch.min(area[:, None], area[None, :]).clamp(min=1e-6)
    overlaps = (inter / smaller > threshold) & (labels[:, None] == labels[None, :])  # [D, D]
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for i in range(len(order)):
        if keep[i]:
            later = overlaps[i].clone()
            later[: i + 1] = False
            keep &= ~later
    return order[keep]


def merge_detections(
    boxes: Tensor, scores: Tensor, labels: Tensor, *, merge: str = "nms", threshold: float = 0.5,
    max_detections: int | None = None,
) -> Tensor:
    """Indices ``[K]`` (by decreasing score, at most ``max_detections``) of the detections kept when
    ``boxes [D, 4]`` gathered from several tiles are merged (module docstring); all without a cap."""
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
    if merge == "nms":
        return batched_nms(boxes, scores, labels, threshold)[:max_detections]
    return _suppress_ios(boxes, scores, labels, threshold)[:max_detections]


def _run(model: nn.Module, crops: list[Tensor]) -> list[dict[str, Tensor]]:
    return model([as_float(c) for c in crops])


@torch.inference_mode()
def predict_tiled(
    model: nn.Module,
    image: Tensor,
    tile: int,
    overlap: float = 0.2,
    *,
    whole: Tensor | None = None,
    merge: str = "nms",
    merge_threshold: float = 0.5,
    batch_size: int = 4,
    max_detections: int | None = None,
    max_tiles: int | None = MAX_TILES,
) -> dict[str, Tensor]:
    """Detections of ``model`` on ``image [3, H, W]`` (uint8 0..255 or float 0..1; kept as it is,
    each tile converted to float on its own) from overlapping ``tile``-pixel tiles.

    ``whole``: the same image, downscaled (e.g. decoded reduced), run once more as a whole; its
    boxes are scaled to ``H x W`` and join the merge. Tiles are run ``batch_size`` at a time.
    ``max_detections`` caps the merged detections (default: no cap beyond each tile's own, as a
    large image may hold far more objects than one model input). ``max_tiles``: refuse an image
    that would make more tiles (:func:`tile_windows`).
    Returns ``boxes [D, 4]`` in ``image``'s pixels, ``labels``, ``scores`` and, for a model that
    predicts masks, ``masks [D, 1, H, W]`` uint8 (binary).
    """
    height, width = image.shape[1], image.shape[2]
    device = image.device
    windows = tile_windows(height, width, tile, overlap, max_tiles)
    boxes, scores, labels, masks, places = [], [], [], [], []
    has_masks = False
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        outputs = _run(model, [image[:, y0:y1, x0:x1] for y0, x0, y1, x1 in chunk])
        for (y0, x0, y1, x1), out in zip(chunk, outputs):
            shift = torch.tensor([x0, y0, x0, y0], dtype=out["boxes"].dtype, device=out["boxes"].device)
            boxes.append(out["boxes"] + shift)
            scores.append(out["scores"])
            labels.append(out["labels"])
            if "masks" in out:
                has_masks = True
                masks += list(out["masks"])
                places += [(y0, x0)] * len(out["scores"])
    if whole is not None:
        (out,) = _run(model, [whole])
        factor = torch.tensor(
            [width / whole.shape[2], height / whole.shape[1]] * 2, dtype=out["boxes"].dtype, device=out["boxes"].device
        )
        boxes.append(out["boxes"] * factor)
        scores.append(out["scores"])
        labels.append(out["labels"])
        if "masks" in out:
            masks += list(out["masks"])
            places += [None] * len(out["scores"])
    all_boxes, all_scores, all_labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = merge_detections(
        all_boxes, all_scores, all_labels, merge=merge, threshold=merge_threshold, max_detections=max_detections
    )
    result = {"boxes": all_boxes[keep], "labels": all_labels[keep], "scores": all_scores[keep]}
    if has_masks:
        pasted = torch.zeros((len(keep), 1, height, width), dtype=torch.uint8, device=device)
        for row, index in enumerate(keep.tolist()):
            mask, place = masks[index], places[index]  # [1, h, w] probabilities
            if place is None:  # from the whole image: scaled up to the full size
                mask = nn.functional.interpolate(mask[None].float(), size=(height, width), mode="bilinear")[0]
                pasted[row] = (mask >= 0.5).to(torch.uint8)
            else:
                y0, x0 = place
                pasted[row, :, y0 : y0 + mask.shape[1], x0 : x0 + mask.shape[2]] = (mask >= 0.5).to(torch.uint8)
        result["masks"] = pasted
    return result


def tile_count(height: int, width: int, tile: int, overlap: float) -> int:
    """How many tiles :func:`tile_windows` cuts an ``H x W`` image into (whatever the cap)."""
    check_tiling(tile, overlap)
    step = max(1, int(tile * (1.0 - overlap)))
    return len(_starts(height, tile, step)) * len(_starts(width, tile, step))

