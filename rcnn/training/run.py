"""From a config to a trained, evaluated model: what ``rcnn train``, ``rcnn demo`` and the
benchmarks run.

Shape shorthand:
    P: proposals of an image
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcnn.build import build_model, initialize_from, model_class, resolved_config
from rcnn.components.proposals.io import load_proposals, proposal_source
from rcnn.components.proposals.selective_search import ensure_dataset_proposals
from rcnn.config import Config, config_to_yaml
from rcnn.data.reading import build_dataset
from rcnn.data.records import DetectionDataset
from rcnn.data.shapes import NotAShapesFolder, make_shapes
from rcnn.data.transforms import augmentation
from rcnn.deploy.published import apply_pretrained, prepare_pretrained
from rcnn.evaluation.classes import match_classes
from rcnn.inference import evaluate_model
from rcnn.io.files import write_json
from rcnn.io.runs import claim_run_folder
from rcnn.training.alternating import train_alternating
from rcnn.training.datasets import TrainingSet
from rcnn.training.folder import FolderFit, fit_to_boxes, folder_config, report_val, split_for_run
from rcnn.training.loop import train
from rcnn.training.rcnn_stages import train_rcnn

__all__ = ["Data", "ensure_proposal_files", "prepare_data", "run_training", "train_folder"]

logger = logging.getLogger(__name__)


def ensure_proposal_files(
    config: Config, data: Data, *, log: Callable[[str], None] = print, progress: bool = True
) -> None:
    """For models that need proposals (R-CNN, Fast R-CNN): compute selective search proposals
    (default settings) into the configured proposals files that do not exist yet; check that
    existing ones cover their split (``MissingProposalsError`` naming the file and the missing
    image ids otherwise)."""
    if not model_class(config.model.name).needs_proposals:
        return
    for dataset, path in ((data.train, config.data.proposals_train), (data.val, config.data.proposals_val)):
        if dataset is None or not path:
            continue
        if Path(path).exists():
            load_proposals(path).check_covers(dataset.image_ids)
        else:
            log(f"{path} not found: computing selective search proposals for its split into it")
            ensure_dataset_proposals(dataset, path, workers=max(config.data.workers, 1), progress=progress)


@dataclass
class Data:
    train: DetectionDataset
    val: DetectionDataset | None


def prepare_data(config: Config, *, need_train: bool = True, need_val: bool = True) -> Data:
    """Build the train and val readers (generating the shapes set first when configured)."""
    data = config.data
    root = Path(data.root)
    if data.shapes is not None and not (root / "annotations").is_dir():
        logger.info("generating the shapes data set in %s", root)
        try:
            make_shapes(root, data.shapes.n_train, data.shapes.n_val, seed=data.shapes.seed,
                        image_size=data.shapes.image_size)  # fmt: skip
        except NotAShapesFolder as exc:
            raise NotAShapesFolder(
                f"data.root={root}: holds files but no data set with annotations/, and the config's data.shapes "
                "would generate the synthetic shapes there; nothing was written. To train on your own data, add "
                "--set data.shapes=null (and check it with `rcnn data check`); for the shapes, give a new data.root"
            ) from exc
    with_masks = model_class(config.model.name).predicts_masks
    options = data.reader_options()
    train = build_dataset(data.root, data.train_split, with_masks=with_masks, train=True, **options) if need_train else None
    val = None
    if need_val and data.val_split:
        val = build_dataset(data.root, data.val_split, with_masks=with_masks, train=False, **options)
    return Data(train, val)  # type: ignore[arg-type]


def run_training(
    config: Config,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    evaluate: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    fit: FolderFit | None = None,
) -> dict[str, Any]:
    """Train the configured model on the configured data, evaluate on the val split.

    ``out_dir`` is held for the whole training (:func:`rcnn.io.runs.claim_run_folder`): a second
    training into it is refused, and so is one into a folder holding an earlier run, unless
    ``resume`` (continue it) or ``overwrite`` (delete it and start over).

    ``fit`` (a run on a folder, ``rcnn train --data``; :mod:`rcnn.training.folder`): draw a split
    into ``out_dir`` for data without one, fit the input size and anchors to the boxes, and at the
    end say the val AP and draw the val predictions (``picture`` in the summary).

    Returns a summary: iterations, training seconds, final losses, evaluation metrics and the
    checkpoint path.
    """
    out_dir = Path(out_dir)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, the first process holds the folder
        return _run_training(config, out_dir, resume, evaluate, progress, log, fit)
    with claim_run_folder(out_dir, resume=resume, overwrite=overwrite):
        return _run_training(config, out_dir, resume, evaluate, progress, log, fit)


def train_folder(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    **options: Any,
) -> dict[str, Any]:
    """``rcnn train --data FOLDER --out OUT``: train a detector for photographs on ``folder``
    (``config``: another config file or packaged name; ``overrides``: ``--set`` strings), with a
    split drawn into ``out_dir`` when the folder has none and the input size and anchors fitted
    to its boxes (:mod:`rcnn.training.folder`). ``options``: those of :func:`run_training`
    (``resume``, ``overwrite``, ``evaluate``, ``progress``, ``log``). Returns its summary, with
    ``picture``: the val predictions beside the ground truth."""
    config, fit = folder_config(folder, config, overrides)
    return run_training(config, out_dir, fit=fit, **options)


def _run_training(
    config: Config, out_dir: Path, resume: bool, evaluate: bool, progress: bool, log: Callable[[str], None],
    fit: FolderFit | None = None,
) -> dict[str, Any]:
    torch.manual_seed(config.train.seed)
    fetched = None
    if config.train.pretrained:  # published weights by name, fetched (once) before the data is read
        config, fetched = prepare_pretrained(config, progress=progress, log=log)
        if int(os.environ.get("RANK", 0)) == 0:
            write_json(out_dir / "pretrained.json", fetched.record())
    if fit is None:
        data = prepare_data(config)
    else:  # a folder run: its split, then the input size and anchors fitted to its training boxes
        config, data = _prepare_folder(config, out_dir, resume, fit, log)
    objects = sum(int((~r.iscrowd).sum()) for r in data.train.records)
    if objects == 0:  # images without objects are valid negatives, but a set of nothing else teaches nothing
        raise ValueError(
            f"{config.data.root}: the training split ({config.data.train_split}, {len(data.train)} images) has no "
            f"object to learn from; check its annotations (rcnn data check {config.data.root})"
        )
    if config.model.num_classes and config.model.num_classes != data.train.num_classes:
        if not config.train.init_from:
            raise ValueError(
                f"model.num_classes = {config.model.num_classes} but the training data has "
                f"{data.train.num_classes - 1} classes + background"
            )
        # fine-tuning a run (e.g. a converted 91-class model) on another class set: the data's classes
        config = config.model_copy(update={"model": config.model.model_copy(update={"num_classes": None})})
    if data.val is not None:  # the val split is scored by the training split's classes, by name
        match_classes(data.train.class_names, data.val.class_names, f"the val split ({config.data.val_split})")
    model = build_model(config.model, data.train.num_classes)
    if config.train.init_from:
        log(str(initialize_from(model, config.train.init_from, data.train.class_names)))
    if fetched is not None:
        log(apply_pretrained(model, fetched, data.train.class_names))
    ensure_proposal_files(config, data, log=log, progress=progress)
    train_proposals = proposal_source(config.data.proposals_train) if config.data.proposals_train else None
    val_proposals = proposal_source(config.data.proposals_val) if config.data.proposals_val else None
    if model.needs_proposals and (train_proposals is None or (data.val and val_proposals is None)):
        raise ValueError(
            f"model {config.model.name} needs proposals files: set data.proposals_train and data.proposals_val "
            "(compute them with `rcnn proposals selective-search`)"
        )
    transforms = augmentation(config.data.hflip, config.data.scale_jitter, config.data.color_jitter)
    training_set = TrainingSet(data.train, transforms, train_proposals)

    evaluator = None
    if evaluate and data.val is not None:
        val_set = data.val

        def evaluator(m: nn.Module) -> dict[str, Any]:
            return evaluate_model(m, val_set, proposals=val_proposals, class_names=data.train.class_names)

    common = dict(
        evaluator=evaluator,
        resume=resume,
        config_yaml=config_to_yaml(resolved_config(config, model)),
        class_names=data.train.class_names,
        workers=config.data.workers,
        progress=progress,
        log=log,
    )
    if model.trains_in_stages:
        result = train_rcnn(model, training_set, config.train, out_dir, **common)
    elif config.train.scheme == "alternating":
        result = train_alternating(model, training_set, config.train, out_dir, **common)
    else:
        val_items = TrainingSet(data.val, None, val_proposals) if evaluate and data.val is not None else None
        result = train(model, training_set, config.train, out_dir, val_set=val_items, **common)
    summary = {
        "model": config.model.name,
        "backbone": config.model.backbone,
        "iterations": result.iterations,
        "train_seconds": result.seconds,
        "losses": result.losses,
        "skipped_steps": result.skipped_steps,
        "metrics": result.metrics,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        **({"pretrained": fetched.record()} if fetched is not None else {}),
        **({"best": result.best, "stopped_early": result.stopped_early} if result.best else {}),
    }
    if fit is not None and int(os.environ.get("RANK", 0)) == 0:
        summary.update(report_val(summary, data.val, out_dir, fit, log, val_proposals))
    return summary


def _prepare_folder(
    config: Config, out_dir: Path, resume: bool, fit: FolderFit, log: Callable[[str], None]
) -> tuple[Config, Data]:
    """The split and fitted config of a folder run, and its data (:mod:`rcnn.training.folder`)."""
    say = log if int(os.environ.get("RANK", 0)) == 0 else (lambda text: None)
    config, drawn = split_for_run(config, out_dir, resume=resume)
    data = prepare_data(config)
    if drawn is not None:
        drawn.settle(data.train, data.val, say)
    return fit_to_boxes(config, data.train.records, fit.keep, say), data
