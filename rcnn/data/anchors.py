"""Anchors from the data: sizes and aspect ratios that cover a data set's boxes.

Anchors live in the *rescaled* image (the detectors resize each image by Fast R-CNN's rule,
shorter side ``min_size``, longer at most ``max_size``: :func:`rcnn.core.images.resized_shape`),
so the boxes are scaled per image first. Then:

- ``aspect_ratios``: the 10%, 50% and 90% quantiles of the boxes' ``h / w``, at least a factor
  sqrt(2) apart around the median, rounded to 2 decimals;
- ``anchor_sizes`` on one level: three sizes at the 1/6, 1/2 and 5/6 quantiles of the scaled
  ``sqrt(w * h)``, at least a factor sqrt(2) apart, rounded; on L > 1 levels (an FPN): one size
  per level doubling from level to level like the defaults 32 .. 512, the start chosen on a grid
  of 1/8 octave to leave the fewest objects uncovered (ties: the highest mean best IoU, then the
  pyramid whose middle is nearest the median box).

An object is *covered* when some anchor reaches IoU >= 0.7 with it (the RPN's positive
threshold, Faster R-CNN §3.1.2). The IoU computed is the best case of anchor placement: the
anchor centred on the object. Real anchors sit on a grid of the feature stride, so the
numbers are a lower bound on what is missed; and the RPN still makes each object's best
anchor a positive, so an uncovered object is learnt from a poor match rather than lost.

The input size (``model.min_size`` / ``max_size``) comes from the data too
(:func:`suggest_input_size`): the images' shorter side large enough that the smallest objects
span :data:`SMALLEST_OBJECT` pixels, starting from a config's size and bounded on both sides.

Shape shorthand:
    N: number of objects
    A: number of anchor shapes (sizes x ratios)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rcnn.core.anchors import cell_anchors
from rcnn.core.boxes import box_iou
from rcnn.core.images import resized_shape
from rcnn.data.records import ImageRecord

__all__ = [
    "DEFAULT_ASPECT_RATIOS",
    "POSITIVE_IOU",
    "LARGEST_SUGGESTED_SIZE",
    "SMALLEST_OBJECT",
    "AnchorSuggestion",
    "InputSizeSuggestion",
    "best_anchor_iou",
    "default_anchor_sizes",
    "format_anchor_suggestion",
    "scaled_box_shapes",
    "suggest_anchors",
    "suggest_input_size",
    "uncovered_objects",
]

POSITIVE_IOU = 0.7  # Faster R-CNN §3.1.2: an anchor with IoU >= 0.7 with a ground-truth box is positive
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)  # model.aspect_ratios' default: 1:2, 1:1, 2:1 (§3.1.1)
_MIN_SPACING = math.sqrt(2.0)  # neighbouring suggested sizes / ratios differ by at least this factor
_GRID_STEPS_PER_OCTAVE = 8
_MAX_SEARCH_BOXES = 20000  # the start size of an FPN's sizes is searched on at most this many boxes
# The input size: the smallest objects should span the smallest anchor of the FPN pyramids (32 ..
# 512), which is also COCO's bound of a "small" object (32 x 32 px); the shorter side is grown for
# them up to the FPN detectors' 800 px (Lin et al., 2017), beyond which the cost of a step grows
# as its square for little gain; sizes are multiples of the coarsest RoI stride, 32.
SMALLEST_OBJECT = 32
LARGEST_SUGGESTED_SIZE = 800
_SIZE_STEP = 32
_SMALL_QUANTILE = 0.05  # "the smallest objects": the 5% quantile of the boxes' sizes


def default_anchor_sizes(levels: int) -> tuple[tuple[float, ...], ...]:
    """The general default anchor sizes: the paper's 128, 256, 512 on one level; one size per level
    from 32, doubling, on a pyramid (``rcnn.components.backbones.default_anchor_sizes`` without a
    backbone's own sizes)."""
    if levels > 1:
        return tuple((32.0 * 2**i,) for i in range(levels))
    return ((128.0, 256.0, 512.0),)


@dataclass
class AnchorSuggestion:
    """What :func:`suggest_anchors` found for a data set."""

    anchor_sizes: list[list[float]]  # per level, as model.anchor_sizes
    aspect_ratios: list[float]  # as model.aspect_ratios
    num_objects: int
    uncovered: int  # objects without a suggested anchor at IoU >= iou_threshold (centred)
    default_sizes: list[list[float]]
    default_ratios: list[float]
    default_uncovered: int  # the same count for the defaults
    min_size: int
    max_size: int
    iou_threshold: float
    size_quantiles: tuple[float, float, float]  # 5%, 50%, 95% of the scaled sqrt(w * h)
    ratio_quantiles: tuple[float, float, float]  # 5%, 50%, 95% of h / w

    def set_flags(self) -> list[str]:
        """The ``--set`` flags that give a model these anchors (and the scale they assume)."""
        sizes = "[" + ", ".join("[" + ", ".join(f"{s:g}" for s in level) + "]" for level in self.anchor_sizes) + "]"
        ratios = "[" + ", ".join(f"{r:g}" for r in self.aspect_ratios) + "]"
        return [
            f"--set model.anchor_sizes='{sizes}'",
            f"--set model.aspect_ratios='{ratios}'",
            f"--set model.min_size={self.min_size}",
            f"--set model.max_size={self.max_size}",
        ]


def scaled_box_shapes(records: Sequence[ImageRecord], min_size: int, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Widths and heights ``([N], [N])`` of every box after its image is rescaled as the models do."""
    widths, heights = [], []
    for record in records:
        if not len(record.boxes):
            continue
        new_h, new_w = resized_shape(record.height, record.width, min_size, max_size)
        boxes = record.boxes.astype(np.float64)  # [n, 4]
        widths.append((boxes[:, 2] - boxes[:, 0]) * (new_w / record.width))
        heights.append((boxes[:, 3] - boxes[:, 1]) * (new_h / record.height))
    if not widths:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(widths), np.concatenate(heights)


def best_anchor_iou(
    widths: np.ndarray, heights: np.ndarray, sizes: Sequence[float], aspect_ratios: Sequence[float]
) -> np.ndarray:
    """``[N]``: for each box ``widths[i] x heights[i]``, the best IoU of an anchor of one of the
    ``sizes x aspect_ratios`` centred on it (the library's anchor shapes, ``cell_anchors``)."""
    if not len(widths):
        return np.zeros(0)
    anchors = cell_anchors(list(sizes), list(aspect_ratios)).to(torch.float64)  # [A, 4] centred on (0, 0)
    w = torch.as_tensor(widths, dtype=torch.float64)
    h = torch.as_tensor(heights, dtype=torch.float64)
    boxes = torch.stack((-w / 2, -h / 2, w / 2, h / 2), dim=1)  # [N, 4] centred on (0, 0)
    return box_iou(boxes, anchors).max(dim=1).values.numpy()  # [N]


def _uncovered(
    widths: np.ndarray, heights: np.ndarray, sizes: Sequence[Sequence[float]], ratios: Sequence[float],
    iou_threshold: float,
) -> int:
    """How many boxes ``widths[i] x heights[i]`` no anchor of ``sizes`` (per level) x ``ratios`` covers."""
    flat = sorted({s for level in sizes for s in level})
    return int((best_anchor_iou(widths, heights, flat, ratios) < iou_threshold).sum())


def uncovered_objects(
    records: Sequence[ImageRecord],
    anchor_sizes: Sequence[Sequence[float]],
    aspect_ratios: Sequence[float],
    *,
    min_size: int,
    max_size: int,
    iou_threshold: float = POSITIVE_IOU,
) -> int:
    """The objects of ``records`` without an anchor of ``anchor_sizes`` (per level, as
    ``model.anchor_sizes``) x ``aspect_ratios`` at IoU >= ``iou_threshold``, centred on them, once
    their images are rescaled by ``min_size`` / ``max_size`` (the count :func:`suggest_anchors`
    reports, for any anchors: a model's defaults, say)."""
    widths, heights = scaled_box_shapes(records, min_size, max_size)
    keep = (widths > 0) & (heights > 0)
    return _uncovered(widths[keep], heights[keep], anchor_sizes, aspect_ratios, iou_threshold)


def _spread(values: Sequence[float]) -> list[float]:
    """Three sorted values pushed at least a factor sqrt(2) apart around the middle one."""
    lo, mid, hi = sorted(values)
    return [min(lo, mid / _MIN_SPACING), mid, max(hi, mid * _MIN_SPACING)]


def _pyramid_sizes(widths: np.ndarray, heights: np.ndarray, ratios: list[float], levels: int) -> list[float]:
    """The doubling sizes ``a, 2a, ..., 2^(L-1) a`` that cover the most boxes (module docstring)."""
    if len(widths) > _MAX_SEARCH_BOXES:  # evenly spaced in size order: deterministic and representative
        order = np.argsort(np.sqrt(widths * heights), kind="stable")
        pick = order[np.linspace(0, len(order) - 1, _MAX_SEARCH_BOXES).round().astype(int)]
        widths, heights = widths[pick], heights[pick]
    sides = np.sqrt(widths * heights)
    centre = math.log2(float(np.median(sides)))
    lo = math.floor(math.log2(max(sides.min(), 1.0)) * _GRID_STEPS_PER_OCTAVE) - _GRID_STEPS_PER_OCTAVE * (levels - 1)
    hi = math.ceil(math.log2(max(sides.max(), 1.0)) * _GRID_STEPS_PER_OCTAVE)
    best: tuple[tuple[int, float, float], list[float]] | None = None
    for step in range(lo, hi + 1):
        start = 2.0 ** (step / _GRID_STEPS_PER_OCTAVE)
        sizes = [float(round(start * 2**i)) for i in range(levels)]
        if sizes[0] < 1:
            continue
        iou = best_anchor_iou(widths, heights, sizes, ratios)
        # Fewest uncovered; then the best mean IoU; then the pyramid centred on the median box.
        score = (int((iou < POSITIVE_IOU).sum()), -round(float(iou.mean()), 3),
                 abs(math.log2(start) + (levels - 1) / 2 - centre))
        if best is None or score < best[0]:
            best = (score, sizes)
    assert best is not None
    return best[1]


def suggest_anchors(
    records: Sequence[ImageRecord],
    *,
    min_size: int = 600,
    max_size: int = 1000,
    levels: int = 5,
    iou_threshold: float = POSITIVE_IOU,
) -> AnchorSuggestion:
    """Anchor sizes and aspect ratios for the boxes of ``records`` (see the module docstring).

    ``levels`` is the number of feature levels of the model: 1 (a single feature map, three
    sizes) or that of an FPN (5 for the ResNet-FPN backbones: one size per level).
    Raises ``ValueError`` when there are no boxes or the arguments are not positive.
    """
    if min_size <= 0 or max_size <= 0 or levels <= 0:
        raise ValueError(f"suggest_anchors: min_size, max_size and levels must be positive, got {min_size}, {max_size}, {levels}")
    widths, heights = scaled_box_shapes(records, min_size, max_size)
    keep = (widths > 0) & (heights > 0)
    widths, heights = widths[keep], heights[keep]
    if not len(widths):
        raise ValueError("suggest_anchors: the data set has no boxes to choose anchors from")
    sides = np.sqrt(widths * heights)
    ratios = heights / widths
    aspect_ratios = [round(r, 2) for r in _spread(np.quantile(ratios, [0.1, 0.5, 0.9]).tolist())]
    if levels == 1:
        anchor_sizes = [[float(round(s)) for s in _spread(np.quantile(sides, [1 / 6, 1 / 2, 5 / 6]).tolist())]]
    else:
        anchor_sizes = [[s] for s in _pyramid_sizes(widths, heights, aspect_ratios, levels)]

    def uncovered(sizes: Sequence[Sequence[float]], ratios_: Sequence[float]) -> int:
        return _uncovered(widths, heights, sizes, ratios_, iou_threshold)

    defaults = [list(level) for level in default_anchor_sizes(levels)]
    return AnchorSuggestion(
        anchor_sizes=anchor_sizes,
        aspect_ratios=aspect_ratios,
        num_objects=len(widths),
        uncovered=uncovered(anchor_sizes, aspect_ratios),
        default_sizes=defaults,
        default_ratios=list(DEFAULT_ASPECT_RATIOS),
        default_uncovered=uncovered(defaults, DEFAULT_ASPECT_RATIOS),
        min_size=min_size,
        max_size=max_size,
        iou_threshold=iou_threshold,
        size_quantiles=tuple(float(v) for v in np.quantile(sides, [0.05, 0.5, 0.95])),  # type: ignore[arg-type]
        ratio_quantiles=tuple(float(v) for v in np.quantile(ratios, [0.05, 0.5, 0.95])),  # type: ignore[arg-type]
    )


def format_anchor_suggestion(suggestion: AnchorSuggestion) -> str:
    """The text ``rcnn data check --suggest-anchors`` prints."""
    s = suggestion
    levels = len(s.anchor_sizes)
    q, r = s.size_quantiles, s.ratio_quantiles

    def sizes_text(sizes: Sequence[Sequence[float]]) -> str:
        return "[" + ", ".join("[" + ", ".join(f"{v:g}" for v in level) + "]" for level in sizes) + "]"

    return "\n".join([
        f"anchors ({levels} level{'s' if levels > 1 else ''}; boxes after rescaling to min_size {s.min_size}, "
        f"max_size {s.max_size}): {s.num_objects} objects",
        f"  scaled box size sqrt(w*h): 5% {q[0]:.0f}, median {q[1]:.0f}, 95% {q[2]:.0f} px; "
        f"aspect h/w: 5% {r[0]:.2f}, median {r[1]:.2f}, 95% {r[2]:.2f}",
        f"  suggested: anchor_sizes {sizes_text(s.anchor_sizes)}, aspect_ratios "
        f"[{', '.join(f'{v:g}' for v in s.aspect_ratios)}]",
        f"    {' '.join(s.set_flags())}",
        f"  objects without an anchor at IoU >= {s.iou_threshold:g}: {s.uncovered} of {s.num_objects} with the "
        f"suggested anchors; {s.default_uncovered} of {s.num_objects} with the defaults "
        f"(anchor_sizes {sizes_text(s.default_sizes)}, aspect_ratios [{', '.join(f'{v:g}' for v in s.default_ratios)}])",
        "  (best case: each object's anchors centred on it; anchors on the feature grid can only do worse)",
    ])


@dataclass
class InputSizeSuggestion:
    """What :func:`suggest_input_size` found for a data set."""

    min_size: int | list[int]  # as model.min_size (a list: multi-scale training, scaled together)
    max_size: int  # as model.max_size
    image_short_side: float  # the images' median shorter side, px
    small_object_fraction: float  # the 5% quantile of the boxes' sqrt(w * h) / their image's shorter side
    needed: int  # the shorter side at which those objects span ``smallest_object`` px (a multiple of 32)
    smallest_object: int

    @property
    def small_object_px(self) -> float:
        """The 5%-quantile object's sqrt(w * h) at the suggested size (the largest ``min_size``)."""
        largest = max(self.min_size) if isinstance(self.min_size, list) else self.min_size
        return self.small_object_fraction * largest


def _step_up(value: float) -> int:
    """``value`` rounded up to a multiple of 32 (at least 32)."""
    return max(_SIZE_STEP, math.ceil(value / _SIZE_STEP - 1e-9) * _SIZE_STEP)


def suggest_input_size(
    records: Sequence[ImageRecord],
    min_size: int | Sequence[int],
    max_size: int,
    *,
    smallest_object: int = SMALLEST_OBJECT,
    largest: int = LARGEST_SUGGESTED_SIZE,
) -> InputSizeSuggestion:
    """The input size for the images and boxes of ``records``, from a config's ``min_size`` /
    ``max_size`` (the detectors' rescaling: shorter side ``min_size``, longer at most ``max_size``).

    The shorter side ``s`` is the one at which the smallest objects (the 5% quantile of the boxes'
    ``sqrt(w * h)``, each relative to its image's shorter side) span ``smallest_object`` px,
    rounded up to a multiple of 32, then bounded:

    - at least the config's ``min_size`` (its largest value, for a list), or the images' own
      median shorter side (rounded up to 32) when that is less: small images are not enlarged
      when their objects do not need it;
    - at most ``largest`` (or the config's ``min_size`` when that is larger).

    ``min_size`` and ``max_size`` are then scaled together by ``s`` / the config's ``min_size``
    (a list keeps its spread, each value a multiple of 32; ``max_size`` at least ``s``), so the
    config's ratio of the longer side's cap to the shorter side stays. Raises ``ValueError`` when
    there are no boxes.
    """
    sizes = [int(v) for v in min_size] if isinstance(min_size, Sequence) else [int(min_size)]
    if not sizes or min(sizes) <= 0 or max_size <= 0:
        raise ValueError(f"suggest_input_size: min_size and max_size must be positive, got {min_size}, {max_size}")
    shorter, fractions = [], []
    for record in records:
        short = min(record.height, record.width)
        shorter.append(short)
        if len(record.boxes) and short > 0:
            boxes = record.boxes.astype(np.float64)  # [n, 4]
            side = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
            fractions.append(side[side > 0] / short)
    fractions = np.concatenate(fractions) if fractions else np.zeros(0)
    if not len(fractions):
        raise ValueError("suggest_input_size: the data set has no boxes to choose the input size from")
    base = max(sizes)
    small = float(np.quantile(fractions, _SMALL_QUANTILE))
    needed = _step_up(smallest_object / small)
    image_short = float(np.median(shorter))
    low = min(base, _step_up(image_short))
    high = max(base, largest)
    chosen = min(max(needed, low), high)
    factor = chosen / base
    if len(sizes) == 1 and not isinstance(min_size, Sequence):
        new_min: int | list[int] = chosen
    else:
        new_min = [chosen if v == base else max(_SIZE_STEP, round(v * factor / _SIZE_STEP) * _SIZE_STEP) for v in sizes]
    new_max = max(chosen, _step_up(max_size * factor))
    return InputSizeSuggestion(
        min_size=new_min, max_size=new_max, image_short_side=image_short, small_object_fraction=small,
        needed=needed, smallest_object=smallest_object,
    )  # fmt: skip
