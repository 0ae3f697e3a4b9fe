"""Where a detector fails: the error analysis behind ``rcnn evaluate --analysis DIR``.

- **Precision-recall curves** per class, read from the COCO evaluation's own precision array
  (``COCOeval.eval["precision"]``: IoU 0.5, 0.75 and the mean over 0.50:0.95; area all, 100
  detections).
- **Confusion matrix** with a background row and column: detections scoring at least
  ``score_thresh``, matched one to one with ground-truth objects of any class at IoU >= 0.5
  (by decreasing score, each to the unmatched object it overlaps most, one of its own class
  first). Row = true class, column = predicted class; the background column counts missed
  objects, the background row detections of nothing.
- **TIDE** (Bolya et al., "TIDE: A General Toolbox for Identifying Object Detection Errors",
  ECCV 2020): every false positive is a *classification* error (IoU >= t_f with an object of
  another class), a *localisation* error (t_b <= IoU < t_f with an object of its class), *both*
  (t_b <= IoU < t_f with an object of another class only), a *duplicate* (IoU >= t_f with an
  object of its class already detected) or *background* (IoU < t_b with everything); an object
  that no detection finds or nearly finds is *missed*. Each error type's dAP is the AP@0.5 gained
  when an oracle fixes all errors of that type and nothing else (t_f = 0.5, t_b = 0.1, as TIDE).
- **Worst images**: the most missed objects and the most false-positive score mass, drawn with
  the ground truth beside the predictions.

Shape shorthand:
    D: detections of an image;  G: ground-truth objects of an image;  K: foreground classes
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval

from rcnn.core.boxes import box_iou
from rcnn.data.records import DetectionDataset
from rcnn.evaluation.coco import _results_coco, coco_results
from rcnn.evaluation.outputs import Detections, prepare_predictions
from rcnn.io.files import atomic_write, write_json, write_text

__all__ = [
    "ERROR_TYPES",
    "ImageErrors",
    "TideResult",
    "analyse",
    "confusion_matrix",
    "tide_errors",
    "worst_images",
]

FOREGROUND_IOU = 0.5  # t_f: a detection is right at IoU >= 0.5 (PASCAL VOC, TIDE)
BACKGROUND_IOU = 0.1  # t_b: below this a detection overlaps nothing (TIDE)
ERROR_TYPES = ("classification", "localisation", "both", "duplicate", "background", "missed")
_RECALLS = np.linspace(0.0, 1.0, 101)  # COCO's 101 recall thresholds


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[D, 4] x [G, 4] -> [D, G]`` IoU (the library's box_iou)."""
    return box_iou(torch.from_numpy(np.asarray(a, dtype=np.float64).reshape(-1, 4)),
                   torch.from_numpy(np.asarray(b, dtype=np.float64).reshape(-1, 4))).numpy()  # fmt: skip


@dataclass
class _Truth:
    boxes: np.ndarray  # [G, 4]
    labels: np.ndarray  # [G]
    crowd: np.ndarray  # [G] bool: crowd / difficult objects, neither right nor wrong to detect


def _truth(dataset: DetectionDataset, image_id: int) -> _Truth:
    ann = dataset.annotation(dataset.index_of(image_id))
    crowd = ann["iscrowd"].numpy().astype(bool) | ann["difficult"].numpy().astype(bool)
    return _Truth(ann["boxes"].numpy().astype(np.float64), ann["labels"].numpy(), crowd)


def _empty() -> Detections:
    return Detections(np.zeros((0, 4)), np.zeros((0,), dtype=np.int64), np.zeros((0,)))


# -- TIDE -------------------------------------------------------------------------------------


@dataclass
class TideResult:
    """TIDE's numbers: ``ap`` (AP@0.5, mean over classes with objects), ``delta_ap`` (error type ->
    AP@0.5 gained by fixing it), ``counts`` (error type -> how many), and per detection its type."""

    ap: float
    delta_ap: dict[str, float]
    counts: dict[str, int]
    per_class_ap: dict[str, float] = field(default_factory=dict)

    @property
    def dominant(self) -> str:
        """The error type whose fix would add the most AP."""
        return max(ERROR_TYPES, key=lambda t: self.delta_ap[t])


def _average_precision(scores: np.ndarray, correct: np.ndarray, positives: int) -> float:
    """COCO's interpolated AP: precision made monotone, read at 101 recall thresholds."""
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(correct[order])
    fp = np.cumsum(~correct[order])
    recall = tp / positives
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    index = np.searchsorted(recall, _RECALLS, side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in index]))


@dataclass
class _Scored:
    image: int
    score: float
    label: int  # predicted class
    kind: str  # "tp", one of ERROR_TYPES[:5], or "ignored" (a crowd's)
    target: int = -1  # the object found, or that a classification / localisation error is closest to (index in its image)
    target_label: int = -1  # that object's class


def _classify(det: Detections, truth: _Truth) -> tuple[list[tuple[str, int]], np.ndarray]:
    """TIDE's type of each detection (by decreasing score; ``(kind, object index)``) and which
    objects ``[G]`` were detected (true positives)."""
    order = np.argsort(-det.scores, kind="mergesort")[:100]  # COCO's 100 detections per image
    iou = _iou(det.boxes, truth.boxes)  # [D, G]
    same = det.labels[:, None] == truth.labels[None, :]  # [D, G]
    used = np.zeros(len(truth.labels), dtype=bool)
    kinds: list[tuple[str, int]] = [("dropped", -1)] * len(det.labels)
    real = ~truth.crowd
    for d in order:
        # a true positive: the unused object of its class it overlaps most, at IoU >= t_f
        cand = np.where(same[d] & real & ~used & (iou[d] >= FOREGROUND_IOU), iou[d], -1.0)
        if len(cand) and cand.max() >= 0:
            g = int(cand.argmax())
            used[g] = True
            kinds[d] = ("tp", g)
            continue
        if len(truth.labels) and (iou[d] * (same[d] & truth.crowd)).max(initial=0) >= FOREGROUND_IOU:
            kinds[d] = ("ignored", -1)  # on a crowd of its class: neither right nor wrong
            continue
        own = np.where(same[d] & real, iou[d], 0.0)
        other = np.where(~same[d] & real, iou[d], 0.0)
        if own.max(initial=0) >= FOREGROUND_IOU:
            kinds[d] = ("duplicate", int(own.argmax()))
        elif other.max(initial=0) >= FOREGROUND_IOU:
            kinds[d] = ("classification", int(other.argmax()))
        elif own.max(initial=0) >= BACKGROUND_IOU:
            kinds[d] = ("localisation", int(own.argmax()))
        elif other.max(initial=0) >= BACKGROUND_IOU:
            kinds[d] = ("both", int(other.argmax()))
        else:
            kinds[d] = ("background", -1)
    return kinds, used


def tide_errors(
    detections: Mapping[int, Detections], dataset: DetectionDataset, image_ids: Iterable[int]
) -> TideResult:
    """TIDE's error breakdown (module docstring) of checked ``detections`` on ``dataset``.

    Fixes, as TIDE's oracles: a classification error takes its object's class, a localisation error
    its object's box — each becoming a true positive unless that object is detected already, when
    it is removed; duplicates, background and *both* errors are removed; a missed object is taken
    out of the count of objects to find. AP is AP@0.5 (COCO's 101-point interpolation), the mean
    over classes with objects.
    """
    scored: list[_Scored] = []
    positives = np.zeros(dataset.num_classes, dtype=np.int64)
    missed = np.zeros(dataset.num_classes, dtype=np.int64)
    for image_id in image_ids:
        truth = _truth(dataset, image_id)
        det = detections.get(image_id, _empty())
        kinds, used = _classify(det, truth)
        real = ~truth.crowd
        np.add.at(positives, truth.labels[real], 1)
        near = {g for kind, g in kinds if kind in ("classification", "localisation")}
        for g in np.flatnonzero(real & ~used):
            if int(g) not in near:
                missed[truth.labels[g]] += 1
        for d, (kind, g) in enumerate(kinds):
            if kind == "dropped":
                continue
            target = g if kind in ("tp", "classification", "localisation") else -1
            scored.append(_Scored(image_id, float(det.scores[d]), int(det.labels[d]), kind, target,
                                  int(truth.labels[g]) if target >= 0 else -1))  # fmt: skip
    taken = {(s.image, s.target) for s in scored if s.kind == "tp"}

    def ap(fix: str | None) -> tuple[float, dict[str, float]]:
        per_class: dict[int, tuple[list[float], list[bool]]] = {k: ([], []) for k in range(1, dataset.num_classes)}
        claimed = set(taken)
        for s in sorted(scored, key=lambda s: -s.score):
            kind, label = s.kind, s.label
            if kind == "ignored":
                continue
            if kind == fix:
                if kind in ("duplicate", "background", "both"):
                    continue
                if kind in ("classification", "localisation"):
                    if (s.image, s.target) in claimed:
                        continue  # its object is found already: the fixed detection would be a duplicate
                    claimed.add((s.image, s.target))
                    if kind == "classification":
                        label = s.target_label
                    kind = "tp"
            per_class[label][0].append(s.score)
            per_class[label][1].append(kind == "tp")
        counts = positives - missed if fix == "missed" else positives
        values = {}
        for k, (scores, correct) in per_class.items():
            if positives[k] > 0:
                values[dataset.class_names[k]] = _average_precision(np.array(scores), np.array(correct, dtype=bool),
                                                                    int(counts[k]))  # fmt: skip
        finite = [v for v in values.values() if not np.isnan(v)]
        return (float(np.mean(finite)) if finite else 0.0), values

    base, per_class = ap(None)
    delta = {kind: ap(kind)[0] - base for kind in ERROR_TYPES}
    counts = {kind: sum(1 for s in scored if s.kind == kind) for kind in ERROR_TYPES[:5]}
    counts["missed"] = int(missed.sum())
    return TideResult(base, delta, counts, per_class)


# -- confusion matrix and the worst images ------------------------------------------------------


@dataclass
class ImageErrors:
    """One image's errors at the confusion matrix's threshold."""

    image_id: int
    missed: int  # objects no detection matched
    false_positive_mass: float  # the summed scores of detections that matched nothing
    matched: int

    @property
    def badness(self) -> float:
        return self.missed + self.false_positive_mass


def _match_any_class(det: Detections, truth: _Truth, score_thresh: float) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """One-to-one matches ``(d, g)`` at IoU >= 0.5 regardless of class, the unmatched detections'
    mask ``[D]`` and the unmatched objects' mask ``[G]`` (crowd objects are never counted)."""
    keep = det.scores >= score_thresh
    iou = _iou(det.boxes, truth.boxes)  # [D, G]
    used = truth.crowd.copy()
    unmatched = keep.copy()
    pairs = []
    for d in np.argsort(-det.scores, kind="mergesort"):
        if not keep[d]:
            continue
        free = ~used & (iou[d] >= FOREGROUND_IOU) if len(truth.labels) else np.zeros(0, dtype=bool)
        if free.any():
            own = free & (truth.labels == det.labels[d])
            pool = own if own.any() else free
            g = int(np.where(pool, iou[d], -1.0).argmax())
            used[g] = True
            unmatched[d] = False
            pairs.append((int(d), g))
        elif len(truth.labels) and (iou[d] * truth.crowd).max(initial=0) >= FOREGROUND_IOU:
            unmatched[d] = False  # on a crowd: not counted
    return pairs, unmatched, ~used


def confusion_matrix(
    detections: Mapping[int, Detections], dataset: DetectionDataset, image_ids: Iterable[int], score_thresh: float = 0.5
) -> tuple[np.ndarray, list[ImageErrors]]:
    """``[K + 1, K + 1]`` counts (row: true class, column: predicted; index 0 the background) and each
    image's :class:`ImageErrors`."""
    matrix = np.zeros((dataset.num_classes, dataset.num_classes), dtype=np.int64)
    per_image = []
    for image_id in image_ids:
        truth = _truth(dataset, image_id)
        det = detections.get(image_id, _empty())
        pairs, unmatched, missed = _match_any_class(det, truth, score_thresh)
        for d, g in pairs:
            matrix[truth.labels[g], det.labels[d]] += 1
        np.add.at(matrix, (0, det.labels[unmatched]), 1)
        np.add.at(matrix, (truth.labels[missed], 0), 1)
        per_image.append(ImageErrors(image_id, int(missed.sum()), float(det.scores[unmatched].sum()), len(pairs)))
    return matrix, per_image


def worst_images(per_image: Sequence[ImageErrors], count: int = 8) -> list[ImageErrors]:
    """The ``count`` images with the most missed objects plus false-positive score mass (ties by id)."""
    ranked = sorted((e for e in per_image if e.badness > 0), key=lambda e: (-e.badness, e.image_id))
    return ranked[:count]


# -- COCO precision and the files ----------------------------------------------------------------


def _coco_precision(detections: Mapping[int, Detections], dataset: DetectionDataset, ids: list[int]) -> tuple[np.ndarray, list[int]]:
    """pycocotools' ``precision [T, R, K, A, M]`` and its category ids."""
    gt = dataset.coco
    coco_eval = COCOeval(gt, _results_coco(gt, coco_results(detections, dataset, "bbox")), "bbox")
    coco_eval.params.imgIds = ids
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval.eval["precision"], list(coco_eval.params.catIds)


def _figure_path(fig, path: Path) -> Path:  # noqa: ANN001 - a matplotlib figure
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _plot_pr(precision: np.ndarray, cat_ids: list[int], dataset: DetectionDataset, path: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [dataset.class_names[dataset.cat_id_to_label[c]] for c in cat_ids]
    ncols = min(4, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.2 * nrows), squeeze=False)
    curves: dict[str, Any] = {}
    for k, name in enumerate(names):
        ax = axes[k // ncols][k % ncols]
        rows = {"IoU 0.50": precision[0, :, k, 0, -1], "IoU 0.75": precision[5, :, k, 0, -1]}
        mean = precision[:, :, k, 0, -1]
        rows["IoU 0.50:0.95"] = np.where((mean > -1).all(axis=0), mean.mean(axis=0), -1)
        curves[name] = {}
        for label, p in rows.items():
            valid = p > -1
            ap = float(p[valid].mean()) if valid.any() else float("nan")
            curves[name][label] = ap
            ax.plot(_RECALLS[valid], p[valid], label=f"{label}: AP {ap:.3f}")
        ax.set_title(name)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    for k in range(len(names), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    _figure_path(fig, path)
    plt.close(fig)
    return curves


def _plot_confusion(matrix: np.ndarray, names: list[str], score_thresh: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [*names[1:], "background"]
    order = [*range(1, len(names)), 0]  # background last
    shown = matrix[np.ix_(order, order)]
    rows = shown.sum(axis=1, keepdims=True)
    fraction = np.divide(shown, rows, out=np.zeros(shown.shape), where=rows > 0)
    size = 1.6 + 0.55 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if i == j == len(labels) - 1:
                continue
            ax.text(j, i, str(shown[i, j]), ha="center", va="center",
                    color="white" if fraction[i, j] > 0.5 else "black", fontsize=9)  # fmt: skip
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"detections scoring >= {score_thresh:g}, IoU >= {FOREGROUND_IOU}")
    fig.colorbar(image, ax=ax, label="fraction of the row")
    _figure_path(fig, path)
    plt.close(fig)


def _plot_tide(tide: TideResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    values = [100 * tide.delta_ap[t] for t in ERROR_TYPES]
    ax.barh(range(len(ERROR_TYPES)), values, color="#00538a")
    for i, (t, v) in enumerate(zip(ERROR_TYPES, values)):
        ax.text(v, i, f" {v:.1f}  ({tide.counts[t]})", va="center", fontsize=9)
    ax.set_yticks(range(len(ERROR_TYPES)), ERROR_TYPES)
    ax.invert_yaxis()
    ax.set_xlabel("AP@0.5 points gained if fixed (count of errors)")
    ax.set_title(f"TIDE error breakdown: AP@0.5 = {100 * tide.ap:.1f}")
    ax.set_xlim(0, max(values + [1.0]) * 1.3)
    _figure_path(fig, path)
    plt.close(fig)


def _draw_worst(
    worst: Sequence[ImageErrors], detections: Mapping[int, Detections], dataset: DetectionDataset,
    score_thresh: float, path: Path, side: int = 420,
) -> None:  # fmt: skip
    from PIL import Image, ImageDraw

    from rcnn.io.images import read_image
    from rcnn.viz import draw_detections, save_grid, to_pil

    tiles = []
    for errors in worst:
        index = dataset.index_of(errors.image_id)
        decoded = read_image(dataset.image_path(index), fit=(side, side))
        height, width = decoded.original_size
        scale = side / max(height, width)  # every picture as large: the longer side `side` pixels
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        picture = to_pil(decoded.image).resize(size, Image.BILINEAR)
        factor = np.array([size[0] / width, size[1] / height] * 2)
        truth = _truth(dataset, errors.image_id)
        det = detections.get(errors.image_id, _empty())
        gt_picture = draw_detections(picture, {"boxes": truth.boxes * factor, "labels": truth.labels},
                                     dataset.class_names)  # fmt: skip
        pred_picture = draw_detections(picture, {"boxes": det.boxes * factor, "labels": det.labels,
                                                 "scores": det.scores}, dataset.class_names, score_thresh)  # fmt: skip
        name = dataset.image_path(index).name
        for picture, text in ((gt_picture, f"{name}: ground truth"),
                              (pred_picture, f"missed {errors.missed}, false-positive mass {errors.false_positive_mass:.2f}")):  # fmt: skip
            draw = ImageDraw.Draw(picture)
            left, top, right, bottom = draw.textbbox((0, 0), text)
            draw.rectangle((0, picture.height - (bottom - top) - 6, right - left + 6, picture.height), fill=(0, 0, 0))
            draw.text((3 - left, picture.height - (bottom - top) - 3 - top), text, fill=(255, 255, 255))
            tiles.append(picture)
    if tiles:
        save_grid(tiles, path, ncols=2)


def analyse(
    predictions: Mapping[int, Mapping[str, Any]],
    dataset: DetectionDataset,
    out: str | os.PathLike,
    *,
    image_ids: Iterable[int] | None = None,
    score_thresh: float = 0.5,
    worst: int = 8,
) -> dict[str, Any]:
    """Write the analysis of ``predictions`` on ``dataset`` into folder ``out`` and return its numbers.

    Files: ``pr_curves.png``, ``confusion_matrix.png`` / ``.csv``, ``tide.png``, ``worst_images.png``,
    ``analysis.json`` and ``summary.txt`` (the text also returned under ``"summary"``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids, detections = prepare_predictions(predictions, dataset, image_ids)
    precision, cat_ids = _coco_precision(detections, dataset, ids)
    curves = _plot_pr(precision, cat_ids, dataset, out / "pr_curves.png")
    matrix, per_image = confusion_matrix(detections, dataset, ids, score_thresh)
    _plot_confusion(matrix, dataset.class_names, score_thresh, out / "confusion_matrix.png")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["true \\ predicted", *dataset.class_names[1:], "background"])
    order = [*range(1, dataset.num_classes), 0]
    for i in order:
        writer.writerow([dataset.class_names[i] if i else "background", *(int(matrix[i, j]) for j in order)])
    write_text(out / "confusion_matrix.csv", text.getvalue())
    tide = tide_errors(detections, dataset, ids)
    _plot_tide(tide, out / "tide.png")
    chosen = worst_images(per_image, worst)
    _draw_worst(chosen, detections, dataset, score_thresh, out / "worst_images.png")
    worst_rows = [{"image_id": e.image_id, "file": str(dataset.image_path(dataset.index_of(e.image_id))),
                   "missed": e.missed, "false_positive_mass": round(e.false_positive_mass, 4)} for e in chosen]  # fmt: skip
    lines = [
        f"analysis of {len(ids)} images -> {out}",
        f"TIDE (AP@0.5 = {100 * tide.ap:.1f}): AP points gained by fixing each error type, and the count:",
        *(f"  {t:<15} {100 * tide.delta_ap[t]:5.1f}   ({tide.counts[t]})" for t in ERROR_TYPES),
        f"  dominant: {tide.dominant}",
        f"confusion (score >= {score_thresh:g}): {int(np.trace(matrix[1:, 1:]))} right, "
        f"{int(matrix[1:, 1:].sum() - np.trace(matrix[1:, 1:]))} of the wrong class, "
        f"{int(matrix[1:, 0].sum())} missed, {int(matrix[0, 1:].sum())} on background",
        "worst images: " + (", ".join(f"{Path(r['file']).name} (missed {r['missed']}, fp {r['false_positive_mass']:.2f})"
                                      for r in worst_rows[:3]) or "none"),  # fmt: skip
    ]
    summary = "\n".join(lines)
    result = {
        "images": len(ids),
        "score_thresh": score_thresh,
        "tide": {"AP50": tide.ap, "delta_AP": tide.delta_ap, "counts": tide.counts, "dominant": tide.dominant,
                 "per_class_AP50": tide.per_class_ap},  # fmt: skip
        "confusion_matrix": {"classes": ["background", *dataset.class_names[1:]], "counts": matrix.tolist()},
        "pr_curve_AP": curves,
        "worst_images": worst_rows,
        "summary": summary,
    }
    write_json(out / "analysis.json", result)
    write_text(out / "summary.txt", summary + "\n")
    return result
