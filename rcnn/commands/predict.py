"""``rcnn predict``: detect objects in images and videos; write pictures, JSON and COCO results.

    rcnn predict --weights runs/frcnn photos/ more/*.jpg list.txt clip.mp4 --out predictions/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rcnn.commands.options import (
    add_backend_arguments,
    add_force_argument,
    detector_from_args,
    float_range,
    guard_output,
    guard_outputs,
    int_range,
    is_coco_results,
    is_images_list,
    is_our_png,
    is_prediction_record,
    is_video_records,
    score_threshold,
)
from rcnn.inference.tiling import MAX_OVERLAP, MAX_TILE, MAX_TILES, MERGES, MIN_TILE

MAX_BATCH = 256  # images (or tiles) per model call: beyond it only memory grows
MAX_STRIDE = 100_000  # video frames: one frame an hour at 30 fps
MAX_PIXELS_LIMIT = 10_000_000_000  # --max-pixels: 10 gigapixels (30 GB decoded)


def _guard_outputs(out: Path, sources: list, coco_results: str | None, force: bool) -> None:  # noqa: ANN001
    """Refuse, before anything is written, to replace a file in the way that rcnn did not write."""
    files = []
    for source in sources:
        if source.kind == "video":
            records = out / f"{source.name}.jsonl"
            files += [(records, is_video_records, "a predictions file (.jsonl)"),
                      (out / f"{source.name}.detections.mp4", lambda _, r=records: r.is_file() and is_video_records(r),
                       "a video of detections")]  # fmt: skip
        else:
            files += [(out / f"{source.name}.png", is_our_png, "a picture of detections"),
                      (out / f"{source.name}.json", is_prediction_record, "a predictions file")]  # fmt: skip
    guard_outputs(files, "--out", force)
    if coco_results:
        guard_output(coco_results, is_coco_results, "--coco-results", "a COCO results file (a JSON list of detections)",
                     force)  # fmt: skip
        guard_output(out / "images.json", is_images_list, "--out", "the images list of --coco-results", force)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from rcnn.inference import CocoResults, ImageFiles, Predictor, Tiling, VideoFiles, check_score_thresh
    from rcnn.io.images import DecodedImage
    from rcnn.io.sources import expand_sources, read_video_frames, video_info

    out = Path(args.out)
    tiling = (Tiling(args.tile, args.overlap, args.tile_whole, args.merge, max_tiles=args.max_tiles)
              if args.tile is not None else None)  # fmt: skip
    sources = expand_sources(args.inputs, exclude=out)
    _guard_outputs(out, sources, args.coco_results, args.force)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    loaded = detector_from_args(args, device)
    predictor = Predictor(loaded.model, batch_size=args.batch_size, tiling=tiling, full_resolution=args.full_resolution,
                          max_pixels=args.max_pixels if args.max_pixels > 0 else None)  # fmt: skip
    detector, class_names = predictor.detector, loaded.class_names
    check_score_thresh(args.score_thresh, detector, "--score-thresh")
    videos = {s.path: video_info(s.path) for s in sources if s.kind == "video"}
    if tiling is not None:
        for path, info in videos.items():
            tiling.check(info.size[0], info.size[1], str(path))
    total = sum(1 for s in sources if s.kind == "image") + sum(-(-v.frames // args.stride) for v in videos.values())

    def items():  # (key, decoded image), in order; keys: (source, frame index or None)
        for source in sources:
            if source.kind == "video":
                for index, frame in read_video_frames(source.path, args.stride):
                    yield (source, index), DecodedImage(frame, (frame.shape[1], frame.shape[2]))
            else:
                yield (source, None), predictor.read(source.path)

    threshold = args.score_thresh if args.score_thresh is not None else detector.display_score_thresh
    sinks = [ImageFiles(out, class_names, threshold), VideoFiles(out, class_names, threshold, videos, args.stride, tqdm.write)]
    if args.coco_results:
        categories = loaded.categories or [{"id": i, "name": n} for i, n in enumerate(class_names)]
        sinks.append(CocoResults(args.coco_results, out / "images.json", categories))
    count = detections = 0
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    bar = tqdm(total=total, desc="predict", unit="img", disable=args.quiet)
    try:
        for prediction in predictor.stream(items()):
            count += 1
            detections += int((prediction.output["scores"] >= threshold).sum())
            for sink in sinks:
                sink.write(prediction, image_id=count)
            bar.update(1)
        for sink in sinks:
            sink.close()
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - tic
    summary = {"images": count, "sources": len(sources), "detections": detections, "out": str(out),
               "seconds": round(seconds, 2), "images_per_second": round(count / seconds, 3) if seconds else None}  # fmt: skip
    if args.coco_results:
        summary["coco_results"] = str(args.coco_results)
    print(json.dumps(summary))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="detect objects in images and videos; write pictures and JSON",
        description="Run a trained detector on images and videos: files, folders (searched recursively by "
        "extension), glob patterns and text files listing paths. For an input named N (its path relative to the "
        "folder the inputs share), OUT/N.png shows the detections and OUT/N.json lists them in original pixel "
        "coordinates (x1, y1, x2, y2), in the JSON schema rcnn serve answers with; a video gives "
        "OUT/N.detections.mp4 and OUT/N.jsonl (a record per frame). See docs/predict.md.",
    )
    parser.add_argument("inputs", nargs="+", help="image or video files, folders, glob patterns, list files (.txt)")
    add_backend_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--score-thresh", type=score_threshold,
        help="draw and list detections scoring at least this, in [0, 1] (default 0.5; R-CNN: any number, default 0, "
        "its scores are SVM values)",
    )  # fmt: skip
    parser.add_argument("--coco-results", metavar="FILE", help="also write every detection as one COCO results JSON "
                        "(image ids as in OUT/images.json); an existing file is replaced only if it is a results list")  # fmt: skip
    parser.add_argument("--batch-size", type=int_range(1, MAX_BATCH), default=1,
                        help=f"images (or tiles) per model call, 1..{MAX_BATCH} (default 1)")  # fmt: skip
    parser.add_argument("--stride", type=int_range(1, MAX_STRIDE), default=1,
                        help="videos: predict every Nth frame (default 1)")  # fmt: skip
    parser.add_argument("--tile", type=int_range(MIN_TILE, MAX_TILE), metavar="SIZE",
                        help=f"cut images into SIZE x SIZE tiles at full resolution ({MIN_TILE}..{MAX_TILE} px)")  # fmt: skip
    parser.add_argument("--overlap", type=float_range(0.0, MAX_OVERLAP), default=0.2,
                        help=f"tiles overlap by this fraction, 0..{MAX_OVERLAP} (default 0.2)")  # fmt: skip
    parser.add_argument("--max-tiles", type=int_range(1, 1_000_000), default=MAX_TILES,
                        help=f"with --tile: refuse an image that would make more tiles than this (default {MAX_TILES})")  # fmt: skip
    parser.add_argument("--tile-whole", action="store_true", help="with --tile: also run the whole image, downscaled")
    parser.add_argument("--merge", default="nms", choices=MERGES,
                        help="with --tile: how tiles' detections merge: nms or ios (default nms)")  # fmt: skip
    parser.add_argument("--max-pixels", type=int_range(1, MAX_PIXELS_LIMIT, special={0: "no limit"}), default=180_000_000,
                        help="refuse images of more pixels than this, from their header (default 180e6; 0: no limit)")  # fmt: skip
    parser.add_argument("--full-resolution", action="store_true",
                        help="decode images whole even when the model shrinks them (default: decode reduced)")  # fmt: skip
    add_force_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.set_defaults(func=run)
