"""``rcnn data check``: validate a COCO or VOC data set and summarise it.

The summary gives what choosing a model's settings needs: images and their sizes, instances
per class, a histogram of box sizes (``sqrt(w * h)``, to choose anchor sizes), box aspect
ratios (to choose anchor ratios), images without objects, and every problem found, each
naming its file and annotation. Unlike the readers, the check does not stop at the first
error, and it decodes every image (``decode_images=False`` reads headers only).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rcnn.data.build import DatasetSource, find_splits, resolve_dataset
from rcnn.data.coco import read_coco
from rcnn.data.common import ImageRecord, Problem, image_size
from rcnn.data.voc import read_voc

__all__ = ["SplitReport", "check_dataset", "format_report"]

# Box size bins (px, sqrt of the area): the anchor sizes of Faster R-CNN are 128, 256, 512.
SIZE_EDGES = (0, 8, 16, 32, 64, 128, 256, 512, float("inf"))
_BAR = 40  # characters of the longest histogram bar
_MAX_PROBLEMS_SHOWN = 200


@dataclass
class SplitReport:
    """The findings for one split of a data set."""

    source: DatasetSource
    class_names: list[str] = field(default_factory=list)
    records: list[ImageRecord] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)
    with_segmentation: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)

    @property
    def warnings(self) -> int:
        return sum(p.severity == "warning" for p in self.problems)


def _default_splits(path: Path) -> list[str]:
    splits = find_splits(path)
    if "trainval" in splits:  # VOC: train and val are inside trainval
        splits = [s for s in splits if s not in ("train", "val")]
    return splits


def _check_images(report: SplitReport, decode: bool) -> None:
    for record in report.records:
        try:
            height, width = image_size(record.path, decode=decode)
        except (FileNotFoundError, ValueError) as exc:
            report.problems.append(Problem("error", str(record.path), str(exc).removeprefix(f"{record.path}: ")))
            continue
        if (height, width) != (record.height, record.width):
            report.problems.append(
                Problem("error", str(record.path), f"the image is {width}x{height} (WxH) but its annotations "
                        f"say {record.width}x{record.height}")
            )


def check_split(source: DatasetSource, decode_images: bool = True) -> SplitReport:
    """Read one split without stopping at errors, then check its images."""
    report = SplitReport(source)
    try:
        if source.format == "coco":
            index = read_coco(source.images_dir, source.ann_file, check_masks=True)
            report.image_names = [str(r.path.relative_to(source.images_dir)) for r in index.records]
            report.with_segmentation = sum(
                s is not None for r in index.records for s in (r.segmentations or [])
            )
        else:
            index = read_voc(source.root, source.split, source.options.get("class_names"))
            report.image_names = index.image_names
    except (FileNotFoundError, ValueError) as exc:  # the file as a whole is unreadable
        file = str(source.ann_file or source.root)
        report.problems.append(Problem("error", file, str(exc).removeprefix(f"{file}: ")))
        return report
    report.class_names = index.class_names
    report.records = index.records
    report.problems = list(index.problems)
    _check_images(report, decode_images)
    return report


def check_dataset(
    path_or_spec: str | os.PathLike | Mapping[str, Any],
    split: str | None = None,
    *,
    images_dir: str | os.PathLike | None = None,
    decode_images: bool = True,
) -> list[SplitReport]:
    """Check ``split`` (default: every split found) of a data set; one report per split."""
    if isinstance(path_or_spec, Mapping) or Path(path_or_spec).is_file():
        stem = "" if isinstance(path_or_spec, Mapping) else Path(path_or_spec).stem.removeprefix("instances_")
        splits = [split or stem]
    elif split:
        splits = [split]
    else:
        if not Path(path_or_spec).exists():
            raise FileNotFoundError(f"{path_or_spec}: data set path not found")
        splits = _default_splits(Path(path_or_spec))
        if not splits:
            raise ValueError(
                f"{path_or_spec}: no splits found: neither a COCO root (annotations/instances_*.json) "
                "nor a VOC root (Annotations/, JPEGImages/, ImageSets/Main/*.txt)"
            )
    return [check_split(resolve_dataset(path_or_spec, s, images_dir), decode_images) for s in splits]


def _histogram(values: np.ndarray) -> list[str]:
    counts, _ = np.histogram(values, bins=np.array(SIZE_EDGES, dtype=np.float64))
    top = max(int(counts.max()), 1)
    lines = []
    for lo, hi, count in zip(SIZE_EDGES[:-1], SIZE_EDGES[1:], counts):
        label = f"[{lo:>3}, {hi:>3})" if hi != float("inf") else f"[{lo:>3}, inf)"
        bar = "#" * round(_BAR * count / top)
        lines.append(f"    {label} {count:>8}  {bar}".rstrip())
    return lines


def _split_lines(report: SplitReport) -> list[str]:
    source = report.source
    lines = [f"split {source.split or '(file)'}: {source.describe()}"]
    if not report.class_names:
        lines.append("  could not be read")
    else:
        records = report.records
        boxes = np.concatenate([r.boxes for r in records]) if records else np.zeros((0, 4), np.float32)
        labels = np.concatenate([r.labels for r in records]) if records else np.zeros(0, np.int64)
        crowd = np.concatenate([r.iscrowd for r in records]) if records else np.zeros(0, bool)
        difficult = np.concatenate([r.difficult for r in records]) if records else np.zeros(0, bool)
        sizes = Counter((r.width, r.height) for r in records)
        size_text = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(3))
        more = f", {len(sizes) - 3} other sizes" if len(sizes) > 3 else ""
        lines.append(f"  images:                 {len(records)}" + (f"  (WxH: {size_text}{more})" if records else ""))
        flags = f"crowd {int(crowd.sum())}" + (f", difficult {int(difficult.sum())}" if source.format == "voc" else "")
        lines.append(f"  instances:              {len(labels)}  ({flags})")
        if source.format == "coco":
            lines.append(f"  with segmentation:      {report.with_segmentation} of {len(labels)}")
        empty = [name for name, r in zip(report.image_names, records) if len(r.labels) == 0]
        shown = f"  ({', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''})" if empty else ""
        lines.append(f"  images without objects: {len(empty)}{shown}")
        lines.append("  instances per class:")
        per_class = np.bincount(labels, minlength=len(report.class_names) + 1)
        width = max(len(n) for n in report.class_names)
        for label, name in enumerate(report.class_names, start=1):
            lines.append(f"    {name:<{width}} {per_class[label]:>8}")
        if len(boxes):
            w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            lines.append("  box size sqrt(w*h) in px (for anchor sizes):")
            lines += _histogram(np.sqrt(w * h))
            q = np.quantile(h / w, [0.05, 0.5, 0.95])
            lines.append(f"  box aspect h/w (for anchor ratios): 5% {q[0]:.2f}, median {q[1]:.2f}, 95% {q[2]:.2f}")
            lines.append(f"  box width px:  min {w.min():.1f}, median {np.median(w):.1f}, max {w.max():.1f}")
            lines.append(f"  box height px: min {h.min():.1f}, median {np.median(h):.1f}, max {h.max():.1f}")
    if not report.problems:
        lines.append("  problems: none")
    else:
        lines.append(f"  problems: {report.errors} error(s), {report.warnings} warning(s)")
        lines += [f"    {p}" for p in report.problems[:_MAX_PROBLEMS_SHOWN]]
        if len(report.problems) > _MAX_PROBLEMS_SHOWN:
            lines.append(f"    ... and {len(report.problems) - _MAX_PROBLEMS_SHOWN} more")
    return lines


def format_report(reports: list[SplitReport]) -> str:
    """The text ``rcnn data check`` prints."""
    lines = []
    for report in reports:
        lines += _split_lines(report)
        lines.append("")
    errors = sum(r.errors for r in reports)
    warnings = sum(r.warnings for r in reports)
    verdict = "OK" if errors == 0 else "FAILED"
    lines.append(f"{verdict}: {len(reports)} split(s) checked, {errors} error(s), {warnings} warning(s)")
    return "\n".join(lines)
