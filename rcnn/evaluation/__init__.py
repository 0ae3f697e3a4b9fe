"""Evaluation: COCO box/mask AP (pycocotools) and Pascal VOC AP (07 11-point and area).

See docs/evaluation.md.
"""

from rcnn.evaluation.coco import COCO_STAT_NAMES, evaluate_coco, write_coco_results
from rcnn.evaluation.voc import evaluate_voc, voc_ap

__all__ = ["COCO_STAT_NAMES", "evaluate_coco", "evaluate_voc", "voc_ap", "write_coco_results"]
