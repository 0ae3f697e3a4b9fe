"""A run folder records what it ran: every effective setting, so that a later change of a default
never changes an old run (issue "A run folder does not record what it ran").

A config's ``model`` section states what differs from the defaults, and several defaults are
chosen when the model is built, from the backbone: the RPN's and RoI heads' settings, the anchors,
the pooler, the backbone's BatchNorm. ``rcnn.build.resolved_config`` reads every value back from
the built model, and that is what a run folder's ``config.yaml`` holds. The tests:

1. a run's ``config.yaml`` holds every effective setting, compared field by field with the built
   model's parts (single-level and FPN Faster R-CNN, Mask R-CNN, Fast R-CNN, R-CNN), and rebuilds
   the same model;
2. changing a default in the code (the per-backbone default functions, a settings class's
   default) does not change a recorded run's detections, though it changes the model a partial
   config builds;
3. a run folder written before (``tests/data/old_run``: a partial section, as ``rcnn train`` wrote
   it) loads and predicts as it did;
4. a resolved config round-trips through YAML, and ``--set`` overrides on top of it work and are
   validated.
"""

from __future__ import annotations

import importlib
import inspect
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import rcnn.training.run
from rcnn.build import build_model, load_model, resolved_config
from rcnn.cli import main
from rcnn.components.mask_heads import MaskSettings
from rcnn.components.proposals.rpn import RPNSettings
from rcnn.components.roi_heads import RoIHeadSettings
from rcnn.config import MODEL_SECTIONS, Config, config_to_yaml, load_config
from rcnn.io.checkpoints import load_checkpoint, save_checkpoint
from rcnn.models import faster_rcnn

OLD_RUN = Path(__file__).parent / "data" / "old_run"
# the modules that call the default functions (rcnn.models exports a function named faster_rcnn)
FASTER = importlib.import_module("rcnn.models.faster_rcnn")
BASE = importlib.import_module("rcnn.models.base")
NAMES = ["__background__", "circle", "square", "triangle"]
SMALL = ["model.min_size=64", "model.max_size=64"]
CASES = {
    "faster_rcnn": ["model.name=faster_rcnn", "model.backbone=tiny", *SMALL],
    "faster_rcnn_fpn": ["model.name=faster_rcnn", "model.backbone=resnet50_fpn", "model.backbone_norm=frozen", *SMALL],
    "mask_rcnn": ["model.name=mask_rcnn", "model.backbone=tiny", "model.mask.num_convs=1", "model.mask.channels=8", *SMALL],
    "fast_rcnn": ["model.name=fast_rcnn", "model.backbone=tiny", *SMALL],
    "rcnn": ["model.name=rcnn", "model.backbone=tiny", "model.warp_size=32", "model.context_padding=2"],
}


def image() -> torch.Tensor:
    """The image ``tests/data/old_run/detections.json`` was predicted on: ``[3, 56, 72]``."""
    return torch.rand(3, 56, 72, generator=torch.Generator().manual_seed(0))


def proposals() -> list[torch.Tensor]:
    """20 fixed boxes ``[20, 4]`` inside :func:`image`, for the models that take proposals."""
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(20, 2, generator=g) * torch.tensor([50.0, 36.0])
    wh = 8 + torch.rand(20, 2, generator=g) * 14
    return [torch.cat((xy, xy + wh), dim=1)]


def predict(model: nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        if model.needs_proposals:
            return model([image()], proposals=proposals())[0]
        return model([image()])[0]


def save_run(run: Path, config, model: nn.Module) -> dict:
    """Save ``model`` as the library saves runs (its resolved config beside the weights); the
    file's ``model`` section."""
    save_checkpoint(run, 0, model, config_yaml=config_to_yaml(resolved_config(config, model)), class_names=NAMES)
    return yaml.safe_load((run / "last" / "config.yaml").read_text())["model"]


def same_floats(recorded, values: torch.Tensor) -> bool:
    """The recorded decimals are the float32 values the model holds."""
    return torch.equal(torch.tensor(recorded, dtype=values.dtype), values.detach().flatten().cpu())


def check_section(section: dict, model: nn.Module, names: list[str] = NAMES) -> None:
    """The file's ``model`` section against the built model's parts, field by field."""
    assert set(section) == set(MODEL_SECTIONS[section["name"]].model_fields), "every field is recorded"
    assert section["name"] == type(model).name and section["num_classes"] == model.num_classes == len(names)
    norms = {type(m) for m in model.backbone.modules()}
    assert section["backbone_norm"] == ("frozen" if FrozenBatchNorm2d in norms else "bn")
    if not hasattr(model, "transform"):  # R-CNN: its settings and normalisation
        assert set(model.settings.model_dump()) < set(section)
        for name, value in model.settings.model_dump(mode="json").items():
            assert section[name] == value, name
        assert same_floats(section["image_mean"], model.image_mean) and same_floats(section["image_std"], model.image_std)
        return
    transform, heads = model.transform, model.roi_heads
    assert [section["min_size"]] == list(transform.min_sizes) and section["max_size"] == transform.max_size
    assert same_floats(section["image_mean"], transform.image_mean) and same_floats(section["image_std"], transform.image_std)
    assert section["size_divisible"] == transform.size_divisible
    assert section["torchvision_compat"] == transform.torchvision
    pooler = heads.pooler
    assert section["pooler"] == pooler.kind
    assert (section["sampling_ratio"], section["aligned"]) == (pooler.sampling_ratio, pooler.aligned)
    assert section["roi"] == heads.settings.model_dump(mode="json") and set(section["roi"]) == set(RoIHeadSettings.model_fields)
    if model.has_rpn:
        anchors = model.rpn.anchor_generator
        assert section["anchor_sizes"] == [list(level) for level in anchors.sizes]
        assert [section["aspect_ratios"]] * len(anchors.sizes) == [list(level) for level in anchors.aspect_ratios]
        assert section["anchor_offset"] == anchors.offset
        assert section["rpn"] == model.rpn.settings.model_dump(mode="json") and set(section["rpn"]) == set(RPNSettings.model_fields)
        assert section["rpn"]["conv_depth"] == 1 + len(model.rpn.head.more_convs)
    if model.predicts_masks:
        mask = section["mask"]
        assert set(mask) == set(MaskSettings.model_fields)
        assert [mask["pool_size"]] * 2 == list(heads.mask_pooler.output_size) and mask["pooler"] == heads.mask_pooler.kind
        assert mask["num_convs"] == sum(isinstance(m, nn.Conv2d) for m in heads.mask_head.convs)
        assert mask["channels"] == heads.mask_predictor.deconv.out_channels
        assert mask["batch_norm"] == any(isinstance(m, nn.BatchNorm2d) for m in heads.mask_head.convs)
        assert mask["paste"] == heads.paste and section["mask_probabilities"] == heads.mask_probabilities


def same_parts(a: nn.Module, b: nn.Module) -> None:
    """Two models built alike: the same settings objects, anchors, poolers, transform and tensors."""
    assert type(a) is type(b)
    assert {k: tuple(v.shape) for k, v in a.state_dict().items()} == {k: tuple(v.shape) for k, v in b.state_dict().items()}
    if not hasattr(a, "transform"):
        assert a.settings == b.settings and torch.equal(a.image_mean, b.image_mean) and torch.equal(a.image_std, b.image_std)
        return
    assert a.roi_heads.settings == b.roi_heads.settings
    for attr in ("kind", "output_size", "sampling_ratio", "aligned", "strides"):
        assert getattr(a.roi_heads.pooler, attr) == getattr(b.roi_heads.pooler, attr), attr
    for attr in ("min_sizes", "max_size", "size_divisible", "torchvision"):
        assert getattr(a.transform, attr) == getattr(b.transform, attr), attr
    assert torch.equal(a.transform.image_mean, b.transform.image_mean) and torch.equal(a.transform.image_std, b.transform.image_std)
    if a.has_rpn:
        assert a.rpn.settings == b.rpn.settings
        for attr in ("sizes", "aspect_ratios", "offset", "torchvision"):
            assert getattr(a.rpn.anchor_generator, attr) == getattr(b.rpn.anchor_generator, attr), attr
    if a.predicts_masks:
        assert a.roi_heads.mask_settings() == b.roi_heads.mask_settings()


# -- 1. a run's config.yaml holds every effective setting ------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_records_every_effective_setting(case, tmp_path):
    config = load_config(None, CASES[case])
    torch.manual_seed(0)
    model = build_model(config.model, len(NAMES))
    path = tmp_path / "config.yaml"  # as a run folder's (the weights are beside it in a run)
    path.write_text(config_to_yaml(resolved_config(config, model)))
    section = yaml.safe_load(path.read_text())["model"]
    check_section(section, model)
    if case == "faster_rcnn_fpn":  # the example: RoIHeadSettings says NMS 0.3, an FPN model runs 0.5
        assert RoIHeadSettings().nms_thresh == 0.3 and section["roi"]["nms_thresh"] == 0.5 == model.roi_heads.settings.nms_thresh
        assert section["anchor_sizes"] == [[32.0], [64.0], [128.0], [256.0], [512.0]] and section["pooler"] == "align"
        assert section["rpn"]["post_nms_top_n_test"] == 1000 and section["backbone_norm"] == "frozen"
    if case == "faster_rcnn":  # the tiny backbone's own anchors, RoI max pooling on one level
        assert section["anchor_sizes"] == [[16.0, 32.0, 64.0]] and section["pooler"] == "pool"
        assert section["rpn"]["nms_thresh"] == 0.7 and section["roi"]["nms_thresh"] == 0.3
    # the record rebuilds the same model, and resolving that gives the record back
    recorded = load_config(path)
    rebuilt = build_model(recorded.model)
    same_parts(model, rebuilt)
    assert resolved_config(recorded, rebuilt).model_dump() == recorded.model_dump()
    # and so do the model's own effective options, in Python
    same_parts(model, type(model).build(section["backbone"], model.num_classes, backbone_norm=section["backbone_norm"],
                                        **model.effective_options()))  # fmt: skip


def test_a_saved_run_loads_with_its_record(tmp_path):
    config = load_config(None, CASES["mask_rcnn"])
    torch.manual_seed(0)
    model = build_model(config.model, len(NAMES)).eval()
    section = save_run(tmp_path / "run", config, model)
    check_section(section, model)
    loaded = load_model(tmp_path / "run", for_inference=False)
    same_parts(model, loaded.model)
    assert loaded.config.model.model_dump(mode="json") == section  # the loaded config is the record


def test_converted_torchvision_runs_record_every_setting(tmp_path):
    import torchvision

    from rcnn.deploy.torchvision import convert_torchvision

    peer = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=4)
    torch.save(peer.state_dict(), tmp_path / "peer.pth")
    convert_torchvision(tmp_path / "peer.pth", "fasterrcnn_mobilenet_v3_large_320_fpn", tmp_path / "run", log=lambda s: None)
    section = yaml.safe_load((tmp_path / "run" / "last" / "config.yaml").read_text())["model"]
    loaded = load_model(tmp_path / "run", for_inference=False)
    check_section(section, loaded.model, loaded.class_names)
    assert section["rpn"]["score_thresh"] == 0.05 and section["rpn"]["nms_thresh"] == 0.7 and section["roi"]["nms_thresh"] == 0.5
    assert section["aligned"] is False and section["anchor_offset"] == 0.0 and section["torchvision_compat"] is True


def test_a_partial_run_with_pretrained_weights_loads_with_frozen_batchnorm(tmp_path):
    """Written before: ``pretrained_backbone`` given, ``backbone_norm`` left to its default (frozen
    with pre-trained weights): the run is rebuilt with the frozen BatchNorm it was trained with."""
    built = load_config(None, ["model.backbone=mobilenet_v3_fpn", *SMALL, "model.backbone_norm=frozen"])
    model = build_model(built.model, len(NAMES))
    partial = load_config(None, ["model.backbone=mobilenet_v3_fpn", *SMALL, "model.pretrained_backbone=gone.pth"])
    save_checkpoint(tmp_path, 0, model, config_yaml=config_to_yaml(partial), class_names=NAMES)
    loaded = load_model(tmp_path, for_inference=False)
    assert loaded.config.model.backbone_norm == "frozen" and loaded.config.model.pretrained_backbone is None
    assert any(isinstance(m, FrozenBatchNorm2d) for m in loaded.model.backbone.modules())


@pytest.mark.skipif(
    "resolved_config" not in inspect.getsource(rcnn.training.run),
    reason="rcnn/training/run.py does not write resolved_config(config, model) yet",
)
def test_rcnn_train_records_every_effective_setting(shapes_root, tmp_path):
    from rcnn.training.run import run_training

    config = load_config("faster_rcnn_tiny_shapes", [f"data.root={shapes_root}", "data.shapes=null", "data.workers=0",
                                                     "train.iterations=1", "train.warmup_iterations=0", *SMALL])  # fmt: skip
    run_training(config, tmp_path / "run", evaluate=False, progress=False, log=lambda s: None)
    section = yaml.safe_load((tmp_path / "run" / "last" / "config.yaml").read_text())["model"]
    loaded = load_model(tmp_path / "run", for_inference=False)
    check_section(section, loaded.model, loaded.class_names)
    assert section["rpn"]["nms_thresh"] == 0.7 and section["roi"]["score_thresh"] == 0.05


# -- 2. a change of a default in the code does not change a recorded run ----------------------


@contextmanager
def changed_default(cls, field: str, value):
    """A settings class's default changed, as an edit of its declaration would."""
    info = cls.model_fields[field]
    old = info.default

    def rebuild() -> None:
        cls.model_rebuild(force=True)
        Config.model_rebuild(force=True)  # its schema holds a copy of the model sections'

    info.default = value
    rebuild()
    try:
        yield
    finally:
        info.default = old
        rebuild()


@pytest.mark.parametrize("case", ["faster_rcnn", "mask_rcnn", "fast_rcnn", "rcnn"])
def test_changed_defaults_do_not_change_a_recorded_run(case, tmp_path, monkeypatch):
    config = load_config(None, CASES[case])
    torch.manual_seed(0)
    model = build_model(config.model, len(NAMES))
    with torch.no_grad():  # spread the scores out: no two detections tie
        for layer in model.modules():
            if isinstance(layer, nn.Linear) and layer.out_features == len(NAMES):
                layer.weight.mul_(50.0)
    recorded = save_run(tmp_path / "run", config, model)
    before = predict(load_model(tmp_path / "run").model)
    assert len(before["scores"]) > 3
    section = MODEL_SECTIONS[config.model.name]
    monkeypatch.setattr(FASTER, "default_rpn_settings",
                        lambda levels: RPNSettings(nms_thresh=0.1, pre_nms_top_n_test=40, post_nms_top_n_test=5))
    monkeypatch.setattr(BASE, "default_roi_settings",
                        lambda levels: (RoIHeadSettings(nms_thresh=0.05, score_thresh=0.3), "align"))
    monkeypatch.setattr(FASTER, "default_anchor_sizes", lambda backbone, levels: ((8.0, 100.0, 300.0),) * levels)
    with (changed_default(RoIHeadSettings, "detections_per_image", 3), changed_default(MaskSettings, "paste", "torchvision"),
          changed_default(section, "nms_thresh" if case == "rcnn" else "aligned", 0.01 if case == "rcnn" else False),
          changed_default(section, "image_std", (0.5, 0.5, 0.5))):  # fmt: skip
        # the changes are real: the partial config builds another model today
        partial = build_model(load_config(None, CASES[case]).model, len(NAMES))
        partial_section = resolved_config(config, partial).model.model_dump(mode="json")
        assert partial_section != recorded and partial_section["image_std"] == [0.5, 0.5, 0.5]
        loaded = load_model(tmp_path / "run")
        after = predict(loaded.model)
        assert loaded.config.model.model_dump(mode="json") == recorded
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(before[key], after[key]), key


# -- 3. a run folder written before this change ----------------------------------------------


OLD_RPN = {"pre_nms_top_n_train": 2000, "post_nms_top_n_train": 512, "pre_nms_top_n_test": 1000, "post_nms_top_n_test": 100}


def expected_old_detections() -> dict[str, torch.Tensor]:
    found = json.loads((OLD_RUN / "detections.json").read_text())
    return {"boxes": torch.tensor(found["boxes"]).reshape(-1, 4), "labels": torch.tensor(found["labels"]),
            "scores": torch.tensor(found["scores"])}  # fmt: skip


def assert_same_detections(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert torch.equal(found["labels"], expected["labels"])
    torch.testing.assert_close(found["boxes"], expected["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(found["scores"], expected["scores"], atol=1e-5, rtol=0)


def test_an_old_run_folder_loads_and_predicts_as_before(tmp_path, monkeypatch):
    """``tests/data/old_run``: written as ``rcnn train`` wrote runs before (the ``rpn`` section with
    four top-n fields, no NMS or IoU threshold, no ``roi`` fields, no anchors; 1-byte weights keep
    the folder small, see its README) with the detections it predicted then."""
    recorded = yaml.safe_load((OLD_RUN / "config.yaml").read_text())["model"]
    assert recorded["rpn"] == OLD_RPN and recorded["roi"] == {} and recorded["anchor_sizes"] is None
    expected = expected_old_detections()
    assert len(expected["scores"]) > 10
    loaded = load_model(OLD_RUN)
    assert_same_detections(predict(loaded.model), expected)
    # the model today's code builds from what the section says, with the same weights
    today = faster_rcnn("tiny", len(NAMES), min_size=64, max_size=64, rpn=OLD_RPN)
    load_checkpoint(OLD_RUN, today)
    today.optimize_for_inference()
    assert_same_detections(predict(today), expected)
    same_parts(today, loaded.model)
    # the loaded config says what the model runs with: today's defaults for the tiny backbone
    model = loaded.config.model
    assert model.rpn.given() == {**RPNSettings().model_dump(), **OLD_RPN} and model.roi.given() == RoIHeadSettings().model_dump()
    assert model.anchor_sizes == [[16.0, 32.0, 64.0]] and model.pooler == "pool" and model.num_classes == len(NAMES)
    # recorded whole (re-saved with the resolved config), it no longer depends on the defaults
    upgraded = tmp_path / "upgraded"
    shutil.copytree(OLD_RUN, upgraded)
    (upgraded / "config.yaml").write_text(config_to_yaml(loaded.config))
    monkeypatch.setattr(FASTER, "default_rpn_settings", lambda levels: RPNSettings(nms_thresh=0.2))
    monkeypatch.setattr(BASE, "default_roi_settings", lambda levels: (RoIHeadSettings(nms_thresh=0.9), "align"))
    monkeypatch.setattr(FASTER, "default_anchor_sizes", lambda backbone, levels: ((20.0, 40.0, 80.0),))
    assert_same_detections(predict(load_model(upgraded).model), expected)
    partial = load_model(OLD_RUN).config.model  # the partial record follows today's defaults
    assert partial.rpn.nms_thresh == 0.2 and partial.roi.nms_thresh == 0.9 and partial.anchor_sizes == [[20.0, 40.0, 80.0]]


# -- 4. a resolved config round-trips, and --set works on top of it ---------------------------


def test_a_resolved_config_round_trips_and_takes_overrides(tmp_path, capsys):
    config = load_config("faster_rcnn_tiny_shapes", SMALL)
    model = build_model(config.model, len(NAMES))
    resolved = resolved_config(config, model)
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(resolved))
    again = load_config(path)
    assert again.model_dump() == resolved.model_dump() and config_to_yaml(again) == path.read_text()
    # --set on top of the record: the field changes, the rest stays as recorded
    tuned = load_config(path, ["model.rpn.nms_thresh=0.6", "model.roi.score_thresh=0.2", "model.anchor_sizes=[[8, 16, 32]]"])
    built = build_model(tuned.model)
    assert built.rpn.settings == model.rpn.settings.model_copy(update={"nms_thresh": 0.6})
    assert built.roi_heads.settings == model.roi_heads.settings.model_copy(update={"score_thresh": 0.2})
    assert built.rpn.anchor_generator.sizes == [(8.0, 16.0, 32.0)] and built.transform.max_size == 64
    # and is validated, naming the field
    for override, message in [
        ("model.rpn.nms_thresh=2", r"model\.rpn\.nms_thresh: Input should be less than or equal to 1"),
        ("model.roi.score_thresh=nan", r"model\.roi\.score_thresh: Input should be a finite number"),
        ("model.roi.nms=0.5", r"model\.roi\.nms: unknown field"),
        ("model.image_std=[0.2, 0, 0.2]", r"model\.image_std\.1: Input should be greater than 0"),
        ("model.size_divisible=0", r"model\.size_divisible: Input should be greater than or equal to 1"),
        ("model.mask.paste=exact", r"model\.mask: not an option of faster_rcnn"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(path, [override])
    with pytest.raises(ValueError, match=r"rpn: bg_iou_thresh \(0.3\) must not exceed fg_iou_thresh \(0.2\)"):
        build_model(load_config(path, ["model.rpn.fg_iou_thresh=0.2"]).model)
    # a section set to {} takes the defaults again (e.g. for another backbone)
    fpn = load_config(path, ["model.backbone=resnet50_fpn", "model.rpn={}", "model.roi={}", "model.anchor_sizes=null",
                             "model.pooler=null"])  # fmt: skip
    assert fpn.model.rpn.given() == {} and fpn.model.anchor_sizes is None
    # the command line refuses before anything is built or written
    code = main(["train", "--config", str(path), "--set", "model.rpn.nms_thresh=abc", "--out", str(tmp_path / "run")])
    assert code == 2 and "model.rpn.nms_thresh: Input should be a valid number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
