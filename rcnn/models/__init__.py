"""The four detectors of the R-CNN family, each composed from the shared parts of the library.

``MODELS`` maps each ``model.name`` of the configs to its class; what a class can do is in its
capability attributes (:class:`rcnn.models.base.DetectorCapabilities`).
"""

from rcnn.models.base import DetectorCapabilities, TwoStageDetector, model_device
from rcnn.models.fast_rcnn import FastRCNN, FastRCNNOptions, fast_rcnn
from rcnn.models.faster_rcnn import FasterRCNN, FasterRCNNOptions, faster_rcnn
from rcnn.models.mask_rcnn import MaskRCNN, MaskRCNNOptions, mask_rcnn
from rcnn.models.rcnn import RCNN, RCNNSettings, rcnn

# in the lineage's order
MODELS: dict[str, type[DetectorCapabilities]] = {cls.name: cls for cls in (RCNN, FastRCNN, FasterRCNN, MaskRCNN)}

__all__ = [
    "MODELS",
    "RCNN",
    "DetectorCapabilities",
    "FastRCNN",
    "FastRCNNOptions",
    "FasterRCNN",
    "FasterRCNNOptions",
    "MaskRCNN",
    "model_device",
    "MaskRCNNOptions",
    "RCNNSettings",
    "TwoStageDetector",
    "fast_rcnn",
    "faster_rcnn",
    "mask_rcnn",
    "rcnn",
]
