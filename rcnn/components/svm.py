"""R-CNN's per-class linear SVMs, trained with hard negative mining (R-CNN §2.3, appendix B).

After fine-tuning, R-CNN scores regions with one linear SVM per class on fixed CNN features
(fc7). For class ``k``:

- positives are the **ground-truth boxes** of class ``k`` only;
- negatives are regions whose IoU with every ground-truth box of class ``k`` is below 0.3
  (including ground-truth boxes of other classes);
- regions in between (the grey zone) are ignored.

All negatives of a data set (~2000 per image) do not fit in memory, so training uses hard
negative mining (the seed's "Common tricks"): start from the negatives of the first image(s),
train, then go through the images scoring every negative with the current SVM and add those
scoring above -1 (inside the margin or misclassified: they still contribute to the hinge loss;
``rcnn.matching.hard_negatives``) to a cache; retrain each time ``retrain_limit`` new ones
accumulate and at the end of a pass, dropping from the cache the easy negatives that score
below -1.2. R-CNN's code makes one pass (the paper: "mining converges quickly ... after only a
single pass over all images"); more rounds stop early when a round adds no hard negative.

Settings follow R-CNN's code (``rcnn_train.m``): ``C = 0.001``, positive loss weight 2, the
bias learned as ``bias_multiplier = 10`` times a constant feature (so it is regularised
``100x`` less than the weights), features rescaled so that their mean L2 norm is 20 ("so that
the same search range for C is reasonable regardless of the layer"). The SVM solver is
scikit-learn's ``LinearSVC`` (liblinear, L2-regularised hinge loss in the dual: R-CNN's
liblinear type 3). Its objective, recorded after every update, is::

    C * w_pos * sum_pos max(0, 1 - z) + C * sum_neg max(0, 1 + z) + ||w||² / 2 + (b / bias_multiplier)² / 2

Shape shorthand:
    R: regions of one image (its ground-truth boxes and its proposals)
    D: feature dimension
    K: foreground classes (labels 1..K; ``num_classes = K + 1`` counts the background)
    G: ground-truth boxes of one image
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC
from torch import Tensor
from tqdm import tqdm

from rcnn.core.boxes import box_iou
from rcnn.core.matching import hard_negatives
from rcnn.io.tensors import read_tensor_file, write_tensor_file

__all__ = [
    "ClassSVMs",
    "ImageRegions",
    "MiningRecord",
    "class_overlaps",
    "mean_feature_norm",
]


def class_overlaps(boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int) -> Tensor:
    """Max IoU of each region with the ground truth of each class: ``[R, K]`` (0 without such gt).

    Column ``k - 1`` is class ``k``. ``boxes [R, 4]``, ``gt_boxes [G, 4]``, ``gt_labels [G]`` in 1..K.
    """
    overlaps = boxes.new_zeros((boxes.shape[0], num_classes - 1))  # [R, K]
    if gt_boxes.shape[0] == 0 or boxes.shape[0] == 0:
        return overlaps
    iou = box_iou(boxes, gt_boxes.to(boxes.dtype))  # [R, G]
    index = (gt_labels.to(torch.int64) - 1)[None, :].expand_as(iou)  # [R, G]
    return overlaps.scatter_reduce(1, index, iou, reduce="amax", include_self=True)


@dataclass
class ImageRegions:
    """The regions of one image whose features were extracted, and which are ground truth.

    Attributes:
        features: ``[R, D]`` float features (a numpy array, or a memory-mapped one).
        boxes: ``[R, 4]`` the regions (x1, y1, x2, y2).
        gt_labels: ``[R]`` int: the class (1..K) of a region that is a ground-truth box, 0 for a
            proposal. R-CNN's feature cache holds both, ground-truth boxes first.
    """

    features: np.ndarray
    boxes: Tensor | np.ndarray
    gt_labels: Tensor | np.ndarray


@dataclass
class MiningRecord:
    """One SVM update during hard negative mining.

    Attributes:
        round: 0 for the initial training, then the pass over the images (1, 2, ...).
        class_id: the class (1..K).
        images_seen: images scored so far in this round.
        hard_added: hard negatives added to the cache since the class's previous update (round 0:
            the initial negatives).
        cache_size: negatives in the cache the SVM was trained on.
        evicted: easy negatives dropped from the cache after training.
        positives: positive examples (ground-truth boxes of the class).
        objective: the SVM objective on the cache (``pos_loss + neg_loss + reg_loss``).
    """

    round: int
    class_id: int
    images_seen: int
    hard_added: int
    cache_size: int
    evicted: int
    positives: int
    objective: float
    pos_loss: float
    neg_loss: float
    reg_loss: float

    def __str__(self) -> str:
        return (
            f"round {self.round} class {self.class_id} (after {self.images_seen} images): "
            f"+{self.hard_added} hard negatives, cache {self.cache_size}, -{self.evicted} easy, "
            f"{self.positives} positives, objective {self.objective:.4f} = {self.pos_loss:.4f} (pos) "
            f"+ {self.neg_loss:.4f} (neg) + {self.reg_loss:.4f} (reg)"
        )


def _regions(source: Sequence[ImageRegions], index: int, num_classes: int) -> tuple[np.ndarray, Tensor, Tensor]:
    """Validated ``(features [R, D] float32, boxes [R, 4], gt_labels [R])`` of image ``index``."""
    item = source[index]
    features = np.asarray(item.features, dtype=np.float32)
    boxes = torch.as_tensor(np.asarray(item.boxes, dtype=np.float32))
    labels = torch.as_tensor(np.asarray(item.gt_labels, dtype=np.int64)).reshape(-1)
    if features.ndim != 2 or boxes.shape != (features.shape[0], 4) or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"SVM training image {index}: features must be [R, D], boxes [R, 4] and gt_labels [R] with the "
            f"same R, got {list(features.shape)}, {list(boxes.shape)} and {list(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"SVM training image {index}: gt_labels must lie in 0..{num_classes - 1}, got {labels.unique().tolist()}")
    if not np.isfinite(features).all():
        raise ValueError(f"SVM training image {index}: features contain NaN or infinite values")
    return features, boxes, labels


def mean_feature_norm(source: Sequence[ImageRegions], max_images: int = 200, max_regions: int = 200, seed: int = 0) -> float:
    """Mean L2 norm of the features of a random sample of regions (R-CNN's ``rcnn_feature_stats``).

    Samples ``max_regions`` regions from each of ``max_images`` random images, as R-CNN's code.
    """
    rng = np.random.default_rng(seed)
    images = rng.permutation(len(source))[:max_images]
    norms = []
    for index in images:
        features = np.asarray(source[int(index)].features, dtype=np.float32)
        rows = rng.permutation(features.shape[0])[:max_regions]
        norms.append(np.linalg.norm(features[np.sort(rows)], axis=1))
    norms_all = np.concatenate(norms) if norms else np.zeros(0)
    if norms_all.size == 0 or not norms_all.mean() > 0:
        raise ValueError("mean_feature_norm: the feature source has no non-zero features")
    return float(norms_all.mean())


_SVM_FORMAT = "rcnn-class-svms"


class _Cache:
    """The training examples of one class: all positives, and a cache of negatives with their keys."""

    def __init__(self, positives: np.ndarray, dim: int) -> None:
        self.positives = positives  # [N_pos, D]
        self.negatives = np.zeros((0, dim), dtype=np.float32)  # [N_neg, D]
        self.keys = np.zeros((0, 2), dtype=np.int64)  # [N_neg, 2]: (image index, region index)
        self.cached: dict[int, set[int]] = {}  # image index -> its regions in the cache
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []  # added since the last update
        self.added = 0

    def add(self, features: np.ndarray, keys: np.ndarray) -> None:
        """Add negatives ``features [N, D]`` with their ``keys [N, 2]`` (image, region)."""
        self.pending.append((features, keys))
        for image, region in keys.tolist():
            self.cached.setdefault(image, set()).add(region)
        self.added += len(keys)

    def flush(self) -> None:
        if self.pending:
            self.negatives = np.concatenate([self.negatives, *(f for f, _ in self.pending)])
            self.keys = np.concatenate([self.keys, *(k for _, k in self.pending)])
            self.pending = []

    def evict(self, keep: np.ndarray) -> int:
        """Keep only the negatives where ``keep [N_neg]`` is true; returns how many were dropped."""
        for image, region in self.keys[~keep].tolist():
            self.cached[image].discard(region)
        self.negatives, self.keys = self.negatives[keep], self.keys[keep]
        return int((~keep).sum())


class ClassSVMs:
    """``K`` one-vs-rest linear SVMs over region features: ``decision_function -> [R, K]``.

    Args:
        num_classes: ``K + 1``, with the background (as the data sets count); one SVM per
            foreground class, column ``k - 1`` of the scores is class ``k``.
        C: SVM regularisation (R-CNN: 0.001, for features of mean norm ``target_norm``).
        positive_weight: weight of the positives' hinge loss (R-CNN: 2).
        bias_multiplier: the bias is learned as the weight of a constant feature of this value
            (liblinear's ``-B``; R-CNN: 10).
        target_norm: features are scaled to this mean L2 norm (R-CNN: 20); the scale is
            estimated when training and stored with the weights.
        max_iter, tol: liblinear's stopping rule.
    """

    def __init__(
        self,
        num_classes: int,
        C: float = 1e-3,
        positive_weight: float = 2.0,
        bias_multiplier: float = 10.0,
        target_norm: float = 20.0,
        max_iter: int = 10000,
        tol: float = 1e-4,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"ClassSVMs: num_classes counts the background and must be >= 2, got {num_classes}")
        if C <= 0 or positive_weight <= 0 or bias_multiplier <= 0 or target_norm <= 0:
            raise ValueError("ClassSVMs: C, positive_weight, bias_multiplier and target_norm must be positive")
        self.num_classes = int(num_classes)
        self.C = float(C)
        self.positive_weight = float(positive_weight)
        self.bias_multiplier = float(bias_multiplier)
        self.target_norm = float(target_norm)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.weights: np.ndarray | None = None  # [D, K]
        self.biases: np.ndarray | None = None  # [K]
        self.feature_scale = 1.0
        self.history: list[MiningRecord] = []
        # cached negatives' keys (image index, region index) per class, after training
        self.negative_keys: dict[int, np.ndarray] = {}

    # -- scoring ---------------------------------------------------------------------------
    def _check_fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if self.weights is None or self.biases is None:
            raise ValueError("ClassSVMs: not trained yet; call fit_with_hard_negatives or load a saved file")
        return self.weights, self.biases

    def decision_function(self, features: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """SVM scores ``[R, K]`` of ``features [R, D]`` (numpy in, numpy out; a tensor stays on its device)."""
        weights, biases = self._check_fitted()
        if features.ndim != 2 or features.shape[1] != weights.shape[0]:
            raise ValueError(f"ClassSVMs: features must be [R, {weights.shape[0]}], got {list(features.shape)}")
        if isinstance(features, Tensor):
            w = torch.as_tensor(weights, device=features.device, dtype=features.dtype)
            b = torch.as_tensor(biases, device=features.device, dtype=features.dtype)
            return (features * self.feature_scale) @ w + b  # [R, K]
        features = np.asarray(features, dtype=np.float32)
        return (features * np.float32(self.feature_scale)) @ weights + biases  # [R, K]

    def objective(self, class_id: int, positives: np.ndarray, negatives: np.ndarray) -> dict[str, float]:
        """The SVM objective of class ``class_id`` on unscaled ``positives [N, D]`` and ``negatives [M, D]``.

        Returns ``{"total", "pos_loss", "neg_loss", "reg_loss"}`` (see the module doc).
        """
        weights, biases = self._check_fitted()
        w, b = weights[:, class_id - 1], float(biases[class_id - 1])
        scale = np.float32(self.feature_scale)
        z_pos = np.asarray(positives, dtype=np.float32) @ (w * scale) + b
        z_neg = np.asarray(negatives, dtype=np.float32) @ (w * scale) + b
        return self._objective(w, b, z_pos, z_neg)

    def _objective(self, w: np.ndarray, b: float, z_pos: np.ndarray, z_neg: np.ndarray) -> dict[str, float]:
        pos = self.C * self.positive_weight * float(np.maximum(0.0, 1.0 - z_pos).sum())
        neg = self.C * float(np.maximum(0.0, 1.0 + z_neg).sum())
        reg = 0.5 * float(w @ w) + 0.5 * (b / self.bias_multiplier) ** 2
        return {"total": pos + neg + reg, "pos_loss": pos, "neg_loss": neg, "reg_loss": reg}

    # -- training --------------------------------------------------------------------------
    def _train_one(self, cache: _Cache, seed: int) -> tuple[np.ndarray, float]:
        """Fit one SVM on a class's cache (scaled features) -> ``(w [D], b)``."""
        x = np.concatenate((cache.positives, cache.negatives))
        y = np.concatenate((np.ones(len(cache.positives)), -np.ones(len(cache.negatives))))
        svm = LinearSVC(
            C=self.C,
            loss="hinge",  # L2-regularised L1-loss SVM, dual: liblinear type 3 as R-CNN
            dual=True,
            class_weight={1: self.positive_weight, -1: 1.0},
            intercept_scaling=self.bias_multiplier,
            max_iter=self.max_iter,
            tol=self.tol,
            random_state=seed,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # reported by the objective instead
            svm.fit(x, y)
        return svm.coef_[0].astype(np.float32), float(svm.intercept_[0])

    def _update(
        self, class_id: int, cache: _Cache, round_: int, images_seen: int, evict_margin: float, seed: int
    ) -> None:
        """Retrain class ``class_id`` on its cache, record the update, evict easy negatives."""
        assert self.weights is not None and self.biases is not None
        cache.flush()
        if len(cache.positives) == 0 or len(cache.negatives) == 0:
            return  # nothing to separate yet: the class keeps scoring everything at its bias
        w, b = self._train_one(cache, seed)
        self.weights[:, class_id - 1], self.biases[class_id - 1] = w, b
        z_pos = cache.positives @ w + b
        z_neg = cache.negatives @ w + b
        parts = self._objective(w, b, z_pos, z_neg)
        cache_size = len(cache.negatives)
        evicted = cache.evict(z_neg >= evict_margin)
        self.history.append(
            MiningRecord(
                round=round_, class_id=class_id, images_seen=images_seen, hard_added=cache.added,
                cache_size=cache_size, evicted=evicted, positives=len(cache.positives),
                objective=parts["total"], pos_loss=parts["pos_loss"], neg_loss=parts["neg_loss"],
                reg_loss=parts["reg_loss"],
            )  # fmt: skip
        )
        cache.added = 0

    def fit_with_hard_negatives(
        self,
        source: Sequence[ImageRegions],
        *,
        max_rounds: int = 1,
        negative_iou: float = 0.3,
        hard_margin: float = -1.0001,
        evict_margin: float = -1.2,
        retrain_limit: int = 2000,
        initial_images: int = 1,
        initial_negatives: int | None = None,
        feature_norm: float | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> ClassSVMs:
        """Train the SVMs on the regions of a data set, mining hard negatives.

        Args:
            source: per image, its regions' features (a list, or a lazy sequence that reads a
                feature cache on ``__getitem__``); images are visited in this order.
            max_rounds: passes of hard negative mining over all images (R-CNN: 1). ``0`` trains
                only on the initial negatives (no mining), for comparison.
            negative_iou: negatives have IoU below this with every gt of the class (R-CNN: 0.3).
            hard_margin: negatives scoring above this are hard (R-CNN's code: -1.0001).
            evict_margin: cached negatives scoring below this after training are dropped (-1.2).
            retrain_limit: retrain a class when this many hard negatives have accumulated (2000).
            initial_images: the initial negatives come from the first this many images (1).
            initial_negatives: keep at most this many of them per class, chosen at random (all).
            feature_norm: the mean feature norm; estimated from ``source`` when ``None``.
            seed: random choices (norm estimate, initial subset, solver).
            progress: show a tqdm progress bar per round.

        Returns ``self``; ``history`` holds one :class:`MiningRecord` per update.
        """
        if len(source) == 0:
            raise ValueError("fit_with_hard_negatives: the feature source has no images")
        if max_rounds < 0 or initial_images < 1 or retrain_limit < 1:
            raise ValueError("fit_with_hard_negatives: need max_rounds >= 0, initial_images >= 1, retrain_limit >= 1")
        num_fg = self.num_classes - 1
        norm = feature_norm if feature_norm is not None else mean_feature_norm(source, seed=seed)
        self.feature_scale = self.target_norm / norm
        scale = np.float32(self.feature_scale)
        self.history = []
        rng = np.random.default_rng(seed)

        # positives: every ground-truth region of each class
        positives: list[list[np.ndarray]] = [[] for _ in range(num_fg)]
        dim = None
        for index in tqdm(range(len(source)), desc="SVM positives", unit="img", disable=not progress):
            features, _, labels = _regions(source, index, self.num_classes)
            if dim is not None and features.shape[1] != dim:
                raise ValueError(f"SVM training image {index}: feature dimension {features.shape[1]}, expected {dim}")
            dim = features.shape[1]
            for k in labels[labels > 0].unique().tolist():
                positives[k - 1].append(features[(labels == k).numpy()] * scale)
        assert dim is not None
        caches = [
            _Cache(np.concatenate(p) if p else np.zeros((0, dim), dtype=np.float32), dim) for p in positives
        ]
        self.weights = np.zeros((dim, num_fg), dtype=np.float32)
        self.biases = np.zeros(num_fg, dtype=np.float32)
        absent = [k + 1 for k, cache in enumerate(caches) if len(cache.positives) == 0]
        if absent:
            # nothing to learn: such a class scores every region at the negative margin, -1
            self.biases[np.asarray(absent) - 1] = -1.0
            warnings.warn(f"ClassSVMs: no ground-truth boxes of class(es) {absent}; they score -1 everywhere", stacklevel=2)

        def negatives_of(index: int) -> tuple[np.ndarray, Tensor]:
            """Scaled features ``[R, D]`` and the negative mask ``[R, K]`` of one image."""
            features, boxes, labels = _regions(source, index, self.num_classes)
            gt = labels > 0
            overlaps = class_overlaps(boxes, boxes[gt], labels[gt], self.num_classes)  # [R, K]
            return features * scale, overlaps < negative_iou

        # round 0: the negatives of the first images (R-CNN's "first_time"), or a random subset
        first = min(initial_images, len(source))
        for index in range(first):
            features, negative = negatives_of(index)
            for k, cache in enumerate(caches):
                regions = negative[:, k].nonzero().flatten().numpy()
                cache.add(features[regions], np.stack((np.full_like(regions, index), regions), axis=1))
        for k, cache in enumerate(caches):
            cache.flush()
            if initial_negatives is not None and len(cache.negatives) > initial_negatives:
                keep = np.zeros(len(cache.negatives), dtype=bool)
                keep[rng.permutation(len(cache.negatives))[:initial_negatives]] = True
                cache.evict(keep)
                cache.added = initial_negatives
            self._update(k + 1, cache, 0, first, evict_margin, seed)

        # rounds of mining: score every negative, add the hard ones not cached yet
        for round_ in range(1, max_rounds + 1):
            added_this_round = 0
            bar = tqdm(range(len(source)), desc=f"hard negatives, round {round_}", unit="img", disable=not progress)
            for index in bar:
                features, negative = negatives_of(index)
                scores = torch.from_numpy(features @ self.weights + self.biases)  # [R, K]
                for k, cache in enumerate(caches):
                    if len(cache.positives) == 0:
                        continue  # no SVM to mine for
                    fresh = negative[:, k].clone()  # [R]
                    fresh[list(cache.cached.get(index, ()))] = False  # never the same negative twice
                    regions = hard_negatives(scores[:, k], fresh, margin=hard_margin).sort().values.numpy()
                    if len(regions):
                        cache.add(features[regions], np.stack((np.full_like(regions, index), regions), axis=1))
                        added_this_round += len(regions)
                    if cache.added > retrain_limit:
                        self._update(k + 1, cache, round_, index + 1, evict_margin, seed)
                bar.set_postfix(hard=added_this_round)
            for k, cache in enumerate(caches):
                if cache.added > 0:
                    self._update(k + 1, cache, round_, len(source), evict_margin, seed)
            if added_this_round == 0:
                break  # converged: the cache holds every hard negative
        self.negative_keys = {k + 1: cache.keys.copy() for k, cache in enumerate(caches)}
        return self

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write weights, biases, the feature scale, the settings and the history (safetensors)."""
        weights, biases = self._check_fitted()
        tensors = {
            "weights": torch.from_numpy(weights.copy()),  # [D, K]
            "biases": torch.from_numpy(biases.copy()),  # [K]
            "feature_scale": torch.tensor([self.feature_scale], dtype=torch.float64),
        }
        settings = {
            "num_classes": self.num_classes, "C": self.C, "positive_weight": self.positive_weight,
            "bias_multiplier": self.bias_multiplier, "target_norm": self.target_norm,
            "max_iter": self.max_iter, "tol": self.tol,
        }  # fmt: skip
        history = [asdict(r) for r in self.history]
        return write_tensor_file(path, tensors, _SVM_FORMAT, {"settings": settings, "history": history})

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassSVMs:
        """Read SVMs written by :meth:`save` (errors name the file)."""
        tensors, metadata = read_tensor_file(path, _SVM_FORMAT, "SVM file")
        if not {"weights", "biases", "feature_scale"} <= tensors.keys() or "settings" not in metadata:
            raise ValueError(f"{path}: not an SVM file written by ClassSVMs.save (entries missing)")
        svms = cls(**metadata["settings"])
        svms.weights = tensors["weights"].numpy().astype(np.float32)
        svms.biases = tensors["biases"].numpy().astype(np.float32)
        svms.feature_scale = float(tensors["feature_scale"][0])
        svms.history = [MiningRecord(**r) for r in metadata.get("history", [])]
        if svms.weights.shape != (svms.weights.shape[0], svms.num_classes - 1) or svms.biases.shape != (svms.num_classes - 1,):
            raise ValueError(f"{path}: weights {list(svms.weights.shape)} / biases {list(svms.biases.shape)} do not fit {svms.num_classes} classes")
        return svms
