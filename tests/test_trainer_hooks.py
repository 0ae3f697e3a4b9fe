"""The trainer and its hooks: the order a hook is called in, a hook's state through a checkpoint
and a resume, the step on its own, and the hooks' agreement under DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fault_run import QUIET, small_model
from rcnn.config import TrainConfig
from rcnn.data.coco import CocoDetection
from rcnn.data.shapes import shapes_paths
from rcnn.data.transforms import RandomHorizontalFlip
from rcnn.training.datasets import TrainingSet
from rcnn.training.loop import _loader, build_optimizer, build_trainer, train
from rcnn.training.trainer import Hook, Trainer, effective_lr, lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(shapes_root):
    return CocoDetection(*shapes_paths(shapes_root, "train"), train=True)


def cfg(**kw) -> TrainConfig:
    base = dict(iterations=4, batch_size=2, lr=0.01, warmup_iterations=2, checkpoint_every=2, log_every=1, device="cpu")
    return TrainConfig(**{**base, **kw})


class Recorder(Hook):
    """Writes down each call with the trainer's iteration, and counts the steps it saw in its state."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.steps = 0
        self.restored: tuple[dict, Path] | None = None

    def before_train(self, trainer: Trainer) -> None:
        self.calls.append(("before_train", trainer.iteration))

    def after_step(self, trainer: Trainer) -> None:
        assert trainer.losses is not None and set(trainer.losses) >= {"loss_cls", "loss_objectness"}
        self.steps += 1
        self.calls.append(("after_step", trainer.iteration))

    def after_train(self, trainer: Trainer) -> None:
        self.calls.append(("after_train", trainer.iteration))

    def state(self) -> dict:
        return {"recorder": {"steps": self.steps}}

    def restore(self, state: dict, checkpoint: Path) -> None:
        self.restored = (state, checkpoint)
        self.steps = state["recorder"]["steps"]


class KillAt(Exception):
    pass


def test_a_hook_sees_the_training_in_order(data, tmp_path):
    recorder = Recorder()
    trainer = build_trainer(small_model(data.num_classes), data, cfg(), tmp_path, hooks=[recorder], **QUIET)
    names = [type(hook).__name__ for hook in trainer.hooks]  # between the evaluation and the checkpoints
    assert names[names.index("Evaluation") + 1 : names.index("Checkpoints")] == ["Recorder"]
    trainer.run()
    assert recorder.calls == [("before_train", 0), ("after_step", 1), ("after_step", 2), ("after_step", 3),
                              ("after_step", 4), ("after_train", 4)]  # fmt: skip
    # the library's hooks ran around it: logs, checkpoints (with the hook's state in them)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "last" / "state.json").read_text())["recorder"] == {"steps": 4}
    assert trainer.checkpoint == tmp_path / "step_0000004" and trainer.stop_reason is None


def test_a_hooks_state_comes_back_on_resume(data, tmp_path):
    """Killed after the checkpoint of iteration 2, resumed: the hook gets back the state it wrote
    there, continues from it, and the run ends as an uninterrupted one."""
    training_set = TrainingSet(data, RandomHorizontalFlip(0.5))
    straight = small_model(data.num_classes)
    build_trainer(straight, training_set, cfg(), tmp_path / "a", hooks=[Recorder()], **QUIET).run()

    killed, calls = small_model(data.num_classes), {"n": 0}
    forward = killed.forward

    def dying_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # iteration 4, after the checkpoint at 2
            raise KillAt()
        return forward(*args, **kwargs)

    killed.forward = dying_forward
    first = Recorder()
    with pytest.raises(KillAt):
        build_trainer(killed, training_set, cfg(), tmp_path / "b", hooks=[first], **QUIET).run()
    assert first.steps == 3 and first.calls[-1] == ("after_step", 3)  # no after_train after a failure

    again, resumed = Recorder(), small_model(data.num_classes, seed=5)
    trainer = build_trainer(resumed, training_set, cfg(), tmp_path / "b", resume=True, hooks=[again], **QUIET)
    state, checkpoint = again.restored
    assert checkpoint.name == "step_0000002" and state["recorder"] == {"steps": 2} and state["iteration"] == 2
    trainer.run()
    assert again.calls == [("before_train", 2), ("after_step", 3), ("after_step", 4), ("after_train", 4)]
    assert json.loads((tmp_path / "b" / "last" / "state.json").read_text())["recorder"] == {"steps": 4}
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_the_step_alone_is_the_step_of_train(data, tmp_path):
    """A Trainer without hooks, on the data loader of ``train``: two calls of ``step()`` give the
    weights of ``train`` for two iterations, bit for bit; a non-finite loss skips a step."""
    c = cfg(iterations=10, momentum=0.9, clip_grad_norm=10.0)
    trained = small_model(data.num_classes)
    train(trained, data, c, tmp_path / "run", iterations=2, **QUIET)

    model = small_model(data.num_classes)
    torch.manual_seed(c.seed)  # as train() seeds the random stream of the process
    model.train()
    optimizer = build_optimizer(model, c, effective_lr(c, 1))
    trainer = Trainer(model, optimizer, iter(_loader(data, c, 0, 0, 1, 0, torch.device("cpu"))), c)
    losses = trainer.step()
    assert trainer.iteration == 1 and set(losses) == {"loss_cls", "loss_box", "loss_objectness", "loss_rpn_box"}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * lr_factor(0, c))  # the warm-up's first
    trainer.step()
    assert trainer.iteration == 2 and trainer.elapsed > 0 and trainer.skipped == 0
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)

    before = {k: v.detach().clone() for k, v in model.named_parameters()}  # (BatchNorm's statistics do move)
    forward = model.forward
    model.forward = lambda *a, **k: {**forward(*a, **k), "loss_cls": torch.tensor(float("nan"))}
    messages = []
    trainer.log = messages.append
    assert trainer.step() is None and trainer.skipped == 1 and trainer.iteration == 3
    assert messages == ["iteration 2: non-finite loss (loss_cls); step skipped, weights unchanged"]
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())


def test_stopping_a_run_from_a_hook(data, tmp_path):
    """A hook ends the run after a step: the hooks after it still see that step, the run ends
    with its checkpoint and final evaluation as at its last iteration."""

    class StopAtTwo(Hook):
        def after_step(self, trainer: Trainer) -> None:
            if trainer.iteration == 2:
                trainer.stop("enough")

    evaluated = []
    recorder = Recorder()
    trainer = build_trainer(small_model(data.num_classes), data, cfg(iterations=6, checkpoint_every=100), tmp_path,
                            evaluator=lambda m: evaluated.append(1) or {}, hooks=[StopAtTwo(), recorder], **QUIET)  # fmt: skip
    trainer.run()
    assert recorder.calls[-2:] == [("after_step", 2), ("after_train", 2)] and trainer.stop_reason == "enough"
    assert trainer.checkpoint == tmp_path / "step_0000002" and evaluated == [1]


def test_an_early_stop_under_ddp_ends_in_every_process(shapes_root, tmp_path):
    """Two CPU processes, keep-best with patience: the first process decides the stop, both stop at
    the same step, and both make the same collective calls up to the barrier at the end (the
    evaluation of the last step is not repeated in either)."""
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parent.parent)!r}]\n"
        "import torch.distributed as dist\n"
        "from test_trainer_hooks import small_model\n"
        "from rcnn.config import TrainConfig\n"
        "from rcnn.data.coco import CocoDetection\n"
        "from rcnn.data.shapes import shapes_paths\n"
        "from rcnn.training.loop import train\n"
        "torch.set_num_threads(1)\n"
        f"ds = CocoDetection(*shapes_paths({str(shapes_root)!r}, 'train'), train=True)\n"
        "scores = iter([0.5, 0.4, 0.3, 0.2, 0.1])\n"
        "c = TrainConfig(iterations=5, batch_size=1, lr=0.01, warmup_iterations=0, checkpoint_every=100, device='cpu',\n"
        "                eval_every=1, keep_best='bbox_AP', patience=1)\n"
        f"r = train(small_model(ds.num_classes), ds, c, {str(tmp_path / 'run')!r}, evaluator=lambda m: {{'bbox': {{'AP': next(scores)}}}},\n"
        "          progress=False, log=lambda s: None)\n"
        f"open(f'{tmp_path}/rank{{dist.get_rank()}}.done', 'w').write(str(r.iterations))\n"  # (two processes' prints interleave)
        "dist.destroy_process_group()\n"
    )  # fmt: skip
    with socket.socket() as free:  # a port no other test or run holds
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), str(script)],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [(tmp_path / f"rank{rank}.done").read_text() for rank in (0, 1)] == ["2", "2"]
    assert os.readlink(tmp_path / "run" / "last") == "step_0000002"
