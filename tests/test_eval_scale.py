"""COCO evaluation at scale: detections streamed to disk and scored in chunks give pycocotools'
own numbers, bit for bit (and so does faster-coco-eval); memory does not grow with the detections;
results files are written as the images come."""

from __future__ import annotations

import contextlib
import io
import json
import tracemalloc

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from benchmarks.eval_scale import detections, synthetic_coco
from rcnn.evaluation.coco import CocoEvaluator, JsonListWriter


def ground_truth(data: dict) -> COCO:
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def pycocotools_alone(gt: COCO, results: list[dict], kind: str, image_ids=None) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(gt, gt.loadRes(results), kind)
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def assert_identical(scores, reference: COCOeval) -> None:
    assert scores.stats.tolist() == reference.stats.tolist()
    assert np.array_equal(scores.precision, reference.eval["precision"])
    assert np.array_equal(scores.recall, reference.eval["recall"])


@pytest.fixture(scope="module")
def scene():
    """60 images, 25 detections each, scores rounded to 2 decimals (ties across images and within),
    two images without detections, one category without ground truth."""
    data = synthetic_coco(60, seed=3)
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 1]
    found = []
    for image_id, cats, scores, boxes in detections(data, per_image=25, seed=4):
        if image_id in (5, 17):
            continue
        found.append((image_id, cats, np.round(scores.astype(np.float64), 2), boxes))
    results = [{"image_id": i, "category_id": int(c), "score": float(s),
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]}
               for i, cats, scores, boxes in found for c, s, (x1, y1, x2, y2) in zip(cats, scores, boxes)]  # fmt: skip
    return ground_truth(data), found, results


@pytest.mark.parametrize("chunk", [1, 97, 10**6])  # an image a chunk, chunks across images, all at once
def test_boxes_score_as_pycocotools_alone(scene, chunk):
    gt, found, results = scene
    reference = pycocotools_alone(gt, results, "bbox")
    assert 0.05 < reference.stats[0] < 0.9  # a score that can tell
    with CocoEvaluator(gt, "bbox", chunk_detections=chunk) as evaluator:
        for image_id, cats, scores, boxes in reversed(found):  # in any order
            evaluator.add(image_id, cats, scores, boxes)
        assert len(evaluator) == len(results)
        assert_identical(evaluator.evaluate()["bbox"], reference)
        some = list(range(10, 40))  # a subset of the images: the others' detections are not scored
        assert_identical(evaluator.evaluate(some)["bbox"], pycocotools_alone(gt, results, "bbox", some))


def square_masks(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    masks = np.zeros((len(boxes), height, width), dtype=np.uint8)
    for j, (x1, y1, x2, y2) in enumerate(np.round(boxes).astype(int)):
        masks[j, y1 : max(y2, y1 + 1), x1 : max(x2, x1 + 1)] = 1
    return masks


def test_masks_score_as_pycocotools_alone():
    data = synthetic_coco(12, seed=5)
    for ann in data["annotations"]:  # masks of the ground truth: the box as a polygon
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    gt = ground_truth(data)
    results = []
    with CocoEvaluator(gt, ("bbox", "segm"), chunk_detections=30) as evaluator:
        for image_id, cats, scores, boxes in detections(data, per_image=12, seed=6):
            info = gt.imgs[image_id]
            masks = square_masks(boxes, info["height"], info["width"])
            evaluator.add(image_id, cats, scores, boxes, masks)
            rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
            results += [{"image_id": image_id, "category_id": int(c), "score": float(s), "segmentation": r}
                        for c, s, r in zip(cats, scores.astype(np.float64), rles)]  # fmt: skip
        scores = evaluator.evaluate()
    assert scores["segm"].stats[0] > 0.05
    assert_identical(scores["segm"], pycocotools_alone(gt, results, "segm"))


def test_faster_coco_eval_gives_the_same_numbers(scene):
    gt, found, results = scene
    with CocoEvaluator(gt, "bbox", backend="faster-coco-eval") as evaluator:
        for image_id, cats, scores, boxes in found:
            evaluator.add(image_id, cats, scores, boxes)
        scores = evaluator.evaluate()["bbox"]
    reference = pycocotools_alone(gt, results, "bbox")
    # the same up to float rounding: its C++ sums in another order (a precision here and there 1 ulp apart)
    np.testing.assert_allclose(scores.stats, reference.stats, rtol=0, atol=1e-12)
    np.testing.assert_allclose(scores.precision, reference.eval["precision"], rtol=0, atol=1e-12)
    assert np.array_equal(scores.recall, reference.eval["recall"])


def evaluation_peak(images: int) -> tuple[int, int]:
    """Bytes held after adding ``images`` images of 20 detections, and the peak while scoring them
    (chunks of 1,000 detections), both traced by tracemalloc."""
    gt = ground_truth(synthetic_coco(images, seed=7))
    found = list(detections(gt.dataset, per_image=20, seed=8))
    with CocoEvaluator(gt, "bbox", chunk_detections=1000) as evaluator:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for image_id, cats, scores, boxes in found:
                evaluator.add(image_id, cats, scores, boxes)
            held = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.reset_peak()
            evaluator.evaluate()
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
    return held, peak


def test_detections_are_not_held_in_memory():
    held_few, peak_few = evaluation_peak(50)  # 1,000 detections
    held_many, peak_many = evaluation_peak(200)  # 4,000
    # adding them holds the index of the images, not the detections (4,000 result dicts: some 4 MB)
    assert held_many < 100_000, held_many
    # scoring holds a chunk's result dicts and pycocotools' work on them, and 56 bytes a detection:
    # 3,000 more detections add 0.7 MB to the peak (all in one chunk, as pycocotools alone: 18 MB)
    assert peak_many - peak_few < 3_000_000, (peak_few, peak_many)


def test_bad_detections_are_named(scene):
    gt, found, _ = scene
    image_id, cats, scores, boxes = found[0]
    with CocoEvaluator(gt, ("bbox", "segm")) as evaluator:
        with pytest.raises(ValueError, match="image id 999: not in the ground truth"):
            evaluator.add(999, cats, scores, boxes)
        with pytest.raises(ValueError, match=f"image id {image_id}: 'segm' evaluation needs masks"):
            evaluator.add(image_id, cats, scores, boxes)
        with pytest.raises(ValueError, match=rf"image id {image_id}: masks must be \[25, (480, 640|640, 480)\]"):
            evaluator.add(image_id, cats, scores, boxes, np.zeros((25, 4, 4), dtype=np.uint8))
        with pytest.raises(ValueError, match=r"category ids \[12\] are not in the ground truth"):
            evaluator.add(image_id, np.full(25, 12), scores, boxes)
        with pytest.raises(ValueError, match="scores contain NaN"):
            evaluator.add(image_id, cats, np.full(25, np.nan), boxes)
        with pytest.raises(ValueError, match=r"boxes must be \[25, 4\] finite numbers"):
            evaluator.add(image_id, cats, scores, boxes[:3])
    with CocoEvaluator(gt, "bbox") as evaluator:
        evaluator.add(image_id, cats, scores, boxes)
        with pytest.raises(ValueError, match="its detections were added already"):
            evaluator.add(image_id, cats, scores, boxes)
        with pytest.raises(ValueError, match=r"image_ids not in the ground truth: \[1000\]"):
            evaluator.evaluate([1, 1000])
    with pytest.raises(ValueError, match="backend: 'fast' is not one of pycocotools, faster-coco-eval"):
        CocoEvaluator(gt, "bbox", backend="fast")
    with pytest.raises(ValueError, match="iou_type must be"):
        CocoEvaluator(gt, "keypoints")


def test_json_list_is_written_as_it_comes_and_put_in_place_when_closed(tmp_path):
    path = tmp_path / "out" / "results.json"
    writer = JsonListWriter(path)
    assert not path.parent.exists()  # nothing before the first item
    writer.write({"a": 1.5})
    writer.write({"b": float("nan")})
    assert not path.exists() and len(list(path.parent.iterdir())) == 1  # a temporary file beside it
    assert writer.close() == path
    assert json.loads(path.read_text()) == [{"a": 1.5}, {"b": None}]
    assert list(path.parent.iterdir()) == [path]
    empty = JsonListWriter(tmp_path / "empty.json", head='{"images": [', tail='], "categories": []}')
    assert json.loads(empty.close().read_text()) == {"images": [], "categories": []}
    aborted = JsonListWriter(tmp_path / "aborted.json")
    aborted.write([1])
    aborted.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.json", "out"]
