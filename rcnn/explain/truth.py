"""Ground truth of one image, and where a detector lost each object it missed.

:func:`load_ground_truth` reads the annotation of one image from a COCO json (matched by the
image's file name), a Pascal VOC / LabelImg XML file, or a small JSON
``{"boxes": [[x1, y1, x2, y2], ...], "labels": [name or label, ...]}``; :func:`dataset_ground_truth`
takes it from an image of a data set.

:func:`analyse_errors` follows every ground-truth object through the stages of the seed's
pipeline — proposals, class scores, per-class NMS, the score threshold — and names the first one
at which it was lost; every false positive is called a duplicate, a localisation error, a
confusion with another class or background (the categories of Hoiem et al.'s error analysis).

Shape shorthand:
    G: ground-truth objects;  P: proposals;  K: foreground classes;  D: detections
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rcnn.core.boxes import box_iou, check_boxes

__all__ = ["ErrorAnalysis", "GroundTruth", "analyse_errors", "dataset_ground_truth", "load_ground_truth"]

MATCH_IOU = 0.5  # a detection or proposal covers an object at IoU >= 0.5 (PASCAL VOC's criterion)
LOCALISATION_IOU = 0.1  # below this a false positive has nothing to do with any object: background


@dataclass
class GroundTruth:
    """The objects of one image: ``boxes [G, 4]`` (x1, y1, x2, y2, original pixels), ``labels [G]`` in 1..K."""

    boxes: Tensor
    labels: Tensor
    source: str = ""


def _label_of(value: Any, class_names: Sequence[str], where: str) -> int:
    """A label in 1..K from a class name or an integer label."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: a label must be a class name or an integer in 1..{len(class_names) - 1}, got {value!r}")
    if isinstance(value, int):
        if not 1 <= value < len(class_names):
            raise ValueError(f"{where}: label {value} outside 1..{len(class_names) - 1} (the model's classes)")
        return value
    if isinstance(value, str):
        if value in class_names[1:]:
            return list(class_names).index(value)
        raise ValueError(f"{where}: class {value!r} is not one of the model's classes {list(class_names[1:])}")
    raise ValueError(f"{where}: a label must be a class name or an integer, got {type(value).__name__}")


def _ground_truth(boxes: list[list[float]], labels: list[int], source: str) -> GroundTruth:
    box_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    check_boxes(box_t, f"{source}: boxes")
    return GroundTruth(box_t, torch.tensor(labels, dtype=torch.int64), source)


def _from_coco(data: dict[str, Any], path: Path, image_name: str | None, class_names: Sequence[str]) -> GroundTruth:
    if not image_name:
        raise ValueError(f"{path}: a COCO file describes many images; give the image's file name to pick one")
    name = Path(image_name).name
    images = [im for im in data.get("images", []) if Path(str(im.get("file_name", ""))).name == name]
    if not images:
        raise ValueError(f"{path}: no image with file_name {name!r} among its {len(data.get('images', []))} images")
    image_id = images[0]["id"]
    categories = {c["id"]: c["name"] for c in data.get("categories", [])}
    boxes, labels = [], []
    for ann in data.get("annotations", []):
        if ann.get("image_id") != image_id or ann.get("iscrowd", 0):
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes.append([x, y, x + w, y + h])
        category = ann.get("category_id")
        labels.append(_label_of(categories.get(category, category), class_names, f"{path}: annotation {ann.get('id')}"))
    return _ground_truth(boxes, labels, f"{path} ({name})")


def _from_voc(path: Path, class_names: Sequence[str]) -> GroundTruth:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{path}: not a readable XML file ({exc})") from None
    boxes, labels = [], []
    for i, obj in enumerate(root.iter("object")):
        name, box = obj.findtext("name"), obj.find("bndbox")
        if name is None or box is None:
            raise ValueError(f"{path}: object {i} needs <name> and <bndbox>")
        try:
            # VOC's pixel indices are 1-based and inclusive: [xmin - 1, xmax] in continuous coordinates
            x1, y1, x2, y2 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"{path}: object {i}: <bndbox> needs numeric xmin, ymin, xmax, ymax") from None
        boxes.append([x1 - 1, y1 - 1, x2, y2])
        labels.append(_label_of(name.strip(), class_names, f"{path}: object {i}"))
    return _ground_truth(boxes, labels, str(path))


def load_ground_truth(
    path: str | os.PathLike, class_names: Sequence[str], image_name: str | None = None
) -> GroundTruth:
    """The objects of one image from an annotation file (see the module doc).

    ``class_names`` are the model's (index = label, 0 the background); names in the file are
    matched against them. ``image_name`` picks the image of a COCO file (its file name).
    Raises ``FileNotFoundError`` / ``ValueError`` naming the file and the entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ground-truth file not found")
    if path.suffix.lower() == ".xml":
        return _from_voc(path, class_names)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON file ({exc}); give a COCO json, a VOC xml or {{'boxes', 'labels'}}") from None
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return _from_coco(data, path, image_name, class_names)
    if isinstance(data, dict) and "boxes" in data:
        boxes, labels = data["boxes"], data.get("labels")
        if not isinstance(boxes, list) or not isinstance(labels, list) or len(labels) != len(boxes):
            raise ValueError(f"{path}: 'boxes' and 'labels' must be lists of the same length")
        if any(not isinstance(b, list) or len(b) != 4 for b in boxes):
            raise ValueError(f"{path}: each box must be [x1, y1, x2, y2]")
        return _ground_truth(
            [[float(v) for v in b] for b in boxes],
            [_label_of(v, class_names, f"{path}: labels[{i}]") for i, v in enumerate(labels)],
            str(path),
        )
    raise ValueError(f"{path}: expected a COCO json (images, annotations), a VOC xml or {{'boxes': [...], 'labels': [...]}}")


def dataset_ground_truth(dataset: Any, index: int, class_names: Sequence[str]) -> tuple[Path, GroundTruth]:
    """The image file and the objects of ``dataset[index]`` (a :class:`rcnn.data.records.DetectionDataset`),
    its labels mapped onto the model's ``class_names`` by name."""
    if not 0 <= index < len(dataset):
        raise ValueError(f"index {index} outside the data set's {len(dataset)} images")
    ann = dataset.annotation(index)
    labels = [_label_of(dataset.class_names[int(v)], class_names, f"data set image {index}") for v in ann["labels"]]
    boxes = torch.as_tensor(ann["boxes"], dtype=torch.float32).reshape(-1, 4).tolist()
    return dataset.image_path(index), _ground_truth(boxes, labels, f"data set image {index}")


@dataclass
class ErrorAnalysis:
    """Per ground-truth object its fate, per false positive its kind (see :func:`analyse_errors`)."""

    objects: list[dict[str, Any]] = field(default_factory=list)  # G entries: index, label, found, stage, detail
    false_positives: list[dict[str, Any]] = field(default_factory=list)  # detection, label, score, kind, iou
    true_positives: list[int] = field(default_factory=list)  # detection indices matched to an object

    @property
    def missed(self) -> list[dict[str, Any]]:
        return [o for o in self.objects if not o["found"]]


def _best(values: Tensor) -> tuple[float, int]:
    if values.numel() == 0:
        return 0.0, -1
    best, where = values.max(dim=0)
    return float(best), int(where)


def analyse_errors(
    gt: GroundTruth,
    proposals: Tensor,
    class_boxes: Tensor,
    class_scores: Tensor,
    candidate_thresh: float,
    kept: tuple[Tensor, Tensor],
    detections: dict[str, Tensor],
    score_thresh: float,
    class_names: Sequence[str],
) -> ErrorAnalysis:
    """Where each object was lost, and what each false positive is.

    Args (all in original image pixels):
        gt: the image's objects.
        proposals: ``[P, 4]`` the regions the classifier scored.
        class_boxes: ``[P, K, 4]`` each region's box per class (its deltas applied), or ``[P, 4]``
            when the classes share the region's box (R-CNN scores the proposal boxes).
        class_scores: ``[P, K]`` each region's score per class.
        candidate_thresh: the post-processing's score threshold (candidates for NMS score above it).
        kept: ``(rows [D'], labels [D'])`` the (region, class) pairs that survived per-class NMS.
        detections: the final ``boxes [D, 4]``, ``labels [D]``, ``scores [D]``.
        score_thresh: detections scoring at least this count (the display threshold).

    An object is found when a detection of its class above ``score_thresh`` covers it at IoU >= 0.5
    (greedy matching by decreasing score, as PASCAL VOC). Otherwise the first stage that lost it:
    ``"no proposal"`` (no region at IoU >= 0.5), ``"wrong class"`` (a detection of another class
    covers it), ``"suppressed by NMS"`` (a candidate of its class covered it and scored above the
    threshold but did not survive NMS or the per-image cap), ``"moved by box regression"`` (it
    survived NMS, but its final box no longer covers the object: R-CNN regresses after NMS), or
    ``"scored below the threshold"``.
    """
    analysis = ErrorAnalysis()
    keep = detections["scores"] >= score_thresh
    order = keep.nonzero().flatten()
    order = order[detections["scores"][order].argsort(descending=True, stable=True)]
    det_boxes, det_labels, det_scores = detections["boxes"], detections["labels"], detections["scores"]
    iou_det = box_iou(det_boxes, gt.boxes) if len(gt.boxes) and len(det_boxes) else torch.zeros((len(det_boxes), len(gt.boxes)))
    matched_by = [-1] * len(gt.boxes)
    for d in order.tolist():
        free = torch.tensor([m < 0 for m in matched_by], dtype=torch.bool)
        candidates = (gt.labels == det_labels[d]) & free  # [G] unmatched objects of the detection's class
        best, g = _best(torch.where(candidates, iou_det[d], torch.full_like(iou_det[d], -1.0)))
        if best >= MATCH_IOU:
            matched_by[g] = d
            analysis.true_positives.append(d)
            continue
        same_class = gt.labels == det_labels[d]  # [G]
        iou_same, g_same = _best(torch.where(same_class, iou_det[d], torch.zeros_like(iou_det[d])))
        iou_other, g_other = _best(torch.where(~same_class, iou_det[d], torch.zeros_like(iou_det[d])))
        if iou_same >= MATCH_IOU:
            kind, iou, g = "duplicate", iou_same, g_same
        elif iou_other >= MATCH_IOU:
            kind, iou, g = "wrong class", iou_other, g_other
        elif iou_same >= LOCALISATION_IOU:
            kind, iou, g = "localisation", iou_same, g_same
        else:
            kind, iou, g = "background", max(iou_same, iou_other), -1
        analysis.false_positives.append(
            {"detection": d, "label": int(det_labels[d]), "class": class_names[int(det_labels[d])],
             "score": float(det_scores[d]), "kind": kind, "iou": iou, "object": g}
        )  # fmt: skip

    kept_pairs = set(zip(kept[0].tolist(), kept[1].tolist()))
    iou_props = box_iou(gt.boxes, proposals) if len(proposals) else torch.zeros((len(gt.boxes), 0))  # [G, P]
    for g, (box, label) in enumerate(zip(gt.boxes, gt.labels.tolist())):
        entry: dict[str, Any] = {"index": g, "label": label, "class": class_names[label], "box": box.tolist()}
        analysis.objects.append(entry)
        if matched_by[g] >= 0:
            d = matched_by[g]
            entry.update(found=True, stage="found", detail=f"detection {d}, score {float(det_scores[d]):.2f}, IoU {float(iou_det[d, g]):.2f}")
            continue
        entry["found"] = False
        best_prop, _ = _best(iou_props[g])
        if best_prop < MATCH_IOU:
            entry.update(stage="no proposal", detail=f"best proposal IoU {best_prop:.2f} < {MATCH_IOU}")
            continue
        others = [d for d in order.tolist() if int(det_labels[d]) != label and float(iou_det[d, g]) >= MATCH_IOU]
        if others:
            d = others[0]
            entry.update(stage="wrong class", detail=f"detected as {class_names[int(det_labels[d])]} ({float(det_scores[d]):.2f}), IoU {float(iou_det[d, g]):.2f}")
            continue
        # the object's class column: each region's box for that class, and its score
        boxes_c = class_boxes[:, label - 1] if class_boxes.dim() == 3 else class_boxes  # [P, 4]
        scores_c = class_scores[:, label - 1]  # [P]
        covering = (box_iou(box[None], boxes_c)[0] >= MATCH_IOU) if len(boxes_c) else torch.zeros(0, dtype=torch.bool)
        above = covering & (scores_c > candidate_thresh) & (scores_c >= score_thresh)
        if bool(above.any()):
            rows = above.nonzero().flatten()
            r = int(rows[scores_c[rows].argmax()])
            if (r, label) in kept_pairs:
                entry.update(stage="moved by box regression", detail=f"region {r} (score {float(scores_c[r]):.2f}) kept by NMS, its final box misses the object")
            else:
                entry.update(stage="suppressed by NMS", detail=f"best covering candidate scored {float(scores_c[r]):.2f}, suppressed by a higher-scoring box")
            continue
        if not bool(covering.any()):
            entry.update(stage="moved by box regression", detail=f"a proposal covers it (IoU {best_prop:.2f}) but none of its {class_names[label]} boxes does")
            continue
        best_score = float(scores_c[covering].max())
        entry.update(stage="scored below the threshold", detail=f"best {class_names[label]} score of a covering region {best_score:.2f} < {score_thresh:g}")
    return analysis
