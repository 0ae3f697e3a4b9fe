"""Training control for long runs: gradient accumulation (equal to the large batch, resumable,
DDP), keep-best and early stopping, validation loss, weight EMA, progress by the time budget."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from rcnn.config import TrainConfig, load_config
from rcnn.core.matching import BalancedSampler
from rcnn.data.coco import CocoDetection
from rcnn.data.shapes import shapes_paths
from rcnn.data.transforms import RandomHorizontalFlip
from rcnn.io.checkpoints import find_checkpoint
from rcnn.models import faster_rcnn
from rcnn.training.alternating import train_alternating
from rcnn.training.control import RunProgress, time_left
from rcnn.training.datasets import TrainingSet
from rcnn.training.loop import _BatchSampler, train

QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def data(shapes_root):
    return CocoDetection(*shapes_paths(shapes_root, "train"), train=True)


@pytest.fixture(scope="module")
def val(shapes_root):
    return TrainingSet(CocoDetection(*shapes_paths(shapes_root, "val")))


class FirstOnes(BalancedSampler):
    """The balanced sampler without its random choice: the first positives and negatives."""

    def __call__(self, labels, generator=None):
        positive = (labels >= 1).nonzero().flatten()
        negative = (labels == 0).nonzero().flatten()
        num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        return positive[:num_pos], negative[: self.batch_size_per_image - num_pos]


def freeze_batchnorm(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key).detach())
                setattr(module, name, frozen)


def small_model(num_classes, seed=0, deterministic=False):
    torch.manual_seed(seed)
    # A large batch and its accumulated micro-batches see the same gradient when every image weighs
    # the same in the losses (here: 64 anchors and 16 RoIs sampled in every image, with background
    # RoIs down to IoU 0), BatchNorm does not depend on the batch, and the sampled anchors and RoIs
    # do not depend on the order the random stream is drawn in (see docs/training.md).
    rpn = {"pre_nms_top_n_train": 200, "post_nms_top_n_train": 50, **({"batch_size_per_image": 64} if deterministic else {})}
    roi = {"batch_size_per_image": 16, **({"bg_iou_thresh_lo": 0.0} if deterministic else {})}
    model = faster_rcnn("tiny", num_classes, min_size=64, max_size=64, rpn=rpn, roi=roi)
    if deterministic:
        freeze_batchnorm(model)
        model.rpn.sampler = FirstOnes(model.rpn.sampler.batch_size_per_image, model.rpn.sampler.positive_fraction)
        model.roi_heads.sampler = FirstOnes(
            model.roi_heads.sampler.batch_size_per_image, model.roi_heads.sampler.positive_fraction
        )
    return model


def cfg(**kw):
    base = dict(iterations=3, batch_size=2, lr=0.01, warmup_iterations=0, checkpoint_every=100, log_every=1, device="cpu")
    return TrainConfig(**{**base, **kw})


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sampler_hands_out_the_large_batch_in_slices():
    big = _BatchSampler(16, 4, seed=3, start_iteration=0, rank=0, world=1)
    small = _BatchSampler(16, 2, seed=3, start_iteration=0, rank=0, world=1, accumulate=2)
    big_it, small_it = iter(big), iter(small)
    for _ in range(6):  # past an epoch (4 steps of 4 images)
        assert next(big_it) == next(small_it) + next(small_it)
    # under DDP each process takes its share of the global batch, sliced the same way
    for rank in (0, 1):
        shares = iter(_BatchSampler(16, 2, seed=3, start_iteration=0, rank=rank, world=2))
        slices = iter(_BatchSampler(16, 1, seed=3, start_iteration=0, rank=rank, world=2, accumulate=2))
        for _ in range(3):
            assert next(shares) == next(slices) + next(slices)


def test_accumulation_equals_the_large_batch(data, tmp_path, one_thread):
    training_set = TrainingSet(data, RandomHorizontalFlip(0.5))
    init = weights(small_model(data.num_classes, deterministic=True))
    runs = {}
    for name, batch, accumulate in (("big", 4, 1), ("accumulated", 2, 2), ("small", 2, 1)):
        model = small_model(data.num_classes, deterministic=True)
        result = train(model, training_set, cfg(batch_size=batch, accumulate=accumulate, momentum=0.9,
                                                clip_grad_norm=50.0), tmp_path / name, **QUIET)  # fmt: skip
        runs[name] = (weights(model), result)
    big, accumulated, small = (runs[k][0] for k in ("big", "accumulated", "small"))
    assert runs["accumulated"][1].iterations == 3
    assert any(not torch.equal(big[k], init[k]) for k in big)  # it trained
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-4, atol=1e-6, msg=key)
    # the losses logged are those of the large batch
    for key, value in runs["big"][1].losses.items():
        assert runs["accumulated"][1].losses[key] == pytest.approx(value, rel=1e-4)
    # and the test can tell: a batch of 2 without accumulation ends elsewhere
    assert max((small[k] - big[k]).abs().max().item() for k in big if big[k].is_floating_point()) > 1e-3
    state = json.loads((tmp_path / "accumulated" / "last" / "state.json").read_text())
    assert state["lr"] == pytest.approx(0.01)  # lr_batch_size defaults to the effective batch


class KillAt(Exception):
    pass


def test_accumulation_ema_and_keep_best_resume_exactly(data, val, tmp_path, one_thread):
    """Killed after its checkpoint at iteration 2 and resumed: the same weights, EMA, best and
    log as an uninterrupted run."""
    training_set = TrainingSet(data, RandomHorizontalFlip(0.5))
    c = cfg(iterations=4, accumulate=2, ema_decay=0.5, keep_best="val_loss", eval_every=1, checkpoint_every=2)
    straight = small_model(data.num_classes)
    result = train(straight, training_set, c, tmp_path / "a", val_set=val, **QUIET)

    class Dying(TrainingSet):  # dies fetching the 11th image: the second micro-batch of iteration 3
        fetched = 0

        def __getitem__(self, index):
            Dying.fetched += 1
            if Dying.fetched == 11:
                raise KillAt()
            return super().__getitem__(index)

    with pytest.raises(KillAt):
        train(small_model(data.num_classes), Dying(data, RandomHorizontalFlip(0.5)), c, tmp_path / "b", val_set=val, **QUIET)
    assert find_checkpoint(tmp_path / "b").name == "step_0000002"
    resumed = small_model(data.num_classes, seed=7)
    again = train(resumed, training_set, c, tmp_path / "b", val_set=val, resume=True, **QUIET)
    assert again.iterations == 4 and again.best == result.best
    for key, value in weights(straight).items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    for name in ("last/model.safetensors", "last/training_model.safetensors", "best/model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # the checkpoint holds the EMA, which is not the training weights
    ema, own = load_file(str(tmp_path / "a/last/model.safetensors")), weights(straight)
    assert any(not torch.equal(ema[k], own[k]) for k in own if own[k].is_floating_point())
    assert all(torch.equal(load_file(str(tmp_path / "a/last/training_model.safetensors"))[k], own[k]) for k in own)
    # the val loss is logged beside the losses, and keep-best kept the lowest one
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    val_rows = {r["iteration"]: r["val/loss"] for r in rows if "val/loss" in r}
    assert sorted(val_rows) == [1, 2, 3, 4] and all("val/loss_cls" in r for r in rows if "val/loss" in r)
    best_iteration = min(val_rows, key=val_rows.get)
    assert result.best["iteration"] == best_iteration and result.best["value"] == pytest.approx(val_rows[best_iteration])
    assert json.loads((tmp_path / "a/best/state.json").read_text())["iteration"] == best_iteration


def test_val_loss_leaves_training_untouched(data, val, tmp_path, one_thread):
    """BatchNorm statistics and the random stream are those of a run without it."""
    plain, measured = small_model(data.num_classes), small_model(data.num_classes)
    train(plain, data, cfg(iterations=2), tmp_path / "plain", **QUIET)
    result = train(measured, data, cfg(iterations=2, eval_every=1, val_loss=True), tmp_path / "val", val_set=val, **QUIET)
    for key, value in weights(plain).items():
        assert torch.equal(measured.state_dict()[key], value), key
    assert set(result.metrics["val"]) >= {"loss", "loss_cls", "loss_box", "loss_objectness"}
    assert result.metrics["val"]["loss"] == pytest.approx(sum(v for k, v in result.metrics["val"].items() if k != "loss"))


def test_keep_best_and_early_stopping(data, tmp_path, one_thread):
    scores = iter([0.10, 0.30, 0.20, 0.25, 0.90])  # best at evaluation 2, then two without improvement

    def evaluator(model):
        assert not model.training
        return {"bbox": {"AP": next(scores), "AP50": 0.5}, "voc": {"mAP": 0.4}}

    messages = []
    c = cfg(iterations=10, eval_every=1, checkpoint_every=1, keep_checkpoints=10, keep_best="bbox_AP", patience=2)
    result = train(small_model(data.num_classes), data, c, tmp_path, evaluator=evaluator, progress=False,
                   log=messages.append)  # fmt: skip
    assert result.stopped_early and result.iterations == 4
    assert result.best == {"metric": "bbox_AP", "value": 0.30, "iteration": 2, "stale": 2}
    assert any("has not improved for 2 evaluations" in m for m in messages)
    assert find_checkpoint(tmp_path).name == "step_0000004"  # the stop is checkpointed
    assert os.readlink(tmp_path / "best") == "best_0000002" and len(list(tmp_path.glob("best_*"))) == 1
    best, at_two = load_file(str(tmp_path / "best/model.safetensors")), load_file(str(tmp_path / "step_0000002/model.safetensors"))
    assert all(torch.equal(best[k], at_two[k]) for k in at_two)
    # min_delta: gains of 0.1 and 0.14 count as none when they must exceed 0.15
    scores = iter([0.1, 0.2, 0.24, 0.9])
    c = cfg(iterations=10, eval_every=1, keep_best="bbox_AP", patience=2, min_delta=0.15)
    result = train(small_model(data.num_classes), data, c, tmp_path / "delta", evaluator=evaluator, **QUIET)
    assert result.iterations == 3 and result.best["iteration"] == 1


def test_keep_best_cli_then_evaluate_the_best(shapes_root, tmp_path, capsys):
    from rcnn.cli import main

    run = tmp_path / "run"
    sets = [f"data.root={shapes_root}", "data.shapes=null", "train.iterations=2", "train.batch_size=2",
            "train.accumulate=2", "train.eval_every=1", "train.keep_best=bbox_AP50", "train.ema_decay=0.9",
            "model.min_size=64", "model.max_size=64", "data.workers=0"]  # fmt: skip
    args = ["train", "--config", "faster_rcnn_tiny_shapes", *(a for s in sets for a in ("--set", s)), "--out", str(run)]
    assert main(args) == 0
    assert '"best"' in capsys.readouterr().out  # the summary says which
    assert (run / "best" / "model.safetensors").is_file() and (run / "best" / "config.yaml").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"eval/bbox/AP50", "val/loss"} <= {k for r in rows for k in r}
    assert main(["evaluate", "--weights", str(run / "best"), "--out", str(tmp_path / "m.json")]) == 0
    assert "VOC mAP@0.5" in capsys.readouterr().out
    assert main(["train", "--config", "faster_rcnn_tiny_shapes", *(a for s in sets for a in ("--set", s)),
                 "--set", "train.keep_best=segm_AP", "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "train.keep_best: segm_AP is a mask metric but faster_rcnn predicts no masks" in capsys.readouterr().err


def test_controls_are_checked_and_refused_where_they_do_not_apply(data, tmp_path):
    def error(name, sets):
        with pytest.raises(ValueError) as err:
            load_config(name, sets)
        return str(err.value)

    assert "train.keep_best: bbox_AP is compared between evaluations; set train.eval_every" in error(
        "faster_rcnn_tiny_shapes", ["train.keep_best=bbox_AP"])
    assert "train.patience: early stopping watches the train.keep_best metric" in error(
        "faster_rcnn_tiny_shapes", ["train.patience=3"])
    assert "train.keep_best: unknown metric 'AP'" in error("faster_rcnn_tiny_shapes", ["train.keep_best=AP", "train.eval_every=5"])
    assert "train.accumulate: Input should be greater than 0" in error("faster_rcnn_tiny_shapes", ["train.accumulate=0"])
    assert "train.ema_decay: Input should be less than 1" in error("faster_rcnn_tiny_shapes", ["train.ema_decay=1"])
    assert "train.ema_decay: not available for R-CNN's stages" in error("rcnn_tiny_shapes", ["train.ema_decay=0.99"])
    assert "train.val_loss: not available for the 4-step alternating scheme" in error(
        "faster_rcnn_tiny_shapes", ["train.scheme=alternating", "train.val_loss=true"])
    assert load_config("rcnn_tiny_shapes", ["train.accumulate=4"]).train.accumulate == 4  # applies to R-CNN's fine-tuning
    # the same from Python
    with pytest.raises(ValueError, match="train.keep_best: not available for the 4-step alternating scheme"):
        train_alternating(small_model(data.num_classes), TrainingSet(data), cfg(keep_best="bbox_AP", eval_every=2),
                          tmp_path, class_names=data.class_names, **QUIET)  # fmt: skip
    with pytest.raises(ValueError, match="train.keep_best: bbox_AP needs evaluations on a val split"):
        train(small_model(data.num_classes), data, cfg(keep_best="bbox_AP", eval_every=2), tmp_path, **QUIET)
    with pytest.raises(ValueError, match="train.val_loss: true, but there is no val split"):
        train(small_model(data.num_classes), data, cfg(val_loss=True), tmp_path, **QUIET)
    with pytest.raises(ValueError, match="fewer than one batch of 24 .*train.accumulate"):
        train(small_model(data.num_classes), data, cfg(batch_size=6, accumulate=4), tmp_path, **QUIET)


def test_progress_shows_the_time_left_by_the_budget():
    # 10 of 100000 iterations in 10 s: 27 hours by the iterations, 590 s by a 600 s budget
    assert time_left(10, 0, 100_000, 10.0, 600.0) == pytest.approx(590.0)
    assert time_left(90, 0, 100, 9.0, 600.0) == pytest.approx(1.0)  # the iterations end first
    assert time_left(60, 50, 100, 5.0, None) == pytest.approx(20.0)  # this run's pace, after a resume
    assert time_left(0, 0, 100, 0.0, None) is None
    out = io.StringIO()
    bar = RunProgress(0, 100_000, 600.0, enabled=True, file=out)
    bar.step(10, 10.0, {"loss_cls": 1.5})
    bar.step(300, 300.0, {"loss_cls": 1.2})
    bar.close()
    last = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert "50%" in last and "it 300/100000" in last and "left 05:00" in last and "cls=1.200" in last, last


def test_distributed_accumulation_equals_one_large_batch(shapes_root, tmp_path):
    """Two CPU processes x 1 image x 2 micro-steps give the weights of one process with a batch
    of 4; the first micro-step of each step runs without gradient synchronisation."""
    import subprocess
    import sys

    setup = (
        "import sys, torch\n"
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parent.parent)!r}]\n"
        "from test_training_control import small_model\n"
        "from rcnn.config import TrainConfig\n"
        "from rcnn.data.coco import CocoDetection\n"
        "from rcnn.data.shapes import shapes_paths\n"
        "from rcnn.training.loop import train\n"
        "torch.set_num_threads(1)\n"
        f"ds = CocoDetection(*shapes_paths({str(shapes_root)!r}, 'train'), train=True)\n"
        "m = small_model(ds.num_classes, deterministic=True)\n"
        "def run(batch, accumulate, out):\n"
        "    c = TrainConfig(iterations=1, batch_size=batch, accumulate=accumulate, lr=0.01, lr_batch_size=4,\n"
        "                    warmup_iterations=0, checkpoint_every=100, device='cpu')\n"
        "    train(m, ds, c, out, progress=False, log=lambda s: None)\n"
    )  # fmt: skip
    script = tmp_path / "ddp.py"
    script.write_text(
        setup
        + "import torch.distributed as dist\n"
        "from torch.nn.parallel import DistributedDataParallel as DDP\n"
        "calls = {'n': 0}\n"
        "original = DDP.no_sync\n"
        "def counting(self):\n"
        "    calls['n'] += 1\n"
        "    return original(self)\n"
        "DDP.no_sync = counting\n"
        f"run(1, 2, {str(tmp_path / 'ddp')!r})\n"
        "assert calls['n'] == 1, calls\n"
        "print('RANK-OK', dist.get_rank())\n"
        "dist.destroy_process_group()\n"
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521", str(script)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("RANK-OK") == 2
    model = small_model(CocoDetection(*shapes_paths(shapes_root, "train")).num_classes, deterministic=True)
    c = TrainConfig(iterations=1, batch_size=4, lr=0.01, lr_batch_size=4, warmup_iterations=0, checkpoint_every=100, device="cpu")
    train(model, CocoDetection(*shapes_paths(shapes_root, "train"), train=True), c, tmp_path / "single", **QUIET)
    a, b = load_file(str(tmp_path / "ddp/last/model.safetensors")), load_file(str(tmp_path / "single/last/model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
