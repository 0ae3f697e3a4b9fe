"""Training on several machines: two ``torchrun`` "nodes" of one process each on 127.0.0.1 (gloo),
started as on two machines (``--nnodes 2``), with c10d and with static rendezvous.

(a) the weights after N steps equal those of one process with the same global batch; (b) a
checkpoint the first process wrote resumes on another number of processes; (c) a process killed
mid-run stops the job with one clear line and leaves a checkpoint that resumes.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fault_run import REPO, child_env, train_args
from multinode_run import cfg, training_set
from test_training_control import small_model

from rcnn.cli import main
from rcnn.training.loop import train

SCRIPT = str(Path(__file__).parent / "multinode_run.py")
QUIET = dict(progress=False, log=lambda s: None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(rendezvous: str, script_args: list[str], logs: Path, timeout: float = 240.0) -> list[tuple[int, str]]:
    """Run ``torchrun --nnodes 2 --nproc-per-node 1`` twice, as on two machines, with ``rendezvous``
    ``static`` (``--node-rank``, ``--master-addr``) or ``c10d``; each node's workers write their
    output under ``logs/nodeN``. Returns each node's exit code and the output of its torchrun."""
    port = free_port()
    nodes = []
    for node in (0, 1):
        if rendezvous == "static":
            where = ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        else:
            where = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test"]
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", *where,
                   "--log-dir", str(logs / f"node{node}"), "--redirects", "3", SCRIPT, *script_args]  # fmt: skip
        nodes.append(subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    try:
        return [(node.wait(timeout=timeout), node.stdout.read()) for node in nodes]  # type: ignore[union-attr]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.send_signal(signal.SIGKILL)


def worker_log(logs: Path, node: int, stream: str) -> str:
    """What the worker of ``node`` wrote on ``stream`` (``stdout`` or ``stderr``)."""
    files = sorted((logs / f"node{node}").rglob(f"{stream}.log"))
    return "".join(f.read_text() for f in files)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def one_process(shapes_root, tmp_path_factory):
    """The single-process reference: the global batch of 2 images on one process, 4 steps,
    checkpoints at 2 and 4."""
    run = tmp_path_factory.mktemp("one_process")
    data = training_set(shapes_root)
    train(small_model(data.dataset.num_classes, deterministic=True), data, cfg(2, 4), run, **QUIET)
    return run


@pytest.fixture(scope="module")
def two_node_run(shapes_root, tmp_path_factory):
    """Two nodes (c10d rendezvous) of one process each, one image per process, 2 steps."""
    out = tmp_path_factory.mktemp("two_nodes")
    nodes = two_nodes("c10d", ["api", str(shapes_root), str(out / "run"), "--iterations", "2"], out / "logs")
    for node, (code, output) in enumerate(nodes):
        assert code == 0, f"node {node}:\n{output[-3000:]}\n{worker_log(out / 'logs', node, 'stderr')[-3000:]}"
    ranks = sorted(worker_log(out / "logs", node, "stdout").split()[1] for node in (0, 1))
    assert ranks == ["0", "1"]
    return out / "run"


def test_two_nodes_train_as_one_process_with_the_same_global_batch(two_node_run, one_process, shapes_root, tmp_path):
    assert (two_node_run / "last").resolve().name == "step_0000002"
    assert_same(weights(two_node_run / "last"), weights(one_process / "step_0000002"))
    # and the test can tell: one process with one image per step (the share of one node) ends elsewhere
    data = training_set(shapes_root)
    train(small_model(data.dataset.num_classes, deterministic=True), data, cfg(1, 2), tmp_path / "half", **QUIET)
    half, reference = weights(tmp_path / "half" / "last"), weights(one_process / "step_0000002")
    assert max((half[k] - reference[k]).abs().max().item() for k in half if half[k].is_floating_point()) > 1e-3


def test_checkpoint_of_two_processes_resumes_on_one(two_node_run, one_process, shapes_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_node_run, run, symlinks=True)
    data = training_set(shapes_root)
    messages: list[str] = []
    model = small_model(data.dataset.num_classes, seed=7, deterministic=True)  # everything must come from disk
    result = train(model, data, cfg(2, 4), run, resume=True, progress=False, log=messages.append)
    assert result.iterations == 4
    assert any("written by 2 process(es), this training has 1: the global batch is the same" in m for m in messages)
    assert_same(weights(run / "last"), weights(one_process / "step_0000004"))


def test_a_killed_process_stops_the_job_with_a_checkpoint_that_resumes(shapes_root, tmp_path, capsys):
    run, logs = tmp_path / "run", tmp_path / "logs"
    sets = ["train.checkpoint_every=2", "train.device=cpu", "train.keep_checkpoints=3"]
    rcnn_args = train_args(shapes_root, run, *(a for s in sets for a in ("--set", s)), iterations=6)
    nodes = two_nodes("static", ["cli", "--kill-rank", "1", "--kill-at", "3", "--", *rcnn_args], logs)
    assert all(code != 0 for code, _ in nodes), nodes  # the whole job stops
    err = worker_log(logs, 0, "stderr")
    lines = [line for line in err.splitlines() if line.startswith("rcnn train")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("rcnn train: error: another process of the training stopped at iteration 3 (")
    assert "step_0000003 is saved" in lines[0] and "--resume" in lines[0]
    assert (run / "last").resolve().name == "step_0000003"
    # the same command on one process (the global batch of two processes: 2 x 2 images) continues it
    assert main([*rcnn_args, "--set", "train.batch_size=4", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_0000003 at iteration 3" in out
    assert "written by 2 process(es), this training has 1: the global batch is the same" in out
    assert (run / "last").resolve().name == "step_0000006"


def test_a_lost_process_is_told_from_other_errors():
    from rcnn.training.trainer import lost_process

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:538] Read error [127.0.0.1]:61653: Connection "
                        "reset by peer. This is typically caused by a remote worker hanging or bugs in the application.")
    assert lost_process(gloo) == "Read error [127.0.0.1]:61653: Connection reset by peer"
    closed = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:3412")
    assert lost_process(closed) == "Connection closed by peer [127.0.0.1]:3412"
    assert lost_process(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")) is None


def test_a_killed_process_stops_its_neighbours_on_one_machine_with_a_checkpoint(shapes_root, tmp_path):
    """On one machine torchrun ends the other processes (SIGTERM) when one fails: they too stop
    after their step, with the checkpoint and the line."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    sets = ["train.checkpoint_every=2", "train.device=cpu"]
    rcnn_args = train_args(shapes_root, run, *(a for s in sets for a in ("--set", s)), iterations=6)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
               "--log-dir", str(logs / "node0"), "--redirects", "3", SCRIPT, "cli", "--kill-rank", "1", "--kill-at", "3",
               "--", *rcnn_args]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    err = (logs / "node0").rglob("0/stderr.log").__next__().read_text()
    lines = [line for line in err.splitlines() if line.startswith("rcnn train")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("rcnn train: error: another process of the training stopped at iteration 3 (")
    assert (run / "last").resolve().name == "step_0000003"


def test_sigterm_asks_for_a_stop_after_the_step_as_ctrl_c_does():
    """What torchrun (and a job scheduler before it preempts a job) sends a training process."""
    import os

    from rcnn.training.hooks import InterruptAfterStep

    before = signal.getsignal(signal.SIGTERM)
    messages: list[str] = []
    with InterruptAfterStep(messages.append) as interrupt:
        assert not interrupt.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.requested()
        assert messages == ["SIGTERM: stopping after this step with a checkpoint (SIGTERM again stops at once, without one)"]
        with pytest.raises(KeyboardInterrupt, match="interrupted twice"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == before
