"""``evaluate_model`` (``rcnn evaluate``) streams: each image's output goes to the metrics as it is
predicted (COCO's to disk, VOC's as boxes, labels and scores), with the numbers of ``evaluate_coco``
and ``evaluate_voc`` on all the outputs at once; ``--coco-evaluator``; memory that does not grow
with the number of images."""

from __future__ import annotations

import json
import sys
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from rcnn.build import load_model
from rcnn.cli import main
from rcnn.commands.evaluate import COCO_EVALUATORS
from rcnn.data import CocoDetection, shapes_paths
from rcnn.data.reading import build_dataset
from rcnn.data.shapes import make_shapes
from rcnn.evaluation import evaluate_coco, evaluate_voc
from rcnn.evaluation.classes import match_classes
from rcnn.evaluation.coco import BACKENDS, CocoEvaluator
from rcnn.inference import Predictor, evaluate_model
from tiny_runs import tiny_run

IMAGES = 36  # of the generated data set
PER_IMAGE = 100  # detections a stand-in detector gives each image


class RandomDetector:
    """A stand-in detector (``rcnn.deploy.backends.Detector``): per image its ground-truth boxes
    jittered (one in five of another class), filled up to ``per_image`` detections with random
    boxes; scores to 2 decimals (ties within and across images); with ``masks``, each box filled as
    a mask of probability 0.9, ``[D, 1, H, W]``. It knows the images by their order (the data
    set's, as the predictor runs them). Each call notes how many of the outputs it returned before
    are still alive (``alive``: the most) and, while tracemalloc traces, the bytes traced."""

    name = "random"
    needs_proposals = False
    has_rpn = False
    trains_in_stages = False
    display_score_thresh = 0.5
    device = torch.device("cpu")
    input_size = None
    backend, precision, records = "eager", "fp32", False

    def __init__(self, dataset: CocoDetection, masks: bool, per_image: int = PER_IMAGE) -> None:
        self.dataset, self.predicts_masks, self.per_image = dataset, masks, per_image
        self.num_classes = dataset.num_classes
        self.calls = 0
        self.refs: list[weakref.ref] = []
        self.alive = 0
        self.traced: list[int] = []

    def __call__(self, images, proposals=None, recorder=None):  # noqa: ANN001, ANN201
        self.alive = max(self.alive, sum(ref() is not None for ref in self.refs))
        if tracemalloc.is_tracing():
            self.traced.append(tracemalloc.get_traced_memory()[0])
        outputs = []
        for image in images:
            rng = np.random.default_rng(self.calls)
            truth = self.dataset.annotation(self.calls)
            self.calls += 1
            height, width = image.shape[-2:]
            boxes = truth["boxes"].numpy() + rng.normal(0, 2, (len(truth["boxes"]), 4))  # [G, 4]
            labels = truth["labels"].numpy().copy()
            wrong = rng.random(len(labels)) < 0.2
            labels[wrong] = rng.integers(1, self.num_classes, int(wrong.sum()))
            scores = rng.uniform(0.4, 1.0, len(labels))
            extra = self.per_image - len(labels)
            corner = rng.uniform(0, [width - 8, height - 8], (extra, 2))
            size = rng.uniform(4, [width / 2, height / 2], (extra, 2))
            boxes = np.concatenate([boxes, np.concatenate([corner, corner + size], axis=1)])
            boxes = np.clip(boxes, 0, [width, height, width, height])
            labels = np.concatenate([labels, rng.integers(1, self.num_classes, extra)])
            scores = np.round(np.concatenate([scores, rng.uniform(0, 0.6, extra)]), 2)
            output = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64),
                      "scores": torch.tensor(scores, dtype=torch.float32)}  # fmt: skip
            if self.predicts_masks:
                masks = torch.zeros(len(boxes), 1, height, width)
                for d, (x1, y1, x2, y2) in enumerate(np.round(boxes).astype(int)):
                    masks[d, 0, y1 : max(y2, y1 + 1), x1 : max(x2, x1 + 1)] = 0.9
                output["masks"] = masks
            outputs.append(output)
        self.refs += [weakref.ref(output["masks" if self.predicts_masks else "boxes"]) for output in outputs]
        return outputs


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory) -> CocoDetection:
    """36 images of 64x64 px, with masks."""
    root = make_shapes(tmp_path_factory.mktemp("small_shapes"), n_train=1, n_val=IMAGES, seed=1, image_size=64)
    return CocoDetection(*shapes_paths(root, "val"), with_masks=True)


def collected(model, dataset, class_names=None, masks: bool = False, limit: int | None = None) -> dict:  # noqa: ANN001
    """The metrics as before streaming: all outputs collected, then ``evaluate_coco`` and ``evaluate_voc``."""
    outputs, _ = Predictor(model).dataset(dataset, limit=limit)
    if class_names is not None:
        mapping = match_classes(class_names, dataset.class_names)
        outputs = {image_id: mapping.apply(output) for image_id, output in outputs.items()}
    result = evaluate_coco(outputs, dataset, ("bbox", "segm") if masks else ("bbox",), image_ids=list(outputs))
    result["voc"] = evaluate_voc(outputs, dataset, image_ids=list(outputs))
    return {"metrics": result, "outputs": outputs}


def assert_same_metrics(streamed: dict, reference: dict) -> None:
    """The same keys in the same order and the same numbers, exactly (NaN where NaN)."""
    assert list(streamed)[: len(reference)] == list(reference)
    np.testing.assert_equal({k: streamed[k] for k in reference}, reference)


@pytest.mark.parametrize("masks", [False, True])
def test_streamed_metrics_are_those_of_all_outputs_at_once(small_shapes, masks):
    streamed = evaluate_model(RandomDetector(small_shapes, masks), small_shapes)
    reference = collected(RandomDetector(small_shapes, masks), small_shapes, masks=masks)["metrics"]
    assert 0.1 < streamed["bbox"]["AP"] < 0.9 and 0.1 < streamed["voc"]["mAP"] < 0.9  # numbers that can tell
    assert ("segm" in streamed) == masks
    assert_same_metrics(streamed, reference)
    assert streamed["images"] == IMAGES and "outputs" not in streamed


def test_classes_mapped_by_name_and_outputs_kept_as_before(small_shapes):
    names = ["__background__", *reversed(small_shapes.class_names[1:])]  # the model's classes, in another order
    streamed = evaluate_model(RandomDetector(small_shapes, True), small_shapes, class_names=names, keep_outputs=True,
                              limit=10)  # fmt: skip
    reference = collected(RandomDetector(small_shapes, True), small_shapes, class_names=names, masks=True, limit=10)
    assert_same_metrics(streamed, reference["metrics"])
    assert streamed["images"] == 10 and list(streamed["outputs"]) == list(reference["outputs"])
    for image_id, output in reference["outputs"].items():
        assert output.keys() == streamed["outputs"][image_id].keys()
        assert all(torch.equal(v, streamed["outputs"][image_id][k]) for k, v in output.items())


@pytest.mark.parametrize("kind", ["faster_rcnn", "mask_rcnn"])
def test_tiny_trained_runs_score_as_before(kind, shapes_root, tmp_path_factory):
    loaded = load_model(tiny_run(kind, shapes_root, tmp_path_factory))
    masks = loaded.model.predicts_masks
    dataset = build_dataset(shapes_root, "val", with_masks=masks)
    streamed = evaluate_model(loaded.model, dataset, class_names=loaded.class_names, keep_outputs=True)
    reference = collected(loaded.model, dataset, loaded.class_names, masks=masks)
    assert sum(len(o["scores"]) for o in reference["outputs"].values()) > 0  # (barely trained, but it detects)
    assert_same_metrics(streamed, reference["metrics"])
    assert ("segm" in streamed) == (kind == "mask_rcnn")
    assert streamed["images"] == len(dataset) and streamed["seconds_per_image"] > 0
    assert list(streamed["outputs"]) == list(reference["outputs"])


@pytest.mark.parametrize("masks", [False, True])
def test_memory_does_not_grow_with_the_images(small_shapes, masks):
    detector = RandomDetector(small_shapes, masks)
    tracemalloc.start()
    try:
        evaluate_model(detector, small_shapes)
    finally:
        tracemalloc.stop()
    # each output (its tensors: torch's memory, which tracemalloc does not see) is let go of once the
    # next is predicted; collected first, as before, 35 are alive at the last call (masks: 1.6 MB each)
    assert detector.alive <= 2, detector.alive
    # what numpy and Python hold per image: its boxes, labels and scores for VOC (48 bytes a detection,
    # 4.8 kB) and COCO's index entry (5.7 kB in all, measured); its masks alone, binarised, 410 kB
    first, last = detector.traced[5], detector.traced[-1]
    per_image = (last - first) / (len(detector.traced) - 1 - 5)
    assert per_image < 12_000, per_image


def test_faster_coco_eval_gives_the_same_numbers(small_shapes):
    pycocotools = evaluate_model(RandomDetector(small_shapes, True), small_shapes)
    faster = evaluate_model(RandomDetector(small_shapes, True), small_shapes, coco_backend="faster-coco-eval")
    for kind in ("bbox", "segm"):
        # up to float rounding (its C++ sums in another order), as tests/test_eval_scale.py finds
        for name, value in pycocotools[kind].items():
            if name != "per_class_AP":
                assert faster[kind][name] == pytest.approx(value, rel=0, abs=1e-12), (kind, name)
        np.testing.assert_allclose(list(faster[kind]["per_class_AP"].values()),
                                   list(pycocotools[kind]["per_class_AP"].values()), rtol=0, atol=1e-12)  # fmt: skip
    assert faster["voc"] == pycocotools["voc"]


@pytest.fixture(scope="module")
def run(shapes_root: Path, tmp_path_factory) -> Path:
    return tiny_run("faster_rcnn", shapes_root, tmp_path_factory)


def test_coco_evaluator_option(run, tmp_path, capsys, monkeypatch):
    assert COCO_EVALUATORS == BACKENDS
    used = []  # the backend that scored each IoU type
    for backend, method in (("pycocotools", "_pycocotools"), ("faster-coco-eval", "_faster")):
        scored = getattr(CocoEvaluator, method)
        spy = lambda self, *a, _scored=scored, _backend=backend: used.append(_backend) or _scored(self, *a)  # noqa: E731
        monkeypatch.setattr(CocoEvaluator, method, spy)
    metrics = {}
    for backend in (None, "pycocotools", "faster-coco-eval"):
        out = tmp_path / f"{backend}.json"
        option = ["--coco-evaluator", backend] if backend else []
        assert main(["evaluate", "--weights", str(run), "--out", str(out), *option]) == 0
        metrics[backend] = json.loads(out.read_text())
    capsys.readouterr()
    assert used == ["pycocotools", "pycocotools", "faster-coco-eval"]
    assert metrics[None] == {**metrics["pycocotools"], "seconds_per_image": metrics[None]["seconds_per_image"]}
    # (the barely trained model's AP may be 0: test_faster_coco_eval_gives_the_same_numbers compares AP that can tell)
    reference, faster = metrics["pycocotools"], metrics["faster-coco-eval"]
    for name, value in reference["bbox"].items():
        if name != "per_class_AP":
            assert faster["bbox"][name] == pytest.approx(value, rel=0, abs=1e-12), name
    assert faster["voc"] == reference["voc"]
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--weights", str(run), "--coco-evaluator", "fast"])
    assert exit_.value.code == 2 and "argument --coco-evaluator: invalid choice: 'fast'" in capsys.readouterr().err


def test_faster_coco_eval_missing_is_one_line_before_any_prediction(run, small_shapes, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # its import fails, as where it is not installed

    def no_prediction(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a prediction ran")

    monkeypatch.setattr(Predictor, "detect", no_prediction)
    assert main(["evaluate", "--weights", str(run), "--coco-evaluator", "faster-coco-eval"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "rcnn evaluate: error: --coco-evaluator: the COCO evaluation backend faster-coco-eval is not installed: "
        "pip install faster-coco-eval==1.8.0 (or use the default, pycocotools)"
    ]
    detector = RandomDetector(small_shapes, False)
    with pytest.raises(ValueError, match=r"^coco_backend: .* not installed: pip install faster-coco-eval==1\.8\.0"):
        evaluate_model(detector, small_shapes, coco_backend="faster-coco-eval")
    with pytest.raises(ValueError, match="^coco_backend: 'fast' is not one of pycocotools, faster-coco-eval$"):
        evaluate_model(detector, small_shapes, coco_backend="fast")
    assert detector.calls == 0
