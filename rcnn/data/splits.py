"""Splits of data sets that come without them: seeded stratified splits and plain split files.

A split file is a text file ``{split}.txt`` with one image per line, written as the image's
*key*: its path below the layout's images (or annotations) folder without the extension, which
for a flat folder is just the file stem (``raccoon-17``). Lines may also give the image's file
name or its path relative to the data set root; empty lines and ``#`` comments are ignored.

:func:`stratified_split` is what both ``rcnn data split`` (which writes the files) and
``build_dataset(..., val_fraction=...)`` (which writes nothing) use, so the same fraction and seed
give the same images on either path.
"""

from __future__ import annotations

import math
import os
import zlib
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from rcnn.data.records import Problem
from rcnn.io.files import write_text

__all__ = [
    "SPLIT_ALL",
    "SPLIT_FILE_NAMES",
    "KeyLookup",
    "find_split_files",
    "read_split_file",
    "split_positions",
    "stratified_split",
    "write_split_files",
]

SPLIT_ALL = "all"  # the split that is every image of a data set, whatever its split files say
# The split files `rcnn data check` looks for; any other `{name}.txt` is read when asked for by name.
SPLIT_FILE_NAMES = ("train", "val", "test", "trainval")


def stratified_split(
    keys: Sequence[str], classes: Sequence[Collection[str]], val_fraction: float, seed: int = 0
) -> dict[str, list[str]]:
    """Split ``keys`` into ``{"train": [...], "val": [...]}`` (each sorted), stratified by class.

    ``classes[i]`` are the class names of the objects of image ``keys[i]`` (empty: an image
    without objects). Each image is placed by its *rarest* class (the one in fewest images), so
    the images of every class are spread over train and val by ``val_fraction``, rare classes
    first; images without objects form a stratum of their own. Within a stratum the images are
    shuffled by a generator seeded with ``(seed, the stratum's name)`` and the first
    ``val_fraction`` of them go to val: the split of one class does not change when another
    class gains images. The stratum sizes are rounded so that val holds ``round(val_fraction * N)``
    images in all (at least one, and at least one image stays in train).

    Raises ``ValueError`` for a fraction outside (0, 1), a negative seed, fewer than two images
    or a repeated key.
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if int(seed) < 0:
        raise ValueError(f"split seed must be a non-negative integer, got {seed}")
    if len(keys) != len(classes):
        raise ValueError(f"stratified_split: {len(keys)} keys but {len(classes)} class sets")
    if len(set(keys)) != len(keys):
        repeated = sorted(k for k, n in Counter(keys).items() if n > 1)[:5]
        raise ValueError(f"stratified_split: repeated image keys {repeated}")
    if len(keys) < 2:
        raise ValueError(f"cannot split {len(keys)} image(s) into train and val: a split needs at least 2 images")

    images_with: dict[str, int] = {}
    for names in classes:
        for name in set(names):
            images_with[name] = images_with.get(name, 0) + 1
    strata: dict[str, list[str]] = {}
    for key, names in zip(keys, classes):
        rarest = min(set(names), key=lambda c: (images_with[c], c)) if names else ""
        strata.setdefault(rarest, []).append(key)
    # Rarest first: they get the rounding remainders first.
    order = sorted(strata, key=lambda s: (images_with.get(s, 0) if s else math.inf, s))

    total = len(keys)
    n_val = min(max(math.floor(val_fraction * total + 0.5), 1), total - 1)
    quota = {s: val_fraction * len(strata[s]) for s in order}
    take = {s: math.floor(quota[s]) for s in order}
    by_remainder = sorted(order, key=lambda s: -(quota[s] - take[s]))  # stable: rarest first among equals
    while sum(take.values()) < n_val:
        grew = False
        for s in by_remainder:
            if sum(take.values()) >= n_val:
                break
            if take[s] < len(strata[s]):
                take[s] += 1
                grew = True
        if not grew:
            break

    train: list[str] = []
    val: list[str] = []
    for s in order:
        members = sorted(strata[s])
        rng = np.random.default_rng([int(seed), zlib.crc32(s.encode("utf-8"))])
        shuffled = [members[i] for i in rng.permutation(len(members))]
        val += shuffled[: take[s]]
        train += shuffled[take[s] :]
    return {"train": sorted(train), "val": sorted(val)}


def split_positions(
    keys: Sequence[str], classes: Sequence[Collection[str]], split: str, val_fraction: float, seed: int = 0
) -> list[int]:
    """Positions (in ``keys`` order) of the images of ``split`` (``train``, ``val`` or ``all``)
    when the images are split on the fly by :func:`stratified_split`."""
    if split == SPLIT_ALL:
        return list(range(len(keys)))
    if split not in ("train", "val"):
        raise ValueError(f"with val_fraction the splits are 'train' and 'val' (or 'all'), not {split!r}")
    chosen = set(stratified_split(keys, classes, val_fraction, seed)[split])
    return [i for i, key in enumerate(keys) if key in chosen]


class KeyLookup:
    """Finds the image key a split-file line means (module docstring): the key itself, the
    image's file name or relative path, with or without the extension."""

    def __init__(self, keys: Sequence[str], aliases: Mapping[str, Sequence[str]] | None = None) -> None:
        self.keys = set(keys)
        self._alias: dict[str, str | None] = {}  # None: ambiguous
        for key in keys:
            names = {key, key.rsplit("/", 1)[-1], *(aliases or {}).get(key, ())}
            for name in names:
                for form in {name, os.path.splitext(name)[0]}:
                    if form == key:
                        continue
                    self._alias[form] = key if self._alias.get(form, key) == key else None

    def find(self, line: str) -> str | None:
        """The key ``line`` names, or ``None`` (unknown or ambiguous)."""
        text = line.replace("\\", "/").removeprefix("./")
        if text in self.keys:
            return text
        for form in (text, os.path.splitext(text)[0]):
            found = self._alias.get(form)
            if found is not None:
                return found
        return None


def read_split_file(path: Path, lookup: KeyLookup) -> tuple[list[str], list[Problem]]:
    """The keys a split file lists (in its order, repeats dropped) and a problem per unknown line.

    An unknown line is an error that concerns that one entry (``skip_broken`` leaves it out).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason}); a split file lists one image per line") from None
    keys: list[str] = []
    seen: set[str] = set()
    problems: list[Problem] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key = lookup.find(line)
        if key is None:
            problems.append(
                Problem("error", str(path), f"{line!r} is not an image of the data set (no annotation file or image "
                        "of that name); fix or remove the line", f"line {number}", missing_file=True,
                        image=f"{path}:{number}")
            )
            continue
        if key not in seen:
            seen.add(key)
            keys.append(key)
    return keys, problems


def find_split_files(folder: Path) -> dict[str, Path]:
    """The split files (:data:`SPLIT_FILE_NAMES`) present in ``folder``."""
    return {name: folder / f"{name}.txt" for name in SPLIT_FILE_NAMES if (folder / f"{name}.txt").is_file()}


def write_split_files(folder: Path, splits: Mapping[str, Sequence[str]], *, force: bool = False) -> list[Path]:
    """Write ``{split}.txt`` (one key per line) into ``folder``, atomically; returns the paths.

    An existing file with other contents is kept and ``ValueError`` raised unless ``force``: a
    split somebody trained on is not silently replaced.
    """
    texts = {name: "".join(f"{key}\n" for key in keys) for name, keys in splits.items()}
    if not force:
        for name, text in texts.items():
            path = folder / f"{name}.txt"
            if path.is_file() and path.read_text(encoding="utf-8", errors="replace") != text:
                raise ValueError(
                    f"{path}: exists with a different split; pass --force (force=True) to replace it, "
                    "or --out DIR to write the new split elsewhere"
                )
    return [write_text(folder / f"{name}.txt", text) for name, text in texts.items()]
