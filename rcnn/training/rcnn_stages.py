"""R-CNN's multi-stage training (Girshick et al., 2014, §2.3; the seed's workflow steps 4-6).

1. **Fine-tune** the CNN on warped regions for K + 1 classes (IoU >= 0.5 with a gt: its class,
   else background; 32 positives + 96 background per 128-region batch). This is the common
   training loop (``rcnn.training.loop.train``) on the R-CNN module's training mode, checkpointed
   in ``run_dir/finetune`` and resumable like any other training.
2. **Extract features** of every region of every training image — its ground-truth boxes first,
   then its proposals — with the fine-tuned CNN, into a disk cache (``run_dir/features``): fc7
   for the SVMs, and the regression features (pool5) of the box-regression examples only. Each
   image is written atomically; a rerun reads what is there and computes only what is missing or
   stale, and the whole cache is rebuilt when the CNN or the warp settings change. Features are
   read back memory-mapped, never all in memory.
3. **Train the SVMs** (``rcnn.components.svm.ClassSVMs``), one per class, with hard negative mining; each
   round's hard negatives are reported.
4. **Train the box regressors** (``rcnn.components.ridge.BoxRegressors``): ridge, λ by
   cross-validation, on proposals with IoU >= 0.6.

The SVMs and regressors are put into the model (:meth:`rcnn.models.RCNN.set_svms`), which is then
saved as an ordinary checkpoint in ``run_dir`` (``run_dir/last``): ``rcnn evaluate`` and
``rcnn predict`` load it like any other model. ``run_dir/rcnn_stages.json`` records each stage's
time, the hard negatives of each round and the regressors' chosen λ; ``svms.safetensors`` and
``box_regressors.safetensors`` keep the SVMs' full mining history and the regressors' settings.

Shape shorthand:
    R: regions of one image (G gt boxes, then P proposals);  F: fc7 features
    N: box-regression examples;  E: regression features;  K: foreground classes
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm import tqdm

from rcnn.components.ridge import BoxRegressors, select_regression_examples
from rcnn.components.svm import ClassSVMs, ImageRegions
from rcnn.config import TrainConfig
from rcnn.models import model_device
from rcnn.io.checkpoints import save_checkpoint
from rcnn.io.files import atomic_write, read_json, write_json
from rcnn.io.tensors import save_tensors
from rcnn.training.datasets import TrainingSet
from rcnn.training.loop import TrainResult, train

__all__ = ["FeatureCache", "extract_features", "train_box_regressors", "train_rcnn", "train_svms"]

CACHE_FORMAT = "rcnn-feature-cache"
CACHE_VERSION = 1


def _save_array(path: Path, array: np.ndarray) -> None:
    """Write a ``.npy`` file atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.save(fh, np.ascontiguousarray(array))

    atomic_write(path, write)


class FeatureCache(Sequence[ImageRegions]):
    """R-CNN's feature cache: per training image, in data set order, the features of its regions.

    Per image id ``i`` the directory holds ``i.fc7.npy`` (``[R, F]`` float32), ``i.reg.npy``
    (``[N, E]``, the regression examples' features) and ``i.safetensors`` — ``boxes [R, 4]``,
    ``gt_labels [R]`` (the class for gt regions, 0 for proposals), ``reg_index [N]`` (rows of the
    examples), ``reg_gt [N, 4]`` and ``reg_classes [N]`` (their gt box and class) — written last, so
    that its presence means the image is complete. ``cache.json`` holds the settings the features
    depend on. ``cache[index]`` is an :class:`rcnn.components.svm.ImageRegions` with memory-mapped features.
    """

    def __init__(self, directory: str | os.PathLike, image_ids: Sequence[int]) -> None:
        self.directory = Path(directory)
        self.image_ids = [int(i) for i in image_ids]

    def __len__(self) -> int:
        return len(self.image_ids)

    def paths(self, image_id: int) -> tuple[Path, Path, Path]:
        """``(fc7 .npy, regression .npy, index .safetensors)`` of an image."""
        stem = self.directory / str(int(image_id))
        return stem.with_suffix(".fc7.npy"), stem.with_suffix(".reg.npy"), stem.with_suffix(".safetensors")

    def index(self, image_id: int) -> dict[str, Tensor] | None:
        """The image's boxes, labels and example rows, or ``None`` when it is not (completely) cached."""
        fc7_path, reg_path, index_path = self.paths(image_id)
        if not (index_path.is_file() and fc7_path.is_file() and reg_path.is_file()):
            return None
        try:
            return load_file(str(index_path))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{index_path}: damaged feature cache entry ({exc}); delete {self.directory} to rebuild") from None

    def write(self, image_id: int, index: dict[str, Tensor], fc7: np.ndarray, reg: np.ndarray) -> None:
        """Store one image's features (``fc7 [R, F]``, ``reg [N, E]``) and index, atomically."""
        fc7_path, reg_path, index_path = self.paths(image_id)
        _save_array(fc7_path, fc7.astype(np.float32, copy=False))
        _save_array(reg_path, reg.astype(np.float32, copy=False))
        save_tensors(index_path, index)

    def _load(self, path: Path) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: damaged feature cache file ({exc}); delete {self.directory} to rebuild") from None

    def __getitem__(self, index: int) -> ImageRegions:  # type: ignore[override]
        image_id = self.image_ids[index]
        entry = self.index(image_id)
        if entry is None:
            raise FileNotFoundError(f"{self.directory}: no cached features for image id {image_id}; run extract_features")
        return ImageRegions(self._load(self.paths(image_id)[0]), entry["boxes"], entry["gt_labels"])

    def regression_examples(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """All images' box-regression examples: ``(features [N, E], proposals [N, 4], gt [N, 4], classes [N])``."""
        features, proposals, gts, classes = [], [], [], []
        for image_id in self.image_ids:
            entry = self.index(image_id)
            if entry is None:
                raise FileNotFoundError(f"{self.directory}: no cached features for image id {image_id}; run extract_features")
            features.append(torch.from_numpy(np.array(self._load(self.paths(image_id)[1]))))
            proposals.append(entry["boxes"][entry["reg_index"]])
            gts.append(entry["reg_gt"])
            classes.append(entry["reg_classes"])
        return torch.cat(features), torch.cat(proposals), torch.cat(gts), torch.cat(classes)


def _cache_settings(model: nn.Module) -> dict[str, Any]:
    s = model.settings
    return {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "cnn": model.feature_fingerprint(),
        "num_classes": model.num_classes, "warp_size": s.warp_size, "warp_mode": s.warp_mode,
        "context_padding": s.context_padding, "regression_features": s.regression_features,
        "bbox_min_iou": s.bbox_min_iou,
    }  # fmt: skip


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    dataset: Any,
    proposals: Callable[[int], Tensor],
    directory: str | os.PathLike,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[FeatureCache, dict[str, int]]:
    """Stage 2: features of every region of every image of ``dataset`` into a :class:`FeatureCache`.

    ``proposals`` maps an image id to its proposals ``[P, 4]`` (original coordinates). Images
    already cached with the same regions are read, not recomputed; a cache made with another CNN
    or other warp settings is deleted and rebuilt. Returns the cache and the counts
    ``{"computed", "reused"}``.
    """
    directory = Path(directory)
    settings = _cache_settings(model)
    meta = directory / "cache.json"
    if meta.is_file() and read_json(meta) != settings:
        log(f"{directory}: features of another CNN or other warp settings; rebuilding the cache")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(meta, settings)
    cache = FeatureCache(directory, dataset.image_ids)
    was_training = model.training
    model.eval()
    device = model_device(model)
    min_iou = model.settings.bbox_min_iou
    computed = reused = 0
    bar = tqdm(range(len(dataset)), desc="R-CNN features", unit="img", disable=not progress)
    for index in bar:
        image, target = dataset[index]
        image_id = int(target["image_id"])
        gt_boxes, gt_labels = target["boxes"].float(), target["labels"]
        boxes = torch.cat((gt_boxes, model.clean_proposals(proposals(image_id).float(), image)))  # [R, 4]
        labels = torch.cat((gt_labels, gt_labels.new_zeros(boxes.shape[0] - gt_boxes.shape[0])))  # [R]
        entry = cache.index(image_id)
        if entry is not None and torch.equal(entry["boxes"], boxes) and torch.equal(entry["gt_labels"], labels):
            reused += 1
            continue
        reg_index, reg_gt, reg_classes = select_regression_examples(boxes, gt_boxes, gt_labels, min_iou)
        fc7, reg = model.region_features(image.to(device), boxes.to(device), reg_index.to(device))
        index_tensors = {
            "boxes": boxes, "gt_labels": labels, "reg_index": reg_index, "reg_gt": reg_gt, "reg_classes": reg_classes,
        }  # fmt: skip
        cache.write(image_id, index_tensors, fc7.float().cpu().numpy(), reg.float().cpu().numpy())
        computed += 1
    model.train(was_training)
    return cache, {"computed": computed, "reused": reused}


def train_svms(
    model: nn.Module, cache: FeatureCache, *, seed: int = 0, progress: bool = True, log: Callable[[str], None] = print
) -> ClassSVMs:
    """Stage 3: per-class linear SVMs on the cached fc7 features, with hard negative mining."""
    s = model.settings
    svms = ClassSVMs(model.num_classes, C=s.svm_C, positive_weight=s.svm_positive_weight)
    svms.fit_with_hard_negatives(
        cache, max_rounds=s.svm_max_rounds, negative_iou=s.svm_negative_iou, retrain_limit=s.svm_retrain_limit,
        initial_images=s.svm_initial_images, initial_negatives=s.svm_initial_negatives, seed=seed, progress=progress,
    )  # fmt: skip
    for round_, added in mining_summary(svms).items():
        what = "initial negatives" if round_ == 0 else "hard negatives added"
        log(f"SVMs, round {round_}: {added} {what}")
    return svms


def mining_summary(svms: ClassSVMs) -> dict[int, int]:
    """Negatives added per round of hard negative mining (round 0: the initial negatives)."""
    added: dict[int, int] = {}
    for record in svms.history:
        added[record.round] = added.get(record.round, 0) + record.hard_added
    return added


def train_box_regressors(model: nn.Module, cache: FeatureCache, *, log: Callable[[str], None] = print) -> BoxRegressors:
    """Stage 4: class-specific ridge regressors from the cached regression features to the t-targets."""
    s = model.settings
    features, proposals, gts, classes = cache.regression_examples()
    regressors = BoxRegressors(model.num_classes, lambdas=s.bbox_lambdas, min_iou=s.bbox_min_iou)
    regressors.fit_examples(features, proposals, gts, classes)
    log(
        f"box regressors: {features.shape[0]} examples (IoU >= {s.bbox_min_iou}), per class "
        f"{regressors.num_examples.tolist()}, λ chosen {regressors.chosen_lambdas.tolist()}"
    )
    return regressors


class _Clock:
    """Wall and CPU seconds of each stage (CPU time is steadier when the machine is shared)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        self.stages[name] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        return result

    @property
    def wall(self) -> float:
        return sum(stage["wall_s"] for stage in self.stages.values())


def train_rcnn(
    model: nn.Module,
    training_set: TrainingSet,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    evaluator: Callable[[nn.Module], dict[str, Any]] | None = None,
    resume: bool = False,
    config_yaml: str | None = None,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    **train_kwargs: Any,
) -> TrainResult:
    """Run R-CNN's four stages on ``model`` (an :class:`rcnn.models.RCNN`) and save it in ``run_dir``.

    ``training_set`` must attach proposals (a :class:`TrainingSet` with a proposal source);
    fine-tuning sees it with its augmentation, the later stages the unaugmented images. With
    ``resume``, fine-tuning continues from ``run_dir/finetune/last`` and the feature cache is reused.
    """
    if cfg.scheme != "joint":
        raise ValueError(f"R-CNN trains in its own stages; train.scheme {cfg.scheme!r} is for Faster R-CNN")
    cfg.check_controls("rcnn")  # keep_best, patience, val_loss, EMA: the one loop's only
    if train_kwargs.get("val_set") is not None:
        raise ValueError("val_set: R-CNN's stages compute no val loss")
    if training_set.proposals is None:
        raise ValueError("R-CNN needs proposals for its training images: set data.proposals_train")
    run_dir = Path(run_dir)
    clock = _Clock()
    log("R-CNN stage 1/4: fine-tuning the CNN on warped regions")
    finetuned = clock.run("finetune", lambda: train(
        model, training_set, cfg, run_dir / "finetune", resume=resume, config_yaml=config_yaml,
        class_names=class_names, progress=progress, log=log, **train_kwargs,
    ))  # fmt: skip
    log("R-CNN stage 2/4: features of every training region")
    cache, counts = clock.run("features", lambda: extract_features(
        model, training_set.dataset, training_set.proposals, run_dir / "features", progress=progress, log=log
    ))  # fmt: skip
    log(f"feature cache {cache.directory}: {counts['computed']} images computed, {counts['reused']} read from the cache")
    log("R-CNN stage 3/4: per-class SVMs with hard negative mining")
    svms = clock.run("svms", lambda: train_svms(model, cache, seed=cfg.seed, progress=progress, log=log))
    model.set_svms(svms)
    svms.save(run_dir / "svms.safetensors")
    log("R-CNN stage 4/4: box regressors")
    regressors = clock.run("box_regression", lambda: train_box_regressors(model, cache, log=log))
    model.set_box_regressors(regressors)
    regressors.save(run_dir / "box_regressors.safetensors")
    summary = {
        "stages": clock.stages,
        "feature_cache": counts,
        "negatives_per_round": {str(k): v for k, v in mining_summary(svms).items()},
        "box_regression": {
            "examples_per_class": regressors.num_examples.tolist(),
            "chosen_lambdas": regressors.chosen_lambdas.tolist(),
        },
    }
    checkpoint = save_checkpoint(
        run_dir, finetuned.iterations, model, config_yaml=config_yaml,
        class_names=list(class_names) if class_names else None, extra_state={"rcnn_stages": summary},
    )  # fmt: skip
    write_json(run_dir / "rcnn_stages.json", summary)
    metrics: dict[str, Any] = {}
    if evaluator is not None:
        model.eval()
        metrics = evaluator(model)
    return TrainResult(finetuned.iterations, clock.wall, finetuned.losses, finetuned.skipped_steps, metrics, checkpoint)
