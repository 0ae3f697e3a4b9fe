"""``rcnn data split``: write seeded, stratified split files for a data set that has none.

The split is :func:`rcnn.data.splits.stratified_split`, the one ``build_dataset(...,
val_fraction=...)`` draws on the fly: the same fraction and seed give the same images either way,
and the same files on every run. The files (``train.txt``, ``val.txt``: one image key per line)
go beside the data, or into ``out`` when the data cannot be written to; ``out`` then also gets an
``rcnn_dataset.json`` naming the data, so that the folder itself is a data set path
(``--set data.root=OUT``).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcnn.data.reading import LAYOUT_FORMATS, SPEC_FILE, read_raw, resolve_dataset
from rcnn.data.splits import SPLIT_ALL, stratified_split, write_split_files
from rcnn.io.files import write_json

__all__ = ["SplitReport", "make_splits"]


@dataclass
class SplitReport:
    """What :func:`make_splits` wrote."""

    description: str
    val_fraction: float
    seed: int
    splits: dict[str, list[str]]  # split -> keys
    images_per_class: dict[str, dict[str, int]]  # class -> split -> images holding it
    files: list[Path] = field(default_factory=list)
    folder: Path | None = None

    def lines(self) -> list[str]:
        """The summary ``rcnn data split`` prints."""
        out = [
            f"split {self.description}",
            f"  val_fraction {self.val_fraction}, seed {self.seed}: "
            + ", ".join(f"{name} {len(keys)} images" for name, keys in self.splits.items()),
        ]
        if self.images_per_class:
            width = max(len(c) for c in self.images_per_class)
            out.append(f"  {'class':<{width}}  images: {'  '.join(f'{s:>6}' for s in self.splits)}  val share")
            for name, counts in self.images_per_class.items():
                total = sum(counts.values())
                share = counts.get("val", 0) / total if total else 0.0
                cells = "  ".join(f"{counts.get(s, 0):>6}" for s in self.splits)
                out.append(f"  {name:<{width}}          {cells}  {share:.2f}")
        out.append("wrote " + ", ".join(str(f) for f in self.files))
        return out


def make_splits(
    path_or_spec: str | os.PathLike | Mapping[str, Any],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    images_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> SplitReport:
    """Split the images of a layout into train and val and write the split files (module docstring).

    Raises ``ValueError`` for a COCO or VOC data set (split a COCO file on the fly with
    ``val_fraction``; a VOC root has its splits), for a folder that cannot be written to without
    ``out``, and for existing split files with other contents without ``force``.
    """
    source = resolve_dataset(path_or_spec, SPLIT_ALL, images_dir)
    if source.format not in LAYOUT_FORMATS:
        where = source.ann_file or source.root
        raise ValueError(
            f"{where}: `rcnn data split` writes split files for the annotation-tool layouts; a {source.format.upper()} "
            "data set has its own splits (or split a COCO file on the fly with val_fraction / data.val_fraction)"
        )
    raw = read_raw(source)
    if raw.splits:
        raise ValueError(
            f"{raw.root}: already has the splits {', '.join(sorted(raw.splits))} (its folders, data.yaml or subsets); "
            "they are what split names read, so split files would not be used: split on the fly with val_fraction "
            "(data.val_fraction) to draw other ones"
        )
    keys = [image.key for image in raw.images]
    classes = [{obj.name for obj in image.objects} for image in raw.images]
    splits = stratified_split(keys, classes, val_fraction, seed)
    classes_of = dict(zip(keys, classes))
    per_class: dict[str, Counter[str]] = {}
    for split, members in splits.items():
        for key in members:
            for name in sorted(classes_of[key]):
                per_class.setdefault(name, Counter())[split] += 1
    if out is None:
        folder = Path(source.options.get("splits") or raw.root)
        # A folder without write permission bits is read-only by its owner's choice, even to a
        # user (root) whom the system would let write.
        if not os.access(folder, os.W_OK) or not folder.stat().st_mode & 0o222:
            raise ValueError(f"{folder}: read-only, so the split files cannot go beside the data; pass --out DIR (out=DIR)")
    else:
        folder = Path(out)
    files = write_split_files(folder, splits, force=force)
    if out is not None:
        spec: dict[str, Any] = {"format": raw.format, "root": str(Path(source.root).resolve())}  # type: ignore[arg-type]
        if source.images_dir is not None:
            spec["images"] = str(Path(source.images_dir).resolve())
        for key in ("annotations",):
            if source.options.get(key):
                spec[key] = str(Path(source.options[key]).resolve())
        for key in ("class_names", "class_attribute"):
            if source.options.get(key):
                spec[key] = source.options[key]
        files.append(write_json(folder / SPEC_FILE, spec))
    return SplitReport(
        description=raw.description,
        val_fraction=float(val_fraction),
        seed=int(seed),
        splits=splits,
        images_per_class={name: dict(counts) for name, counts in sorted(per_class.items())},
        files=files,
        folder=folder,
    )
