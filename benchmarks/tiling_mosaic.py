"""Tiled against whole-image prediction on a mosaic of real photographs whose objects are small.

    python -m benchmarks.tiling_mosaic --weights runs/raccoon --data ../shared/data/raccoon --out tiling/

The validation photographs of a LabelImg / VOC / COCO data set are pasted into one large picture
(``--grid`` x ``--grid`` cells of ``--cell`` pixels; their boxes moved with them), so that each
object is ``grid`` times smaller relative to the picture than in its photograph. The model runs
once on the whole mosaic (which its resize shrinks to its input size) and once on tiles of
``--tile`` pixels (``rcnn.inference.tiling.predict_tiled``, each merge); recall and precision at IoU 0.5 of
the detections scoring at least ``--score-thresh`` are printed and written to ``OUT/tiling.json``,
and ``OUT/tiling.png`` shows the two passes side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rcnn.build import load_model
from rcnn.core.boxes import box_iou
from rcnn.data.reading import build_dataset
from rcnn.io.images import read_image
from rcnn.inference import Clock, Predictor, Tiling
from rcnn.inference.tiling import MERGES, tile_count
from rcnn.viz import draw_detections, save_grid, to_pil


def mosaic(dataset, grid: int, cell: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """``(image [3, grid*cell, grid*cell] uint8, boxes [G, 4], labels [G])`` of the first grid² images."""
    canvas = Image.new("RGB", (grid * cell, grid * cell))
    boxes, labels = [], []
    for k in range(min(grid * grid, len(dataset))):
        row, col = divmod(k, grid)
        decoded = read_image(dataset.image_path(k))
        height, width = decoded.original_size
        scale = cell / max(height, width)
        size = (round(width * scale), round(height * scale))
        x0, y0 = col * cell + (cell - size[0]) // 2, row * cell + (cell - size[1]) // 2
        canvas.paste(to_pil(decoded.image).resize(size, Image.BILINEAR), (x0, y0))
        ann = dataset.annotation(k)
        boxes.append(ann["boxes"] * scale + torch.tensor([x0, y0, x0, y0], dtype=torch.float32))
        labels.append(ann["labels"])
    pixels = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).contiguous()
    return pixels, torch.cat(boxes), torch.cat(labels)


def score(output: dict, boxes: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict:
    keep = output["scores"] >= threshold
    found, found_labels = output["boxes"][keep], output["labels"][keep]
    if not len(found):
        return {"recall": 0.0, "precision": 0.0, "detections": 0}
    iou = box_iou(boxes, found) * (labels[:, None] == found_labels[None, :])
    hit = iou.max(dim=1).values >= 0.5
    right = iou.max(dim=0).values >= 0.5
    return {"recall": float(hit.float().mean()), "precision": float(right.float().mean()), "detections": int(keep.sum())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--data", required=True, help="data set with a validation split (or use --val-fraction)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--cell", type=int, default=400)
    parser.add_argument("--tile", type=int, default=400)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    model = load_model(args.weights).model
    dataset = build_dataset(args.data, args.split, val_fraction=args.val_fraction, skip_broken=True)
    image, boxes, labels = mosaic(dataset, args.grid, args.cell)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"image": list(image.shape[1:]), "objects": len(boxes),
               "tiles": tile_count(image.shape[1], image.shape[2], args.tile, args.overlap)}  # fmt: skip
    predictors = {"whole": Predictor(model)}
    for merge in MERGES:  # the tiles four to a call, as predict_tiled's default
        predictors[f"tiled_{merge}"] = Predictor(model, tiling=Tiling(args.tile, args.overlap, merge=merge), batch_size=4)
    passes = {}
    for name, predictor in predictors.items():
        _, seconds, prediction = Clock().measure(lambda predictor=predictor: predictor.predict(image))
        passes[name] = prediction.output
        results[name] = {**score(prediction.output, boxes, labels, args.score_thresh), "seconds": seconds}
    print(json.dumps(results, indent=1))
    (out / "tiling.json").write_text(json.dumps(results, indent=1))
    names = ["__background__", *dataset.class_names[1:]]
    pictures = [draw_detections(image, passes[k], names, args.score_thresh) for k in ("whole", "tiled_nms")]
    small = [p.resize((p.width // 2, p.height // 2), Image.BILINEAR) for p in pictures]
    save_grid(small, out / "tiling.png", ncols=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
