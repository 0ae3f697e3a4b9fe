"""rcnn.explain: the stages of each generation on one image, recorded from the model's forward pass; the page;
ground truth and the error analysis; the command."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch

from rcnn.build import load_model
from rcnn.cli import main
from rcnn.components.proposals.selective_search import SelectiveSearch
from rcnn.core.ops import roi_align, roi_align_points, roi_pool, roi_pool_bins
from rcnn.data.reading import build_dataset
from rcnn.explain import GroundTruth, analyse_errors, dataset_ground_truth, explain, explain_model, load_ground_truth
from rcnn.io.images import load_image
from tiny_runs import tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = {  # the seed's order, per generation
    "rcnn": ["proposals", "warp", "scores", "nms", "regression", "detections", "errors"],
    "fast_rcnn": ["proposals", "features", "pooling", "scores", "regression", "nms", "detections", "errors"],
    "faster_rcnn": ["anchors", "features", "objectness", "rpn_nms", "pooling", "scores", "regression", "nms", "detections", "errors"],
    "mask_rcnn": ["anchors", "features", "objectness", "rpn_nms", "pooling", "scores", "regression", "nms", "masks", "detections", "errors"],
}  # fmt: skip
NAMES = ["__background__", "circle", "square", "triangle", "star", "hexagon"]


class Runs:
    """The tiny runs, trained when first asked for (once per test process)."""

    def __init__(self, shapes_root, proposals, tmp_path_factory):
        self.args = shapes_root, tmp_path_factory, proposals

    def __getitem__(self, kind):
        shapes_root, factory, proposals = self.args
        return tiny_run(kind, shapes_root, factory, proposals)


@pytest.fixture(scope="module")
def runs(shapes_root, proposals, tmp_path_factory):
    return Runs(shapes_root, proposals, tmp_path_factory)


@pytest.fixture(scope="module")
def val_image(shapes_root):
    dataset = build_dataset(shapes_root, "val")
    path, gt = dataset_ground_truth(dataset, 1, NAMES)
    return load_image(path), gt


@pytest.mark.parametrize("kind", list(STAGES))
def test_stages_are_the_models_own_and_end_in_its_detections(kind, runs, val_image):
    loaded = load_model(runs[kind])
    model, names = loaded.model, loaded.class_names
    image, gt = val_image
    explanation = explain_model(model, image, names, gt=gt, score_thresh=0.1)
    assert [s.key for s in explanation.stages] == STAGES[kind]
    with torch.inference_mode():
        if model.needs_proposals:  # the same selective search as the explanation's
            boxes = SelectiveSearch()((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
            (expected,) = model([image], proposals=[boxes])
        else:
            (expected,) = model([image])
    assert set(explanation.detections) == set(expected)
    for key, value in expected.items():  # bit-identical: the explanation drew the predictor's own forward pass
        assert torch.equal(explanation.detections[key], value), key
    assert all(s.caption and s.picture.size[0] > 50 for s in explanation.stages)
    errors = explanation.errors
    assert len(errors.objects) == len(gt.boxes)
    assert len(errors.true_positives) + len(errors.false_positives) == int((expected["scores"] >= 0.1).sum())
    assert explanation.times["proposals"] > 0 and explanation.times["rest"] > 0


def test_page_is_self_contained_with_a_picture_per_stage(runs, val_image, tmp_path):
    loaded = load_model(runs["mask_rcnn"])
    model, names = loaded.model, loaded.class_names
    image, gt = val_image
    page = explain(model, image, names, tmp_path / "out", gt=gt, title="val 1")
    html = page.read_text()
    sources = re.findall(r'src="([^"]+)"', html)
    assert len(sources) == len(STAGES["mask_rcnn"]) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert base64.b64decode(sources[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(href|src)=\"(https?:|//)", html) and "<link" not in html and "<script" not in html
    assert [p.name for p in sorted((tmp_path / "out").glob("*.png"))][:2] == ["01_anchors.png", "02_features.png"]
    assert len(re.findall(r'<section class="stage" id="stage-', html)) == len(STAGES["mask_rcnn"]) + 1  # + times
    assert "RoIAlign against RoIPool" in html and "14x14 masks" in html


def test_rpn_candidates_then_nms_are_the_proposal_layer(runs, val_image):
    from rcnn.components.backbones import as_feature_list
    from rcnn.core.ops import batched_nms

    model = load_model(runs["faster_rcnn"]).model
    batch, _, _ = model.transform([val_image[0]])
    with torch.inference_mode():
        features = as_feature_list(model.backbone(batch.tensors))
        (proposals,), _ = model.rpn(features, batch.image_sizes)
        out = model.rpn.head_outputs(features)
        ((boxes, scores, levels),) = model.rpn.candidates(out.objectness, out.box_deltas, out.anchors, out.level_sizes, batch.image_sizes)
    s = model.rpn.settings
    assert len(boxes) == min(s.pre_nms_top_n_test, out.anchors.shape[0]) >= len(proposals)
    keep = batched_nms(boxes, scores, levels, s.nms_thresh, max_kept=s.post_nms_top_n_test)
    assert torch.equal(boxes[keep], proposals)
    assert out.logits[0].shape[1] == 9 and out.anchors.shape[0] == sum(out.level_sizes)


def test_roi_pool_bins_and_roi_align_points_by_hand():
    # an RoI of 0..32 px on a stride-8 map: corners at cells 0 and 4 (the kernel's +1 gives 5 cells), 2x2 bins
    bins = roi_pool_bins((0.0, 0.0, 32.0, 32.0), 2, 1 / 8, (10, 10))
    assert bins.tolist() == [[[0, 3, 0, 3], [0, 3, 2, 5]], [[2, 5, 0, 3], [2, 5, 2, 5]]]
    features = torch.arange(100.0).reshape(1, 1, 10, 10)
    rois = torch.tensor([[0.0, 0.0, 0.0, 32.0, 32.0]])
    assert roi_pool(features, rois, 2, 1 / 8).flatten().tolist() == [22.0, 24.0, 42.0, 44.0]  # max of each bin
    points = roi_align_points((0.0, 0.0, 32.0, 32.0), 2, 1 / 8, sampling_ratio=2, aligned=True)
    assert points.shape == (2, 2, 4, 2)
    # x from -0.5 to 3.5 in cell units: bins of 2 cells, samples at a quarter and three quarters of each
    assert points[0, 0].tolist() == [[-0.0, -0.0], [-0.0, 1.0], [1.0, -0.0], [1.0, 1.0]]
    assert points[1, 1, 3].tolist() == [3.0, 3.0]
    # the average of the bilinear values at those points is RoIAlign (the value map is linear in x and y)
    expected = torch.tensor([[0.5 * 10 + 0.5, 0.5 * 10 + 2.5], [2.5 * 10 + 0.5, 2.5 * 10 + 2.5]])
    torch.testing.assert_close(roi_align(features, rois, 2, 1 / 8, 2, True)[0, 0], expected)


def _gt(boxes, labels):
    return GroundTruth(torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels))


def test_error_analysis_names_the_stage_and_the_kind():
    names = ["bg", "a", "b"]
    gt = _gt([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10], [80, 0, 90, 10]], [1, 1, 1, 1, 2])
    # regions: 0 covers object 1; 1 covers object 2; 2 covers object 3; 3 covers object 4; 4 on background;
    # 5 a near-copy of 3; 6 half on object 0 (localisation); none covers object 0
    proposals = torch.tensor([[20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10], [80, 0, 90, 10], [100, 0, 110, 10],
                              [80, 0, 90, 11], [5, 0, 15, 10]], dtype=torch.float32)  # fmt: skip
    scores = torch.tensor([[0.9, 0.0], [0.6, 0.0], [0.2, 0.0], [0.0, 0.3], [0.8, 0.0], [0.0, 0.0], [0.7, 0.0]])
    scores[3] = torch.tensor([0.95, 0.3])  # object 4 (class b) detected as class a
    scores[5] = torch.tensor([0.9, 0.0])  # a duplicate of that wrong detection
    kept = (torch.tensor([0, 3, 4, 6, 5]), torch.tensor([1, 1, 1, 1, 1]))  # region 1 was suppressed by NMS
    detections = {"boxes": proposals[[3, 0, 5, 4, 6]], "labels": torch.tensor([1, 1, 1, 1, 1]),
                  "scores": torch.tensor([0.95, 0.9, 0.9, 0.8, 0.7])}  # fmt: skip
    analysis = analyse_errors(gt, proposals, proposals, scores, 0.05, kept, detections, 0.5, names)
    stages = [o["stage"] for o in analysis.objects]
    assert stages == ["no proposal", "found", "suppressed by NMS", "scored below the threshold", "wrong class"]
    kinds = {fp["detection"]: fp["kind"] for fp in analysis.false_positives}
    # detection 0 (class a on object 4 of class b): wrong class; 2: the same again; 3: background; 4: localisation
    assert kinds == {0: "wrong class", 2: "wrong class", 3: "background", 4: "localisation"}
    assert analysis.true_positives == [1]
    # a duplicate: a second detection of an object already found
    dup = {"boxes": proposals[[0, 0]] + torch.tensor([[0.0], [0.5]]), "labels": torch.tensor([1, 1]), "scores": torch.tensor([0.9, 0.8])}
    again = analyse_errors(gt, proposals, proposals, scores, 0.05, kept, dup, 0.5, names)
    assert [fp["kind"] for fp in again.false_positives] == ["duplicate"]


def test_ground_truth_files(tmp_path):
    coco = {"images": [{"id": 7, "file_name": "sub/im.png", "width": 50, "height": 40}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 2, 10, 20], "iscrowd": 0}],
            "categories": [{"id": 3, "name": "star"}]}  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(coco))
    gt = load_ground_truth(tmp_path / "c.json", NAMES, image_name="/data/im.png")
    assert gt.boxes.tolist() == [[1.0, 2.0, 11.0, 22.0]] and gt.labels.tolist() == [4]
    with pytest.raises(ValueError, match="no image with file_name 'other.png'"):
        load_ground_truth(tmp_path / "c.json", NAMES, image_name="other.png")
    (tmp_path / "s.json").write_text(json.dumps({"boxes": [[0, 0, 5, 5], [1, 1, 9, 9]], "labels": ["circle", 2]}))
    assert load_ground_truth(tmp_path / "s.json", NAMES).labels.tolist() == [1, 2]
    (tmp_path / "bad.json").write_text(json.dumps({"boxes": [[0, 0, 5, 5]], "labels": ["dog"]}))
    with pytest.raises(ValueError, match=r"bad.json: labels\[0\]: class 'dog' is not one of the model's classes"):
        load_ground_truth(tmp_path / "bad.json", NAMES)
    (tmp_path / "v.xml").write_text("<annotation><object><name>square</name><bndbox><xmin>3</xmin><ymin>4</ymin>"
                                    "<xmax>20</xmax><ymax>30</ymax></bndbox></object></annotation>")  # fmt: skip
    gt = load_ground_truth(tmp_path / "v.xml", NAMES)
    assert gt.boxes.tolist() == [[2.0, 3.0, 20.0, 30.0]] and gt.labels.tolist() == [2]
    (tmp_path / "n.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a COCO json"):
        load_ground_truth(tmp_path / "n.json", NAMES)


def test_the_command(runs, shapes_root, tmp_path, capsys):
    assert main(["explain", "--weights", str(runs["rcnn"]), "--data", str(shapes_root), "--index", "2", "--out", str(tmp_path / "a")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    html = (tmp_path / "a" / "explain.html").read_text()
    assert summary["gt_objects"] > 0 and 'id="stage-warp"' in html and 'id="stage-errors"' in html
    image = next((shapes_root / "images" / "val").glob("*.png"))
    (tmp_path / "gt.json").write_text(json.dumps({"boxes": [[10, 10, 40, 40]], "labels": ["circle"]}))
    code = main(["explain", str(image), "--gt", str(tmp_path / "gt.json"), "--weights", str(runs["faster_rcnn"]),
                 "--out", str(tmp_path / "b"), "--score-thresh", "0.2"])  # fmt: skip
    assert code == 0 and "score threshold 0.2" in (tmp_path / "b" / "explain.html").read_text()
    assert main(["explain", "--weights", str(runs["rcnn"]), "--out", str(tmp_path / "c")]) == 2
    assert "give either an IMAGE file or --data" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "missing.png"), "--weights", str(runs["rcnn"]), "--out", str(tmp_path / "c")]) == 2
    assert "missing.png: image file not found" in capsys.readouterr().err


def test_a_feature_pyramid_model_is_explained_level_by_level():
    from rcnn.models import faster_rcnn

    torch.manual_seed(0)
    model = faster_rcnn("mobilenet_v3_fpn", 3, min_size=160, max_size=160).eval()
    image = torch.rand(3, 120, 150)
    explanation = explain_model(model, image, ["bg", "a", "b"], score_thresh=0.0)
    with torch.inference_mode():
        (expected,) = model([image])
    assert all(torch.equal(explanation.detections[k], v) for k, v in expected.items())
    objectness = next(s for s in explanation.stages if s.key == "objectness")
    levels = len(model.rpn.strides)
    assert levels > 1 and objectness.picture.size[0] == 8 + (1 + levels) * (420 + 8)  # the input and one map per level
    assert "RoIAlign on one region" in [s.title for s in explanation.stages]
