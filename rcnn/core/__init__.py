"""The core: the papers' building blocks as plain functions and small objects on tensors.

Boxes and the (tx, ty, tw, th) coding (:mod:`~rcnn.core.boxes`), anchors, IoU matching and
sampling (:mod:`~rcnn.core.matching`), the losses, NMS / RoI pooling / RoIAlign
(:mod:`~rcnn.core.ops`, torchvision's kernels with slow references beside them), the one
resize and normalisation (:mod:`~rcnn.core.images`), the one per-class post-processing
(:mod:`~rcnn.core.postprocess`), mask targets and pasting (:mod:`~rcnn.core.masks`), and, apart,
the CPU fast paths behind one switch (:mod:`~rcnn.core.fastpaths`). Nothing here knows a model,
a config, training or the command line.
"""
