"""Data sets: the built-in synthetic shapes, COCO and Pascal VOC readers, the annotation-tool
layouts (LabelImg, YOLO, LabelMe, VIA, CVAT) read in place, splits, conversion, transforms.

``build_dataset(path, split)`` detects the format; see docs/data.md.
"""

from rcnn.data.reading import build_dataset, find_splits, resolve_dataset
from rcnn.data.coco import CocoDetection
from rcnn.data.records import DataWarning, DetectionDataset, Problem, load_image
from rcnn.data.layouts import LayoutDetection
from rcnn.data.shapes import SHAPES_CLASSES, make_shapes, shapes_paths
from rcnn.data.transforms import Compose, RandomHorizontalFlip, Resize, collate_fn
from rcnn.data.voc import VOC_CLASSES, VOCDetection

__all__ = [
    "SHAPES_CLASSES",
    "VOC_CLASSES",
    "CocoDetection",
    "Compose",
    "DataWarning",
    "DetectionDataset",
    "LayoutDetection",
    "Problem",
    "RandomHorizontalFlip",
    "Resize",
    "VOCDetection",
    "build_dataset",
    "collate_fn",
    "find_splits",
    "load_image",
    "make_shapes",
    "resolve_dataset",
    "shapes_paths",
]
