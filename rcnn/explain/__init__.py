"""``explain``: a detector on one image, stage by stage, as pictures with captions.

    from rcnn.build import load_model
    from rcnn.explain import explain
    loaded = load_model("runs/frcnn")
    page = explain(loaded.model, load_image("image.png"), loaded.class_names, "explain_out")   # explain_out/explain.html

The image goes once through the predictor (:class:`rcnn.inference.Predictor`, as ``rcnn predict``
runs it), which records what the forward pass computes; the page draws each stage the model's
generation has from that record, in the order the seed explains them (see
:mod:`rcnn.explain.stages`); its final detections are the predictor's. With ground truth (:func:`load_ground_truth`) it also says, for each
missed object, the stage at which it was lost and, for each false positive, what it is. The page
is one self-contained HTML file (pictures embedded), written beside the pictures as PNG files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from rcnn.explain.report import png_bytes, render_html
from rcnn.explain.stages import GENERATIONS, Explanation, Stage, explain_model
from rcnn.explain.truth import ErrorAnalysis, GroundTruth, analyse_errors, dataset_ground_truth, load_ground_truth
from rcnn.io.files import write_bytes, write_text
from rcnn.io.images import DecodedImage

__all__ = [
    "GENERATIONS",
    "ErrorAnalysis",
    "Explanation",
    "GroundTruth",
    "Stage",
    "analyse_errors",
    "dataset_ground_truth",
    "explain",
    "explain_html",
    "explain_model",
    "load_ground_truth",
    "render_html",
    "write_page",
]


def explain_html(
    model: Any,
    image: Tensor | DecodedImage,
    class_names: Sequence[str],
    gt: GroundTruth | None = None,
    score_thresh: float | None = None,
    title: str = "",
) -> tuple[str, Explanation]:
    """The explanation page of ``model`` (an eager model, or a predictor of one) on ``image`` (float
    ``[3, H, W]``, or as ``Predictor.read`` decodes a file) as an HTML string, and what it shows."""
    explanation = explain_model(model, image, class_names, gt, score_thresh)
    return render_html(explanation, title), explanation


def explain(
    model: Any,
    image: Tensor | DecodedImage,
    class_names: Sequence[str],
    out_dir: str | os.PathLike,
    gt: GroundTruth | None = None,
    score_thresh: float | None = None,
    title: str = "",
) -> Path:
    """Write the explanation of ``model`` (an eager model, or a predictor of one) on ``image`` (float
    ``[3, H, W]`` in 0..1, or a decoded file) to ``out_dir``; return the page's path.

    ``out_dir/explain.html`` is self-contained; ``out_dir/NN_<stage>.png`` are its pictures.
    ``class_names``: index = label, 0 the background. ``gt``: the image's objects, for the
    error analysis. ``score_thresh``: default ``model.display_score_thresh``.
    """
    return write_page(explain_model(model, image, class_names, gt, score_thresh), out_dir, title)


def write_page(explanation: Explanation, out_dir: str | os.PathLike, title: str = "") -> Path:
    """Write ``out_dir/explain.html`` (self-contained) and its pictures ``out_dir/NN_<stage>.png``; return the page's path."""
    out = Path(out_dir)
    pngs = [png_bytes(stage.picture) for stage in explanation.stages]
    for n, (stage, data) in enumerate(zip(explanation.stages, pngs), 1):
        write_bytes(out / f"{n:02d}_{stage.key}.png", data)
    return write_text(out / "explain.html", render_html(explanation, title, pngs))
