"""``rcnn data check``: validate a data set (any format ``build_dataset`` reads) and summarise it.

The summary gives what choosing a model's settings needs: images and their sizes, instances
per class, a histogram of box sizes (``sqrt(w * h)``, to choose anchor sizes), box aspect
ratios (to choose anchor ratios), images without objects, and every problem found, each
naming its file and annotation. Unlike the readers, the check does not stop at the first
error. Every image file is checked against its annotation: its header (size) and its end (a
file cut short), in a few threads (``decode_images`` decodes every pixel, ``headers_only`` reads
the headers alone; docs/data.md, "Large data sets"). With
``skip_broken`` the problems that a reader with ``skip_broken=True`` would skip are shown as the
warnings it would give, and the summary is of the images it would keep.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rcnn.data.reading import DatasetSource, coco_keys, dataset_splits, layout_index, resolve_dataset
from rcnn.data.coco import image_names, read_coco
from rcnn.data.records import ImageCheck, ImageRecord, Problem, RecordTable, check_images, skip_broken_images
from rcnn.data.layouts import RawSet
from rcnn.data.splits import split_positions
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
    description: str = ""  # the format and files; default ``source.describe()``
    class_names: list[str] = field(default_factory=list)
    category_ids: list[int] | None = None  # the COCO category id of each class, where the data has them
    records: Sequence[ImageRecord] = field(default_factory=list)  # a RecordTable once read
    image_names: list[str] = field(default_factory=list)
    with_segmentation: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)

    @property
    def warnings(self) -> int:
        return sum(p.severity == "warning" for p in self.problems)


def _image_check(decode_images: bool, headers_only: bool) -> ImageCheck:
    if decode_images and headers_only:
        raise ValueError("check_dataset: decode_images and headers_only exclude each other")
    return "decode" if decode_images else "header" if headers_only else "complete"


def check_split(
    source: DatasetSource,
    images: ImageCheck = "complete",
    *,
    skip_broken: bool = False,
    raw: RawSet | None = None,
    progress: bool = False,
) -> SplitReport:
    """Read one split without stopping at errors, then check its images (``images``: how, one of
    :data:`~rcnn.data.records.IMAGE_CHECKS`; ``progress``: a progress bar on a terminal).

    ``raw``: the layout already parsed (one parse serves every split of a check).
    """
    report = SplitReport(source, description=source.describe())
    try:
        if source.format == "coco":
            index = read_coco(source.images_dir, source.ann_file, check_masks=True)
            records, problems = index.records, list(index.problems)
            names = image_names(records.path_strings(), source.images_dir)  # type: ignore[arg-type]
            if source.val_fraction is not None:
                classes = [{index.class_names[label - 1] for label in records.labels_of(i).tolist()}
                           for i in range(len(records))]  # fmt: skip
                keep = split_positions(coco_keys(records, source.images_dir), classes, source.split,
                                       source.val_fraction, source.split_seed)
                paths = records.path_strings()
                mine = {paths[i] for i in keep}
                others = set(paths) - mine

                def shown_here(problem: Problem) -> bool:
                    if problem.image is None or problem.image in mine:
                        return True
                    # An image that could not be read at all is in no split: shown with train.
                    return problem.image not in others and source.split != "val"

                problems = [p for p in problems if shown_here(p)]
                records, names = records.take(keep), [names[i] for i in keep]
        elif source.format == "voc":
            index = read_voc(source.root, source.split, source.options.get("class_names"))
            records, problems, names = RecordTable.from_records(index.records), list(index.problems), index.image_names
        else:
            index = layout_index(source, raw)
            records, problems, names = RecordTable.from_records(index.records), list(index.problems), index.image_names
            report.description = index.raw.description + (
                f", split on the fly: val_fraction {source.val_fraction}, seed {source.split_seed}"
                if source.val_fraction is not None else ""
            )
    except (FileNotFoundError, ValueError) as exc:  # the file as a whole is unreadable
        file = str(source.ann_file or source.root)
        report.problems.append(Problem("error", file, str(exc).removeprefix(f"{file}: ")))
        return report
    problems += check_images(records, images, progress=progress)
    if skip_broken:
        kept, problems = skip_broken_images(records, problems)
        if len(kept) != len(records):
            kept_paths = set(kept.path_strings())  # type: ignore[attr-defined]
            names = [n for n, path in zip(names, records.path_strings()) if path in kept_paths]
        records = kept  # type: ignore[assignment]
    report.class_names = index.class_names
    cat_ids = getattr(index, "label_to_cat_id", None)
    if cat_ids:
        report.category_ids = [cat_ids[label] for label in range(1, len(index.class_names) + 1)]
    report.records = records
    report.image_names = names
    report.problems = problems
    report.with_segmentation = records.segmentation_count()
    return report


def check_dataset(
    path_or_spec: str | os.PathLike | Mapping[str, Any],
    split: str | None = None,
    *,
    images_dir: str | os.PathLike | None = None,
    decode_images: bool = False,
    headers_only: bool = False,
    val_fraction: float | None = None,
    split_seed: int = 0,
    skip_broken: bool = False,
    progress: bool = False,
) -> list[SplitReport]:
    """Check ``split`` (default: every split found) of a data set; one report per split.

    With ``val_fraction`` the splits are ``train`` and ``val`` drawn on the fly (as
    ``build_dataset`` draws them); a layout without splits is checked as the one split ``all``.

    Each image file is checked against its annotation: by default its header (its size) and its
    end (a file cut short is found); ``decode_images`` decodes every pixel instead (also finds
    corrupt data inside a file; slow on a large data set); ``headers_only`` reads the headers
    alone. ``progress``: a progress bar while the images are checked, on a terminal.
    """
    how = _image_check(decode_images, headers_only)
    splits, raw = dataset_splits(path_or_spec, split, images_dir=images_dir, val_fraction=val_fraction)
    reports = [
        check_split(
            resolve_dataset(path_or_spec, s, images_dir, val_fraction=val_fraction, split_seed=split_seed),
            how,
            skip_broken=skip_broken,
            raw=raw,
            progress=progress,
        )
        for s in splits
    ]
    _compare_classes(reports)
    return reports


def _compare_classes(reports: list[SplitReport]) -> None:
    """A warning on each split whose classes (or COCO category ids) differ from the first split's:
    a model trained on one split is scored on another by class name, so the lists must agree."""
    read = [r for r in reports if r.class_names]
    if len(read) < 2:
        return
    first = read[0]
    for report in read[1:]:
        file = str(report.source.ann_file or report.source.root)
        names = f"split {first.source.split}: {first.class_names}; split {report.source.split}: {report.class_names}"
        if [n.strip().lower() for n in report.class_names] != [n.strip().lower() for n in first.class_names]:
            same_set = sorted(n.strip().lower() for n in report.class_names) == sorted(
                n.strip().lower() for n in first.class_names
            )
            what = "has the same classes in another order" if same_set else "has other classes"
            report.problems.append(Problem("warning", file, f"{what} than split {first.source.split} ({names})"))
        elif first.category_ids and report.category_ids and first.category_ids != report.category_ids:
            ids = f"split {first.source.split}: {first.category_ids}; split {report.source.split}: {report.category_ids}"
            report.problems.append(
                Problem("warning", file, f"has the same class names with other category ids than split {first.source.split} ({ids})")
            )


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
    lines = [f"split {source.split or '(file)'}: {report.description or source.describe()}"]
    if not report.class_names:
        lines.append("  could not be read")
    else:
        records = RecordTable.from_records(report.records)  # the columns: no record built
        boxes, labels, crowd, difficult = records.boxes, records.labels, records.iscrowd, records.difficult
        sizes = Counter(zip(records.widths.tolist(), records.heights.tolist()))
        size_text = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(3))
        more = f", {len(sizes) - 3} other sizes" if len(sizes) > 3 else ""
        lines.append(f"  images:                 {len(records)}" + (f"  (WxH: {size_text}{more})" if len(records) else ""))
        has_difficult = source.format in ("voc", "labelimg")
        flags = f"crowd {int(crowd.sum())}" + (f", difficult {int(difficult.sum())}" if has_difficult else "")
        lines.append(f"  instances:              {len(labels)}  ({flags})")
        if source.format not in ("voc", "labelimg"):
            lines.append(f"  with segmentation:      {report.with_segmentation} of {len(labels)}")
        empty = [name for name, count in zip(report.image_names, records.counts().tolist()) if count == 0]
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
    if len(reports) > 1:
        images = sum(len(r.records) for r in reports)
        instances = sum(len(RecordTable.from_records(r.records).labels) for r in reports)
        classes = max((len(r.class_names) for r in reports), default=0)
        lines.append(f"all splits: {images} images, {instances} instances, {classes} class(es)")
    errors = sum(r.errors for r in reports)
    warnings = sum(r.warnings for r in reports)
    verdict = "OK" if errors == 0 else "FAILED"
    lines.append(f"{verdict}: {len(reports)} split(s) checked, {errors} error(s), {warnings} warning(s)")
    return "\n".join(lines)
