"""Deployment: the exported forms of a model and the backends that run them.

- :mod:`rcnn.deploy.export`: the ONNX graph of a model (and its checks on load);
- :mod:`rcnn.deploy.quantize`: its int8 form, calibrated on the model's own data;
- :mod:`rcnn.deploy.backends`: the one :class:`~rcnn.deploy.backends.Detector` protocol every
  backend implements (eager PyTorch, the torchvision peer, ONNX Runtime) and ``load_detector``;
- :mod:`rcnn.deploy.torchvision`: torchvision's detection checkpoints converted into run folders.
"""
