"""One image through a detector stage by stage, with a picture and a caption for each stage.

Explain records, it does not replay: the image goes once through the predictor
(:class:`rcnn.inference.Predictor`, as ``rcnn predict`` runs it) with a
:class:`rcnn.inference.Recorder`, and the pictures are drawn from what that forward pass wrote:
the resized batch, the feature maps, the proposals, the RoI heads' detections before they are
mapped back (Mask R-CNN's m x m masks), the box predictor's class scores and deltas (recorded from
the module's output by a hook), R-CNN's regions and per-class scores, and the time of each. The
final detections are the predictor's, by construction. What the forward pass does not compute for
every region is derived from the recorded tensors by the components' public methods: the per-class
boxes before NMS (the RoI heads' ``class_boxes``, then the one ``per_class_detections``), the RPN's
scores of every anchor and its candidates before NMS (the RPN's ``head_outputs`` and
``candidates`` on the recorded features), and the pooling geometry (``rcnn.core.ops``'
``roi_pool_bins`` and ``roi_align_points``).

What is shown depends on what the model can do (``needs_proposals``, ``has_rpn``,
``predicts_masks``), in the seed's order:

- R-CNN: selective search; warping in the three modes; per-class SVM scores; per-class NMS;
  ridge box regression; detections.
- Fast R-CNN: selective search; the shared feature map; RoI pooling's grid on one region;
  softmax scores; per-class box deltas; NMS; detections.
- Faster R-CNN: anchors; the shared feature map; the RPN's objectness; proposals before and
  after its NMS; then Fast R-CNN's stages on them.
- Mask R-CNN: Faster R-CNN's, with RoIAlign against RoIPool on one RoI, the m x m masks of the
  predicted classes and the masks pasted at full size.

Shape shorthand:
    P: proposals;  K: foreground classes;  D: detections;  C: channels;  h, w: feature map size
    H, W: original image size;  H', W': the model's input size
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rcnn.components.proposals.selective_search import SelectiveSearch
from rcnn.components.warp import WARP_MODES, warp_regions
from rcnn.core.boxes import box_iou
from rcnn.core.images import resize_boxes, resize_image
from rcnn.core.ops import assign_fpn_levels, roi_align_points, roi_pool_bins
from rcnn.core.postprocess import per_class_detections
from rcnn.explain.drawing import (
    CYAN, GREEN, GREY, ORANGE, RED, WHITE, YELLOW, View, blend, colour_of, heat_map, label_tile, side_by_side,
    tile_row, upscale,
)  # fmt: skip
from rcnn.explain.truth import MATCH_IOU, ErrorAnalysis, GroundTruth, analyse_errors
from rcnn.inference import GENERATIONS, Predictor, Recorder, check_score_thresh, generation, time_split
from rcnn.io.images import DecodedImage
from rcnn.models import RCNN, TwoStageDetector
from rcnn.viz import draw_detections

__all__ = ["GENERATIONS", "Explanation", "Stage", "explain_model"]
SHOWN_REGIONS = 8  # regions in the score tables and the regression pictures
SHOWN_PROPOSALS = 50  # proposals drawn before / after the RPN's NMS


@dataclass
class Stage:
    """One stage of the pipeline: a picture, a one-line caption, optionally a table."""

    key: str
    title: str
    caption: str
    picture: Image.Image
    table: list[list[str]] | None = None  # the first row is the header


@dataclass
class Explanation:
    """Everything :func:`explain_model` found out about one image."""

    generation: str
    model_class: str
    image_size: tuple[int, int]  # (H, W), original
    input_size: tuple[int, int]  # (H', W'), what the network saw
    score_thresh: float
    stages: list[Stage]
    detections: dict[str, Tensor]  # the predictor's output (original pixels)
    times: dict[str, float]  # seconds: "proposals", "rest" and the steps
    errors: ErrorAnalysis | None = None
    notes: list[str] = field(default_factory=list)


def _ms(seconds: dict[str, float], name: str) -> str:
    return f"{1000 * seconds.get(name, 0.0):.1f} ms"


def _times(recorder: Recorder, steps: dict[str, tuple[str, str]]) -> dict[str, float]:
    """``{"proposals", "rest"}`` (:func:`rcnn.inference.time_split`) and each step's seconds as
    ``"<step>_s"``, a step being the time between two of the recorder's writes."""
    split = time_split(recorder)
    seconds = {name: recorder.between(a, b) for name, (a, b) in steps.items()}
    return {"proposals": split["proposals_s"], "rest": split["rest_s"], **{f"{k}_s": v for k, v in seconds.items()}}


def _recall(gt: GroundTruth | None, boxes: Tensor) -> str:
    """``"; recall of the G objects at IoU 0.5: r"`` (empty without ground truth)."""
    if gt is None or len(gt.boxes) == 0:
        return ""
    covered = (box_iou(gt.boxes, boxes.cpu()).max(dim=1).values >= MATCH_IOU) if len(boxes) else torch.zeros(len(gt.boxes), dtype=torch.bool)
    return f"; recall of the {len(gt.boxes)} ground-truth objects at IoU {MATCH_IOU}: {float(covered.float().mean()):.2f}"


def _region_colours(count: int, seed: int = 0) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in rng.integers(60, 256, 3)) for _ in range(count)]  # type: ignore[misc]


def _proposals_stage(view: View, boxes: Tensor, seconds: dict[str, float], gt: GroundTruth | None, gt_view: Tensor | None, search: SelectiveSearch) -> Stage:
    """Selective search's regions, all drawn thinly."""
    picture = view.canvas(dim=0.35)
    view.boxes(picture, boxes, _region_colours(len(boxes)), width=1)
    if gt_view is not None:
        view.boxes(picture, gt_view, WHITE, width=2, dashed=True)
    caption = (
        f"Selective search ({search.mode} mode) proposes {len(boxes)} category-independent regions in "
        f"{_ms(seconds, 'proposals_s')}{_recall(gt, boxes)}" + ("; ground truth dashed white" if gt_view is not None else "")
    )
    return Stage("proposals", "Region proposals: selective search", caption, picture)


def _score_table(rows: Tensor, scores: Tensor, boxes: Tensor, class_names: Sequence[str], background: Tensor | None) -> list[list[str]]:
    """Regions (rows) x classes table of scores; the best class of each region in bold (``*``)."""
    header = ["region", "box (x1, y1, x2, y2)"] + (["background"] if background is not None else []) + list(class_names[1:])
    table = [header]
    for r in rows.tolist():
        best = int(scores[r].argmax())
        cells = [f"{float(v):.2f}" + ("*" if k == best else "") for k, v in enumerate(scores[r])]
        bg = [f"{float(background[r]):.2f}"] if background is not None else []
        table.append([str(r), ", ".join(f"{v:.0f}" for v in boxes[r].tolist()), *bg, *cells])
    return table


def _labelled_regions(view: View, boxes: Tensor, scores: Tensor, rows: Tensor, class_names: Sequence[str]) -> Image.Image:
    picture = view.canvas(dim=0.3)
    for r in rows.tolist()[::-1]:  # the best drawn last, on top
        k = int(scores[r].argmax())
        view.boxes(picture, boxes[r : r + 1], colour_of(k + 1), width=2, texts=[f"#{r} {class_names[k + 1]} {float(scores[r, k]):.2f}"])
    return picture


def _nms_stage(view: View, before: Tensor, before_labels: Tensor, after: Tensor, after_labels: Tensor, caption: str) -> Stage:
    left, right = view.canvas(dim=0.3), view.canvas(dim=0.3)
    view.boxes(left, before, [colour_of(int(k)) for k in before_labels], width=1)
    view.boxes(right, after, [colour_of(int(k)) for k in after_labels], width=2)
    picture = side_by_side([label_tile(left, f"before NMS: {len(before)}"), label_tile(right, f"after NMS: {len(after)}")])
    return Stage("nms", "Per-class non-maximum suppression", caption, picture)


def _regression_stage(view: View, starts: Tensor, ends: Tensor, labels: Tensor, class_names: Sequence[str], title: str, how: str) -> Stage:
    """Boxes before (white, dashed) and after (class colour) a box regression, centres joined."""
    picture = view.canvas(dim=0.3)
    view.boxes(picture, starts, WHITE, width=1, dashed=True)
    view.boxes(picture, ends, [colour_of(int(k)) for k in labels], width=2, texts=[class_names[int(k)] for k in labels])
    centre = lambda b: torch.stack(((b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2), dim=1)  # noqa: E731
    view.lines(picture, centre(starts), centre(ends), YELLOW)
    if len(starts):
        shift = (centre(ends) - centre(starts)).norm(dim=1).mean()
        area = ((ends[:, 2] - ends[:, 0]) * (ends[:, 3] - ends[:, 1])) / ((starts[:, 2] - starts[:, 0]) * (starts[:, 3] - starts[:, 1])).clamp(min=1e-6)
        numbers = f"the {len(starts)} detections above the threshold (else the best 3) shown, centres moved {float(shift):.1f} px on average, areas x{float(area.mean()):.2f}"
    else:
        numbers = "no detection to show"
    caption = f"{how}: white dashed = the region before, coloured = after, yellow = the centre's move; {numbers}"
    return Stage("regression", title, caption, picture)


def _shown_detections(scores: Tensor, thresh: float) -> Tensor:
    """Indices of the detections a picture shows: those scoring at least ``thresh`` (at most
    ``SHOWN_REGIONS``), else the best three."""
    above = (scores >= thresh).nonzero().flatten()[:SHOWN_REGIONS]
    return (above if len(above) else torch.arange(min(3, len(scores)), device=scores.device)).cpu()


def _final_stage(decoded: DecodedImage, output: dict[str, Tensor], class_names: Sequence[str], thresh: float, times: dict[str, float], masks: bool) -> Stage:
    keep = output["scores"] >= thresh
    shown = {k: v[keep] for k, v in output.items()}
    scale = 420 / max(decoded.image.shape[1:])
    picture = draw_detections(decoded.image, shown, class_names, thresh, scale=scale, frame=decoded.original_size)
    count = int(keep.sum())
    what = "detection" + ("s" if count != 1 else "")
    if masks:
        what += " with their masks pasted at full size (each m x m map resampled into its box, binarised at 0.5)"
    caption = (
        f"{count} {what} scoring at least {thresh:g} (of {len(keep)} the model returns); "
        f"time: proposals {1000 * times['proposals']:.1f} ms + rest {1000 * times['rest']:.1f} ms"
    )
    return Stage("detections", "Final detections", caption, picture)


def _errors_stage(decoded: DecodedImage, gt: GroundTruth, analysis: ErrorAnalysis, detections: dict[str, Tensor], class_names: Sequence[str]) -> Stage:
    view = View(decoded.image)
    to_view = lambda b: resize_boxes(torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4), decoded.original_size,  # noqa: E731
                                     tuple(decoded.image.shape[1:]))  # fmt: skip
    picture = view.canvas(dim=0.2)
    for obj in analysis.objects:
        colour = GREEN if obj["found"] else RED
        view.boxes(picture, to_view(obj["box"]), colour, width=3, texts=[f"{obj['class']}: {obj['stage']}"])
    for fp in analysis.false_positives:
        box = detections["boxes"][fp["detection"]]
        view.boxes(picture, to_view(box), ORANGE, width=2, dashed=True, texts=[f"FP {fp['class']} {fp['score']:.2f}: {fp['kind']}"])
    table = [["kind", "#", "class", "stage / what it is", "detail"]]
    for obj in analysis.objects:
        table.append(["object", str(obj["index"]), obj["class"], obj["stage"], obj["detail"]])
    for fp in analysis.false_positives:
        iou = f"IoU {fp['iou']:.2f}" + (f" with object {fp['object']}" if fp["object"] >= 0 else "")
        table.append(["false positive", f"det {fp['detection']}", fp["class"], fp["kind"], f"score {fp['score']:.2f}, {iou}"])
    found = sum(o["found"] for o in analysis.objects)
    kinds: dict[str, int] = {}
    for fp in analysis.false_positives:
        kinds[fp["kind"]] = kinds.get(fp["kind"], 0) + 1
    stages: dict[str, int] = {}
    for obj in analysis.missed:
        stages[obj["stage"]] = stages.get(obj["stage"], 0) + 1
    caption = (
        f"{found} of {len(analysis.objects)} objects found (green); missed (red), by the stage that lost them: "
        + (", ".join(f"{v} {k}" for k, v in stages.items()) or "none")
        + f"; {len(analysis.false_positives)} false positives (orange, dashed): "
        + (", ".join(f"{v} {k}" for k, v in kinds.items()) or "none")
    )
    return Stage("errors", "Against the ground truth: what was lost where", caption, picture, table)


# -- R-CNN ---------------------------------------------------------------------------------------
def _explain_rcnn(model: RCNN, predictor: Predictor, decoded: DecodedImage, class_names: Sequence[str], gt: GroundTruth | None,
                  thresh: float) -> Explanation:  # fmt: skip
    s = model.settings
    recorder = predictor.recorder()
    output = predictor.predict(decoded, recorder=recorder).output  # R-CNN decodes whole: the original's pixels
    (image,), (proposals,) = recorder["images"], recorder["external_proposals"]  # on the device
    (regions,), ((scores, cand_thresh),) = recorder["regions"], recorder["scores"]  # [P, 4], [P, K]
    height, width = decoded.original_size
    view = View(decoded.image)
    gt_view = gt.boxes if gt is not None else None
    found = per_class_detections(regions, scores, cand_thresh, s.nms_thresh, s.detections_per_image)
    times = _times(recorder, {"proposals": ("images", "external_proposals"), "cnn": ("regions", "scores")})
    stages = [_proposals_stage(view, proposals.cpu(), times, gt, gt_view, predictor.search)]

    best = scores.max(dim=1).values  # [P]
    top = best.argsort(descending=True)[:SHOWN_REGIONS].cpu()
    # a few regions warped the three ways the seed lists (the model uses s.warp_mode): the two best
    # detections (distinct after NMS) and the most elongated of the 50 best regions, where the modes differ most
    rows = []
    fill = model.image_mean.flatten().to(image.dtype)
    sides = (regions[:, 2:] - regions[:, :2]).cpu()  # [P, 2]
    elongation = sides.max(dim=1).values / sides.min(dim=1).values.clamp(min=1e-6)
    candidates = best.argsort(descending=True)[:50].cpu()
    chosen = list(dict.fromkeys(found["rows"][:2].tolist() + [int(candidates[elongation[candidates].argmax()])]))
    for r in chosen[:3]:
        box = regions[r : r + 1]
        crop_view = View(image, target=160)
        located = crop_view.boxes(crop_view.canvas(dim=0.3), box.cpu(), YELLOW, width=2)
        tiles = [label_tile(located, f"region #{r}", 170)]
        for mode in WARP_MODES:
            warped = warp_regions(image, box, s.warp_size, mode, s.context_padding, fill=fill)[0]
            used = " (used)" if mode == s.warp_mode else ""
            tiles.append(label_tile(upscale(warped.cpu(), 128), f"{mode}{used}", 170))
        rows.append(tiles)
    warp_caption = (
        f"Each region, with {s.context_padding} px of context, is resampled to the CNN's fixed {s.warp_size}x{s.warp_size} "
        "input: anisotropic (stretched: R-CNN's choice), isotropic with the image around it, or isotropic padded "
        f"with the mean; this model uses {s.warp_mode}"
    )
    stages.append(Stage("warp", "Warping regions to a fixed size", warp_caption, tile_row(rows) if rows else view.canvas()))

    svm = model.svms() is not None
    what = "one linear SVM per class on fc7" if svm else "the fine-tuned softmax (the SVMs are not trained yet)"
    score_caption = (
        f"The CNN runs once per warped region: {len(regions)} regions in {_ms(times, 'cnn_s')} "
        f"({1000 * times['cnn_s'] / max(len(regions), 1):.2f} ms each), then {what} scores each region; "
        f"the {len(top)} best regions are shown (* = their best class); candidates score above {cand_thresh:g}"
    )
    stages.append(Stage(
        "scores", "CNN features and per-class SVM scores" if svm else "CNN features and class scores", score_caption,
        _labelled_regions(view, regions.cpu(), scores.cpu(), top, class_names),
        _score_table(top, scores.cpu(), regions.cpu(), class_names, None),
    ))  # fmt: skip

    cand_rows, cand_cls = (scores > cand_thresh).nonzero(as_tuple=True)
    nms_caption = (
        f"{len(cand_rows)} (region, class) candidates score above {cand_thresh:g}; greedy NMS per class at IoU "
        f"{s.nms_thresh} on the proposal boxes keeps {len(found['rows'])} (at most {s.detections_per_image})"
    )
    stages.append(_nms_stage(view, regions[cand_rows].cpu(), (cand_cls + 1).cpu(), found["boxes"].cpu(), found["labels"].cpu(), nms_caption))
    shown = _shown_detections(output["scores"], thresh)
    regressed = model.box_regressors() is not None and model.use_box_regression
    how = (
        f"Class-specific ridge regressors on {s.regression_features} features predict (tx, ty, tw, th) for each kept box"
        if regressed else "No box regressors trained: the boxes stay the proposals"
    )  # fmt: skip
    stages.append(_regression_stage(
        view, found["boxes"][shown].cpu(), output["boxes"][shown].cpu(), output["labels"][shown].cpu(), class_names,
        "Bounding-box regression (after NMS)", how,
    ))  # fmt: skip
    stages.append(_final_stage(decoded, output, class_names, thresh, times, masks=False))
    errors = None
    if gt is not None:
        errors = analyse_errors(
            gt, regions.cpu(), regions.cpu(), scores.cpu(), cand_thresh, (found["rows"].cpu(), found["labels"].cpu()),
            output, thresh, class_names,
        )  # fmt: skip
        stages.append(_errors_stage(decoded, gt, errors, output, class_names))
    return Explanation(generation(model), type(model).__name__, (height, width), (height, width), thresh, stages, output,
                       times, errors)  # fmt: skip


# -- Fast, Faster and Mask R-CNN -----------------------------------------------------------------
def _feature_stage(view: View, feature: Tensor, stride: float, times: dict[str, float], shared_by: str) -> Stage:
    mean_map, max_map = feature.mean(dim=0), feature.amax(dim=0)  # [h, w]
    size = view.base.size
    tiles = [
        label_tile(view.canvas(), "input"),
        label_tile(heat_map(mean_map, size), f"mean over {feature.shape[0]} channels"),
        label_tile(heat_map(max_map, size), "max over channels"),
    ]
    caption = (
        f"One pass of the backbone over the whole {view.size[0]}x{view.size[1]} input in {_ms(times, 'backbone_s')}: "
        f"{feature.shape[0]} channels at stride {stride:g} ({feature.shape[1]}x{feature.shape[2]} cells), {shared_by}"
    )
    return Stage("features", "The shared feature map", caption, side_by_side(tiles))


def _draw_pooling(view: View, mean_map: Tensor, roi: Tensor, stride: float, kind: str, output_size: tuple[int, int],
                  sampling_ratio: int, aligned: bool, feature_size: tuple[int, int], area: tuple[float, ...],
                  radius: float) -> tuple[Image.Image, str]:  # fmt: skip
    """RoI pooling's bins or RoIAlign's sampling points of one RoI, drawn over the feature map on ``view``."""
    picture = blend(view.canvas(), heat_map(mean_map, view.base.size), 0.55)
    x1, y1, x2, y2 = roi.tolist()
    view.grid(picture, stride, GREY, area)
    if kind == "pool":
        bins = roi_pool_bins(roi.tolist(), output_size, 1.0 / stride, feature_size)  # [P, Q, 4] cells
        boxes = torch.stack((bins[..., 2], bins[..., 0], bins[..., 3], bins[..., 1]), dim=-1).reshape(-1, 4).float() * stride
        colours = [CYAN if (i // output_size[1] + i % output_size[1]) % 2 == 0 else ORANGE for i in range(len(boxes))]
        view.boxes(picture, boxes, colours, width=2)
        cells = bins[..., 1] - bins[..., 0], bins[..., 3] - bins[..., 2]
        note = (
            f"RoIPool: the corners are rounded to feature cells, then {output_size[0]}x{output_size[1]} bins of "
            f"{int(cells[0].min())}-{int(cells[0].max())} x {int(cells[1].min())}-{int(cells[1].max())} cells, each max-pooled"
        )
    else:
        points = roi_align_points(roi.tolist(), output_size, 1.0 / stride, sampling_ratio, aligned)  # [P, Q, S, 2] (y, x)
        xy = (points.flip(-1).reshape(-1, 2).float() + 0.5) * stride  # cell i's centre is at (i + 0.5) * stride px
        bin_w, bin_h = (x2 - x1) / output_size[1], (y2 - y1) / output_size[0]
        edges = [[x1 + j * bin_w, y1 + i * bin_h, x1 + (j + 1) * bin_w, y1 + (i + 1) * bin_h]
                 for i in range(output_size[0]) for j in range(output_size[1])]  # fmt: skip
        view.boxes(picture, edges, CYAN, width=1)
        view.points(picture, xy, YELLOW, radius=radius)
        note = (
            f"RoIAlign: no rounding; {output_size[0]}x{output_size[1]} bins of {bin_h / stride:.2f} x {bin_w / stride:.2f} "
            f"cells, each the mean of {points.shape[2]} bilinear samples (yellow)"
        )
    view.boxes(picture, roi[None], WHITE, width=2, dashed=True)
    return picture, note


def _pool_picture(view: View, mean_map: Tensor, roi: Tensor, stride: float, kind: str, output_size: tuple[int, int],
                  sampling_ratio: int, aligned: bool, feature_size: tuple[int, int]) -> tuple[Image.Image, str]:  # fmt: skip
    """The whole feature map with the RoI's bins or samples, and the region enlarged beside it (drawn
    again at the larger scale, so that each cell, bin and sample can be told apart)."""
    margin = 2 * stride
    x1, y1, x2, y2 = roi.tolist()
    area = (max(x1 - margin, 0), max(y1 - margin, 0), min(x2 + margin, view.size[0]), min(y2 + margin, view.size[1]))
    args = (roi, stride, kind, output_size, sampling_ratio, aligned, feature_size, area)
    whole, note = _draw_pooling(view, mean_map, *args, radius=1.0)
    zoom_side = 320.0
    span = max(area[2] - area[0], area[3] - area[1], 1.0)
    zoom_view = View(view.base.resize(view.size, Image.NEAREST), target=round(zoom_side * max(view.size) / span))
    zoomed, _ = _draw_pooling(zoom_view, mean_map, *args, radius=2.5)
    zoom = zoomed.crop(tuple(round(v * zoom_view.scale) for v in area))
    return side_by_side([whole, zoom]), note


def _roi_level(roi: Tensor, pooler: Any) -> int:
    """Index of the feature level the pooler reads ``roi [4]`` from."""
    if len(pooler.strides) == 1:
        return 0
    level = assign_fpn_levels(roi[None], pooler.min_level, pooler.max_level, pooler.canonical_size, pooler.canonical_level)
    return int(level[0]) - pooler.min_level


def _explain_two_stage(model: TwoStageDetector, predictor: Predictor, decoded: DecodedImage, class_names: Sequence[str],
                       gt: GroundTruth | None, thresh: float) -> Explanation:  # fmt: skip
    heads = model.roi_heads
    recorder = predictor.recorder()
    with recorder.watching({"box_predictor": heads.predictor}):
        output = predictor.predict(decoded, recorder=recorder).output  # the original's pixels
    batch, features, proposals = recorder["batch"], recorder["features"], recorder["proposals"]
    class_logits, box_deltas = recorder["box_predictor"]  # [P, K+1], [P, 4K]
    in_input = recorder["detections"][0]  # input pixels; masks [D, 1, m, m] in the box frame
    height, width = decoded.original_size
    size = batch.image_sizes[0]
    image = decoded.image
    shown_image = resize_image(image, size) if size != tuple(image.shape[1:]) else image  # what the network sees, unnormalised
    view = View(shown_image)
    to_view = lambda b: resize_boxes(b.cpu(), (height, width), size)  # noqa: E731  original -> input pixels
    to_original = lambda b: resize_boxes(b.cpu(), size, (height, width))  # noqa: E731
    gt_view = to_view(gt.boxes) if gt is not None else None
    start = "external_proposals" if model.needs_proposals else "images"
    steps = {"proposals": ("images", "external_proposals")} if model.needs_proposals else {}
    steps.update({"transform": (start, "batch"), "backbone": ("batch", "features"),
                  "proposals" if model.has_rpn else "propose": ("features", "proposals"),
                  "heads": ("proposals", "detections"), "finalize": ("detections", "output")})  # fmt: skip
    times = _times(recorder, steps)

    ((class_boxes, probs),) = heads.class_boxes(class_logits, box_deltas, proposals, batch.image_sizes)  # [P, K, 4], [P, K]
    rs = heads.settings
    found = per_class_detections(class_boxes, probs, rs.score_thresh, rs.nms_thresh, rs.detections_per_image, min_size=1e-2)
    props = proposals[0].cpu()
    stages: list[Stage] = []
    feature = features[0][0].detach().cpu()  # [C, h, w] of the first level
    stride0 = float(model.strides[0])

    if model.needs_proposals:
        stages.append(_proposals_stage(view, props, times, gt, gt_view, predictor.search))
    if model.has_rpn:
        stages.append(_anchors_stage(model, view, features))
    shared = f"computed once and shared by all {len(props)} RoIs" + (" and the RPN" if model.has_rpn else "")
    stages.append(_feature_stage(view, feature, stride0, times, shared))
    if model.has_rpn:
        stages += _rpn_stages(model, view, features, batch.image_sizes, props, times, gt_view)

    # the RoI behind the best detection (else the first proposal), pooled by the box branch
    roi_row = int(found["rows"][0]) if len(found["rows"]) else 0
    if len(props):
        stages.append(_pooling_stage(model, view, props[roi_row], roi_row, features[: len(model.pool_strides)]))

    fg = probs.cpu()
    top = fg.max(dim=1).values.argsort(descending=True)[:SHOWN_REGIONS]
    background = torch.softmax(class_logits, dim=-1)[:, 0].cpu()
    candidates = (probs > rs.score_thresh).nonzero(as_tuple=True)
    score_caption = (
        f"Each of the {len(props)} RoIs: {heads.pooler.kind} -> box head ({heads.box_head.out_features} features) -> "
        f"softmax over {len(class_names) - 1} classes + background, {_ms(times, 'heads_s')} for all; "
        f"{len(candidates[0])} (RoI, class) pairs score above {rs.score_thresh:g}; the best {len(top)} RoIs are shown"
    )
    stages.append(Stage("scores", "RoI head: softmax class scores", score_caption,
                        _labelled_regions(view, props, fg, top, class_names),
                        _score_table(top, fg, props, class_names, background)))  # fmt: skip
    shown = _shown_detections(found["scores"], thresh)
    rows = found["rows"][shown].cpu()
    stages.append(_regression_stage(
        view, props[rows], found["boxes"][shown].cpu(), found["labels"][shown].cpu(), class_names,
        "Per-class box regression", "Each RoI's deltas for a class, (tx, ty, tw, th) x weights "
        f"{tuple(rs.bbox_reg_weights)}, move the proposal to that class's box (shown for the detections' classes)",
    ))  # fmt: skip
    cand_boxes = class_boxes[candidates].cpu()
    nms_caption = (
        f"{len(cand_boxes)} candidates above {rs.score_thresh:g}, each class's own regressed box; greedy NMS per class at "
        f"IoU {rs.nms_thresh} keeps {len(found['rows'])} (at most {rs.detections_per_image})"
    )
    stages.append(_nms_stage(view, cand_boxes, (candidates[1] + 1).cpu(), found["boxes"].cpu(), found["labels"].cpu(), nms_caption))
    if model.predicts_masks:
        stages.append(_masks_stage(model, in_input, class_names, thresh))
    stages.append(_final_stage(decoded, output, class_names, thresh, times, masks=model.predicts_masks))

    errors = None
    if gt is not None:
        num_fg = class_boxes.shape[1]
        errors = analyse_errors(
            gt, to_original(props), to_original(class_boxes.reshape(-1, 4)).reshape(-1, num_fg, 4), probs.cpu(),
            rs.score_thresh, (found["rows"].cpu(), found["labels"].cpu()), output, thresh, class_names,
        )  # fmt: skip
        stages.append(_errors_stage(decoded, gt, errors, output, class_names))
    return Explanation(generation(model), type(model).__name__, (height, width), tuple(size), thresh, stages, output,
                       times, errors)  # type: ignore[arg-type]  # fmt: skip


def _anchors_stage(model: TwoStageDetector, view: View, features: list[Tensor]) -> Stage:
    """The A anchors at the location nearest the image centre, and the anchor grid's centres."""
    generator = model.rpn.anchor_generator
    picture = view.canvas(dim=0.35)
    level = 0
    stride = float(model.rpn.strides[level])
    h, w = features[level].shape[-2:]
    centres = torch.stack(torch.meshgrid(
        (torch.arange(w) + generator.offset) * stride, (torch.arange(h) + generator.offset) * stride, indexing="xy"
    ), dim=-1).reshape(-1, 2)  # [h*w, 2] (x, y)
    inside = (centres[:, 0] < view.size[0]) & (centres[:, 1] < view.size[1])
    view.points(picture, centres[inside], GREY, radius=1.5)
    cx = (min(w, int(view.size[0] / stride)) // 2 + generator.offset) * stride
    cy = (min(h, int(view.size[1] / stride)) // 2 + generator.offset) * stride
    base = generator.base_anchors[level]  # [A, 4] centred on (0, 0), ratio-major
    anchors = base + torch.tensor([cx, cy, cx, cy])
    sizes, ratios = generator.sizes[level], generator.aspect_ratios[level]
    palette = [CYAN, YELLOW, ORANGE, GREEN, RED, WHITE]
    colours = [palette[(i % len(sizes)) % len(palette)] for i in range(len(anchors))]
    texts = [f"{sizes[i % len(sizes)]:g}px 1:{ratios[i // len(sizes)]:g}" if i // len(sizes) == 1 else "" for i in range(len(anchors))]
    view.boxes(picture, anchors, colours, width=2, texts=texts)
    view.points(picture, torch.tensor([[cx, cy]]), RED, radius=4)
    total = sum(a.shape[0] * f.shape[-2] * f.shape[-1] for a, f in zip(generator.base_anchors, features))
    caption = (
        f"k = {len(base)} anchors per location ({len(sizes)} sizes {', '.join(f'{v:g}' for v in sizes)} px x "
        f"{len(ratios)} height:width ratios {', '.join(f'{v:g}' for v in ratios)}) drawn at one location (red); "
        f"grey dots: the {h}x{w} locations of the stride-{stride:g} map; {total} anchors in all"
    )
    return Stage("anchors", "Anchors: 3 scales x 3 ratios at every location", caption, picture)


def _rpn_stages(model: TwoStageDetector, view: View, features: list[Tensor], image_sizes: list[tuple[int, int]],
                proposals: Tensor, times: dict[str, float], gt_view: Tensor | None) -> list[Stage]:  # fmt: skip
    rpn = model.rpn
    out = rpn.head_outputs(features)
    ((cand_boxes, cand_scores, _),) = rpn.candidates(out.objectness, out.box_deltas, out.anchors, out.level_sizes, image_sizes)
    tiles = [label_tile(view.canvas(), "input")]
    peak, above = 0.0, 0
    for level, logits in enumerate(out.logits):
        probs = logits[0].detach().sigmoid().cpu()  # [A, h, w]
        best = probs.amax(dim=0)  # [h, w]
        peak, above = max(peak, float(best.max())), above + int((probs > 0.5).sum())
        heat = heat_map(best, view.base.size, "viridis", 0.0, 1.0)
        tiles.append(label_tile(blend(view.canvas(), heat, 0.7), f"level {level} (stride {rpn.strides[level]:g}): max over anchors"))
    objectness = Stage(
        "objectness", "RPN objectness per location",
        f"The RPN's 3x3 conv and 1x1 classifier slide over the shared map and score every anchor: the highest of the "
        f"{out.logits[0].shape[1]} anchor probabilities per location (0 dark .. 1 yellow); peak {peak:.2f}, {above} anchors above 0.5",
        side_by_side(tiles),
    )  # fmt: skip
    s = rpn.settings
    order = cand_scores.argsort(descending=True)[:SHOWN_PROPOSALS].cpu()
    left, right = view.canvas(dim=0.35), view.canvas(dim=0.35)
    view.boxes(left, cand_boxes.cpu()[order], _region_colours(len(order), 1), width=1)
    view.boxes(right, proposals[:SHOWN_PROPOSALS], _region_colours(min(len(proposals), SHOWN_PROPOSALS), 2), width=1)
    for picture in (left, right):
        if gt_view is not None:
            view.boxes(picture, gt_view, WHITE, width=2, dashed=True)
    caption = (
        f"{len(cand_boxes)} candidates (top {s.pre_nms_top_n_test} anchors per level by objectness, their deltas applied, "
        f"clipped, tiny ones dropped) -> NMS at IoU {s.nms_thresh} -> {len(proposals)} proposals (at most "
        f"{s.post_nms_top_n_test}) in {_ms(times, 'proposals_s')}; the best {SHOWN_PROPOSALS} of each are drawn"
        + (", ground truth dashed white" if gt_view is not None else "")
    )
    picture = side_by_side([label_tile(left, f"before NMS (best {len(order)} of {len(cand_boxes)})"),
                            label_tile(right, f"after NMS (best {min(len(proposals), SHOWN_PROPOSALS)} of {len(proposals)})")])  # fmt: skip
    return [objectness, Stage("rpn_nms", "Proposals before and after the RPN's NMS", caption, picture)]


def _pooling_stage(model: TwoStageDetector, view: View, roi: Tensor, roi_row: int, features: list[Tensor]) -> Stage:
    pooler = model.roi_heads.pooler
    level = _roi_level(roi, pooler)
    stride = pooler.strides[level]
    feature = features[level][0].detach().cpu()  # [C, h, w]
    mean_map = feature.mean(dim=0)  # [h, w]
    args = (pooler.output_size, pooler.sampling_ratio, pooler.aligned, tuple(feature.shape[-2:]))
    width, height = float(roi[2] - roi[0]), float(roi[3] - roi[1])
    where = f"RoI #{roi_row} ({width:.0f}x{height:.0f} px = {width / stride:.1f}x{height / stride:.1f} cells of stride {stride:g})"
    if model.predicts_masks:
        mask_pooler = getattr(model.roi_heads, "mask_pooler", pooler)
        pool_pic, pool_note = _pool_picture(view, mean_map, roi, stride, "pool", *args)
        align_pic, align_note = _pool_picture(view, mean_map, roi, stride, "align", *args)
        caption = (
            f"{where}: {pool_note}, against {align_note}; the box branch uses {pooler.kind}, the mask branch "
            f"{mask_pooler.kind} at {mask_pooler.output_size[0]}x{mask_pooler.output_size[1]}"
        )
        picture = side_by_side([label_tile(pool_pic, "RoIPool: quantised bins"), label_tile(align_pic, "RoIAlign: sampling points")])
        return Stage("pooling", "RoIAlign against RoIPool on one RoI", caption, picture)
    pic, note = _pool_picture(view, mean_map, roi, stride, pooler.kind, *args)
    title = "RoI pooling on one region" if pooler.kind == "pool" else "RoIAlign on one region"
    caption = f"{where}, dashed white, over the feature map (grey: cells): {note} into the box head's fixed input"
    return Stage("pooling", title, caption, pic)


def _masks_stage(model: TwoStageDetector, detections: dict[str, Tensor], class_names: Sequence[str], thresh: float) -> Stage:
    masks = detections["masks"][:, 0].cpu()  # [D, m, m] probabilities in the box frame
    keep = (detections["scores"] >= thresh).nonzero().flatten()[:6].tolist() or list(range(min(3, len(masks))))
    tiles = []
    for d in keep:
        name, score = class_names[int(detections["labels"][d])], float(detections["scores"][d])
        grey = upscale(heat_map(masks[d], tuple(masks[d].shape[::-1]), "gray", 0.0, 1.0), 112)
        tiles.append(label_tile(grey, f"{name} {score:.2f}", 120))
    m = masks.shape[-1] if len(masks) else model.roi_heads.mask_size
    pool = model.roi_heads.mask_pooler.output_size[0]
    caption = (
        f"The mask branch ({pool}x{pool} RoIAlign -> convolutions -> 2x2 deconvolution) predicts one {m}x{m} mask per class "
        f"for each detection; shown: the predicted class's channel (sigmoid, black 0 .. white 1) of {len(tiles)} detections"
    )
    picture = side_by_side(tiles) if tiles else Image.new("RGB", (120, 40), WHITE)
    return Stage("masks", f"The {m}x{m} masks of the predicted classes", caption, picture)


def explain_model(
    detector: Any,
    image: Tensor | DecodedImage,
    class_names: Sequence[str],
    gt: GroundTruth | None = None,
    score_thresh: float | None = None,
    search: SelectiveSearch | None = None,
) -> Explanation:
    """Run ``detector`` on ``image`` once, recording its stages, and draw them (module doc).

    ``detector``: a :class:`rcnn.inference.Predictor` of an eager model, or the model itself (run
    by a predictor with ``search`` for models that need proposals: default settings). ``image``: a
    float tensor ``[3, H, W]`` in 0..1, or a file as ``Predictor.read`` decodes it (the detections,
    ``gt`` and the error analysis are in the original's pixels). ``score_thresh`` (default
    ``display_score_thresh``) decides which detections count as found.
    """
    predictor = detector if isinstance(detector, Predictor) else Predictor(detector, search=search)
    eager = predictor.detector
    if not eager.records or predictor.tiling is not None:
        raise ValueError(f"explain: a {eager.backend} detector gives only its detections, not its stages; explain the run "
                         "folder's model (the eager backend, untiled)")  # fmt: skip
    if isinstance(image, Tensor) and (image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point()):
        raise ValueError(f"explain: the image must be a float tensor [3, H, W] in 0..1, got {image.dtype} {list(image.shape)}")
    decoded = image if isinstance(image, DecodedImage) else DecodedImage(image.cpu(), (image.shape[1], image.shape[2]))
    if len(class_names) != eager.num_classes:
        raise ValueError(f"explain: {len(class_names)} class names for a model of {eager.num_classes} classes (background included)")
    check_score_thresh(score_thresh, eager, "explain: score_thresh")
    thresh = float(eager.display_score_thresh if score_thresh is None else score_thresh)
    model = eager.model
    with torch.inference_mode():
        if isinstance(model, RCNN):
            return _explain_rcnn(model, predictor, decoded, class_names, gt, thresh)
        if isinstance(model, TwoStageDetector):
            return _explain_two_stage(model, predictor, decoded, class_names, gt, thresh)
    raise ValueError(f"explain: {type(model).__name__} is not one of the library's detectors (R-CNN or a TwoStageDetector)")
