"""From a config to a model, and from a run folder back to the trained model.

The one place that knows both configs and models (above it: training and the commands; below
it: the models, which know no config):

- :func:`model_class`: the detector class of a ``model.name``, whose capability attributes
  (``needs_proposals``, ``predicts_masks``, ``trains_in_stages``, ``has_rpn``) the callers read;
- :func:`build_model`: the detector a ``model`` section describes;
- :func:`load_model`: a trained model rebuilt from its checkpoint folder alone (weights, the
  config and the class names stored beside them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcnn.config import Config, ModelCommon, load_config
from rcnn.io.checkpoints import find_checkpoint, load_checkpoint, read_checkpoint_weights
from rcnn.io.files import read_json
from rcnn.models import MODELS, DetectorCapabilities

__all__ = ["InitReport", "LoadedModel", "build_model", "initialize_from", "load_model", "model_class"]


def model_class(name: str) -> type[DetectorCapabilities]:
    """The detector class of ``model.name`` ``name``."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def build_model(model: ModelCommon, num_classes: int | None = None) -> nn.Module:
    """The detector a config's ``model`` section describes, with ``num_classes`` = K + 1 unless the
    section sets ``num_classes`` itself."""
    num_classes = model.num_classes or num_classes
    if num_classes is None:
        raise ValueError("model.num_classes is not set and no training data gives it")
    return model_class(model.name).build(
        model.backbone, num_classes, pretrained_backbone=model.pretrained_backbone,
        trainable_stages=model.trainable_stages, backbone_norm=model.backbone_norm, **model.options(),
    )  # fmt: skip


@dataclass
class LoadedModel:
    """A trained model with what was stored beside its weights."""

    model: nn.Module
    config: Config
    class_names: list[str]  # index = label, 0 the background
    checkpoint: Path
    categories: list[dict[str, Any]] | None = None  # index = label: {"id", "name"}, the data's own ids

    def __iter__(self):  # (model, config, class_names), as before
        return iter((self.model, self.config, self.class_names))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", *, for_inference: bool = True) -> LoadedModel:
    """Rebuild a trained model from its checkpoint alone: ``(model, config, class names)``.

    ``path`` is a run folder (its ``last``), a ``step_*`` folder or its ``model.safetensors``.
    With ``for_inference`` (the default) the model is in eval mode and optimised for inference
    (BatchNorm folded; it cannot be trained further: to continue training, use
    ``rcnn train --resume``).
    """
    ckpt = find_checkpoint(path)
    if not (ckpt / "config.yaml").is_file():
        raise FileNotFoundError(f"{ckpt}: no config.yaml beside the weights; pass --config too")
    config = load_config(ckpt / "config.yaml")
    class_names = read_json(ckpt / "classes.json") if (ckpt / "classes.json").is_file() else None
    num_classes = len(class_names) if class_names else None
    config.model.pretrained_backbone = None  # the checkpoint holds the trained weights
    model = build_model(config.model, num_classes)
    load_checkpoint(ckpt, model)
    model.to(device).eval()
    if for_inference and hasattr(model, "optimize_for_inference"):
        model.optimize_for_inference()
    names: Any = class_names or [f"class_{i}" for i in range(model.num_classes)]
    categories = read_json(ckpt / "categories.json") if (ckpt / "categories.json").is_file() else None
    return LoadedModel(model, config, list(names), ckpt, categories)


@dataclass
class InitReport:
    """What :func:`initialize_from` loaded from another run, and what it left as initialised."""

    source: Path
    loaded: int
    reinitialised: list[str]  # the class-specific parts, when the classes differ
    reason: str = ""

    def __str__(self) -> str:
        text = f"initialised from {self.source}: {self.loaded} tensors loaded"
        if self.reinitialised:
            text += f"; {', '.join(self.reinitialised)} newly initialised ({self.reason})"
        return text


def initialize_from(model: nn.Module, path: str | os.PathLike, class_names: list[str] | None = None) -> InitReport:
    """Load every tensor of another run's checkpoint into ``model`` except its class-specific
    layers when the classes differ (fine-tuning on another class set).

    The classes differ when their number differs (the predictor's shapes) or, with
    ``class_names`` (the new data's, background first), when the source run's names differ. Any
    other tensor must match by name and shape: ``ValueError`` naming the first that does not (the
    source is another architecture).
    """
    ckpt = find_checkpoint(path)
    weights = read_checkpoint_weights(ckpt, set(model.state_dict()))
    own = model.state_dict()
    source_names = read_json(ckpt / "classes.json") if (ckpt / "classes.json").is_file() else None

    def class_specific(key: str) -> bool:  # predictor_names are modules' or buffers' names
        return any(key == name or key.startswith(name + ".") for name in model.predictor_names)

    reason = ""
    shapes_differ = [k for k in own if class_specific(k) and k in weights and weights[k].shape != own[k].shape]
    if shapes_differ:
        reason = f"{model.num_classes - 1} classes instead of the source's"
    elif class_names is not None and source_names is not None and list(source_names) != list(class_names):
        reason = "the classes' names differ from the source's"
    keep_own = bool(reason)
    state = {}
    for key, value in own.items():
        if keep_own and class_specific(key):
            state[key] = value
            continue
        if key not in weights:
            raise ValueError(f"{ckpt}: no tensor {key!r}; was it trained with another architecture or config?")
        if weights[key].shape != value.shape:
            raise ValueError(
                f"{ckpt}: tensor {key!r} has shape {list(weights[key].shape)}, this model needs {list(value.shape)}; "
                "was it trained with another architecture or config?"
            )
        state[key] = weights[key]
    model.load_state_dict(state)
    reinitialised = list(model.predictor_names) if keep_own else []
    return InitReport(ckpt, sum(1 for k in state if not (keep_own and class_specific(k))), reinitialised, reason)
