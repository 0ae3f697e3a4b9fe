"""R-CNN (Girshick et al., 2014): a CNN on every warped region, per-class SVMs, ridge box regression.

    image -> proposals (selective search, from a file) -> warp each to S x S (+ context padding)
          -> CNN (conv layers -> pool5 -> fc6 -> fc7) -> per-class linear SVMs on fc7
          -> per-class NMS (IoU 0.3) -> class-specific ridge box regression on pool5

The network is the backbone's: its convolutional body, a max pool to the box head's input size
(pool5: for VGG16 at 227 px, conv5_3 is 14x14 and this is VGG's own 2x2 pool; for AlexNet, 13x13
-> 6x6 with windows 3 and stride 2, AlexNet's pool5 exactly) and its box head (fc6, fc7). Only
the last layer is new: a (K+1)-way classifier for fine-tuning on warped regions (§2.3).

Training is R-CNN's multi-stage procedure (``rcnn.training.rcnn_stages``):

1. fine-tune the CNN on warped regions, K + 1 classes — this module's training mode:
   ``model(images, targets, proposals) -> {"loss_cls"}``, driven by the common training loop;
2. extract fc7 (and pool5) features of every training region into a disk cache;
3. train one linear SVM per class with hard negative mining (``rcnn.components.svm.ClassSVMs``);
4. train the class-specific box regressors (``rcnn.components.ridge.BoxRegressors``).

The SVMs and the regressors are stored in the module as buffers (:meth:`RCNN.set_svms`,
:meth:`RCNN.set_box_regressors`), so a checkpoint of the module is the whole trained R-CNN.
Eval mode follows the library's API: ``model(images, proposals=...)`` -> per image ``boxes``,
``labels``, ``scores`` in original image coordinates (R-CNN never resizes the image: regions are
cut from the original). The scores are SVM scores (unbounded, > 0 on the positive side); before
the SVMs are trained, the fine-tuned softmax scores regions (R-CNN appendix B compares the two).

Shape shorthand:
    N: images;  P: proposals of an image;  R: regions (warped crops);  G: gt boxes of an image
    K: foreground classes (K + 1 with background);  D: detections of an image
    C: conv channels;  Q: pool5 side (``pool_size``);  F: fc7 features;  E: regression features
    S: warp size
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from rcnn.components.backbones import as_feature_list, feature_strides
from rcnn.components.box_heads import MLPHead
from rcnn.components.ridge import DEFAULT_LAMBDAS, BoxRegressors
from rcnn.components.settings import IoU, NonNegativeInt, PositiveFloat, PositiveInt, Probability, Settings, validate_options
from rcnn.components.svm import ClassSVMs
from rcnn.components.transform import as_decimals, validate_inputs
from rcnn.components.warp import WARP_MODES, warp_regions
from rcnn.core.boxes import clip_boxes, remove_small_boxes
from rcnn.core.images import IMAGENET_MEAN, IMAGENET_STD, normalize
from rcnn.core.losses import softmax_log_loss
from rcnn.core.matching import BalancedSampler, Matcher, label_proposals
from rcnn.core.postprocess import per_class_detections
from rcnn.models.base import DetectorCapabilities, InferenceOptimizable

__all__ = ["RCNN", "RCNNOptions", "RCNNSettings", "rcnn"]

_MIN_REGION_SIZE = 1.0  # proposals narrower or lower than 1 px are dropped (nothing to warp)


class RCNNSettings(Settings):
    """R-CNN's hyper-parameters; defaults from the paper and its code (``rcnn_train.m`` and friends).

    Attributes:
        warp_size: side S of the warped regions (227 for AlexNet; smaller for small networks; 8..1024).
        warp_mode: ``"anisotropic"`` (the paper's choice), ``"isotropic_context"`` or
            ``"isotropic_pad"`` (``rcnn.components.warp``).
        context_padding: p, output pixels of image context around the box (16 at 227, App. A).
        fg_iou_thresh: fine-tuning labels a region with a gt's class if IoU >= 0.5, else background.
        batch_size, positive_fraction: regions per fine-tuning step over all its images, and the
            foreground share: 128 = 32 positives + 96 background (§2.3).
        add_gt_as_proposals: the gt boxes are fine-tuning regions too (R-CNN's window files).
        regression_features: ``"pool5"`` (the paper, App. C) or ``"fc7"`` for the box regressors.
        feature_batch_size: regions per CNN forward pass when extracting features.
        svm_C, svm_positive_weight: the SVMs' regularisation and positive loss weight (0.001, 2).
        svm_negative_iou: SVM negatives have IoU < 0.3 with every gt of the class (§2.3).
        svm_max_rounds: passes of hard negative mining (1; 0 = none, the initial negatives only).
        svm_initial_images, svm_initial_negatives: the initial negatives come from the first this
            many images, at most this many per class chosen at random (1 image, all of them).
        svm_retrain_limit: retrain a class's SVM when this many hard negatives have accumulated.
        bbox_min_iou: regression examples have IoU >= 0.6 with a gt (App. C).
        bbox_lambdas: the ridge penalties cross-validation chooses from (around the paper's 1000).
        nms_thresh: per-class NMS IoU at test time (0.3, §2.2).
        svm_score_thresh: regions whose SVM score is below this are dropped (-1: the margin); any
            finite value (SVM scores are margins, not probabilities: no natural bound).
        softmax_score_thresh: the same for softmax probabilities (before the SVMs are trained).
        detections_per_image: at most this many detections per image.
    """

    warp_size: int = Field(default=227, ge=8, le=1024)  # 1024: 128 regions per pass are already 1.6 GB of input
    warp_mode: Literal[WARP_MODES] = "anisotropic"  # type: ignore[valid-type]
    context_padding: NonNegativeInt = 16
    fg_iou_thresh: IoU = 0.5
    batch_size: PositiveInt = 128
    positive_fraction: Probability = 0.25
    add_gt_as_proposals: bool = True
    regression_features: Literal["pool5", "fc7"] = "pool5"
    feature_batch_size: PositiveInt = 128
    svm_C: PositiveFloat = 1e-3
    svm_positive_weight: PositiveFloat = 2.0
    svm_negative_iou: IoU = 0.3
    svm_max_rounds: NonNegativeInt = 1
    svm_initial_images: PositiveInt = 1
    svm_initial_negatives: PositiveInt | None = None
    svm_retrain_limit: PositiveInt = 2000
    bbox_min_iou: IoU = 0.6
    bbox_lambdas: tuple[PositiveFloat, ...] = Field(default=DEFAULT_LAMBDAS, min_length=1)
    nms_thresh: IoU = 0.3
    svm_score_thresh: float = -1.0
    softmax_score_thresh: Probability = 0.05
    detections_per_image: PositiveInt = 100

    @model_validator(mode="after")
    def _padding_fits(self) -> RCNNSettings:
        if not 2 * self.context_padding < self.warp_size:
            raise ValueError(
                f"context_padding must leave room for the region: 2 * {self.context_padding} >= warp_size {self.warp_size}"
            )
        return self


class RCNNOptions(RCNNSettings):
    """R-CNN's constructor options: its :class:`RCNNSettings` and the network's input normalisation.

    Attributes:
        image_mean, image_std: per RGB channel (ImageNet's, as the backbones' pre-trained weights
            expect); regions outside the image are filled with the mean.
    """

    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_STD


class RCNN(DetectorCapabilities, InferenceOptimizable, nn.Module):
    """R-CNN: a CNN on warped regions, per-class SVMs and box regressors (see the module doc).

    ``display_score_thresh``: detections scoring at least this are drawn by ``rcnn predict`` and
    the demo — 0, the SVMs' decision boundary (other detectors' scores are probabilities: 0.5).

    Args:
        backbone: a single-level backbone (any ``nn.Module`` with ``out_channels``): the conv body.
        num_classes: K + 1 (background included).
        box_head: fc6/fc7 on pool5 (its ``pool_size``); default 2 fc layers of 1024 on 7 x 7.
        settings: :class:`RCNNSettings`; or give its fields as keyword ``options``.
        image_mean, image_std: the network's input normalisation; regions outside the image are
            filled with the mean (zero after normalisation, as R-CNN's code). With the settings,
            they make :class:`RCNNOptions` (a config's ``model`` section).
    """

    name = "rcnn"
    options = RCNNOptions
    needs_proposals = True
    trains_in_stages = True
    display_score_thresh = 0.0

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        *,
        box_head: nn.Module | None = None,
        settings: RCNNSettings | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        **options: Any,
    ) -> None:
        strides, _ = feature_strides(backbone)
        if len(strides) != 1:
            raise ValueError(
                f"R-CNN runs the CNN on whole warped regions and needs a single-level backbone; "
                f"{getattr(backbone, 'name', type(backbone).__name__)!r} has {len(strides)} feature levels"
            )
        if num_classes is None or num_classes < 2:
            raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
        if settings is not None and options:
            raise ValueError("give R-CNN's settings either as settings=RCNNSettings(...) or as keyword options, not both")
        s = settings or validate_options(RCNNSettings, options, "RCNN")
        super().__init__()
        self.settings = s
        self.backbone = backbone
        self.box_head = box_head if box_head is not None else MLPHead(backbone.out_channels, 7, 1024)
        self.pool_size = int(self.box_head.pool_size)
        fc7_dim = self.box_head.out_features
        pool5_dim = backbone.out_channels * self.pool_size**2
        self.register_buffer("image_mean", torch.tensor(image_mean).reshape(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).reshape(3, 1, 1), persistent=False)
        self._new_classifier(num_classes, fc7_dim, pool5_dim if s.regression_features == "pool5" else fc7_dim)
        self.matcher = Matcher(s.fg_iou_thresh, s.fg_iou_thresh)  # below 0.5: background
        self.sampler = BalancedSampler(s.batch_size, s.positive_fraction)
        self.use_box_regression = True  # switch off to measure its effect (ablation)

    def _new_classifier(self, num_classes: int, fc7_dim: int, reg_dim: int) -> None:
        """The class-specific parts: fine-tuning's (K+1)-way layer, and the SVMs' and regressors' buffers."""
        num_fg = num_classes - 1
        # fine-tuning's new (K+1)-way classification layer, initialised as Fast R-CNN's (std 0.01)
        self.cls_score = nn.Linear(fc7_dim, num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.zeros_(self.cls_score.bias)
        # the parts trained outside the network, as buffers so that they travel in checkpoints
        self.register_buffer("svm_weights", torch.zeros(fc7_dim, num_fg))  # [F, K]
        self.register_buffer("svm_biases", torch.zeros(num_fg))  # [K]
        self.register_buffer("svm_feature_scale", torch.ones((), dtype=torch.float64))
        self.register_buffer("bbox_weights", torch.zeros(num_fg, reg_dim, 4))  # [K, E, 4]
        self.register_buffer("bbox_biases", torch.zeros(num_fg, 4))  # [K, 4]
        self.register_buffer("bbox_feature_scale", torch.ones((), dtype=torch.float64))
        self.register_buffer("trained_parts", torch.zeros(2, dtype=torch.bool))  # SVMs, regressors

    def effective_options(self) -> dict[str, Any]:
        """Every :class:`RCNNOptions` field as this model runs with it (its settings, its normalisation)."""
        return {**self.settings.model_dump(), "image_mean": as_decimals(self.image_mean),
                "image_std": as_decimals(self.image_std)}  # fmt: skip

    @property
    def num_classes(self) -> int:
        """K + 1, from the fine-tuning classifier."""
        return self.cls_score.out_features

    predictor_names = ["cls_score", "svm_weights", "svm_biases", "svm_feature_scale", "bbox_weights", "bbox_biases",
                       "bbox_feature_scale", "trained_parts"]  # fmt: skip

    def replace_predictor(self, num_classes: int) -> list[str]:
        """A new (K+1)-way layer for ``num_classes``, and empty SVMs and regressors (to train again)."""
        device = self.cls_score.weight.device
        self._new_classifier(num_classes, self.cls_score.in_features, self.bbox_weights.shape[1])
        self.to(device)
        return list(self.predictor_names)

    # -- the parts trained outside the network ----------------------------------------------
    def set_svms(self, svms: ClassSVMs) -> None:
        """Use trained SVMs to score regions (stored in the module's buffers)."""
        weights, biases = svms.weights, svms.biases
        if weights is None or biases is None:
            raise ValueError("ClassSVMs: not trained yet")
        if svms.num_classes != self.num_classes or weights.shape != tuple(self.svm_weights.shape):
            raise ValueError(
                f"SVMs for {svms.num_classes} classes on {weights.shape[0]}-d features do not fit this R-CNN "
                f"({self.num_classes} classes, fc7 of {self.svm_weights.shape[0]})"
            )
        self.svm_weights.copy_(torch.from_numpy(weights))
        self.svm_biases.copy_(torch.from_numpy(biases))
        self.svm_feature_scale.fill_(svms.feature_scale)
        self.trained_parts[0] = True

    def set_box_regressors(self, regressors: BoxRegressors) -> None:
        """Use trained box regressors to refine detections (stored in the module's buffers)."""
        if regressors.weights is None:
            raise ValueError("BoxRegressors: not trained yet")
        if regressors.num_classes != self.num_classes or regressors.weights.shape != tuple(self.bbox_weights.shape):
            raise ValueError(
                f"box regressors of shape {list(regressors.weights.shape)} do not fit this R-CNN's "
                f"{list(self.bbox_weights.shape)} ({self.settings.regression_features} features)"
            )
        if tuple(regressors.box_coder.weights) != (1.0, 1.0, 1.0, 1.0):
            raise ValueError("R-CNN's box regressors use the seed's t-targets (BoxCoder weights 1)")
        self.bbox_weights.copy_(torch.from_numpy(regressors.weights))
        self.bbox_biases.copy_(torch.from_numpy(regressors.biases))
        self.bbox_feature_scale.fill_(regressors.feature_scale)
        self.trained_parts[1] = True

    def svms(self) -> ClassSVMs | None:
        """The SVMs held in the buffers (``None`` before :meth:`set_svms`)."""
        if not bool(self.trained_parts[0]):
            return None
        svms = ClassSVMs(self.num_classes)
        svms.weights = self.svm_weights.detach().cpu().numpy()
        svms.biases = self.svm_biases.detach().cpu().numpy()
        svms.feature_scale = float(self.svm_feature_scale)
        return svms

    def box_regressors(self) -> BoxRegressors | None:
        """The box regressors held in the buffers (``None`` before :meth:`set_box_regressors`)."""
        if not bool(self.trained_parts[1]):
            return None
        regressors = BoxRegressors(self.num_classes)
        regressors.weights = self.bbox_weights.detach().cpu().numpy()
        regressors.biases = self.bbox_biases.detach().cpu().numpy()
        regressors.feature_scale = float(self.bbox_feature_scale)
        return regressors

    # -- regions -> features ----------------------------------------------------------------
    def warp(self, image: Tensor, boxes: Tensor) -> Tensor:
        """Warped, normalised regions ``[R, 3, S, S]`` of ``image [3, H, W]`` (0..1) at ``boxes [R, 4]``."""
        s = self.settings
        mean = self.image_mean.to(image.dtype)
        crops = warp_regions(image, boxes, s.warp_size, s.warp_mode, s.context_padding, fill=mean.flatten())
        return normalize(crops, mean, self.image_std)

    def cnn(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        """``crops [R, 3, S, S]`` -> ``(pool5 [R, C, Q, Q], fc7 [R, F])``."""
        conv = as_feature_list(self.backbone(crops))[0]  # [R, C, S/stride, S/stride]
        pool5 = F.adaptive_max_pool2d(conv, self.pool_size)  # [R, C, Q, Q]
        return pool5, self.box_head(pool5)

    def region_features(self, image: Tensor, boxes: Tensor, regression_rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """fc7 features ``[R, F]`` of ``boxes [R, 4]``, and the regression features ``[E_rows, E]``.

        ``regression_rows`` (int64 ``[R']``, default all rows) selects the regions whose regression
        features (pool5 flattened, or fc7) are returned, in that order. One image's case of
        :meth:`batched_region_features`.
        """
        return self.batched_region_features([image], [boxes], [regression_rows])[0]

    def batched_region_features(
        self,
        images: Sequence[Tensor],
        boxes: Sequence[Tensor],
        regression_rows: Sequence[Tensor | None] | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image, :meth:`region_features` of its ``boxes [R_i, 4]``, the regions of all images
        pushed through the CNN together.

        Regions are warped and run ``feature_batch_size`` at a time, a batch taking regions of
        consecutive images when one image has fewer left, so every pass but the last is full;
        each region goes through the CNN once, and its fc7 and regression features come from that
        one pass.
        """
        if len(images) != len(boxes):
            raise ValueError(f"batched_region_features: {len(images)} images but {len(boxes)} box sets")
        rows_per_image = list(regression_rows) if regression_rows is not None else [None] * len(images)
        counts = [int(b.shape[0]) for b in boxes]
        fc7_parts: list[list[Tensor]] = [[] for _ in images]
        reg_parts: list[list[Tensor]] = [[] for _ in images]
        use_pool5 = self.settings.regression_features == "pool5"
        wanted = []  # per image, which rows' regression features to keep (None: all)
        for b, rows in zip(boxes, rows_per_image):
            mask = None
            if rows is not None:
                mask = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
                mask[rows] = True
            wanted.append(mask)
        for batch in _region_batches(counts, self.settings.feature_batch_size):
            crops = torch.cat([self.warp(images[i], boxes[i][start:stop]) for i, start, stop in batch])  # [B, 3, S, S]
            pool5, fc7 = self.cnn(crops)  # [B, C, Q, Q], [B, F]
            reg = pool5.flatten(1) if use_pool5 else fc7  # [B, E]
            offset = 0
            for i, start, stop in batch:
                fc7_parts[i].append(fc7[offset : offset + stop - start])
                part = reg[offset : offset + stop - start]
                reg_parts[i].append(part if wanted[i] is None else part[wanted[i][start:stop]])
                offset += stop - start
        out = []
        for image, parts, regs, rows, mask in zip(images, fc7_parts, reg_parts, rows_per_image, wanted):
            fc7 = torch.cat(parts) if parts else image.new_zeros((0, self.svm_weights.shape[0]))  # [R, F]
            reg = torch.cat(regs) if regs else image.new_zeros((0, self.bbox_weights.shape[1]))  # [R', E]
            if rows is not None:  # from ascending row order back to the order asked for
                reg = reg[torch.searchsorted(mask.nonzero().flatten(), rows)]
            out.append((fc7, reg))
        return out

    # -- the API ----------------------------------------------------------------------------
    def forward(
        self,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Any]] | None = None,
        proposals: Sequence[Tensor] | None = None,
        recorder: dict[str, Any] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: ``{"loss_cls"}`` of fine-tuning; eval: detections per image (module doc).

        ``recorder``: a mapping the stages write what they computed to, in order
        (``rcnn.inference.Recorder`` notes when): ``regions`` (per image the clean proposals
        ``[P, 4]``), then ``scores`` (per image ``(scores [P, K], threshold)``: SVM or softmax)."""
        if proposals is None:
            raise ValueError("R-CNN needs proposals: model(images, targets, proposals=...) (see docs/proposals.md)")
        proposals = validate_inputs(images, targets, proposals, self.training, self.num_classes)
        regions = [self.clean_proposals(p, image) for p, image in zip(proposals, images)]
        if self.training:
            return self.finetune_loss(images, targets, regions)
        if recorder is not None:
            recorder["regions"] = regions
        features = self.batched_region_features(images, regions)  # per image (fc7 [P, F], reg [P, E])
        scores = [self.class_scores(fc7) for fc7, _ in features]  # per image (scores [P, K], threshold)
        if recorder is not None:
            recorder["scores"] = scores
        return [self.postprocess(boxes, s, reg, threshold, tuple(image.shape[1:]))
                for image, boxes, (_, reg), (s, threshold) in zip(images, regions, features, scores)]

    @staticmethod
    def clean_proposals(proposals: Tensor, image: Tensor) -> Tensor:
        """Proposals ``[P, 4]`` clipped to the image, without those under 1 px."""
        boxes = clip_boxes(proposals, image.shape[1:])
        return boxes[remove_small_boxes(boxes, _MIN_REGION_SIZE)]

    def finetune_loss(
        self, images: Sequence[Tensor], targets: Sequence[dict[str, Any]], proposals: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        """Fine-tuning (§2.3): sample 128 regions over the batch (32 foreground with IoU >= 0.5),
        warp them, and return the (K+1)-way log loss ``{"loss_cls"}``."""
        boxes_per_image, labels_per_image = [], []
        for boxes, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"].to(boxes.dtype), target["labels"]
            if self.settings.add_gt_as_proposals:
                boxes = torch.cat((boxes, gt_boxes))
            labels, _ = label_proposals(self.matcher, gt_boxes, gt_labels, boxes)  # [P]: below 0.5 background
            boxes_per_image.append(boxes)
            labels_per_image.append(labels)
        owner = torch.cat([torch.full_like(lab, i) for i, lab in enumerate(labels_per_image)])  # [sum P]
        all_labels = torch.cat(labels_per_image)
        pos, neg = self.sampler(all_labels)  # the 32 + 96 are drawn from the whole batch
        chosen = torch.cat((pos, neg))
        offsets = [0]
        for boxes in boxes_per_image:
            offsets.append(offsets[-1] + boxes.shape[0])
        crops, labels = [], []
        for i, image in enumerate(images):
            rows = chosen[owner[chosen] == i]
            if rows.numel():
                crops.append(self.warp(image, boxes_per_image[i][rows - offsets[i]]))
                labels.append(all_labels[rows])
        if not crops:
            return {"loss_cls": self.cls_score.weight.sum() * 0.0}
        _, fc7 = self.cnn(torch.cat(crops))
        return {"loss_cls": softmax_log_loss(self.cls_score(fc7), torch.cat(labels))}

    def class_scores(self, fc7: Tensor) -> tuple[Tensor, float]:
        """Scores ``[R, K]`` of regions from their ``fc7 [R, F]``, and the threshold for them.

        SVM scores when the SVMs are trained, else the fine-tuned softmax's probabilities.
        """
        svms = self.svms()
        if svms is not None:
            return svms.decision_function(fc7), self.settings.svm_score_thresh
        return torch.softmax(self.cls_score(fc7), dim=-1)[:, 1:], self.settings.softmax_score_thresh

    def detect(self, image: Tensor, proposals: Tensor) -> dict[str, Tensor]:
        """Detections of one image ``[3, H, W]`` from its (clean) ``proposals [P, 4]``."""
        return self.detect_batch([image], [proposals])[0]

    def detect_batch(self, images: Sequence[Tensor], proposals: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Detections per image from its (clean) ``proposals [P_i, 4]``: the regions of all the
        images through the CNN in shared batches (:meth:`batched_region_features`), then each
        image's scoring and post-processing."""
        out = []
        for image, boxes, (fc7, reg) in zip(images, proposals, self.batched_region_features(images, proposals)):
            scores, threshold = self.class_scores(fc7)  # [P, K]
            out.append(self.postprocess(boxes, scores, reg, threshold, tuple(image.shape[1:])))
        return out

    def postprocess(
        self, proposals: Tensor, scores: Tensor, reg_features: Tensor, score_thresh: float, image_size: tuple[int, int]
    ) -> dict[str, Tensor]:
        """Scores -> per-class NMS -> box regression (the seed's order), for one image.

        ``proposals [P, 4]``, ``scores [P, K]``, ``reg_features [P, E]``. Regions scoring above
        ``score_thresh`` for a class go through that class's NMS on their *proposal* boxes; the
        best ``detections_per_image`` survivors are then moved by their class's regressor.
        """
        s = self.settings
        found = per_class_detections(proposals, scores, score_thresh, s.nms_thresh, s.detections_per_image)
        rows, labels, flat = found["rows"], found["labels"], found["scores"]
        boxes = proposals[rows]
        regressors = self.box_regressors() if self.use_box_regression else None
        if regressors is not None and rows.numel():
            boxes = clip_boxes(regressors.predict(reg_features[rows], boxes, labels).to(boxes.dtype), image_size)
        return {"boxes": boxes, "labels": labels, "scores": flat.to(torch.float32)}

    def feature_fingerprint(self) -> str:
        """A hash of the CNN's weights (conv body and box head): what the feature cache depends on."""
        digest = hashlib.sha1()
        for prefix, module in (("backbone.", self.backbone), ("box_head.", self.box_head)):
            for name, tensor in module.state_dict().items():
                digest.update((prefix + name).encode())
                digest.update(np.ascontiguousarray(tensor.detach().cpu().float().numpy()).tobytes())
        return digest.hexdigest()


def _region_batches(counts: Sequence[int], size: int) -> list[list[tuple[int, int, int]]]:
    """Batches of at most ``size`` regions over images with ``counts`` regions each, in order:
    each batch a list of ``(image, start, stop)`` slices; only the last batch may be short."""
    batches: list[list[tuple[int, int, int]]] = []
    batch: list[tuple[int, int, int]] = []
    room = size
    for i, count in enumerate(counts):
        start = 0
        while start < count:
            stop = start + min(room, count - start)
            batch.append((i, start, stop))
            room -= stop - start
            start = stop
            if room == 0:
                batches.append(batch)
                batch, room = [], size
    if batch:
        batches.append(batch)
    return batches


def rcnn(backbone: str | nn.Module = "alexnet", num_classes: int = 21, **kwargs: Any) -> RCNN:
    """Build an :class:`RCNN` on a named architecture (or a backbone module); keyword arguments:
    ``pretrained_backbone``, ``trainable_stages`` and the :class:`RCNNSettings` fields.

    Example: ``rcnn("alexnet", 21, pretrained_backbone="alexnet.pth")`` (the paper's network) or
    ``rcnn("tiny", 6, warp_size=64, context_padding=4)``.
    """
    return RCNN.build(backbone, num_classes, **kwargs)
