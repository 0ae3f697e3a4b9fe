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

Shape shorthand:
    N: images;  P: proposals per image;  D: detections per image
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rcnn.backbones import Backbone, InferenceOptimizable
from rcnn.heads import RoIHeads
from rcnn.models.transform import DetectionTransform, ImageBatch, validate_images, validate_targets
from rcnn.proposals.rpn import RegionProposalNetwork

__all__ = ["TRAIN_MODES", "TwoStageDetector"]

# What a training step optimises, for Faster R-CNN's 4-step alternating training (§3.2):
#   "joint":    RPN and detector losses together (approximate joint training, the default);
#   "rpn":      the RPN only (steps 1 and 3); the RoI heads are not run;
#   "detector": the RoI heads only, on given proposals or on the (fixed) RPN's (steps 2 and 4).
TRAIN_MODES = ("joint", "rpn", "detector")


class TwoStageDetector(InferenceOptimizable, nn.Module):
    """Backbone + (RPN or external proposals) + RoI heads, with input/output transforms."""

    def __init__(
        self,
        backbone: Backbone,
        roi_heads: RoIHeads,
        transform: DetectionTransform,
        rpn: RegionProposalNetwork | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.transform = transform
        self.num_classes = roi_heads.num_classes
        self.train_mode = "joint"

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
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        validate_images(images)
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets (call model.eval() for inference)")
            self.check_targets(images, targets)
        if proposals is not None:
            if len(proposals) != len(images):
                raise ValueError(f"got {len(images)} images but {len(proposals)} proposal sets")
            proposals = [p.to(images[0].dtype) for p in proposals]
        batch, targets, proposals = self.transform(images, targets, proposals)
        features = self.backbone(batch.tensors)
        proposals, losses = self.propose(batch, features, targets, proposals)
        if self.training and self.train_mode == "rpn":
            return losses
        pool_features = features[: len(self.backbone.pool_strides)]
        detections, head_losses = self.roi_heads(pool_features, proposals, batch.image_sizes, targets)
        if self.training:
            return {**losses, **head_losses}
        return self.finalize(detections, batch)

    def check_targets(self, images: Sequence[Tensor], targets: Sequence[dict[str, Any]]) -> None:
        """Raise a ``ValueError`` naming the image and field for malformed training targets."""
        validate_targets(targets, len(images), self.num_classes)

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

    def finalize(self, detections: list[dict[str, Tensor]], batch: ImageBatch) -> list[dict[str, Tensor]]:
        """Map detections back to original image coordinates."""
        return self.transform.postprocess(detections, batch)
