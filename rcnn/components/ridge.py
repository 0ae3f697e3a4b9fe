"""R-CNN's class-specific bounding-box regressors: ridge regression from features to t-targets.

R-CNN (§3.4, appendix C; the seed's "Bounding Box Regression") trains, for each class, a linear
map from a proposal's CNN features to the seed's targets ``t = (tx, ty, tw, th)``
(:class:`rcnn.core.boxes.BoxCoder`) that move the proposal onto its ground-truth box, minimising::

    sum_i ||t_i - x_i W||² + λ ||W||²

Only proposals near an object teach it: a proposal is used if its highest IoU with a
ground-truth box is at least 0.6, and then for that box and its class ("the transformation
would not make sense" further away). λ is chosen per class by cross-validation over a grid
(the paper's λ = 1000, for features rescaled to mean L2 norm 20 as R-CNN's code does; the default
grid spans 10..10000 around it). R-CNN's code also whitens the targets of each class (subtract
the mean, decorrelate with the inverse square root of their covariance + 0.001) before the fit
and undoes it after the prediction; ``whiten_targets`` does the same.

Differences from R-CNN's code: scikit-learn's ridge leaves the bias unregularised (R-CNN's adds
a constant feature that is regularised with the rest); λ is chosen by efficient leave-one-out
cross-validation (``RidgeCV``) unless ``cv_folds`` asks for k-fold.

Shape shorthand:
    N: training examples (proposals with IoU >= 0.6)
    P: proposals of one image;  G: its ground-truth boxes
    R: regions to refine
    D: feature dimension
    K: foreground classes (``num_classes = K + 1`` with the background)
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import RidgeCV
from torch import Tensor

from rcnn.core.boxes import BoxCoder
from rcnn.core.matching import Matcher, label_proposals
from rcnn.io.tensors import read_tensor_file, write_tensor_file

__all__ = ["DEFAULT_LAMBDAS", "BoxRegressors", "select_regression_examples"]

# λ grid around R-CNN's 1000 (features of mean norm 20)
DEFAULT_LAMBDAS = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
_WHITENING_EPS = 0.001  # added to the target covariance's eigenvalues, as R-CNN's code
_FORMAT = "rcnn-box-regressors"


def select_regression_examples(
    proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, min_iou: float = 0.6
) -> tuple[Tensor, Tensor, Tensor]:
    """The proposals a regressor learns from, with their ground-truth box and class.

    A proposal ``[P, 4]`` is an example if its highest IoU with ``gt_boxes [G, 4]`` is at least
    ``min_iou`` (R-CNN: 0.6) and it has positive width and height; its target is that
    ground-truth box and its class that box's label (``gt_labels [G]``).

    Returns ``(index [N] int64 into proposals, matched gt boxes [N, 4], classes [N] int64)``.
    """
    labels, matches = label_proposals(Matcher(high=min_iou, low=min_iou), gt_boxes, gt_labels, proposals)  # [P], [P]
    has_area = (proposals[:, 2] > proposals[:, 0]) & (proposals[:, 3] > proposals[:, 1])
    index = ((labels > 0) & has_area).nonzero().flatten()  # [N]
    matched = matches[index]
    return index, gt_boxes[matched].to(proposals.dtype), gt_labels[matched].to(torch.int64)


def _as_tensor(features: np.ndarray | Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    if isinstance(features, Tensor):
        return features.to(dtype)
    return torch.from_numpy(np.asarray(features, dtype=np.float32)).to(dtype)


class BoxRegressors:
    """``K`` class-specific linear regressors from features to the t-targets of ``box_coder``.

    Args:
        num_classes: ``K + 1`` with the background, as the data sets count.
        lambdas: the ridge penalties to choose from by cross-validation (one value: no choice).
        min_iou: proposals need this IoU with a ground-truth box to be examples (R-CNN: 0.6).
        whiten_targets: centre and decorrelate each class's targets before the fit (R-CNN's code).
        target_norm: features are scaled to this mean L2 norm (R-CNN: 20) before the fit; λ is
            relative to that scale.
        cv_folds: ``None`` for efficient leave-one-out cross-validation, else k-fold.
        box_coder: the target parameterisation (default: the seed's t-formulas, weights 1).

    After :meth:`fit`: ``chosen_lambdas [K]`` (NaN for a class without enough examples, which
    then leaves its proposals unchanged) and ``num_examples [K]``.
    """

    def __init__(
        self,
        num_classes: int,
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        min_iou: float = 0.6,
        whiten_targets: bool = True,
        target_norm: float = 20.0,
        cv_folds: int | None = None,
        box_coder: BoxCoder | None = None,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"BoxRegressors: num_classes counts the background and must be >= 2, got {num_classes}")
        if not lambdas or any(not (lam > 0 and math.isfinite(lam)) for lam in lambdas):
            raise ValueError(f"BoxRegressors: lambdas must be positive numbers, got {tuple(lambdas)}")
        if not 0.0 < min_iou <= 1.0:
            raise ValueError(f"BoxRegressors: min_iou must lie in (0, 1], got {min_iou}")
        if cv_folds is not None and cv_folds < 2:
            raise ValueError(f"BoxRegressors: cv_folds must be None or >= 2, got {cv_folds}")
        self.num_classes = int(num_classes)
        self.lambdas = tuple(float(lam) for lam in lambdas)
        self.min_iou = float(min_iou)
        self.whiten_targets = bool(whiten_targets)
        self.target_norm = float(target_norm)
        self.cv_folds = cv_folds
        self.box_coder = box_coder if box_coder is not None else BoxCoder()
        num_fg = self.num_classes - 1
        self.weights: np.ndarray | None = None  # [K, D, 4], on scaled features, targets un-whitened
        self.biases = np.zeros((num_fg, 4), dtype=np.float32)  # [K, 4]
        self.feature_scale = 1.0
        self.chosen_lambdas = np.full(num_fg, np.nan)  # [K]
        self.num_examples = np.zeros(num_fg, dtype=np.int64)  # [K]

    # -- training --------------------------------------------------------------------------
    def fit(
        self,
        features: Sequence[np.ndarray | Tensor],
        proposals: Sequence[Tensor],
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        feature_norm: float | None = None,
    ) -> BoxRegressors:
        """Fit on per-image lists: ``features [P_i, D]``, ``proposals [P_i, 4]``, ``gt_boxes [G_i, 4]``, ``gt_labels [G_i]``.

        Selects the examples with :func:`select_regression_examples` and calls :meth:`fit_examples`.
        To save memory, select first and extract only the examples' features, then call
        :meth:`fit_examples` directly.
        """
        if not len(features) == len(proposals) == len(gt_boxes) == len(gt_labels):
            raise ValueError(
                "BoxRegressors.fit: features, proposals, gt_boxes and gt_labels need one entry per image, got "
                f"{len(features)}, {len(proposals)}, {len(gt_boxes)} and {len(gt_labels)}"
            )
        chosen_features, chosen_proposals, targets, classes = [], [], [], []
        for i, (feats, props, gts, labels) in enumerate(zip(features, proposals, gt_boxes, gt_labels)):
            props = torch.as_tensor(props, dtype=torch.float32)
            if feats.shape[0] != props.shape[0]:
                raise ValueError(f"BoxRegressors.fit: image {i} has {feats.shape[0]} feature rows for {props.shape[0]} proposals")
            index, matched, labels = select_regression_examples(
                props, torch.as_tensor(gts, dtype=torch.float32), torch.as_tensor(labels), self.min_iou
            )
            chosen_features.append(_as_tensor(feats)[index])
            chosen_proposals.append(props[index])
            targets.append(matched)
            classes.append(labels)
        return self.fit_examples(
            torch.cat(chosen_features), torch.cat(chosen_proposals), torch.cat(targets), torch.cat(classes), feature_norm
        )

    def fit_examples(
        self,
        features: np.ndarray | Tensor,
        proposals: Tensor,
        targets: Tensor,
        classes: Tensor,
        feature_norm: float | None = None,
    ) -> BoxRegressors:
        """Fit on selected examples: ``features [N, D]``, ``proposals [N, 4]``, their gt boxes ``targets [N, 4]``, ``classes [N]`` (1..K).

        ``feature_norm``: the features' mean L2 norm (estimated from these examples when ``None``).
        """
        x = _as_tensor(features, torch.float64).cpu()  # [N, D]
        if x.dim() != 2 or proposals.shape != (x.shape[0], 4) or targets.shape != (x.shape[0], 4) or classes.shape != (x.shape[0],):
            raise ValueError(
                "BoxRegressors.fit_examples: need features [N, D], proposals [N, 4], targets [N, 4], classes [N], got "
                f"{list(x.shape)}, {list(proposals.shape)}, {list(targets.shape)}, {list(classes.shape)}"
            )
        if x.shape[0] and (int(classes.min()) < 1 or int(classes.max()) >= self.num_classes):
            raise ValueError(f"BoxRegressors.fit_examples: classes must lie in 1..{self.num_classes - 1}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("BoxRegressors.fit_examples: features contain NaN or infinite values")
        if feature_norm is None:
            feature_norm = float(x.norm(dim=1).mean()) if x.shape[0] else 1.0
        if not feature_norm > 0:
            raise ValueError(f"BoxRegressors: the mean feature norm must be positive, got {feature_norm}")
        self.feature_scale = self.target_norm / feature_norm
        x = (x * self.feature_scale).numpy()
        t = self.box_coder.encode(targets.double().cpu(), proposals.double().cpu()).numpy()  # [N, 4]
        num_fg = self.num_classes - 1
        self.weights = np.zeros((num_fg, x.shape[1], 4), dtype=np.float32)
        self.biases = np.zeros((num_fg, 4), dtype=np.float32)
        self.chosen_lambdas = np.full(num_fg, np.nan)
        classes_np = classes.cpu().numpy()
        for k in range(1, self.num_classes):
            rows = classes_np == k
            self.num_examples[k - 1] = int(rows.sum())
            minimum = max(self.cv_folds or 2, 2)
            if rows.sum() < minimum:
                if rows.sum():
                    warnings.warn(f"BoxRegressors: class {k} has only {int(rows.sum())} example(s); its boxes are left unchanged", stacklevel=2)
                continue
            weights, bias, lam = self._fit_class(x[rows], t[rows])
            self.weights[k - 1], self.biases[k - 1], self.chosen_lambdas[k - 1] = weights, bias, lam
        return self

    def _fit_class(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Ridge ``x [N, D] -> t [N, 4]`` with λ by cross-validation -> ``(W [D, 4], b [4], λ)``."""
        mean = np.zeros(4)
        whiten = unwhiten = np.eye(4)
        if self.whiten_targets:
            mean = t.mean(axis=0)
            covariance = (t - mean).T @ (t - mean) / len(t)  # [4, 4]
            eigenvalues, eigenvectors = np.linalg.eigh(covariance)
            whiten = eigenvectors @ np.diag(1.0 / np.sqrt(eigenvalues + _WHITENING_EPS)) @ eigenvectors.T
            unwhiten = eigenvectors @ np.diag(np.sqrt(eigenvalues + _WHITENING_EPS)) @ eigenvectors.T
        ridge = RidgeCV(alphas=self.lambdas, fit_intercept=True, cv=self.cv_folds)
        ridge.fit(x, (t - mean) @ whiten)
        # fold the whitening into the linear map: t = (x W' + b') T^-1 + mean
        weights = ridge.coef_.T @ unwhiten  # [D, 4]
        bias = ridge.intercept_ @ unwhiten + mean  # [4]
        return weights.astype(np.float32), bias.astype(np.float32), float(ridge.alpha_)

    # -- prediction ------------------------------------------------------------------------
    def predict_deltas(self, features: np.ndarray | Tensor, classes: Tensor) -> Tensor:
        """Predicted targets ``[R, 4]`` for ``features [R, D]`` and each region's class ``classes [R]`` (1..K)."""
        if self.weights is None:
            raise ValueError("BoxRegressors: not trained yet; call fit or load a saved file")
        x = _as_tensor(features)
        if x.dim() != 2 or x.shape[1] != self.weights.shape[1] or classes.shape != (x.shape[0],):
            raise ValueError(
                f"BoxRegressors: need features [R, {self.weights.shape[1]}] and classes [R], "
                f"got {list(x.shape)} and {list(classes.shape)}"
            )
        if classes.numel() and (int(classes.min()) < 1 or int(classes.max()) >= self.num_classes):
            raise ValueError(f"BoxRegressors: classes must lie in 1..{self.num_classes - 1}")
        num_fg, dim = self.weights.shape[:2]
        w = torch.from_numpy(self.weights).to(x.device).permute(1, 0, 2).reshape(dim, num_fg * 4)  # [D, 4K]
        b = torch.from_numpy(self.biases).to(x.device).reshape(num_fg * 4)  # [4K]
        all_deltas = ((x * self.feature_scale) @ w + b).reshape(-1, num_fg, 4)  # [R, K, 4]
        index = (classes.to(x.device, torch.int64) - 1)[:, None, None].expand(-1, 1, 4)  # [R, 1, 4]
        return all_deltas.gather(1, index)[:, 0]  # [R, 4]

    def predict(self, features: np.ndarray | Tensor, proposals: Tensor, classes: Tensor) -> Tensor:
        """Refined boxes ``[R, 4]``: ``proposals [R, 4]`` moved by their class's regressor.

        ``features [R, D]`` (numpy or tensor; computed on the tensor's device), ``classes [R]`` in 1..K.
        """
        deltas = self.predict_deltas(features, classes)
        return self.box_coder.decode(deltas, proposals.to(deltas.device, deltas.dtype))

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the regressors (weights, biases, feature scale, chosen λ, settings) as safetensors."""
        if self.weights is None:
            raise ValueError("BoxRegressors: not trained yet, nothing to save")
        tensors = {
            "weights": torch.from_numpy(self.weights.copy()),  # [K, D, 4]
            "biases": torch.from_numpy(self.biases.copy()),  # [K, 4]
            "feature_scale": torch.tensor([self.feature_scale], dtype=torch.float64),
            "chosen_lambdas": torch.from_numpy(self.chosen_lambdas.copy()),  # [K]
            "num_examples": torch.from_numpy(self.num_examples.copy()),  # [K]
        }
        settings = {
            "num_classes": self.num_classes, "lambdas": list(self.lambdas), "min_iou": self.min_iou,
            "whiten_targets": self.whiten_targets, "target_norm": self.target_norm, "cv_folds": self.cv_folds,
            "box_coder_weights": list(self.box_coder.weights), "box_coder_clamp": self.box_coder.clamp,
        }  # fmt: skip
        return write_tensor_file(path, tensors, _FORMAT, {"settings": settings})

    @classmethod
    def load(cls, path: str | os.PathLike) -> BoxRegressors:
        """Read regressors written by :meth:`save` (errors name the file)."""
        tensors, metadata = read_tensor_file(path, _FORMAT, "box regressor file")
        names = {"weights", "biases", "feature_scale", "chosen_lambdas", "num_examples"}
        if not names <= tensors.keys() or "settings" not in metadata:
            raise ValueError(f"{path}: not a box regressor file written by BoxRegressors.save (entries missing)")
        settings = dict(metadata["settings"])
        coder = BoxCoder(settings.pop("box_coder_weights"), settings.pop("box_coder_clamp"))
        regressors = cls(**settings, box_coder=coder)
        regressors.weights = tensors["weights"].numpy()
        regressors.biases = tensors["biases"].numpy()
        regressors.feature_scale = float(tensors["feature_scale"][0])
        regressors.chosen_lambdas = tensors["chosen_lambdas"].numpy()
        regressors.num_examples = tensors["num_examples"].numpy()
        if regressors.weights.shape[0] != regressors.num_classes - 1:
            raise ValueError(f"{path}: weights for {regressors.weights.shape[0]} classes, settings say {regressors.num_classes - 1}")
        return regressors
