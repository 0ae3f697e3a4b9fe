"""Matching a model's classes with a data set's, by name: evaluation never pairs classes by position.

A model knows its class names (``classes.json`` of its run folder, background first); a data set
its own. They are matched by name (case and surrounding blanks ignored): the same list gives the
identity, the same set in another order a permutation, and a data set whose classes are a subset
of the model's (a COCO-trained model on a data set of some COCO classes) maps them, the
predictions of the model's other classes being dropped. A data set class the model does not know
is refused with both lists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ClassMapping", "match_classes"]


def _key(name: str) -> str:
    return str(name).strip().lower()


@dataclass(frozen=True)
class ClassMapping:
    """``to_data[model label]``: the data set's label for each model label, 0 where the data set has none."""

    to_data: tuple[int, ...]
    dropped: tuple[str, ...]  # model classes the data set does not have

    @property
    def identity(self) -> bool:
        return self.to_data == tuple(range(len(self.to_data))) and not self.dropped

    def apply(self, output: Mapping[str, Any]) -> dict[str, Any]:
        """One image's detections with data-set labels; detections of unmapped classes removed."""
        if self.identity:
            return dict(output)
        labels = output["labels"]
        table = torch.tensor(self.to_data, dtype=labels.dtype, device=labels.device)
        mapped = table[labels]  # [D]
        keep = mapped > 0
        out = {k: (v[keep] if isinstance(v, Tensor) and v.shape[:1] == labels.shape else v) for k, v in output.items()}
        out["labels"] = mapped[keep]
        return out


def match_classes(model_classes: Sequence[str], data_classes: Sequence[str], where: str = "the data set") -> ClassMapping:
    """The :class:`ClassMapping` of a model's classes onto a data set's (both background first).

    ``ValueError`` listing both when a class of the data set is not among the model's, or when a
    name appears twice among the model's classes that the data set uses.
    """
    model_fg, data_fg = list(model_classes)[1:], list(data_classes)[1:]
    index: dict[str, list[int]] = {}
    for label, name in enumerate(model_fg, start=1):
        index.setdefault(_key(name), []).append(label)
    to_data = [0] * len(model_classes)
    unknown = []
    for data_label, name in enumerate(data_fg, start=1):
        labels = index.get(_key(name))
        if not labels:
            unknown.append(name)
            continue
        if len(labels) > 1:
            raise ValueError(f"the model has class {name!r} {len(labels)} times; cannot match it with {where}")
        to_data[labels[0]] = data_label
    if unknown:
        raise ValueError(
            f"{where} has classes the model does not know: {unknown}. The model's classes: {model_fg}; "
            f"{where}'s: {data_fg}. Evaluate on data with the model's classes, or fine-tune the model on these "
            "(rcnn train --init-from RUN)"
        )
    dropped = tuple(name for label, name in enumerate(model_fg, start=1) if to_data[label] == 0)
    return ClassMapping(tuple(to_data), dropped)
