"""The four detectors of the R-CNN family, each composed from the shared parts of the library."""

from rcnn.models.base import TwoStageDetector
from rcnn.models.fast_rcnn import FastRCNN, fast_rcnn
from rcnn.models.faster_rcnn import FasterRCNN, faster_rcnn
from rcnn.models.mask_rcnn import MaskRCNN, mask_rcnn
from rcnn.models.rcnn import RCNN, RCNNSettings, rcnn

__all__ = [
    "RCNN",
    "FastRCNN",
    "FasterRCNN",
    "MaskRCNN",
    "RCNNSettings",
    "TwoStageDetector",
    "fast_rcnn",
    "faster_rcnn",
    "mask_rcnn",
    "rcnn",
]
