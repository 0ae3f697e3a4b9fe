"""COCO box and mask AP through pycocotools (or faster-coco-eval), and COCO results files.

``evaluate_coco`` returns, per IoU type, the 12 standard COCO numbers (in 0..1)::

    AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl

plus ``per_class_AP`` (class name -> AP over IoU 0.50:0.95, NaN for a class without ground
truth), and under ``"summary"`` the text pycocotools prints (captured, not printed).
The ground truth is ``dataset.coco``: the validated annotations (clipped boxes; crowd
objects, and VOC difficult objects, are ignored as COCO does for crowds).

At scale (5,000 images of 100 detections, COCO's val set) the detections are not held as Python
objects: :class:`CocoEvaluator` appends each image's detections to a file as fixed-size binary
records (masks as their RLE bytes), then scores them a chunk of images at a time — pycocotools'
own per-image matching (``COCOeval.evaluate``) on each chunk, its accumulation of precision and
recall over all of them done here on compact arrays, with the same arithmetic, so the numbers are
pycocotools' to the last bit. :class:`CocoDatasetEvaluator` is ``evaluate_coco`` on it for outputs
given one image at a time, as a predictor makes them (``rcnn evaluate``). Results files are streamed
to disk the same way (:class:`JsonListWriter`).

Shape shorthand:
    D: number of detections in an image
    H, W: original image height and width
    T, R, K, A, M: COCO's IoU thresholds (10), recall points (101), categories, area ranges (4)
        and detection limits (1, 10, 100)
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rcnn.data.records import DetectionDataset
from rcnn.evaluation.outputs import Detections, _check_one, prepare_predictions
from rcnn.io.files import dumps_json

__all__ = [
    "BACKENDS",
    "COCO_STAT_NAMES",
    "CocoDatasetEvaluator",
    "CocoEvaluator",
    "CocoScores",
    "JsonListWriter",
    "check_backend",
    "coco_results",
    "evaluate_coco",
    "result_entries",
    "write_coco_results",
]

# The order of COCOeval.stats (pycocotools' summarize()).
COCO_STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip
IOU_TYPES = ("bbox", "segm")
# Who matches detections to the ground truth: pycocotools (the reference, by chunks of images in
# bounded memory) or faster-coco-eval (its C++ evaluation, same numbers, all images at once).
BACKENDS = ("pycocotools", "faster-coco-eval")
FASTER_COCO_EVAL = "faster-coco-eval==1.8.0"
# Detections turned into pycocotools' Python objects at a time (about 1 KB each there).
CHUNK_DETECTIONS = 20_000

# One detection on disk: its category, score, box (x, y, width, height) and where its mask's RLE
# bytes are in the masks file (offset, length; -1 without a mask).
_RECORD = np.dtype([("category_id", "<i8"), ("score", "<f8"), ("bbox", "<f8", (4,)), ("mask", "<i8", (2,))])


def result_entries(
    image_id: int,
    boxes: np.ndarray | None,
    labels: np.ndarray,
    scores: np.ndarray,
    category_ids: Mapping[int, int],
    masks: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """COCO results entries of one image: ``boxes [D, 4]`` (x1, y1, x2, y2; ``None``: none written),
    ``labels [D]`` mapped to category ids by ``category_ids``, ``scores [D]`` and optional binary
    ``masks [D, H, W]`` (written as compressed RLE)."""
    rles = []
    if masks is not None and len(labels):
        rles = mask_utils.encode(np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0)))  # [H, W, D] -> D RLEs
    results = []
    for j in range(len(labels)):
        result: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": int(category_ids[int(labels[j])]),
            "score": float(scores[j]),
        }
        if boxes is not None:
            x1, y1, x2, y2 = (float(v) for v in boxes[j])
            result["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        if masks is not None:
            result["segmentation"] = {"size": rles[j]["size"], "counts": rles[j]["counts"].decode("ascii")}
        results.append(result)
    return results


def _results_for_image(
    image_id: int, det: Detections, dataset: DetectionDataset, with_boxes: bool, with_masks: bool
) -> list[dict[str, Any]]:
    return result_entries(
        image_id, det.boxes if with_boxes else None, det.labels, det.scores, dataset.label_to_cat_id,
        det.masks if with_masks else None,
    )  # fmt: skip


def coco_results(
    detections: Mapping[int, Detections], dataset: DetectionDataset, iou_type: str | None = None
) -> list[dict[str, Any]]:
    """COCO results entries (category ids mapped back) for checked ``detections``.

    ``iou_type`` ``"bbox"`` gives boxes only, ``"segm"`` masks only, ``None`` both (masks when
    the detections have them).
    """
    results = []
    for image_id, det in detections.items():
        with_masks = iou_type == "segm" or (iou_type is None and det.masks is not None)
        if with_masks and det.masks is None:
            raise ValueError(f"predictions[{image_id}]: 'segm' evaluation needs 'masks' in every output")
        results += _results_for_image(image_id, det, dataset, iou_type != "segm", with_masks)
    return results


def _results_coco(gt: COCO, results: list[dict[str, Any]]) -> COCO:
    """A pycocotools results object; an empty one when there are no detections at all."""
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            return gt.loadRes(results)
        empty = COCO()
        empty.dataset = {"images": list(gt.dataset["images"]), "categories": gt.dataset["categories"], "annotations": []}
        empty.createIndex()
        return empty


@dataclass
class CocoScores:
    """COCO evaluation of one IoU type, as pycocotools' ``COCOeval`` leaves it after ``summarize()``."""

    stats: np.ndarray  # [12] in the order of COCO_STAT_NAMES
    precision: np.ndarray  # [T, R, K, A, M]; -1 where undefined
    recall: np.ndarray  # [T, K, A, M]; -1 where undefined
    cat_ids: list[int]  # [K] the categories, in the order of the K axis
    summary: str  # the lines pycocotools prints


class CocoEvaluator:
    """COCO AP of detections given image by image, holding a chunk of them as Python objects at most.

    :meth:`add` appends an image's detections to files in a temporary folder (``folder``: where to
    make it; default: the system's), 64 bytes a detection, masks as their RLE bytes: only an index
    of the images stays in memory; scoring holds a chunk's detections as pycocotools' objects and
    28 bytes of each detection scored. :meth:`evaluate` scores them per IoU type (``"bbox"``,
    ``"segm"``) against the ground truth ``gt`` (a ``pycocotools.coco.COCO``), with ``backend``:

    - ``"pycocotools"``: the images in chunks of about ``chunk_detections`` detections, each
      matched by ``COCOeval.evaluate``; precision and recall accumulated over the chunks here, with
      pycocotools' arithmetic (the numbers are its own, bit for bit; the tests check it);
    - ``"faster-coco-eval"`` (``pip install faster-coco-eval``): its C++ ``COCOeval_faster`` on all
      images at once — faster, with the memory of all the detections as Python objects.

    Use it as a context manager (or call :meth:`close`): the temporary folder is removed.
    """

    def __init__(
        self,
        gt: COCO,
        iou_types: str | Sequence[str] = ("bbox",),
        *,
        backend: str = "pycocotools",
        folder: str | os.PathLike | None = None,
        chunk_detections: int = CHUNK_DETECTIONS,
    ) -> None:
        self.iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
        if not self.iou_types or any(t not in IOU_TYPES for t in self.iou_types):
            raise ValueError(f"iou_type must be 'bbox', 'segm' or both, got {iou_types!r}")
        check_backend(backend)  # installed, or a clear error before any work
        if chunk_detections < 1:
            raise ValueError(f"chunk_detections must be at least 1, got {chunk_detections}")
        self.gt, self.backend, self.chunk_detections = gt, backend, chunk_detections
        self.cat_ids = np.array(sorted(gt.getCatIds()), dtype=np.int64)
        self._folder = tempfile.TemporaryDirectory(prefix="rcnn_coco_", dir=folder)
        self._paths = (Path(self._folder.name) / "detections.bin", Path(self._folder.name) / "masks.bin")
        self._records = self._paths[0].open("wb")
        self._masks = self._paths[1].open("wb")
        self._index: dict[int, tuple[int, int]] = {}  # image id -> (first record, number of records)
        self._count = self._mask_bytes = 0

    def __enter__(self) -> CocoEvaluator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary folder."""
        self._records.close()
        self._masks.close()
        self._folder.cleanup()

    def __len__(self) -> int:
        """Detections added."""
        return self._count

    def add(
        self,
        image_id: int,
        category_ids: np.ndarray,
        scores: np.ndarray,
        boxes: np.ndarray | None = None,
        masks: np.ndarray | None = None,
    ) -> None:
        """The detections of image ``image_id``: ``category_ids [D]`` (the ground truth's ids),
        ``scores [D]``, ``boxes [D, 4]`` (x1, y1, x2, y2 in the image's pixels; needed for
        ``"bbox"``) and binary ``masks [D, H, W]`` (needed for ``"segm"``). Each image once."""
        image_id = int(image_id)
        where = f"image id {image_id}"
        info = self.gt.imgs.get(image_id)
        if info is None:
            raise ValueError(f"{where}: not in the ground truth")
        if image_id in self._index:
            raise ValueError(f"{where}: its detections were added already")
        category_ids, scores = np.asarray(category_ids, dtype=np.int64), np.asarray(scores, dtype=np.float64)
        count = len(scores)
        if category_ids.shape != (count,):
            raise ValueError(f"{where}: {len(category_ids)} category ids for {count} scores")
        if count and not np.isin(category_ids, self.cat_ids).all():
            unknown = sorted(set(category_ids.tolist()) - set(self.cat_ids.tolist()))
            raise ValueError(f"{where}: category ids {unknown[:10]} are not in the ground truth")
        if not np.isfinite(scores).all():
            raise ValueError(f"{where}: scores contain NaN or infinite values")
        records = np.zeros(count, dtype=_RECORD)
        records["category_id"], records["score"], records["mask"] = category_ids, scores, -1
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
            if len(boxes) != count or not np.isfinite(boxes).all():
                raise ValueError(f"{where}: boxes must be [{count}, 4] finite numbers, got {list(boxes.shape)}")
            records["bbox"] = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)  # x, y, w, h
        elif "bbox" in self.iou_types:
            raise ValueError(f"{where}: 'bbox' evaluation needs boxes")
        if masks is not None:
            masks = np.asarray(masks)
            size = (int(info["height"]), int(info["width"]))
            if masks.shape != (count, *size):
                raise ValueError(f"{where}: masks must be [{count}, {size[0]}, {size[1]}], got {list(masks.shape)}")
            if count:
                rles = mask_utils.encode(np.asfortranarray((masks > 0).astype(np.uint8).transpose(1, 2, 0)))  # D RLEs
                for j, rle in enumerate(rles):
                    records["mask"][j] = (self._mask_bytes, len(rle["counts"]))
                    self._masks.write(rle["counts"])
                    self._mask_bytes += len(rle["counts"])
        elif "segm" in self.iou_types:
            raise ValueError(f"{where}: 'segm' evaluation needs masks")
        records.tofile(self._records)
        self._index[image_id] = (self._count, count)
        self._count += count

    def evaluate(self, image_ids: Iterable[int] | None = None) -> dict[str, CocoScores]:
        """The scores of each IoU type on ``image_ids`` (default: every image of the ground truth;
        an image without detections added has none; detections of other images are not scored)."""
        ids = sorted(self.gt.getImgIds()) if image_ids is None else sorted({int(i) for i in image_ids})
        missing = [i for i in ids if i not in self.gt.imgs]
        if missing:
            raise ValueError(f"image_ids not in the ground truth: {missing[:10]}")
        self._records.flush()
        self._masks.flush()
        scores = {}
        # (read back image by image into ordinary memory: a memory map would count the whole file in)
        with self._paths[0].open("rb") as records, self._paths[1].open("rb") as masks:
            for kind in self.iou_types:
                if self.backend == "faster-coco-eval":
                    scores[kind] = self._faster(kind, ids, records, masks)
                else:
                    scores[kind] = self._pycocotools(kind, ids, records, masks)
        return scores

    def _results(self, kind: str, ids: Sequence[int], records: BinaryIO, masks: BinaryIO) -> list[dict[str, Any]]:
        """pycocotools' results entries of ``ids`` (boxes for ``"bbox"``, masks for ``"segm"``)."""
        results = []
        for image_id in ids:
            first, count = self._index.get(image_id, (0, 0))
            records.seek(first * _RECORD.itemsize)
            rows = np.frombuffer(records.read(count * _RECORD.itemsize), dtype=_RECORD)
            info = self.gt.imgs[image_id]
            size = [int(info["height"]), int(info["width"])]
            for category, score, bbox, (offset, length) in zip(
                rows["category_id"].tolist(), rows["score"].tolist(), rows["bbox"].tolist(), rows["mask"].tolist()
            ):
                entry: dict[str, Any] = {"image_id": image_id, "category_id": category, "score": score}
                if kind == "bbox":
                    entry["bbox"] = bbox
                else:
                    masks.seek(offset)
                    entry["segmentation"] = {"size": size, "counts": masks.read(length)}
                results.append(entry)
        return results

    def _chunks(self, ids: Sequence[int]) -> Iterator[list[int]]:
        """``ids`` (sorted) in consecutive runs of about ``chunk_detections`` detections."""
        chunk: list[int] = []
        held = 0
        for image_id in ids:
            chunk.append(image_id)
            held += self._index.get(image_id, (0, 0))[1]
            if held >= self.chunk_detections:
                yield chunk
                chunk, held = [], 0
        if chunk:
            yield chunk

    def _pycocotools(self, kind: str, ids: list[int], records: BinaryIO, masks: BinaryIO) -> CocoScores:
        accumulation = _Accumulation(len(self.cat_ids))
        for chunk in self._chunks(ids):
            coco_eval = COCOeval(self.gt, _results_coco(self.gt, self._results(kind, chunk, records, masks)), kind)
            coco_eval.params.imgIds = chunk
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval.evaluate()
            accumulation.add(coco_eval)
        final = COCOeval(self.gt, iouType=kind)
        final.params.imgIds = ids
        final.eval = accumulation.result(final.params)
        return _summarized(final)

    def _faster(self, kind: str, ids: list[int], records: BinaryIO, masks: BinaryIO) -> CocoScores:
        faster_coco, faster_eval = _faster_coco_eval()
        with contextlib.redirect_stdout(io.StringIO()):
            gt = faster_coco(self.gt.dataset)
            results = self._results(kind, ids, records, masks)
            for entry in results:  # (its RLE reader takes text)
                if "segmentation" in entry:
                    entry["segmentation"]["counts"] = entry["segmentation"]["counts"].decode("ascii")
            if results:
                dt = gt.loadRes(results)
            else:
                dt = faster_coco({"images": list(gt.dataset["images"]), "categories": gt.dataset["categories"],
                                  "annotations": []})  # fmt: skip
            del results
            coco_eval = faster_eval(gt, dt, kind)
            coco_eval.params.imgIds = ids
            coco_eval.evaluate()
            coco_eval.accumulate()
        return _summarized(coco_eval)


def _faster_coco_eval() -> tuple[Any, Any]:
    """faster-coco-eval's ``COCO`` and ``COCOeval_faster``; a clear error where it is not installed."""
    try:
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        raise ValueError(
            f"the COCO evaluation backend faster-coco-eval is not installed: pip install {FASTER_COCO_EVAL} "
            "(or use the default, pycocotools)"
        ) from None
    return FasterCOCO, COCOeval_faster


def check_backend(backend: str, what: str = "backend") -> str:
    """``backend`` when it is one of :data:`BACKENDS` and can run here, else one ``ValueError`` line
    naming ``what`` (the argument or option): an unknown name, or faster-coco-eval not installed
    (with the command that installs it). Call it before any work that the evaluation would waste."""
    if backend not in BACKENDS:
        raise ValueError(f"{what}: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "faster-coco-eval":
        try:
            _faster_coco_eval()
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
    return backend


def _summarized(coco_eval: Any) -> CocoScores:
    """``coco_eval.summarize()`` (its lines captured) as :class:`CocoScores`."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        coco_eval.summarize()
    lines = "\n".join(line for line in text.getvalue().splitlines() if "Average" in line)
    stats = np.asarray(coco_eval.stats, dtype=np.float64)[: len(COCO_STAT_NAMES)]
    return CocoScores(stats, np.asarray(coco_eval.eval["precision"]), np.asarray(coco_eval.eval["recall"]),
                      [int(c) for c in coco_eval.params.catIds], lines)  # fmt: skip


class _Accumulation:
    """pycocotools' ``COCOeval.accumulate`` over images matched in chunks, on compact arrays.

    ``COCOeval.evaluate`` leaves one entry per (category, area range, image) with the image's
    detections (best first, at most 100): their scores, whether each matched a ground truth at each
    of the T IoU thresholds, whether each is ignored there, and which ground truths are ignored.
    Of those, each category keeps here the scores and each detection's rank in its image (the same
    detections in every area range), each (category, area range) the T match and ignore flags as
    bits and the number of ground truths not ignored — 12 bytes a detection, and 4 per area range —
    in image order, which is the order pycocotools concatenates them in (ties of scores are broken
    by it)."""

    def __init__(self, categories: int) -> None:
        self.categories = categories
        self.ranked: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # k -> per chunk: scores, ranks
        self.flags: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}  # (k, a) -> per chunk
        self.positives: dict[tuple[int, int], int] = {}  # (k, a) -> ground truths not ignored

    def add(self, coco_eval: COCOeval) -> None:
        """The entries of a chunk's ``COCOeval.evaluate()``."""
        params = coco_eval._paramsEval
        images, areas = len(params.imgIds), len(params.areaRng)
        gathered: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for index, entry in enumerate(coco_eval.evalImgs):
            if entry is not None:
                gathered.setdefault((index // (areas * images), index // images % areas), []).append(entry)
        for (k, a), entries in gathered.items():
            if a == 0:  # (an entry is there for every area range or for none)
                counts = np.array([len(e["dtScores"]) for e in entries], dtype=np.int64)
                total = int(counts.sum())
                scores = np.fromiter((s for e in entries for s in e["dtScores"]), dtype=np.float64, count=total)
                rank = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
                self.ranked.setdefault(k, []).append((scores, rank.astype(np.int32)))
            matched = np.concatenate([e["dtMatches"] for e in entries], axis=1) != 0  # [T, D]
            ignored = np.concatenate([e["dtIgnore"] for e in entries], axis=1).astype(bool)  # [T, D]
            self.flags.setdefault((k, a), []).append((_bits(matched), _bits(ignored)))
            positives = int(np.count_nonzero(np.concatenate([np.asarray(e["gtIgnore"]).ravel() for e in entries]) == 0))
            self.positives[(k, a)] = self.positives.get((k, a), 0) + positives

    def result(self, params: Any) -> dict[str, Any]:
        """``COCOeval.eval`` (precision, recall, scores) as pycocotools' ``accumulate`` computes it."""
        thresholds, recall_points = len(params.iouThrs), np.asarray(params.recThrs)
        areas, limits = len(params.areaRng), list(params.maxDets)
        shape = (thresholds, len(recall_points), self.categories, areas, len(limits))
        precision, scores_at = -np.ones(shape), -np.ones(shape)
        recall = -np.ones((thresholds, self.categories, areas, len(limits)))
        for (k, a), parts in self.flags.items():
            positives = self.positives[(k, a)]
            if positives == 0:
                continue
            all_scores = np.concatenate([p[0] for p in self.ranked[k]])
            rank = np.concatenate([p[1] for p in self.ranked[k]])
            matched = _unbits(np.concatenate([p[0] for p in parts]), thresholds)  # [T, D]
            ignored = _unbits(np.concatenate([p[1] for p in parts]), thresholds)
            for m, limit in enumerate(limits):
                keep = rank < limit
                scores = all_scores[keep]
                order = np.argsort(-scores, kind="mergesort")  # pycocotools' (and Matlab's) tie order
                dtm, dt_ignored = matched[:, keep][:, order], ignored[:, keep][:, order]
                tp_sum = np.cumsum(dtm & ~dt_ignored, axis=1).astype(float)  # [T, D]
                fp_sum = np.cumsum(~dtm & ~dt_ignored, axis=1).astype(float)
                found = tp_sum.shape[1]
                recall[:, k, a, m] = tp_sum[:, -1] / positives if found else 0.0
                if not found:
                    precision[:, :, k, a, m] = scores_at[:, :, k, a, m] = 0.0
                    continue
                ranked = scores[order]
                for t in range(thresholds):
                    rc = tp_sum[t] / positives
                    pr = tp_sum[t] / (fp_sum[t] + tp_sum[t] + np.spacing(1))
                    pr = np.maximum.accumulate(pr[::-1])[::-1]  # the precision envelope, from the right
                    at = np.searchsorted(rc, recall_points, side="left")
                    inside = at < found  # beyond the last recall reached: 0, as pycocotools leaves it
                    precision[t, :, k, a, m] = np.where(inside, pr[np.minimum(at, found - 1)], 0.0)
                    scores_at[t, :, k, a, m] = np.where(inside, ranked[np.minimum(at, found - 1)], 0.0)
        return {"params": params, "counts": list(shape), "precision": precision, "recall": recall, "scores": scores_at}


def _bits(flags: np.ndarray) -> np.ndarray:
    """``[T, D]`` bools as ``[D]`` integers, bit t for threshold t."""
    weights = (1 << np.arange(flags.shape[0], dtype=np.int64))[:, None]  # [T, 1]
    return (flags.astype(np.int64) * weights).sum(axis=0).astype(np.uint16 if flags.shape[0] <= 16 else np.int64)


def _unbits(codes: np.ndarray, thresholds: int) -> np.ndarray:
    """The ``[T, D]`` bools of :func:`_bits`."""
    return (codes.astype(np.int64)[None, :] >> np.arange(thresholds, dtype=np.int64)[:, None]) & 1 == 1


def _checked(predictions: Mapping[int, Mapping[str, Any]], dataset: DetectionDataset) -> Iterator[tuple[int, Detections]]:
    """Each image's checked detections in turn (:mod:`rcnn.evaluation.outputs`), after a check that every
    image id of ``predictions`` is the data set's."""
    gt = dataset.coco
    unknown = [i for i in predictions if int(i) not in gt.imgs]
    if unknown:
        raise ValueError(
            f"predictions for image ids not in the data set: {sorted(unknown)[:10]}"
            f"{' ...' if len(unknown) > 10 else ''} (keys must be the data set's image_id)"
        )
    for image_id, output in predictions.items():
        info = gt.imgs[int(image_id)]
        yield int(image_id), _check_one(int(image_id), output, dataset.num_classes, (int(info["height"]), int(info["width"])))


def _check_iou_types(iou_type: str | Sequence[str], dataset: DetectionDataset) -> tuple[str, ...]:
    iou_types = (iou_type,) if isinstance(iou_type, str) else tuple(iou_type)
    if not iou_types or any(t not in IOU_TYPES for t in iou_types):
        raise ValueError(f"iou_type must be 'bbox', 'segm' or both, got {iou_type!r}")
    if "segm" in iou_types and not dataset.with_masks:
        raise ValueError("'segm' evaluation needs a data set built with with_masks=True (ground-truth masks)")
    return iou_types


class CocoDatasetEvaluator:
    """:func:`evaluate_coco` one image at a time: the model outputs of ``dataset``'s images are given
    as they come (:meth:`add`), checked and stored on disk by a :class:`CocoEvaluator`, and scored
    at the end (:meth:`result`, the dict of :func:`evaluate_coco`, the same numbers). Memory holds
    one output at a time, whatever the number of images. The arguments are checked when it is made
    (before any prediction is wasted): ``iou_type``, ground-truth masks for ``"segm"``, ``backend``.
    Use it as a context manager (or call :meth:`close`): its temporary folder is removed."""

    def __init__(
        self, dataset: DetectionDataset, iou_type: str | Sequence[str] = ("bbox",), *, backend: str = "pycocotools"
    ) -> None:
        self.dataset = dataset
        self.iou_types = _check_iou_types(iou_type, dataset)
        self.category_of = np.zeros(dataset.num_classes, dtype=np.int64)  # [K + 1] label -> category id
        for label, cat_id in dataset.label_to_cat_id.items():
            self.category_of[label] = cat_id
        self.evaluator = CocoEvaluator(dataset.coco, self.iou_types, backend=backend)

    def __enter__(self) -> CocoDatasetEvaluator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary folder."""
        self.evaluator.close()

    def add(self, image_id: int, output: Mapping[str, Any]) -> Detections:
        """The model ``output`` of image ``image_id`` (original coordinates; :mod:`rcnn.evaluation.outputs`):
        checked (``ValueError`` naming the image id), stored, and returned as checked :class:`Detections`."""
        info = self.dataset.coco.imgs.get(int(image_id))
        if info is None:
            raise ValueError(f"predictions for image ids not in the data set: [{image_id}] (keys must be the data set's image_id)")  # fmt: skip
        det = _check_one(int(image_id), output, self.dataset.num_classes, (int(info["height"]), int(info["width"])))
        self.add_detections(int(image_id), det)
        return det

    def add_detections(self, image_id: int, det: Detections) -> None:
        """Image ``image_id``'s detections, checked already (:meth:`add` checks them)."""
        segm = "segm" in self.iou_types
        if segm and det.masks is None:
            raise ValueError(f"predictions[{image_id}]: 'segm' evaluation needs 'masks' in every output")
        self.evaluator.add(image_id, self.category_of[det.labels], det.scores, det.boxes, det.masks if segm else None)

    def result(self, image_ids: Iterable[int] | None = None) -> dict[str, Any]:
        """:func:`evaluate_coco`'s result on ``image_ids`` (default: every image of the data set; an
        image without an output added has no detections)."""
        ids, _ = prepare_predictions({}, self.dataset, image_ids)  # (the ids checked)
        evaluated = self.evaluator.evaluate(ids)
        output: dict[str, Any] = {}
        summaries = []
        for kind, scores in evaluated.items():
            numbers: dict[str, Any] = {name: float(v) for name, v in zip(COCO_STAT_NAMES, scores.stats)}
            per_class = {}
            for k, cat_id in enumerate(scores.cat_ids):
                p = scores.precision[:, :, k, 0, -1]  # area "all", 100 detections
                p = p[p > -1]
                per_class[self.dataset.class_names[self.dataset.cat_id_to_label[cat_id]]] = float(p.mean()) if p.size else float("nan")  # fmt: skip
            numbers["per_class_AP"] = per_class
            output[kind] = numbers
            summaries.append(f"{kind}:\n{scores.summary}")
        output["summary"] = "\n".join(summaries)
        return output


def evaluate_coco(
    predictions: Mapping[int, Mapping[str, Any]],
    dataset: DetectionDataset,
    iou_type: str | Sequence[str] = ("bbox",),
    *,
    image_ids: Iterable[int] | None = None,
    backend: str = "pycocotools",
) -> dict[str, Any]:
    """COCO AP of ``predictions`` (image_id -> model output, original coordinates) on ``dataset``.

    ``iou_type`` is ``"bbox"``, ``"segm"`` or both. ``image_ids`` (default: every image of the
    data set) selects the images scored; an image without predictions has no detections.
    ``backend``: ``"pycocotools"`` or ``"faster-coco-eval"`` (:class:`CocoEvaluator`).
    Returns ``{iou_type: {"AP": ..., ..., "ARl": ..., "per_class_AP": {name: AP}}, "summary": str}``.
    Outputs given one image at a time (a predictor's): :class:`CocoDatasetEvaluator`.
    """
    _check_iou_types(iou_type, dataset)
    ids, _ = prepare_predictions({}, dataset, image_ids)  # (the ids checked)
    with CocoDatasetEvaluator(dataset, iou_type, backend=backend) as evaluator:
        for image_id, det in _checked(predictions, dataset):  # checked and stored one image at a time
            evaluator.add_detections(image_id, det)
        return evaluator.result(ids)


class JsonListWriter:
    """A JSON list written item by item, one line each, to a temporary file beside ``path`` that
    :meth:`close` moves onto ``path`` (a reader never sees half a file, as with :mod:`rcnn.io.files`);
    :meth:`abort` removes it. ``head`` and ``tail`` wrap the list (default: a bare list). Nothing is
    written before the first item or :meth:`close`."""

    def __init__(self, path: str | os.PathLike, head: str = "[", tail: str = "]") -> None:
        self.path, self.head, self.tail = Path(path), head, tail
        self.file: io.TextIOWrapper | None = None
        self.tmp: Path | None = None
        self.items = 0

    def _open(self) -> io.TextIOWrapper:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            self.tmp, self.file = Path(name), os.fdopen(fd, "w", encoding="utf-8")
            self.file.write(self.head)
        return self.file

    def write(self, item: Any) -> None:
        """One item (strict JSON: NaN and infinities as ``null``)."""
        self._open().write(("\n" if not self.items else ",\n") + dumps_json(item, indent=None))
        self.items += 1

    def close(self) -> Path:
        """End the list and put the file in place; returns ``path``."""
        file = self._open()
        try:
            file.write(("\n" if self.items else "") + self.tail + "\n")
            file.close()
            os.replace(self.tmp, self.path)  # type: ignore[arg-type]
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Remove what was written; ``path`` is left as it was."""
        if self.file is not None:
            self.file.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


def write_coco_results(
    predictions: Mapping[int, Mapping[str, Any]], dataset: DetectionDataset, path: str | os.PathLike
) -> Path:
    """Write ``predictions`` as a COCO results JSON file (atomically, one image at a time) and return its path.

    Each entry has ``image_id``, ``category_id`` (the data set's own ids), ``score``,
    ``bbox`` ``[x, y, width, height]`` and, when the outputs have masks, ``segmentation`` (RLE).
    """
    writer = JsonListWriter(path)
    try:
        for image_id, det in _checked(predictions, dataset):
            for entry in coco_results({image_id: det}, dataset):
                writer.write(entry)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
