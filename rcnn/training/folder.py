"""Training on a folder of annotated images (``rcnn train --data FOLDER``): what is fitted to the data.

:func:`folder_config` is the config of such a run: the packaged config for photographs
(``configs/faster_rcnn_photos.yaml``) or the user's own, with ``data.root`` the folder and the
``--set`` overrides on top; it also names the model fields the user set, which nothing here
changes. Inside the run folder, :func:`rcnn.training.run.run_training` then

1. draws a split when the data has none (:func:`split_for_run`): seeded by ``data.split_seed``,
   stratified by class, ``data.val_fraction`` (default 0.2) of the images for validation
   (:func:`rcnn.data.make_splits.make_splits`). The split files go into ``RUN/split`` (never beside
   the data), which becomes the run's data set path: a continued run (``--resume``) reads them
   there. A COCO file is split on the fly by the same fraction and seed (the same rule); its lists
   are written there too, and a continued run is refused if the data no longer gives them;
2. fits the input size and the anchors to the training boxes (:func:`fit_to_boxes`:
   :func:`rcnn.data.anchors.suggest_input_size`, :func:`rcnn.data.anchors.suggest_anchors`)
   unless the user set them, or the run starts from other weights (whose RPN was trained for its
   own anchors); the run's ``config.yaml`` records the values used;
3. at the end, says the val AP and draws val images with their ground truth beside the
   predictions (:func:`draw_val_predictions`, what ``rcnn demo`` draws too) into
   ``RUN/val_predictions.png``.

Each step says what it chose in one line.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from torch import nn

from rcnn.build import load_model
from rcnn.components.backbones import BACKBONES
from rcnn.components.backbones import default_anchor_sizes as backbone_anchor_sizes
from rcnn.config import Config, config_from_dict, load_config, resolve_config_path
from rcnn.data.anchors import POSITIVE_IOU, suggest_anchors, suggest_input_size, uncovered_objects
from rcnn.data.make_splits import make_splits
from rcnn.data.reading import LAYOUT_FORMATS, SPEC_FILE, coco_keys, find_splits, folder_format, resolve_dataset
from rcnn.data.records import DetectionDataset, ImageRecord
from rcnn.data.splits import SPLIT_ALL, write_split_files
from rcnn.inference import predict_dataset
from rcnn.io.files import read_json
from rcnn.viz import draw_detections, save_grid, to_pil

__all__ = [
    "DEFAULT_VAL_FRACTION",
    "PHOTOS_CONFIG",
    "PICTURE_NAME",
    "SPLIT_FOLDER",
    "DrawnSplit",
    "FolderFit",
    "draw_val_predictions",
    "fit_to_boxes",
    "folder_config",
    "report_val",
    "split_for_run",
]

PHOTOS_CONFIG = "faster_rcnn_photos"  # the packaged config of `rcnn train --data FOLDER` without --config
SPLIT_FOLDER = "split"  # RUN/split: the split drawn for data without one
PICTURE_NAME = "val_predictions.png"  # RUN/val_predictions.png
DEFAULT_VAL_FRACTION = 0.2  # 1 image in 5 for validation, as `rcnn data split`
FITTED_FIELDS = frozenset({"min_size", "max_size", "anchor_sizes", "aspect_ratios"})


@dataclass(frozen=True)
class FolderFit:
    """What :func:`rcnn.training.run.run_training` fits to the data of a folder run (module docstring).

    Attributes:
        folder: the data folder as the user gave it (for the messages).
        keep: the model fields the user set (in ``--set`` or their own config): left as they are.
        picture: draw ``RUN/val_predictions.png`` at the end.
    """

    folder: str
    keep: frozenset[str] = frozenset()
    picture: bool = True


def _model_fields_in_file(config: str | os.PathLike) -> set[str]:
    """The ``model`` fields a config file states."""
    try:
        loaded = yaml.safe_load(resolve_config_path(config).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return set()  # load_config has read it already; it names any problem itself
    model = loaded.get("model") if isinstance(loaded, dict) else None
    if not isinstance(model, dict):
        return set()
    return set(model) | set(model.get("extra") or {})  # rcnn 0.1's run folders: options under model.extra


def folder_config(
    folder: str | os.PathLike, config: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> tuple[Config, FolderFit]:
    """The config of a run on ``folder`` and what to fit to its data (module docstring).

    ``config``: a config file or packaged name (default :data:`PHOTOS_CONFIG`); ``overrides``:
    ``--set`` strings. ``data.root`` becomes ``folder`` and ``data.shapes`` is turned off (the
    folder is the data). Raises ``ValueError`` / ``FileNotFoundError`` naming a bad config or field.
    """
    if not Path(folder).exists():
        raise FileNotFoundError(f"{folder}: data folder not found")
    loaded = load_config(config if config is not None else PHOTOS_CONFIG, list(overrides))
    loaded.data.root = str(folder)
    loaded.data.shapes = None
    keep = _model_fields_in_file(config) if config is not None else set()
    for item in overrides:
        key = item.partition("=")[0].strip().split(".")
        if len(key) >= 2 and key[0] == "model":
            keep.add(key[1])
    return loaded, FolderFit(str(folder), frozenset(keep & FITTED_FIELDS))


def _updated(config: Config, section: str, updates: Mapping[str, Any], source: str) -> Config:
    """``config`` with the fields ``updates`` of ``section`` replaced, validated again."""
    data = config.model_dump(mode="json", exclude_unset=True)
    data[section] = {**data.get(section, {}), **updates}
    return config_from_dict(data, source)


# -- 1. the split ----------------------------------------------------------------------------------
@dataclass
class DrawnSplit:
    """A split drawn for a folder run (or the recorded one of a continued run), to be said once
    the data is read: :meth:`settle`."""

    folder: str
    record: Path  # RUN/split
    val_fraction: float
    seed: int
    on_the_fly: bool  # COCO: split by data.val_fraction; the lists in ``record`` for the check
    continued: bool  # the split recorded by the run before (--resume)
    images_dir: Path | None = None  # COCO: the images folder its keys are relative to

    def settle(self, train: DetectionDataset, val: DetectionDataset | None, log: Callable[[str], None]) -> None:
        """Say the split in one line; for a COCO file, write its lists into ``record`` or, for a
        continued run, check that the data gives the recorded ones (``ValueError`` otherwise)."""
        if self.on_the_fly:
            assert val is not None and self.images_dir is not None  # a split drawn here has both parts
            splits = {"train": sorted(coco_keys(train.records, self.images_dir)),
                      "val": sorted(coco_keys(val.records, self.images_dir))}  # fmt: skip
            recorded = {name: self.record / f"{name}.txt" for name in splits}
            if self.continued:
                for name, path in recorded.items():
                    if [key for key in path.read_text(encoding="utf-8").splitlines() if key] != splits[name]:
                        raise ValueError(
                            f"{path}: the {name} images this run was trained with are no longer the ones "
                            f"{self.folder} gives with val_fraction {self.val_fraction} and seed {self.seed} (the data "
                            "or the split settings changed); continue with the same data and settings, or start a new "
                            "run (--overwrite, or another --out)"
                        )
            else:
                self.record.mkdir(parents=True, exist_ok=True)
                write_split_files(self.record, splits, force=True)
        counts = f"{len(train)} train / {len(val) if val is not None else 0} val"
        if self.continued:
            log(f"{self.folder}: continuing with the split recorded in {self.record} ({counts})")
        else:
            log(f"{self.folder} has no split files: split {counts} by seed {self.seed} (stratified by class, "
                f"val_fraction {self.val_fraction:g}); recorded in {self.record}")  # fmt: skip


def _data_format(root: Path, images: str | None) -> str:
    """The format of a data set path: ``coco``, ``voc`` or one of the layouts (errors name what was looked for)."""
    fmt = folder_format(root) if root.is_dir() else None
    if fmt is None or fmt == "spec":
        fmt = resolve_dataset(root, SPLIT_ALL, images).format
    return fmt


def split_for_run(config: Config, run_dir: Path, *, resume: bool) -> tuple[Config, DrawnSplit | None]:
    """The config with the split a folder run trains on, and the split drawn (module docstring, step 1).

    Data that has the configured ``data.train_split`` and ``data.val_split`` keeps them (and so does
    data whose splits ``data.val_fraction`` redraws on the fly, as for any config). Data without
    splits is split: an annotation tool's layout into ``run_dir/split`` (then the data set path),
    a COCO file on the fly. ``resume`` reads a split recorded by the run before. Raises
    ``ValueError`` for data with other splits only, and, under torchrun, for a split still to be
    drawn (the processes would race to write it).
    """
    data = config.data
    root = Path(data.root)
    fmt = _data_format(root, data.images)
    splits = find_splits(root)
    if splits and data.val_fraction is not None:
        return config, None  # redrawn on the fly, as the user asked
    if {data.train_split, data.val_split} <= set(splits):
        return config, None
    one_coco_file = fmt == "coco" and (root.is_file() or len(splits) == 1)
    if splits and not one_coco_file:
        redraw = "" if fmt == "voc" else ", or split all its images with --set data.val_fraction=0.2"
        raise ValueError(
            f"{root}: has the split{'s' if len(splits) > 1 else ''} {', '.join(splits)} but not both "
            f"{data.train_split} and {data.val_split}; name the ones to use with --set data.train_split=NAME "
            f"--set data.val_split=NAME{redraw}"
        )
    fraction = data.val_fraction or DEFAULT_VAL_FRACTION
    record = run_dir / SPLIT_FOLDER
    on_the_fly = fmt not in LAYOUT_FORMATS
    marks = ("train.txt", "val.txt") if on_the_fly else (SPEC_FILE,)
    recorded = resume and all((record / name).is_file() for name in marks)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not recorded:
        raise ValueError(
            f"{root}: has no split files, and the processes of torchrun would each draw one; split it first "
            f"(rcnn data split {root} --out DIR) and train on DIR"
        )
    drawn = DrawnSplit(str(root), record, fraction, data.split_seed, on_the_fly=on_the_fly, continued=recorded)
    if not on_the_fly:
        spec_file = record / SPEC_FILE
        if recorded:
            spec = read_json(spec_file)
            split_root = Path(spec.get("root", "")) if isinstance(spec, Mapping) else None
            if split_root is None or split_root.resolve() != root.resolve():
                raise ValueError(
                    f"{spec_file}: this run was split from {split_root}, not {root}; continue it with --data "
                    f"{split_root}, or start a new run (--overwrite, or another --out)"
                )
        else:
            make_splits(root, val_fraction=fraction, seed=data.split_seed, out=record, images_dir=data.images,
                        force=True)  # fmt: skip
        section = {"root": str(record.resolve()), "images": None, "val_fraction": None, "train_split": "train",
                   "val_split": "val"}  # fmt: skip
    else:  # one COCO file: the same split, drawn on the fly by build_dataset
        section = {"val_fraction": fraction, "train_split": "train", "val_split": "val"}
        drawn.images_dir = resolve_dataset(root, "train", data.images, val_fraction=fraction).images_dir
    return _updated(config, "data", section, f"the config of {root}"), drawn


# -- 2. input size and anchors -----------------------------------------------------------------------
def _sizes_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_sizes_text(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fitted_anchors(
    section: Any, records: Sequence[ImageRecord], min_size: int | list[int], max_size: int
) -> tuple[dict[str, Any], str]:
    """The anchors for ``records`` at the given input size, in the structure of the backbone's
    own: one size per level on an FPN; three sizes on one map, or on every level when the backbone
    gives each level the same sizes (MobileNetV3-FPN). The backbone's defaults stay when the
    suggestion would cover fewer objects."""
    backbone = BACKBONES[section.backbone]("bn").backbone
    levels = len(backbone.strides)
    own = section.anchor_sizes or [list(level) for level in backbone_anchor_sizes(backbone, levels)]
    shared = levels > 1 and all(list(level) == list(own[0]) for level in own)
    scale = int(statistics.median(min_size)) if isinstance(min_size, list) else int(min_size)
    found = suggest_anchors(records, min_size=scale, max_size=max_size, levels=1 if shared else levels)
    sizes = [list(found.anchor_sizes[0]) for _ in range(levels)] if shared else found.anchor_sizes
    before = uncovered_objects(records, own, section.aspect_ratios, min_size=scale, max_size=max_size)
    ratios = "[" + ", ".join(f"{r:g}" for r in found.aspect_ratios) + "]"
    if found.uncovered > before:
        return {}, (f"anchors: the defaults {_sizes_text(own)} x ratios {_sizes_text(section.aspect_ratios)} kept ("
                    f"{before} of {found.num_objects} objects without an anchor at IoU >= {POSITIVE_IOU:g}; the data's "
                    f"suggestion {_sizes_text(sizes)} x {ratios}: {found.uncovered})")  # fmt: skip
    return {"anchor_sizes": sizes, "aspect_ratios": found.aspect_ratios}, (
        f"anchors {_sizes_text(sizes)} x ratios {ratios} ({found.uncovered} of {found.num_objects} objects without an "
        f"anchor at IoU >= {POSITIVE_IOU:g}; {before} with the defaults)"
    )


def fit_to_boxes(
    config: Config, records: Sequence[ImageRecord], keep: frozenset[str], log: Callable[[str], None]
) -> Config:
    """``config`` with the input size and anchors fitted to the boxes of ``records`` (module
    docstring, step 2), said in one line; the fields in ``keep`` stay as they are. Left alone:
    R-CNN (warped crops, no input size), a run from other weights (``train.init_from``,
    ``train.pretrained``), a split without boxes (the training refuses it, naming it)."""
    section = config.model
    fields = type(section).model_fields
    if "min_size" not in fields or not any(len(r.boxes) for r in records):
        return config
    if config.train.init_from or getattr(config.train, "pretrained", None):
        log("input size and anchors: as configured, for the starting weights (train.init_from / train.pretrained)")
        return config
    updates: dict[str, Any] = {}
    said = []
    if keep & {"min_size", "max_size"}:
        said.append(f"input size {_sizes_text(section.min_size)} / {section.max_size} as set")
    else:
        size = suggest_input_size(records, section.min_size, section.max_size)
        updates.update(min_size=size.min_size, max_size=size.max_size)
        said.append(
            f"input size {_sizes_text(size.min_size)} / {size.max_size} (the images' median shorter side "
            f"{size.image_short_side:.0f} px; the smallest objects {size.small_object_px:.0f} px at that size)"
        )
    if "anchor_sizes" in fields:
        if keep & {"anchor_sizes", "aspect_ratios"}:
            said.append(f"anchors {_sizes_text(section.anchor_sizes or 'per backbone')} x ratios "
                        f"{_sizes_text(section.aspect_ratios)} as set")  # fmt: skip
        else:
            anchors, text = _fitted_anchors(
                section, records, updates.get("min_size", section.min_size), updates.get("max_size", section.max_size)
            )
            updates.update(anchors)
            said.append(text)
    images = sum(1 for r in records if len(r.boxes))
    log(f"fitted to the boxes of {images} training images: {'; '.join(said)} (--set model.min_size=... / "
        "model.anchor_sizes=... to choose them)")  # fmt: skip
    if not updates:
        return config
    return _updated(config, "model", updates, "the config fitted to the data")


# -- 3. the end: val AP and a picture ------------------------------------------------------------------
def _tile(image: torch.Tensor, side: int) -> tuple[Image.Image, float, tuple[int, int] | None]:
    """The picture to draw ``image [3, H, W]`` on, the ``scale`` and the ``frame`` for
    :func:`rcnn.viz.draw_detections`: enlarged (nearest, up to 2x) when small, so that the labels
    stay legible; shrunk smoothly when its longer side exceeds ``side``."""
    height, width = image.shape[-2:]
    factor = min(2.0, side / max(height, width))
    if factor >= 1.0:
        return to_pil(image), factor, None
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return to_pil(image).resize(size, Image.BILINEAR), 1.0, (int(height), int(width))


def draw_val_predictions(
    model: nn.Module,
    dataset: DetectionDataset,
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    count: int = 8,
    proposals: Any = None,
    side: int = 384,
) -> Path:
    """Draw the first ``count`` images of ``dataset``, each as a pair: the ground truth (left) and
    ``model``'s detections from its ``display_score_thresh`` (right), four tiles to a row, into the
    PNG ``path``. Images are drawn at most ``side`` px on their longer side (small ones enlarged up
    to 2x). ``proposals``: for the models that need them. Returns the path."""
    outputs, _ = predict_dataset(model, dataset, proposals=proposals, limit=count)
    threshold = getattr(model, "display_score_thresh", 0.5)  # R-CNN: SVM scores, 0 = the decision boundary
    tiles = []
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        picture, scale, frame = _tile(image, side)
        tiles.append(draw_detections(picture, target, class_names, scale=scale, frame=frame))
        tiles.append(draw_detections(picture, outputs[int(target["image_id"])], class_names, threshold, scale=scale,
                                     frame=frame))  # fmt: skip
    return save_grid(tiles, path, ncols=4)


def report_val(
    summary: Mapping[str, Any],
    val: DetectionDataset | None,
    run_dir: Path,
    fit: FolderFit,
    log: Callable[[str], None],
    proposals: Any = None,
) -> dict[str, Any]:
    """At the end of a folder run: say the val AP (when evaluated) and draw the val predictions
    beside the ground truth into ``run_dir/val_predictions.png`` (module docstring, step 3).
    Returns ``{"picture": path}`` for the summary, or ``{}``."""
    bbox = (summary.get("metrics") or {}).get("bbox")
    if bbox and val is not None:
        log(f"val ({len(val)} images): box AP {bbox['AP']:.3f}, AP@0.5 {bbox['AP50']:.3f}, AP@0.75 {bbox['AP75']:.3f}")
    if not fit.picture or val is None or not len(val) or not summary.get("checkpoint"):
        return {}
    loaded = load_model(summary["checkpoint"])
    path = draw_val_predictions(loaded.model, val, loaded.class_names, run_dir / PICTURE_NAME, proposals=proposals)
    log(f"val predictions (right) beside the ground truth (left): {path}")
    return {"picture": str(path)}
