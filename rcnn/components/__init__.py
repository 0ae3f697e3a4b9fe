"""The components detectors are assembled from: backbones and box heads, proposal methods
(selective search, the RPN), RoI heads (and Mask R-CNN's mask branch as RoI heads), the input
transform, R-CNN's warping, SVMs and ridge regressors, and the typed settings they take."""
