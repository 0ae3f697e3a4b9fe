"""Typed configuration: YAML files (``configs/``) validated into pydantic models.

A config has three sections, ``model``, ``data`` and ``train``; every field has a default, so a
file only states what differs. ``rcnn train --set train.lr=0.01 --set model.rpn.nms_thresh=0.6``
overrides single fields (values are parsed as YAML). Errors name the file and the field.

The ``model`` section is the chosen detector's: its common fields (:class:`ModelCommon`: name,
backbone, pre-trained weights, classes) and the constructor options of that detector class,
declared once there (``FasterRCNNOptions`` and the component settings it holds: ``rpn``,
``roi``, ``mask``). So an option is written in one place and reaches the YAML, ``--set`` and
the Python builders (``faster_rcnn("tiny", 6, rpn={...})``) from there; an option of another
model (``model.mask`` for ``faster_rcnn``) is refused, naming it.

A run folder's ``config.yaml`` is the *resolved* config (``rcnn.build.resolved_config``): its
``model`` section states every field with the value the trained model ran with, defaults and
per-backbone choices included, so that loading the run rebuilds that model even after a default
has changed. ``--set`` overrides apply on top of it as on any config; sections written before
(only the fields that were given) are still read, their missing fields taking today's defaults.

Packaged configs can be given by name: ``--config faster_rcnn_tiny_shapes`` finds
``rcnn/configs/faster_rcnn_tiny_shapes.yaml`` (also reachable as ``configs/`` in a checkout).
Run folders written by rcnn 0.1 (``model.extra``, every model's fields present) are read too.

Every number has a range, stated where the field is declared (docs/configs.md lists them), and
NaN and infinities are refused in every section: ``--set train.momentum=nan`` is
"train.momentum: Input should be a finite number".
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rcnn.components.backbones import BACKBONES
from rcnn.components.settings import (
    ImageSide,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    Probability,
    Seed,
    validation_problems,
)
from rcnn.evaluation.coco import COCO_STAT_NAMES
from rcnn.models import MODELS

__all__ = [
    "CONFIG_DIR",
    "MODEL_NAMES",
    "SHAPES_CONFIGS",
    "Config",
    "DataConfig",
    "ModelCommon",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_yaml",
    "load_config",
    "resolve_config_path",
]

CONFIG_DIR = Path(__file__).parent / "configs"
MODEL_NAMES = tuple(MODELS)
# The packaged config of each generation on the shapes data (demo, lineage benchmark).
SHAPES_CONFIGS = {name: f"{name}_tiny_shapes" for name in MODEL_NAMES}


# Upper bounds of counts: far beyond any real use, low enough that a slip of the keyboard (an extra
# zero or three) is caught when the config is read rather than after hours or in an allocation.
MAX_ITERATIONS = 1_000_000_000  # steps: ~30 years at a step a second (10**9 is the "never" of checkpoint_every)
MAX_BATCH = 1024  # images per step of one process (a 32 GB device holds ~64 at 800 px)
MAX_WORKERS = 256  # data loader processes
MAX_IMAGES = 10_000_000  # generated images (a shapes set of 128 px images: ~50 KB each)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelCommon(_Section):
    """What every ``model`` section has; the rest are the chosen detector's options.

    Attributes:
        name: the detector (``rcnn``, ``fast_rcnn``, ``faster_rcnn``, ``mask_rcnn``).
        backbone: a named architecture (``rcnn.components.backbones.BACKBONES``).
        pretrained_backbone: a local classification checkpoint (.pth / .safetensors).
        trainable_stages: train only the last N backbone stages (None: all).
        backbone_norm: the backbone's BatchNorm: ``frozen`` (statistics and affine fixed, for
            fine-tuning with small batches) or ``bn``; default frozen with pre-trained weights, else bn.
        num_classes: K + 1; default: taken from the training data.
    """

    name: str = "faster_rcnn"
    backbone: str = "tiny"
    pretrained_backbone: str | None = None
    trainable_stages: NonNegativeInt | None = None
    backbone_norm: Literal["frozen", "bn"] | None = None
    num_classes: int | None = Field(default=None, ge=2, le=100_000)  # LVIS has 1203 classes

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r}; choose one of {', '.join(BACKBONES)}")
        return value

    def options(self) -> dict[str, Any]:
        """The detector's constructor options (every field but the common ones), validated."""
        return {name: getattr(self, name) for name in type(self).model_fields if name not in ModelCommon.model_fields}


def _model_section(cls: type) -> type[ModelCommon]:
    """``ModelCommon`` + the options of detector class ``cls``, with ``name`` fixed to ``cls.name``."""
    namespace = {
        "__annotations__": {"name": Literal[cls.name]},  # type: ignore[name-defined]
        "name": cls.name,
        "model_config": ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False),
        "__module__": __name__,
        "__doc__": f"The ``model`` section for {cls.__name__}: :class:`ModelCommon` and {cls.options.__name__}.",
    }
    return type(f"{cls.__name__}Config", (ModelCommon, cls.options), namespace)


MODEL_SECTIONS: dict[str, type[ModelCommon]] = {name: _model_section(cls) for name, cls in MODELS.items()}
ModelConfig = Annotated[Union[tuple(MODEL_SECTIONS.values())], Field(discriminator="name")]  # type: ignore[valid-type]


class ShapesSpec(_Section):
    """Generate the synthetic shapes data set at ``data.root`` if it is not there yet."""

    n_train: int = Field(default=400, gt=0, le=MAX_IMAGES)
    n_val: int = Field(default=100, ge=0, le=MAX_IMAGES)
    seed: Seed = 0
    image_size: ImageSide = 128


class DataConfig(_Section):
    """Where the data is: any layout ``rcnn data check`` reads (COCO root or .json, VOC root, a
    LabelImg, YOLO, LabelMe, VIA or CVAT folder, a split folder of ``rcnn data split``)."""

    root: str = "data/shapes"
    images: str | None = None  # images folder, when ``root`` is a COCO .json file
    train_split: str = "train"
    val_split: str = "val"
    shapes: ShapesSpec | None = None
    proposals_train: str | None = None  # proposals files (Fast R-CNN, R-CNN)
    proposals_val: str | None = None
    val_fraction: float | None = Field(default=None, gt=0.0, lt=1.0)  # split a set without splits on the fly
    split_seed: Seed = 0  # the seed of that split (stratified by class)
    skip_broken: bool = False  # list unreadable images / annotations and use the rest (default: refuse the set)
    hflip: Probability = 0.5  # horizontal flip probability in training (Fast R-CNN §2.3)
    scale_jitter: tuple[PositiveFloat, PositiveFloat] | None = None  # zoom range in training, e.g. [0.5, 1.5] (rcnn.data.transforms.ScaleJitter)
    color_jitter: float | None = Field(default=None, ge=0.0, le=1.0)  # photometric jitter strength in training, e.g. 0.3 (ColorJitter)
    workers: int = Field(default=2, ge=0, le=MAX_WORKERS)  # data loader processes

    @field_validator("scale_jitter")
    @classmethod
    def _jitter_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not (0.1 <= value[0] <= value[1] <= 10.0):
            raise ValueError(f"must be [low, high] with 0.1 <= low <= high <= 10, got {list(value)}")
        return value

    def reader_options(self) -> dict[str, Any]:
        """What :func:`rcnn.data.reading.build_dataset` takes from this section besides the root and split."""
        return {"images_dir": self.images, "val_fraction": self.val_fraction, "split_seed": self.split_seed,
                "skip_broken": self.skip_broken}  # fmt: skip


class AlternatingConfig(_Section):
    """Iterations of each step of Faster R-CNN's 4-step alternating training (§3.2)."""

    rpn_iterations: int = Field(default=1000, gt=0, le=MAX_ITERATIONS)  # steps 1 and 3
    detector_iterations: int = Field(default=1000, gt=0, le=MAX_ITERATIONS)  # steps 2 and 4
    lr_factor_steps_3_4: float = Field(default=1.0, gt=0.0, le=1.0)  # learning-rate factor for the fine-tuning steps


class TrainConfig(_Section):
    """The training loop: optimiser, schedule, checkpoints, evaluation."""

    scheme: Literal["joint", "alternating"] = "joint"
    init_from: str | None = None  # start from another run's weights (its class-specific layers only if the classes match)
    pretrained: str | None = None  # published weights by torchvision's name (a COCO detector or an ImageNet backbone), or such a file (rcnn.deploy.published)
    iterations: int = Field(default=1000, gt=0, le=MAX_ITERATIONS)
    time_budget_s: float | None = Field(default=None, gt=0.0, le=366 * 86_400.0)  # stop early once this much training time has passed (a year at most)
    batch_size: int = Field(default=2, gt=0, le=MAX_BATCH)  # images per step (per process under DDP)
    lr: float = Field(default=0.01, gt=0.0, le=10.0)  # above 10 every loss here diverges
    # ``lr`` is for this total batch; scaled linearly (default: batch_size x accumulate)
    lr_batch_size: int | None = Field(default=None, gt=0, le=MAX_BATCH * 1024)
    accumulate: int = Field(default=1, gt=0, le=1024)  # micro-batches of batch_size images whose gradients make one step
    aspect_ratio_grouping: bool = True  # batch images of one aspect ratio together (less padding; rcnn.training.datasets)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=1e-4, ge=0.0, le=1.0)
    schedule: Literal["step", "cosine", "constant"] = "step"
    steps: list[PositiveFloat] = [0.67, 0.89]  # step schedule: fractions of ``iterations`` (or absolute if > 1)
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)  # the step schedule's decay factor
    warmup_iterations: int = Field(default=100, ge=0, le=MAX_ITERATIONS)
    warmup_factor: float = Field(default=0.001, ge=0.0, le=1.0)
    clip_grad_norm: PositiveFloat | None = None
    amp: Literal["auto", "on", "off"] = "auto"  # mixed precision, on CUDA only
    log_every: int = Field(default=20, gt=0, le=MAX_ITERATIONS)
    checkpoint_every: int = Field(default=500, gt=0, le=MAX_ITERATIONS)
    keep_checkpoints: int = Field(default=2, gt=0, le=10_000)
    eval_every: int | None = Field(default=None, gt=0, le=MAX_ITERATIONS)  # evaluate on the val split every N iterations (and at the end)
    val_loss: bool | None = None  # the losses on the val split at each evaluation (None: wherever the trainer can)
    keep_best: str | None = None  # keep RUN/best, the checkpoint best by this val metric (bbox_AP, segm_AP, val_loss ...)
    patience: int | None = Field(default=None, gt=0, le=MAX_ITERATIONS)  # stop after this many evaluations without improvement of keep_best
    min_delta: NonNegativeFloat = 0.0  # the least change of keep_best that counts as an improvement
    ema_decay: float | None = Field(default=None, gt=0.0, lt=1.0)  # an exponential moving average of the weights
    max_bad_steps: int = Field(default=20, gt=0, le=MAX_ITERATIONS)  # consecutive non-finite losses before giving up
    seed: Seed = 0
    device: str = "auto"  # "auto": CUDA when available, else CPU
    alternating: AlternatingConfig = Field(default_factory=AlternatingConfig)

    @field_validator("keep_best")
    @classmethod
    def _known_metric(cls, value: str | None) -> str | None:
        if value is not None and not VAL_METRIC.fullmatch(value):
            raise ValueError(
                f"unknown metric {value!r}; choose bbox_<stat> or segm_<stat> (stat: {', '.join(COCO_STAT_NAMES)}), "
                "voc_mAP, val_loss or val_<loss term> (e.g. val_loss_cls)"
            )
        return value

    @model_validator(mode="after")
    def _controls_need_evaluations(self) -> TrainConfig:
        if self.pretrained is not None and self.init_from is not None:
            raise ValueError("train.pretrained: train.init_from gives the starting weights too; keep one of them")
        if self.patience is not None and self.keep_best is None:
            raise ValueError("train.patience: early stopping watches the train.keep_best metric; set train.keep_best too")
        if self.keep_best is not None and self.eval_every is None:
            raise ValueError(f"train.keep_best: {self.keep_best} is compared between evaluations; set train.eval_every")
        return self

    def check_controls(self, trainer: str) -> None:
        """``ValueError`` naming the first field set here that ``trainer`` (``loop``: the one loop
        of Fast, Faster and Mask R-CNN; ``rcnn``: R-CNN's stages; ``alternating``: Faster R-CNN's
        4 steps) does not support. Gradient accumulation applies to all of them."""
        reason = TRAINER_LIMITS.get(trainer)
        if reason is None:
            return
        for name in ("keep_best", "patience", "ema_decay"):
            if getattr(self, name) is not None:
                raise ValueError(f"train.{name}: not available for {reason}")
        if self.val_loss:
            raise ValueError(f"train.val_loss: not available for {reason}")


# A val metric: a COCO statistic of boxes or masks, the VOC mAP, the val loss or one of its terms.
VAL_METRIC = re.compile(rf"(bbox|segm)_({'|'.join(COCO_STAT_NAMES)})|voc_mAP|val_loss|val_loss_[a-z0-9_]+")
# Trainers without evaluations during training, hence without keep_best, patience, val_loss, EMA.
TRAINER_LIMITS = {
    "rcnn": "R-CNN's stages (its detector exists only after the SVMs and regressors are trained, after "
    "fine-tuning; only gradient accumulation applies)",
    "alternating": "the 4-step alternating scheme (it evaluates only the unified network at the end; only "
    "gradient accumulation applies; use train.scheme: joint)",
}


# The fields every model section of rcnn 0.1 held (with their defaults), whatever the model.
_LEGACY_DEFAULTS: dict[str, Any] = {
    "pretrained_backbone": None, "trainable_stages": None, "num_classes": None, "min_size": 600, "max_size": 1000,
    "anchor_sizes": None, "aspect_ratios": [0.5, 1.0, 2.0], "anchor_offset": 0.5, "pooler": None,
    "sampling_ratio": 2, "aligned": True, "rpn": {}, "roi": {}, "mask": {},
}  # fmt: skip


def _upgrade_model_section(model: dict[str, Any]) -> dict[str, Any]:
    """A model section as rcnn 0.1 wrote it (``extra`` options, every model's fields) in today's form."""
    model = dict(model)
    extra = model.pop("extra", None) or {}
    section = MODEL_SECTIONS.get(model.get("name", "faster_rcnn"))
    if section is not None:
        for key in list(model):
            if key not in section.model_fields and key in _LEGACY_DEFAULTS and model[key] == _LEGACY_DEFAULTS[key]:
                del model[key]  # a default of a field this model never used
    model.update(extra)
    return model


class Config(_Section):
    model: ModelConfig = Field(default_factory=MODEL_SECTIONS["faster_rcnn"])  # type: ignore[valid-type]
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _model_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            model = dict(data["model"])
            if "extra" in model:
                model = _upgrade_model_section(model)
            model.setdefault("name", "faster_rcnn")
            data = {**data, "model": model}
        return data

    @model_validator(mode="after")
    def _controls_fit_the_model(self) -> Config:
        name = self.model.name
        staged = MODELS[name].trains_in_stages
        self.train.check_controls("rcnn" if staged else "alternating" if self.train.scheme == "alternating" else "loop")
        if self.train.keep_best and self.train.keep_best.startswith("segm_") and not MODELS[name].predicts_masks:
            raise ValueError(f"train.keep_best: {self.train.keep_best} is a mask metric but {name} predicts no masks")
        return self


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
    for item in validation_problems(error):
        loc = [str(p) for p in item["loc"]]
        model_name = None
        if len(loc) >= 2 and loc[0] == "model" and loc[1] in MODEL_SECTIONS:
            model_name = loc.pop(1)  # the discriminated union's tag
        where = ".".join(loc) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        named = re.match(r"((?:train|model|data)\.[\w.]+): ", message)
        if not loc and named:  # a check across sections names its field itself
            where, message = named.group(1), message[named.end() :]
        elif named and where == loc[0]:
            where, message = named.group(1), message[named.end() :]
        if item["type"] == "extra_forbidden":
            message = (
                f"not an option of {model_name} (see docs/configs.md)" if model_name and len(loc) == 2
                else "unknown field (check the spelling; see docs/configs.md)"
            )  # fmt: skip
        lines.append(f"{source}: {where}: {message}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """A :class:`Config` from a dict of sections; ``ValueError`` naming ``source`` and each field."""
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
        if isinstance(data.get("model"), dict) and "extra" in data["model"]:
            data["model"] = _upgrade_model_section(data["model"])
        data = apply_overrides(data, overrides)
        source += " (with --set overrides)"
    return config_from_dict(data, source)


def config_to_yaml(config: Config) -> str:
    """The full config (defaults included) as YAML. Beside a checkpoint, store it for
    ``rcnn.build.resolved_config(config, model)``: with the settings the built model chose (the
    ``rpn``, ``roi`` and ``mask`` sections hold only the fields given until then)."""
    data = config.model_dump(mode="json")
    common = {key: data["model"].pop(key) for key in ModelCommon.model_fields}
    data["model"] = {**common, **data["model"]}  # name and backbone first
    return yaml.safe_dump(data, sort_keys=False)
