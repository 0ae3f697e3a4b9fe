"""Typed configuration: YAML files (``configs/``) validated into pydantic models, and the one
place where a configuration is turned into a model.

A config has three sections, ``model``, ``data`` and ``train``; every field has a default, so
a file only states what differs. ``rcnn train --set train.lr=0.01 --set model.backbone=vgg16``
overrides single fields (values are parsed as YAML). Errors name the file and the field.

Packaged configs can be given by name: ``--config faster_rcnn_tiny_shapes`` finds
``rcnn/configs/faster_rcnn_tiny_shapes.yaml`` (also reachable as ``configs/`` in a checkout).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "CONFIG_DIR",
    "Config",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "build_model",
    "config_to_yaml",
    "load_config",
    "override_settings",
    "resolve_config_path",
]

CONFIG_DIR = Path(__file__).parent / "configs"
MODEL_NAMES = ("rcnn", "fast_rcnn", "faster_rcnn", "mask_rcnn")
# The packaged config of each generation on the shapes data (demo, lineage benchmark).
SHAPES_CONFIGS = {name: f"{name}_tiny_shapes" for name in MODEL_NAMES}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which detector, on which backbone, with which settings (see each model's docs)."""

    name: Literal["rcnn", "fast_rcnn", "faster_rcnn", "mask_rcnn"] = "faster_rcnn"
    backbone: str = "tiny"
    pretrained_backbone: str | None = None  # local classification checkpoint (.pth / .safetensors)
    trainable_stages: int | None = None  # train only the last N backbone stages (None: all)
    num_classes: int | None = None  # K + 1; default: taken from the training data
    min_size: int | list[int] = 600  # shorter image side; a list: multi-scale training
    max_size: int = 1000
    anchor_sizes: list[list[float]] | None = None  # per feature level; default per backbone
    aspect_ratios: list[float] = [0.5, 1.0, 2.0]
    anchor_offset: float = 0.5  # anchor centre within its feature cell, in strides (torchvision: 0.0)
    pooler: Literal["pool", "align"] | None = None  # RoI pooling or RoIAlign; default per model
    sampling_ratio: int = 2
    aligned: bool = True  # RoIAlign's half-pixel alignment (torchvision's detectors: False)
    rpn: dict[str, Any] = Field(default_factory=dict)  # rcnn.proposals.rpn.RPNSettings fields
    roi: dict[str, Any] = Field(default_factory=dict)  # rcnn.heads.RoIHeadSettings fields
    mask: dict[str, Any] = Field(default_factory=dict)  # Mask R-CNN branch settings
    extra: dict[str, Any] = Field(default_factory=dict)  # model-specific options (R-CNN, Fast R-CNN)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        from rcnn.backbones import BACKBONES

        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r}; choose one of {', '.join(BACKBONES)}")
        return value


class ShapesSpec(_Section):
    """Generate the synthetic shapes data set at ``data.root`` if it is not there yet."""

    n_train: int = 400
    n_val: int = 100
    seed: int = 0
    image_size: int = 128


class DataConfig(_Section):
    """Where the data is: a COCO root, a COCO .json file or a VOC root (see ``rcnn data check``)."""

    root: str = "data/shapes"
    images: str | None = None  # images folder, when ``root`` is a COCO .json file
    train_split: str = "train"
    val_split: str = "val"
    shapes: ShapesSpec | None = None
    proposals_train: str | None = None  # proposals files (Fast R-CNN, R-CNN)
    proposals_val: str | None = None
    hflip: float = 0.5  # horizontal flip probability in training (Fast R-CNN §2.3)
    workers: int = 2  # data loader processes


class AlternatingConfig(_Section):
    """Iterations of each step of Faster R-CNN's 4-step alternating training (§3.2)."""

    rpn_iterations: int = 1000  # steps 1 and 3
    detector_iterations: int = 1000  # steps 2 and 4
    lr_factor_steps_3_4: float = 1.0  # learning-rate factor for the fine-tuning steps


class TrainConfig(_Section):
    """The training loop: optimiser, schedule, checkpoints, evaluation."""

    scheme: Literal["joint", "alternating"] = "joint"
    iterations: int = 1000
    time_budget_s: float | None = None  # stop early once this much training time has passed
    batch_size: int = 2  # images per step (per process under DDP)
    lr: float = 0.01
    lr_batch_size: int | None = None  # ``lr`` is for this total batch; scaled linearly (default: batch_size)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Literal["step", "cosine", "constant"] = "step"
    steps: list[float] = [0.67, 0.89]  # step schedule: fractions of ``iterations`` (or absolute if > 1)
    gamma: float = 0.1
    warmup_iterations: int = 100
    warmup_factor: float = 0.001
    clip_grad_norm: float | None = None
    amp: Literal["auto", "on", "off"] = "auto"  # mixed precision, on CUDA only
    log_every: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int | None = None  # evaluate on the val split every N iterations (and at the end)
    max_bad_steps: int = 20  # consecutive non-finite losses before giving up
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available, else CPU
    alternating: AlternatingConfig = Field(default_factory=AlternatingConfig)

    @field_validator("iterations", "batch_size", "log_every", "checkpoint_every")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"must be positive, got {value}")
        return value


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A config file path, or the name of a packaged config (with or without ``.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if packaged.is_file() and (len(path.parts) == 1 or path.parent.name == "configs"):
        return packaged
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {name_or_path} not found (packaged configs: {available})")


def _format_error(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see docs/configs.md)"
        lines.append(f"{source}: {where}: {message}")
    return "\n".join(lines)


def _parse(data: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_format_error(source, exc)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` strings (values parsed as YAML) to a config dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.01")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {item!r}: value is not valid YAML ({exc})") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read and validate a config file (or the defaults when ``path`` is None), then apply overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        resolved = resolve_config_path(path)
        source = str(resolved)
        try:
            loaded = yaml.safe_load(resolved.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"{resolved}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{resolved}: expected a mapping with sections model, data, train")
        data = loaded or {}
    if overrides:
        data = apply_overrides(data, overrides)
        source += " (with --set overrides)"
    return _parse(data, source)


def config_to_yaml(config: Config) -> str:
    """The full config (defaults included) as YAML, as stored beside each checkpoint."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# The ModelConfig fields each model's builder takes (beyond backbone, classes and weights). R-CNN
# warps regions from the original image (no resizing, no RoI pooling): its options are in ``extra``.
_DETECTOR_FIELDS = ("min_size", "max_size", "pooler", "sampling_ratio", "aligned", "roi")
_RPN_FIELDS = ("anchor_sizes", "aspect_ratios", "anchor_offset", "rpn")
MODEL_FIELDS: dict[str, tuple[str, ...]] = {
    "rcnn": (),
    "fast_rcnn": _DETECTOR_FIELDS,
    "faster_rcnn": _DETECTOR_FIELDS + _RPN_FIELDS,
    "mask_rcnn": _DETECTOR_FIELDS + _RPN_FIELDS + ("mask",),
}


def override_settings(settings: Any, overrides: dict[str, Any] | None, what: str) -> Any:
    """A copy of the settings dataclass ``settings`` with ``overrides`` applied; unknown keys are an
    error naming ``what`` (e.g. "rpn") and the known fields."""
    if not overrides:
        return settings
    known = {f.name for f in dataclasses.fields(settings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(settings, **overrides)


def build_model(model: ModelConfig, num_classes: int | None = None):  # -> nn.Module
    """The detector a :class:`ModelConfig` describes, with ``num_classes`` = K + 1.

    Each builder gets the fields of ``MODEL_FIELDS[model.name]`` and ``model.extra``; a field set
    away from its default for a model that does not use it is an error (it would be ignored).
    """
    num_classes = model.num_classes or num_classes
    if num_classes is None:
        raise ValueError("model.num_classes is not set and no training data gives it")
    from rcnn import models

    builder = getattr(models, model.name, None)
    if builder is None:
        raise ValueError(f"model {model.name!r} is not available in this installation")
    accepted = MODEL_FIELDS[model.name]
    defaults = ModelConfig()
    for name in sorted(set().union(*MODEL_FIELDS.values()) - set(accepted)):
        if getattr(model, name) != getattr(defaults, name):
            users = ", ".join(m for m, fields in MODEL_FIELDS.items() if name in fields)
            raise ValueError(f"model.{name} does not apply to {model.name} (only to {users}); remove it from the config")
    clashing = sorted(set(model.extra) & (set(ModelConfig.model_fields) - {"extra"}))
    if clashing:
        raise ValueError(f"model.extra.{clashing[0]}: set model.{clashing[0]} instead")
    kwargs: dict[str, Any] = dict(
        pretrained_backbone=model.pretrained_backbone, trainable_stages=model.trainable_stages, **model.extra
    )
    for name in accepted:
        value = getattr(model, name)
        if name in ("pooler", "anchor_sizes") and value is None:
            continue  # the builder's per-backbone default
        if name == "mask" and not value:
            continue
        if name == "anchor_sizes":
            value = [tuple(level) for level in value]
        elif name == "aspect_ratios":
            value = tuple(value)
        kwargs[name] = value
    return builder(model.backbone, num_classes, **kwargs)
