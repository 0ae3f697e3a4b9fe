"""COCO evaluation at scale: 5,000 images of 100 detections each (the size of COCO val 2017 with a
detector's usual 100 detections per image), scored by the library and by pycocotools alone.

    python -m benchmarks.eval_scale                  # 5,000 images (about 5 minutes on 2 cores)
    python -m benchmarks.eval_scale --quick          # 1,000 images
    python -m benchmarks.eval_scale --run ours --images 5000    # one measurement (what the above run each)

The ground truth and the detections are synthetic and seeded (:func:`synthetic_coco`): 80 categories
with COCO's ids, about 7 objects an image of all sizes, some crowds; each object found several
times (jittered boxes, now and then the wrong class) and the rest of the 100 detections scattered,
with the low scores of a detector's tail. Each measurement runs in a fresh process, so that its
peak resident memory is its own:

- ``pycocotools``: the detections as pycocotools takes them (a list of result dicts, built first and
  not timed), then ``loadRes``, ``evaluate``, ``accumulate``, ``summarize``: its own time;
- ``ours``: :class:`rcnn.evaluation.coco.CocoEvaluator`, the detections given image by image as the
  predictor makes them (stored on disk), then scored in chunks: the library's time, all included;
- ``faster``: the same with ``backend="faster-coco-eval"``.

The AP of each is checked to be pycocotools' own. Writes ``benchmarks/results/eval_scale.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from benchmarks.harness import ROOT, command_line, print_peak_rss, reset_peak_rss, table, write_result

__all__ = ["detections", "main", "markdown", "measure", "synthetic_coco"]

# COCO's 80 category ids (1..90 with gaps).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35,
    36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64,
    65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip
RUNS = ("pycocotools", "ours", "faster")


def synthetic_coco(images: int, seed: int = 0) -> dict[str, Any]:
    """A COCO instances dictionary of ``images`` images (640 x 480 or 480 x 640) with about 7 objects
    each of COCO's 80 categories (boxes of all three area ranges, 2 % crowds)."""
    rng = np.random.default_rng(seed)
    cats = [{"id": c, "name": f"class_{c}"} for c in COCO_CATEGORY_IDS]
    out_images, annotations = [], []
    for image_id in range(1, images + 1):
        width, height = (640, 480) if rng.random() < 0.7 else (480, 640)
        out_images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        for _ in range(int(np.clip(rng.poisson(7), 1, 30))):
            side = float(np.exp(rng.uniform(np.log(12), np.log(400))))  # small, medium and large objects
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            w, h = min(w, width - 1.0), min(h, height - 1.0)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.choice(COCO_CATEGORY_IDS)), "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": int(rng.random() < 0.02)})  # fmt: skip
    return {"images": out_images, "annotations": annotations, "categories": cats}


def detections(
    gt: dict[str, Any], per_image: int = 100, seed: int = 1
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Each image's ``(image id, category ids [D], scores [D] float32, boxes [D, 4] x1 y1 x2 y2)``,
    D = ``per_image``: every object found 1..4 times (boxes jittered by up to 15 %, one in five of
    the wrong class, high scores), the rest scattered over the image (its classes and a few others,
    low scores)."""
    rng = np.random.default_rng(seed)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in gt["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for info in gt["images"]:
        objects = by_image.get(info["id"], [])
        boxes, cats, scores = [], [], []
        for ann in objects:
            x, y, w, h = ann["bbox"]
            for _ in range(int(rng.integers(1, 5))):
                jitter = rng.uniform(-0.15, 0.15, 4) * [w, h, w, h]
                boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
                wrong = rng.random() < 0.2
                cats.append(int(rng.choice(COCO_CATEGORY_IDS)) if wrong else ann["category_id"])
                scores.append(rng.uniform(0.3, 1.0))
        pool = [a["category_id"] for a in objects] + [int(c) for c in rng.choice(COCO_CATEGORY_IDS, 5)]
        while len(boxes) < per_image:
            w, h = rng.uniform(8, info["width"] / 2), rng.uniform(8, info["height"] / 2)
            x, y = rng.uniform(0, info["width"] - w), rng.uniform(0, info["height"] - h)
            boxes.append([x, y, x + w, y + h])
            cats.append(int(rng.choice(pool)))
            scores.append(rng.uniform(0.0, 0.4))
        box = np.clip(np.array(boxes[:per_image]), 0, [info["width"], info["height"], info["width"], info["height"]])
        yield info["id"], np.array(cats[:per_image], dtype=np.int64), np.array(scores[:per_image], dtype=np.float32), box


def _ground_truth(gt: dict[str, Any]) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def measure(run: str, images: int, per_image: int = 100) -> dict[str, Any]:
    """One measurement (see the module docstring), in this process: seconds, the 12 numbers, and the
    peak resident memory above that of the ground truth alone."""
    from benchmarks.harness import measure as clock
    from rcnn.inference import peak_memory_mb

    gt = _ground_truth(synthetic_coco(images))
    found = list(detections(gt.dataset, per_image))  # (as a predictor would hand them over, image by image)
    reset_peak_rss()
    base = peak_memory_mb()
    if run == "pycocotools":
        from pycocotools.cocoeval import COCOeval

        results = [{"image_id": i, "category_id": int(c), "score": float(s),
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]}
                   for i, cats, scores, boxes in found
                   for c, s, (x1, y1, x2, y2) in zip(cats, scores.astype(np.float64), boxes)]  # fmt: skip

        def score() -> np.ndarray:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval = COCOeval(gt, gt.loadRes(results), "bbox")
                coco_eval.evaluate()
                coco_eval.accumulate()
                coco_eval.summarize()
            return coco_eval.stats
    else:
        from rcnn.evaluation.coco import CocoEvaluator

        def score() -> np.ndarray:
            with CocoEvaluator(gt, "bbox", backend="faster-coco-eval" if run == "faster" else "pycocotools") as evaluator:
                for image_id, cats, scores, boxes in found:
                    evaluator.add(image_id, cats, scores, boxes)
                return evaluator.evaluate()["bbox"].stats

    box: dict[str, Any] = {}
    cpu, wall = clock(lambda: box.setdefault("stats", score()))
    return {"run": run, "images": images, "detections": images * per_image, "cpu_s": cpu, "wall_s": wall,
            "peak_mb_above_gt": peak_memory_mb() - base, "stats": [float(v) for v in box["stats"]]}  # fmt: skip


def _in_child(run: str, images: int) -> dict[str, Any]:
    """:func:`measure` in a fresh process (its own peak memory)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.eval_scale", "--run", run, "--images", str(images)],
                         cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"benchmarks.eval_scale --run {run} failed:\n{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def markdown(result: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md."""
    rows = []
    reference = result["runs"]["pycocotools"]
    titles = {"pycocotools": "pycocotools alone (its result dicts built beforehand, untimed)",
              "ours": "rcnn `CocoEvaluator` (pycocotools, chunks of 20,000 detections, on disk)",
              "faster": "rcnn `CocoEvaluator`, backend faster-coco-eval"}  # fmt: skip
    for name in RUNS:
        run = result["runs"].get(name)
        if run is None:
            continue
        gap = max(abs(a - b) for a, b in zip(run["stats"], reference["stats"]))
        same = "the same" if gap == 0 else f"the same to {gap:.0e}" if gap < 1e-12 else f"DIFFERENT by {gap:.1e}"
        rows.append([titles[name], f"{run['cpu_s']:.1f}", f"{run['wall_s']:.1f}", f"{run['wall_s'] / reference['wall_s']:.2f}",
                     f"{run['peak_mb_above_gt']:.0f}", f"{run['stats'][0]:.4f} ({same})"])  # fmt: skip
    lines = [
        table(["evaluation", "CPU s", "wall s", "wall / pycocotools", "peak MB beyond the data", "box AP (against pycocotools)"], rows),
        "",
        f"{result['images']:,} synthetic images with {result['per_image']} detections each "
        f"({result['images'] * result['per_image']:,} detections, 80 categories; `benchmarks.eval_scale.synthetic_coco`), "
        "each evaluation once, in a fresh process; its peak resident memory is counted from the ground truth and "
        "the detections' arrays in place. The library's rows include storing the detections as they come and "
        "all of the scoring; pycocotools' row starts from its list of result dicts, which a caller must first hold "
        "in memory (counted in its peak). All twelve COCO numbers of each row are compared with pycocotools'.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="images of the synthetic data set (default 5000)")
    parser.add_argument("--quick", action="store_true", help="1,000 images (for `make bench`)")
    parser.add_argument("--run", choices=RUNS, help="one measurement, in this process, printed as JSON")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")
    images = 1000 if args.quick else args.images
    if args.run:
        print(json.dumps(measure(args.run, args.images)), flush=True)
        print_peak_rss()
        return 0
    runs = {}
    for name in RUNS:
        tic = time.perf_counter()
        runs[name] = _in_child(name, images)
        print(f"{name}: {runs[name]['wall_s']:.1f} s, peak +{runs[name]['peak_mb_above_gt']:.0f} MB, "
              f"AP {runs[name]['stats'][0]:.4f} ({time.perf_counter() - tic:.0f} s with set-up)", flush=True)  # fmt: skip
    result = {"images": images, "per_image": 100, "runs": runs}
    write_result("eval_scale", result, command_line("benchmarks.eval_scale", list(argv) if argv is not None else None))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
