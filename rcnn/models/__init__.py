"""The four detectors of the R-CNN family, each composed from the shared parts of the library."""

from rcnn.models.base import TwoStageDetector
from rcnn.models.faster_rcnn import FasterRCNN, faster_rcnn
from rcnn.models.mask_rcnn import MaskRCNN, mask_rcnn

__all__ = ["FasterRCNN", "MaskRCNN", "TwoStageDetector", "faster_rcnn", "mask_rcnn"]
