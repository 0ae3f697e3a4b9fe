"""The training loop: exact resume after a kill, non-finite losses, schedules, checkpoints,
alternating training, configs."""

import os
from pathlib import Path

import pytest
import torch

from rcnn.config import TrainConfig, load_config
from rcnn.data.coco import CocoDetection
from rcnn.data.shapes import shapes_paths
from rcnn.models import faster_rcnn
from rcnn.training.alternating import STEPS, shared_parameters, train_alternating
from rcnn.build import load_model
from rcnn.io.checkpoints import find_checkpoint, load_checkpoint, save_checkpoint
from rcnn.training.loop import lr_factor, train
from rcnn.training.datasets import TrainingSet

QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def data(shapes_root):
    images_dir, ann = shapes_paths(shapes_root, "train")
    return CocoDetection(images_dir, ann, train=True)


def small_model(num_classes, seed=0):
    torch.manual_seed(seed)
    return faster_rcnn(
        "tiny", num_classes, min_size=64, max_size=64,
        rpn={"pre_nms_top_n_train": 200, "post_nms_top_n_train": 50}, roi={"batch_size_per_image": 16},
    )  # fmt: skip


def cfg(**kw):
    base = dict(iterations=6, batch_size=2, lr=0.01, warmup_iterations=2, checkpoint_every=3, log_every=2)
    return TrainConfig(**{**base, **kw})


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


class KillAt(Exception):
    pass


def test_resume_after_kill_continues_identically(data, tmp_path):
    from rcnn.data.transforms import RandomHorizontalFlip

    training_set = TrainingSet(data, RandomHorizontalFlip(0.5))
    straight = small_model(data.num_classes)
    train(straight, training_set, cfg(), tmp_path / "a", **QUIET)

    killed = small_model(data.num_classes)
    calls = {"n": 0}
    original = killed.forward

    def dying_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at iteration 3
            raise KillAt()
        return original(*args, **kwargs)

    killed.forward = dying_forward
    with pytest.raises(KillAt):
        train(killed, training_set, cfg(), tmp_path / "b", **QUIET)
    assert find_checkpoint(tmp_path / "b").name == "step_0000003"
    assert not list((tmp_path / "b").glob(".*tmp"))  # no half-written checkpoint left

    resumed = small_model(data.num_classes, seed=123)  # different init: everything must come from disk
    result = train(resumed, training_set, cfg(), tmp_path / "b", resume=True, **QUIET)
    assert result.iterations == 6
    for key, value in weights(straight).items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_non_finite_loss_is_skipped_and_reported(data, tmp_path):
    model = small_model(data.num_classes)
    original = model.forward
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        losses = original(*args, **kwargs)
        if calls["n"] == 2:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses

    model.forward = sometimes_nan
    messages = []
    result = train(model, data, cfg(iterations=3, checkpoint_every=100), tmp_path, progress=False, log=messages.append)
    assert result.skipped_steps == 1
    assert any("iteration 1: non-finite loss (loss_cls)" in m for m in messages)
    assert all(torch.isfinite(p).all() for p in model.parameters())

    model.forward = lambda *a, **k: {"loss": original(*a, **k)["loss_cls"] * float("inf")}
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        train(model, data, cfg(iterations=5, max_bad_steps=3), tmp_path / "x", **QUIET)


def test_lr_schedule_and_linear_scaling(data, tmp_path):
    c = TrainConfig(iterations=100, steps=[0.5, 80], gamma=0.1, warmup_iterations=10, warmup_factor=0.0)
    assert lr_factor(0, c) == 0.0 and lr_factor(5, c) == pytest.approx(0.5)
    assert lr_factor(10, c) == 1.0 and lr_factor(50, c) == pytest.approx(0.1) and lr_factor(80, c) == pytest.approx(0.01)
    cos = TrainConfig(iterations=100, schedule="cosine", warmup_iterations=0)
    assert lr_factor(50, cos) == pytest.approx(0.5) and lr_factor(100, cos) == pytest.approx(0.0, abs=1e-12)
    budget = TrainConfig(iterations=1000, time_budget_s=60.0, steps=[0.5], warmup_iterations=0)
    assert lr_factor(10, budget, elapsed=20.0) == 1.0 and lr_factor(10, budget, elapsed=31.0) == pytest.approx(0.1)
    model = small_model(data.num_classes)
    train(model, data, cfg(iterations=1, lr=0.01, batch_size=4, lr_batch_size=2, warmup_iterations=0), tmp_path, **QUIET)
    state = load_checkpoint(tmp_path, small_model(data.num_classes))
    assert state["lr"] == pytest.approx(0.02)  # twice the batch, twice the lr


def test_checkpoints_are_complete_and_rotated(data, tmp_path):
    model = small_model(data.num_classes)
    for it in (1, 2, 3):
        save_checkpoint(tmp_path, it, model, config_yaml="model: {}\n", class_names=data.class_names, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000002", "step_0000003"]
    assert os.readlink(tmp_path / "last") == "step_0000003"
    assert {p.name for p in (tmp_path / "last").iterdir()} == {"model.safetensors", "state.json", "config.yaml", "classes.json"}
    with pytest.raises(FileNotFoundError, match="nothing: not found"):
        find_checkpoint(tmp_path / "step_0000002" / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        find_checkpoint(tmp_path / "empty")
    other = faster_rcnn("tiny", data.num_classes + 2, min_size=64, max_size=64)
    with pytest.raises(ValueError, match="do not fit this model"):
        load_checkpoint(tmp_path, other)


def test_alternating_training_freezes_what_it_should(data, tmp_path):
    model = small_model(data.num_classes)
    before = weights(model)
    c = cfg(scheme="alternating", checkpoint_every=100)
    c.alternating.rpn_iterations = 2
    c.alternating.detector_iterations = 2
    result = train_alternating(model, TrainingSet(data), c, tmp_path, class_names=data.class_names, **QUIET)
    assert result.iterations == 8 and find_checkpoint(tmp_path).name == "step_0000008"
    states = {}
    for step in STEPS:
        m = small_model(data.num_classes, seed=99)
        load_checkpoint(tmp_path / step, m)
        states[step] = m.state_dict()
    shared = {k for k in before if k.startswith("backbone.") and ".box_head." not in k and "running" not in k
              and "num_batches" not in k}  # fmt: skip
    rpn = {k for k in before if k.startswith("rpn.")}
    heads = {k for k in before if k.startswith("roi_heads.predictor.")}

    def same(a, b, keys):
        return all(torch.equal(states[a][k], states[b][k]) for k in keys)

    # step 1 trains the RPN on a copy: the detector (steps 2-4) starts from the same initialisation
    assert not all(torch.equal(states["step1_rpn"][k], before[k]) for k in rpn)
    assert all(torch.equal(states["step1_rpn"][k], before[k]) for k in heads)
    # step 2 trains the detector (shared layers + heads), not the RPN
    assert not same("step1_rpn", "step2_detector", heads)
    assert all(torch.equal(states["step2_detector"][k], before[k]) for k in rpn)
    # step 3: shared layers fixed, RPN trained
    assert same("step2_detector", "step3_rpn", shared) and same("step2_detector", "step3_rpn", heads)
    assert not same("step2_detector", "step3_rpn", rpn)
    # step 4: shared layers and RPN fixed, detector heads trained
    assert same("step3_rpn", "step4_detector", shared) and same("step3_rpn", "step4_detector", rpn)
    assert not same("step3_rpn", "step4_detector", heads)
    # freezing was for training only
    assert all(p.requires_grad for p in shared_parameters(model))


def test_config_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: faster_rcnn\n  backbone: resnet9000\ntrain:\n  lr: fast\n  itarations: 3\n")
    with pytest.raises(ValueError) as err:
        load_config(bad)
    text = str(err.value)
    assert "bad.yaml: model.backbone: unknown backbone 'resnet9000'" in text
    assert "bad.yaml: train.lr:" in text and "bad.yaml: train.itarations: unknown field" in text
    (tmp_path / "broken.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ValueError, match="broken.yaml: not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(FileNotFoundError, match="packaged configs: .*faster_rcnn_tiny_shapes"):
        load_config(tmp_path / "missing.yaml")
    config = load_config("faster_rcnn_tiny_shapes", ["train.lr=0.5", "model.rpn.nms_thresh=0.6"])
    assert config.train.lr == 0.5 and config.model.rpn.nms_thresh == 0.6
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_cli_train_evaluate_predict(shapes_root, tmp_path, capsys):
    from rcnn.cli import main

    run = tmp_path / "run"
    args = ["--config", "faster_rcnn_tiny_shapes", "--set", f"data.root={shapes_root}", "--set", "data.shapes=null",
            "--set", "train.iterations=3", "--set", "train.batch_size=2", "--set", "model.min_size=64",
            "--set", "model.max_size=64"]  # fmt: skip
    assert main(["train", *args, "--out", str(run)]) == 0
    assert (run / "last" / "model.safetensors").is_file() and (run / "metrics.jsonl").is_file()
    assert main(["evaluate", "--weights", str(run), "--out", str(tmp_path / "m.json")]) == 0
    assert "VOC mAP@0.5" in capsys.readouterr().out
    images = sorted((Path(shapes_root) / "images" / "val").glob("*.png"))[:2]
    assert main(["predict", "--weights", str(run), *map(str, images), "--out", str(tmp_path / "pred"),
                 "--score-thresh", "0.0"]) == 0  # fmt: skip
    assert (tmp_path / "pred" / f"{images[0].name}.png").is_file() and (tmp_path / "pred" / f"{images[0].name}.json").is_file()
    loaded = load_model(run)
    model, config, names = loaded.model, loaded.config, loaded.class_names
    assert names == ["__background__", "circle", "square", "triangle", "star", "hexagon"]
    assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(run)]) == 2
    assert "nope.yaml not found" in capsys.readouterr().err
    assert main(["predict", "--weights", str(tmp_path), str(images[0]), "--out", str(tmp_path / "p2")]) == 2
    assert "no checkpoint here" in capsys.readouterr().err


def test_distributed_training_with_torchrun(shapes_root, tmp_path):
    """Two CPU processes (gloo) train one model; both end with the same weights."""
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, torch\n"
        "from rcnn.config import TrainConfig\n"
        "from rcnn.data.coco import CocoDetection\n"
        "from rcnn.data.shapes import shapes_paths\n"
        "from rcnn.models import faster_rcnn\n"
        "from rcnn.training.loop import train\n"
        "torch.set_num_threads(1)\n"
        f"ds = CocoDetection(*shapes_paths({str(shapes_root)!r}, 'train'), train=True)\n"
        "torch.manual_seed(0)\n"
        "m = faster_rcnn('tiny', ds.num_classes, min_size=64, max_size=64)\n"
        "r = train(m, ds, TrainConfig(iterations=2, batch_size=1, checkpoint_every=100, warmup_iterations=0, device='cpu'),\n"
        f"          {str(tmp_path / 'run')!r}, progress=False, log=lambda s: None)\n"
        "import torch.distributed as dist\n"
        "s = torch.cat([p.detach().flatten() for p in m.parameters()]).sum().item()\n"
        "out = [None, None]; dist.all_gather_object(out, s)\n"
        "assert out[0] == out[1], out\n"
        "print('RANK-OK', dist.get_rank(), r.iterations)\n"
        "dist.destroy_process_group()\n"
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", str(script)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("RANK-OK") == 2 and (tmp_path / "run" / "last").exists()


def test_cli_ends_the_process_group(shapes_root, tmp_path, capsys):
    # a command that succeeds ends a process group training started (under torchrun); one that
    # fails leaves it, so that it does not wait for processes still at work
    import torch.distributed as dist

    from rcnn.cli import main

    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run")]) == 2
        assert dist.is_initialized()
        assert main(["data", "check", "--quick", str(shapes_root)]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_cli_train_under_torchrun_ends_cleanly(shapes_root, tmp_path):
    """``torchrun ... -m rcnn.cli train``, the documented multi-process command: both processes
    exit 0 (the CLI ends the process group; left to shutdown, gloo can abort a process)."""
    import subprocess
    import sys

    run = tmp_path / "run"
    sets = [f"data.root={shapes_root}", "data.shapes=null", "train.iterations=2", "train.batch_size=1",
            "train.device=cpu", "model.min_size=64", "model.max_size=64"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
         "-m", "rcnn.cli", "train", "--config", "faster_rcnn_tiny_shapes", *(a for s in sets for a in ("--set", s)),
         "--no-eval", "--out", str(run)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr and "destroy_process_group" not in proc.stderr
    assert (run / "last" / "model.safetensors").is_file()


def test_every_config_field_is_documented():
    from rcnn.components.mask_heads import MaskSettings
    from rcnn.components.proposals.rpn import RPNSettings
    from rcnn.components.roi_heads import RoIHeadSettings
    from rcnn.config import MODEL_SECTIONS, AlternatingConfig, DataConfig, TrainConfig
    from rcnn.models.rcnn import RCNNSettings

    text = (Path(__file__).parent.parent / "docs" / "configs.md").read_text()
    names = [name for section in MODEL_SECTIONS.values() if section.__name__ != "RCNNConfig" for name in section.model_fields]
    names += [*DataConfig.model_fields, *TrainConfig.model_fields, *AlternatingConfig.model_fields]
    names += [*RPNSettings.model_fields, *RoIHeadSettings.model_fields, *MaskSettings.model_fields]
    missing = sorted({n for n in names if f"`{n}`" not in text})
    assert missing == [], f"docs/configs.md does not describe {missing}"
    rcnn_text = (Path(__file__).parent.parent / "docs" / "rcnn.md").read_text()
    missing = [name for name in RCNNSettings.model_fields if f"`{name}`" not in rcnn_text]
    assert missing == [], f"docs/rcnn.md does not describe {missing}"


def test_auto_device_names_a_missing_gpu(monkeypatch):
    """torchrun starting more processes on a machine than it has GPUs: a clear error, not CUDA's."""
    from rcnn.training.loop import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="local process 1 but the machine has 1 CUDA device.*train.device=cpu"):
        resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
