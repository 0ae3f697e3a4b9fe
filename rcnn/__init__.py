"""rcnn: the R-CNN family of object detectors in one PyTorch library."""

__version__ = "0.1.0"
