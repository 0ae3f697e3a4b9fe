"""From a config to a model, and from a run folder back to the trained model.

The one place that knows both configs and models (above it: training and the commands; below
it: the models, which know no config):

- :func:`model_class`: the detector class of a ``model.name``, whose capability attributes
  (``needs_proposals``, ``predicts_masks``, ``trains_in_stages``, ``has_rpn``) the callers read;
- :func:`build_model`: the detector a ``model`` section describes;
- :func:`resolved_config`: the config with the ``model`` section a built model actually runs
  with, every field given (what a run folder records, so that a later change of a default, or of
  a per-backbone choice, never changes an old run);
- :func:`load_model`: a trained model rebuilt from its checkpoint folder alone (weights, the
  config and the class names stored beside them).

A config's ``model`` section states what differs from the defaults; several defaults are chosen
when the model is built, from the backbone (``default_rpn_settings``, ``default_roi_settings``,
``default_anchor_sizes``, the pooler kind, the backbone's BatchNorm). :func:`resolved_config`
reads the values back from the built model's parts (``model.effective_options()``: their settings
objects, anchors, poolers, transform), not by running the default rules again, so the record is
what runs; building from it gives the same model whatever the defaults are then. Run folders
written before (partial sections) still load: their missing fields take today's defaults, as
they always did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from rcnn.config import MODEL_SECTIONS, Config, ModelCommon, config_from_dict, load_config
from rcnn.io.checkpoints import find_checkpoint, load_checkpoint, read_checkpoint_weights
from rcnn.io.files import read_json
from rcnn.models import MODELS, DetectorCapabilities

__all__ = [
    "InitReport",
    "LoadedModel",
    "build_model",
    "initialize_from",
    "load_model",
    "model_class",
    "resolved_config",
    "resolved_model_section",
]


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


def _backbone_norm(model: nn.Module, section: ModelCommon) -> str | None:
    """The backbone's BatchNorm as built: ``frozen`` or ``bn`` (the tiny backbone's is always
    ``bn``); a backbone without normalisation layers keeps what the section says."""
    body = getattr(model, "backbone", None)
    layers = list(body.modules()) if isinstance(body, nn.Module) else []
    if any(isinstance(layer, FrozenBatchNorm2d) for layer in layers):
        return "frozen"
    if any(isinstance(layer, nn.BatchNorm2d) for layer in layers):
        return "bn"
    return section.backbone_norm


def resolved_model_section(section: ModelCommon, model: nn.Module) -> ModelCommon:
    """The ``model`` section ``model`` (built from ``section``) runs with: every field given, the
    values read from the model's parts (:meth:`rcnn.models.base.DetectorCapabilities.effective_options`),
    its number of classes and its backbone's BatchNorm; the pre-trained weights file and the
    trainable stages as the section says (they matter for training only)."""
    name = getattr(type(model), "name", None)
    if name != section.name:
        raise ValueError(f"model.name is {section.name!r} but the model is a {type(model).__name__}")
    built_backbone = getattr(getattr(model, "backbone", None), "name", section.backbone)
    if built_backbone != section.backbone:
        raise ValueError(f"model.backbone is {section.backbone!r} but the model's backbone is {built_backbone!r}")
    common = {
        "name": section.name,
        "backbone": section.backbone,
        "pretrained_backbone": section.pretrained_backbone,
        "trainable_stages": section.trainable_stages,
        "backbone_norm": _backbone_norm(model, section),
        "num_classes": model.num_classes,
    }
    try:
        return MODEL_SECTIONS[section.name].model_validate({**common, **model.effective_options()})
    except ValueError as exc:  # pydantic's ValidationError is one
        raise ValueError(f"the options {type(model).__name__} runs with do not make a model section: {exc}") from None


def resolved_config(config: Config, model: nn.Module) -> Config:
    """``config`` with the ``model`` section that ``model`` (built from it) runs with, every field
    given (:func:`resolved_model_section`): what a run folder records (``config_to_yaml`` of it)."""
    section = resolved_model_section(config.model, model)
    data = config.model_dump(mode="json")
    data["model"] = section.model_dump(mode="json")
    return config_from_dict(data, f"the resolved config of {type(model).__name__}")


@dataclass
class LoadedModel:
    """A trained model with what was stored beside its weights."""

    model: nn.Module
    config: Config
    class_names: list[str]  # index = label, 0 the background
    checkpoint: Path
    categories: list[dict[str, Any]] | None = None  # index = label: {"id", "name"}, the data's own ids


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", *, for_inference: bool = True) -> LoadedModel:
    """Rebuild a trained model from its checkpoint alone: ``(model, config, class names)``.

    ``path`` is a run folder (its ``last``), a ``step_*`` folder or its ``model.safetensors``.
    With ``for_inference`` (the default) the model is in eval mode and optimised for inference
    (BatchNorm folded; it cannot be trained further: to continue training, use
    ``rcnn train --resume``).

    The model is built from the recorded ``model`` section: a resolved one (every field, see
    :func:`resolved_config`) rebuilds the model that was trained whatever today's defaults are; an
    older, partial one takes today's defaults for the fields it lacks, as before. The returned
    config is the resolved one, with the values the loaded model runs with.
    """
    ckpt = find_checkpoint(path)
    if not (ckpt / "config.yaml").is_file():
        raise FileNotFoundError(f"{ckpt}: no config.yaml beside the weights; pass --config too")
    config = load_config(ckpt / "config.yaml")
    class_names = read_json(ckpt / "classes.json") if (ckpt / "classes.json").is_file() else None
    num_classes = len(class_names) if class_names else None
    if config.model.pretrained_backbone is not None and config.model.backbone_norm is None:
        config.model.backbone_norm = "frozen"  # what building with those weights chose (a partial section)
    config.model.pretrained_backbone = None  # the checkpoint holds the trained weights
    model = build_model(config.model, num_classes)
    load_checkpoint(ckpt, model)
    config = resolved_config(config, model)  # before BatchNorm is folded away
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
