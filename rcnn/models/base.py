"""What Fast, Faster and Mask R-CNN share: one conv pass over the image, then per-RoI heads.

``TwoStageDetector.forward`` is the torchvision-compatible API of the library:

    model(images, targets=None, proposals=None)

- ``images``: list of float tensors ``[3, H, W]`` in 0..1 (any sizes);
- ``targets`` (training): list of dicts with ``boxes [G, 4]`` float (x1, y1, x2, y2, pixels),
  ``labels [G]`` int64 in 1..K, and ``masks [G, H, W]`` uint8 for Mask R-CNN;
- ``proposals``: list of ``[P, 4]`` boxes per image, required by Fast R-CNN (selective search or
  any other method) and otherwise ignored unless ``train_mode == "detector"`` (see below).

Training mode returns a dict of named losses; eval mode returns per image ``boxes [D, 4]``,
``labels [D]``, ``scores [D]`` (+ ``masks [D, 1, H, W]``) in original image coordinates.

A detector is assembled from injectable parts, as torchvision's are: a backbone (any
``nn.Module`` with ``out_channels``), optionally the RPN, the RoI heads and the transform; parts
not given are built from the constructor's options. What a model can do is said by class
attributes (:class:`DetectorCapabilities`), never by its name. The number of classes is the
predictor's (``model.num_classes``); :meth:`TwoStageDetector.replace_predictor` swaps the
class-specific layers for another class count (fine-tuning).

Shape shorthand:
    N: images;  P: proposals per image;  D: detections per image
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from rcnn.components.backbones import BackboneParts, as_feature_list, build_backbone, feature_strides, fold_batchnorm
from rcnn.components.box_heads import MLPHead
from rcnn.components.proposals.rpn import RegionProposalNetwork
from rcnn.components.roi_heads import BoxPredictor, RoIHeads, RoIHeadSettings, default_roi_settings
from rcnn.components.settings import (
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    ImageSide,
    NonNegativeInt,
    PositiveFloat,
    Settings,
    validate_options,
)
from rcnn.components.transform import DetectionTransform, ImageBatch, validate_images, validate_inputs
from rcnn.core.images import IMAGENET_MEAN, IMAGENET_STD, resize_boxes
from rcnn.core.ops import RoIPooler

__all__ = [
    "TRAIN_MODES",
    "BoxBranch",
    "DetectorCapabilities",
    "DetectorOptions",
    "InferenceOptimizable",
    "TwoStageDetector",
    "resolve_parts",
]

# What a training step optimises, for Faster R-CNN's 4-step alternating training (§3.2):
#   "joint":    RPN and detector losses together (approximate joint training, the default);
#   "rpn":      the RPN only (steps 1 and 3); the RoI heads are not run;
#   "detector": the RoI heads only, on given proposals or on the (fixed) RPN's (steps 2 and 4).
TRAIN_MODES = ("joint", "rpn", "detector")


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (or buffers, for a model of buffers only); the CPU for none."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


class DetectorCapabilities:
    """What a detector class is and can do, read by the training loop, the commands and the tools.

    Attributes:
        name: the ``model.name`` of configs (``"faster_rcnn"``).
        options: the :class:`Settings` class of the constructor's options — their one declaration,
            also the ``model`` section of a config (see ``rcnn.config``).
        needs_proposals: proposals come from outside the network (selective search).
        predicts_masks: outputs have ``masks``; training targets need them.
        trains_in_stages: trained by its own multi-stage procedure (R-CNN), not the common loop alone.
        has_rpn: proposes its own regions (so it can train by 4-step alternation).
        display_score_thresh: the score from which a detection is drawn by default (probabilities:
            0.5; R-CNN's SVM scores: 0, the decision boundary).
    """

    name: ClassVar[str]
    options: ClassVar[type[Settings]]
    needs_proposals: ClassVar[bool] = False
    predicts_masks: ClassVar[bool] = False
    trains_in_stages: ClassVar[bool] = False
    has_rpn: ClassVar[bool] = False
    display_score_thresh: ClassVar[float] = 0.5

    def effective_options(self) -> dict[str, Any]:
        """Every constructor option of :attr:`options` with the value this model runs with, read
        from its parts (the settings objects of its RPN and RoI heads, its anchors, poolers and
        transform), defaults and per-backbone choices resolved: ``type(model).build(backbone,
        num_classes, **model.effective_options())`` builds the same model whatever today's defaults
        are (``rcnn.build.resolved_config`` records it in a run folder). ``ValueError`` for a model
        assembled from parts the options cannot describe."""
        raise NotImplementedError(f"{type(self).__name__} does not report its effective options")

    @classmethod
    def build(
        cls,
        backbone: str | nn.Module = "tiny",
        num_classes: int | None = None,
        *,
        pretrained_backbone: str | os.PathLike | None = None,
        trainable_stages: int | None = None,
        backbone_norm: str | None = None,
        **options: Any,
    ):
        """The detector on a named architecture (its backbone and box head, optionally with local
        pre-trained weights; ``backbone_norm`` ``"frozen"`` or ``"bn"``, see
        :func:`rcnn.components.backbones.build_backbone`) or on a given backbone module, with the
        constructor's ``options``."""
        parts = resolve_parts(backbone, pretrained_backbone, trainable_stages, backbone_norm)
        if parts.box_head is not None:
            options.setdefault("box_head", parts.box_head)
        return cls(parts.backbone, num_classes, **options)


def resolve_parts(
    backbone: str | nn.Module,
    pretrained: str | os.PathLike | None = None,
    trainable_stages: int | None = None,
    norm: str | None = None,
) -> BackboneParts:
    """:func:`rcnn.components.backbones.build_backbone` of a name, or ``(module, None)`` for a module."""
    if isinstance(backbone, nn.Module):
        if pretrained is not None or trainable_stages is not None or norm is not None:
            raise ValueError(
                "pretrained_backbone / trainable_stages / backbone_norm apply to a backbone name, not a backbone module"
            )
        return BackboneParts(backbone, None)  # type: ignore[arg-type]
    return build_backbone(backbone, pretrained, trainable_stages, norm)


class InferenceOptimizable:
    """Mixin for detectors with a ``backbone``: :meth:`optimize_for_inference`, and a guard that
    refuses to train a model so optimised."""

    def optimize_for_inference(self, channels_last: bool = True):
        """Prepare the model for fast inference, in place: eval mode, BatchNorm folded into the
        preceding convolutions (same outputs, less work) and, with ``channels_last``, every
        convolution's weights in the channels-last memory layout, so that the feature maps are
        computed channels-last from the first convolution on (same outputs to rounding; on a CPU
        oneDNN's convolutions are faster in that layout: R50-FPN at 800x1066, 0.82-0.84x the CPU
        time, ``python -m benchmarks.eager_profile``). The model cannot be trained afterwards."""
        self.eval()
        fold_batchnorm(self.backbone)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self._inference_only = True
        return self

    def train(self, mode: bool = True):
        if mode and getattr(self, "_inference_only", False):
            raise ValueError("this model was optimized for inference (BatchNorm folded) and cannot be trained")
        return super().train(mode)


class DetectorOptions(Settings):
    """Options of every two-stage detector (Fast R-CNN's, which the later generations extend).

    Attributes:
        min_size, max_size: image rescaling, shorter side / longer side at most (600 / 1000,
            Fast R-CNN §2.3); a list of ``min_size`` draws one per image in training (multi-scale).
            Each between 32 and 4096 px (``rcnn.components.settings.ImageSide``), ``max_size`` at
            least every ``min_size``.
        pooler: ``"pool"`` (RoI max pooling) or ``"align"`` (RoIAlign); default per backbone
            (pooling on one level, RoIAlign on an FPN) and model (Mask R-CNN: RoIAlign).
        sampling_ratio: RoIAlign's samples per bin side (2; 0 adapts to the bin size).
        aligned: RoIAlign's half-pixel alignment (True; torchvision's detectors use False).
        image_mean, image_std: the input normalisation, per RGB channel (ImageNet's, as the
            backbones' pre-trained weights expect).
        size_divisible: the batch is padded to multiples of this many pixels (32: the coarsest
            stride of the RoI levels; 1..256).
        roi: RoI-head settings that differ from :func:`rcnn.components.roi_heads.default_roi_settings`
            (a run folder records all of them, see ``rcnn.build.resolved_config``).
        torchvision_compat: compute as torchvision's detectors do, to reproduce their outputs from
            their weights (converted checkpoints): images resized by torchvision's rule, the legacy
            RoIAlign (``aligned`` false), and for the later generations torchvision's anchors and
            mask pasting. Implies ``aligned: false``; an explicit ``aligned: true`` is refused.
    """

    min_size: ImageSide | list[ImageSide] = 600
    max_size: ImageSide = 1000
    pooler: str | None = None
    sampling_ratio: NonNegativeInt = 2
    aligned: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_STD
    size_divisible: int = Field(default=32, ge=1, le=256)
    roi: RoIHeadSettings.overrides() = RoIHeadSettings.overrides()()  # type: ignore[valid-type]
    torchvision_compat: bool = False

    @model_validator(mode="after")
    def _torchvision_geometry(self) -> DetectorOptions:
        """torchvision_compat fixes the options whose values torchvision's computation implies."""
        if not self.torchvision_compat:
            return self
        implied = self.torchvision_implied()
        clashes = [k for k, v in implied.items() if k in self.model_fields_set and getattr(self, k) != v]
        if clashes:
            raise ValueError(
                f"torchvision_compat implies {', '.join(f'{k}={implied[k]!r}' for k in clashes)}; "
                f"remove {', '.join(clashes)} or torchvision_compat"
            )
        return self.model_copy(update=implied)

    def torchvision_implied(self) -> dict[str, Any]:
        """The option values torchvision_compat implies."""
        return {"aligned": False}

    @field_validator("pooler")
    @classmethod
    def _pooler_kind(cls, value: str | None) -> str | None:
        if value not in (None, "pool", "align"):
            raise ValueError(f"must be 'pool' (RoI max pooling) or 'align' (RoIAlign), got {value!r}")
        return value

    @field_validator("min_size")
    @classmethod
    def _some_size(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, list) and not value:
            raise ValueError("a list of min_size needs at least one size")
        return value

    @field_validator("max_size")
    @classmethod
    def _caps_the_shorter_side(cls, value: int, info: Any) -> int:
        min_size = info.data.get("min_size")  # absent when it was refused itself
        largest = max(min_size) if isinstance(min_size, list) and min_size else min_size
        if isinstance(largest, int) and value < largest:
            raise ValueError(
                f"max_size {value} is smaller than min_size {largest}: the longer side would be capped below the "
                f"shorter side's target; give max_size >= min_size (both in {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE})"
            )
        return value


def refuse_unused(options: Settings, names: Sequence[str], part: str) -> None:
    """``ValueError`` if any of ``names`` was given while ``part`` was passed in built."""
    given = sorted(set(names) & options.model_fields_set)
    if given:
        raise ValueError(f"option(s) {given} configure the {part} the model builds; you passed a built {part}")


class TwoStageDetector(DetectorCapabilities, InferenceOptimizable, nn.Module):
    """Backbone + (RPN or external proposals) + RoI heads, with input/output transforms.

    Args:
        backbone: any ``nn.Module`` with ``out_channels`` (see :mod:`rcnn.components.backbones`).
        roi_heads: the :class:`rcnn.components.roi_heads.RoIHeads` (or a subclass).
        transform: the :class:`rcnn.components.transform.DetectionTransform`.
        rpn: the :class:`rcnn.components.proposals.rpn.RegionProposalNetwork`, if the model has one.
        levels: the backbone's ``(strides, pool_strides)`` when the caller has them
            (:func:`rcnn.components.backbones.feature_strides`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        roi_heads: RoIHeads,
        transform: DetectionTransform,
        rpn: RegionProposalNetwork | None = None,
        levels: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> None:
        strides, pool_strides = levels or feature_strides(backbone)
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.transform = transform
        pyramid = getattr(backbone, "fpn", None)
        if hasattr(pyramid, "fix_factors"):  # padded sizes make the pyramid's upsampling a fixed ratio
            pyramid.fix_factors(getattr(transform, "size_divisible", 1), strides[: len(pyramid.inner_blocks)])
        self.strides = strides
        self.pool_strides = pool_strides
        self.train_mode = "joint"

    @property
    def num_classes(self) -> int:
        """K + 1, the box predictor's."""
        return self.roi_heads.num_classes

    @property
    def predictor_names(self) -> list[str]:
        """The class-specific parts (what :meth:`replace_predictor` replaces), as state-dict prefixes."""
        return [f"roi_heads.{name}" for name in self.roi_heads.predictor_names]

    def replace_predictor(self, num_classes: int) -> list[str]:
        """Fresh class-specific layers (box, and mask for Mask R-CNN) for ``num_classes`` (K + 1),
        on the same device; the rest of the model is kept. Returns the replaced modules' names."""
        device = next(self.roi_heads.parameters()).device
        replaced = self.roi_heads.replace_predictor(num_classes)
        self.roi_heads.to(device)
        return [f"roi_heads.{name}" for name in replaced]

    def set_train_mode(self, mode: str) -> None:
        """Choose what training optimises: one of ``TRAIN_MODES``."""
        if mode not in TRAIN_MODES:
            raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {mode!r}")
        if mode == "rpn" and self.rpn is None:
            raise ValueError(f"{type(self).__name__} has no RPN to train")
        self.train_mode = mode

    def forward(
        self,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Any]] | None = None,
        proposals: Sequence[Tensor] | None = None,
        recorder: dict[str, Any] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """The model API (module docstring). ``recorder``: a mapping the stages write what they
        computed to, in order (``rcnn.inference.Recorder`` notes when): ``batch`` (the resized,
        normalised :class:`ImageBatch`), ``features`` (the backbone's levels), ``proposals`` (per
        image ``[P, 4]``, resized pixels) and ``detections`` (the RoI heads' output in resized
        pixels, before :meth:`finalize`: Mask R-CNN's ``masks [D, 1, m, m]`` in their boxes' frames)."""
        proposals = validate_inputs(images, targets, proposals, self.training, self.num_classes)
        if self.training:
            self.check_targets(images, targets)
        batch, targets, proposals = self.transform(images, targets, proposals)
        if recorder is not None:
            recorder["batch"] = batch
        features = as_feature_list(self.backbone(batch.tensors))
        if recorder is not None:
            recorder["features"] = features
        proposals, losses = self.propose(batch, features, targets, proposals)
        if recorder is not None:
            recorder["proposals"] = proposals
        if self.training and self.train_mode == "rpn":
            return losses
        pool_features = features[: len(self.pool_strides)]
        detections, head_losses = self.roi_heads(pool_features, proposals, batch.image_sizes, targets)
        if self.training:
            return {**losses, **head_losses}
        if recorder is not None:
            recorder["detections"] = [dict(d) for d in detections]  # finalize replaces their boxes and masks
        return self.finalize(detections, batch)

    def check_targets(self, images: Sequence[Tensor], targets: Sequence[dict[str, Any]]) -> None:
        """Further checks of the training targets a model needs (Mask R-CNN: masks); none here."""

    def propose(
        self,
        batch: ImageBatch,
        features: list[Tensor],
        targets: list[dict[str, Any]] | None,
        proposals: list[Tensor] | None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Region proposals for the batch (resized coordinates) and the RPN's losses, if any."""
        if self.rpn is None or (proposals is not None and self.train_mode == "detector"):
            if proposals is None:
                raise ValueError(f"{type(self).__name__} needs proposals: model(images, targets, proposals=...)")
            return proposals, {}
        if self.training and self.train_mode == "detector":
            # the RPN is fixed in this step: its (training-time) proposals, without loss or gradients
            with torch.no_grad():
                props, _ = self.rpn(features, batch.image_sizes)
            return props, {}
        return self.rpn(features, batch.image_sizes, targets)

    @torch.no_grad()
    def rpn_proposals(self, images: Sequence[Tensor], training_counts: bool = False) -> list[Tensor]:
        """The RPN's proposals ``[P, 4]`` for each image, in original image coordinates.

        ``training_counts`` uses the RPN's training-time numbers (e.g. 2000 per image after NMS), as
        the reference code does when it generates proposals to train a detector on (alternating
        training); otherwise the test-time numbers.
        """
        if self.rpn is None:
            raise ValueError(f"{type(self).__name__} has no RPN")
        validate_images(images)
        was_training, rpn_training = self.training, self.rpn.training
        self.eval()
        self.rpn.train(training_counts)  # without targets a training-mode RPN computes no loss
        try:
            batch, _, _ = self.transform(images)
            features = as_feature_list(self.backbone(batch.tensors))
            proposals, _ = self.rpn(features, batch.image_sizes)
        finally:
            self.train(was_training)
            self.rpn.train(rpn_training)
        return [
            resize_boxes(props, size, original)
            for props, size, original in zip(proposals, batch.image_sizes, batch.original_sizes)
        ]

    def finalize(self, detections: list[dict[str, Tensor]], batch: ImageBatch) -> list[dict[str, Tensor]]:
        """Map detections back to original image coordinates (and let the heads finish theirs: masks)."""
        detections = self.transform.postprocess(detections, batch)
        self.roi_heads.finalize(detections, batch.original_sizes)
        return detections


class BoxBranch(NamedTuple):
    """The parts of the box branch a detector builds."""

    box_head: nn.Module
    predictor: BoxPredictor
    pooler: RoIPooler
    settings: RoIHeadSettings


def box_branch(
    backbone: nn.Module,
    box_head: nn.Module | None,
    num_classes: int | None,
    options: DetectorOptions,
    num_levels: int,
    pool_strides: Sequence[int],
    default_pooler: str | None = None,
) -> BoxBranch:
    """The parts of the box branch a detector builds: box head (default: 2 fc of 1024 on 7 x 7),
    predictor, pooler and settings (the backbone's defaults with ``options.roi`` applied)."""
    if num_classes is None:
        raise ValueError("num_classes (K + 1, background included) is needed to build the RoI heads")
    if box_head is None:
        box_head = MLPHead(backbone.out_channels, 7, 1024)
    for attribute in ("out_features", "pool_size"):
        if not isinstance(getattr(box_head, attribute, None), int):
            raise ValueError(f"a box head needs an int attribute {attribute}; {type(box_head).__name__} has none")
    defaults, pooler_kind = default_roi_settings(num_levels)
    settings = defaults.merged(options.roi, "roi")
    pooler = RoIPooler(box_head.pool_size, pool_strides, options.pooler or default_pooler or pooler_kind,
                       options.sampling_ratio, options.aligned)  # fmt: skip
    return BoxBranch(box_head, BoxPredictor(box_head.out_features, num_classes, settings.predictor_init), pooler, settings)


def detector_options(cls: type[DetectorCapabilities], options: dict[str, Any]) -> Any:
    """The constructor's keyword options validated by ``cls.options`` (``ValueError`` naming the field)."""
    return validate_options(cls.options, options, cls.__name__)
