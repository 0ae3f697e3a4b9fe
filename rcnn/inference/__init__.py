"""Inference: the one predictor and what it owns (tiling), from an image to detections.

:mod:`rcnn.inference.predictor` holds :class:`Predictor` (device, decode size, proposals, batching,
tiling, backend; detections in the original image's pixels), the recorder and clock it takes as
hooks, and the sinks that write its output (PNG, JSON, COCO results, video); :mod:`rcnn.inference.tiling`
the tiled prediction of large images. ``rcnn.explain`` draws what a predictor's forward pass recorded.
"""

from rcnn.inference.predictor import *  # noqa: F403 (the package's face: its names, one place to import them from)
from rcnn.inference.predictor import __all__  # noqa: F401
