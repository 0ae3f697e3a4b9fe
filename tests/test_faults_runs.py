"""The folders a training may write to, delete from or resume from (docs/reliability.md).

Each test is one class of mistake an ordinary user makes with ``rcnn train`` / ``rcnn data
shapes`` / ``rcnn pretrain``, reproduced through the command line, with the user's folders hashed
before and after (:mod:`user_files`):

- synthetic data generated over a folder of the user's files (a packaged shapes config pointed at
  one's own data without ``data.shapes=null``; ``rcnn data shapes`` into an existing folder);
- ``--overwrite`` (and a plain ``--out``) on a folder that is not one run of ours: a parent of
  several runs, a folder of photographs, a run written before run folders had a marker;
- ``--resume`` after the checkpoint ``last`` names was deleted or cut short, or with none left;
- ``--resume`` with another optimiser or other trainable parameters than the run's;
- Ctrl-C in the middle of a training (a checkpoint after the step, one line, resumable).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fault_run import child_env, one_error_line, rows, train_args
from rcnn.cli import main
from rcnn.io.runs import RUN_MARKER
from user_files import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def user_photos(folder: Path) -> Path:
    """A folder of someone's own files in the layouts the library reads (YOLO-like images/train
    with the shapes' own file names, labels, notes) and names that look like a run's."""
    (folder / "images" / "train").mkdir(parents=True)
    (folder / "labels" / "train").mkdir(parents=True)
    for i in range(3):
        (folder / "images" / "train" / f"{i:06d}.png").write_bytes(b"my own photo %d" % i)
        (folder / "labels" / "train" / f"{i:06d}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (folder / "notes.txt").write_text("do not lose me\n")
    (folder / "step_01.jpg").write_bytes(b"a photo whose name starts like a checkpoint's")
    return folder


def shapes_config_args(data_root: Path, out: Path, *extra: str) -> list[str]:
    """The packaged shapes config with ``data.root`` set and ``data.shapes`` left as shipped."""
    return ["train", "--config", "faster_rcnn_tiny_shapes", "--out", str(out), "--no-eval",
            "--set", f"data.root={data_root}", "--set", "train.iterations=1", *extra]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Synthetic data is generated only into a new or empty folder, or over an earlier shapes set


def test_shapes_are_never_generated_over_the_users_files(tmp_path, capsys):
    mine = user_photos(tmp_path / "my_yolo_set")
    before = snapshot(mine)
    assert main(shapes_config_args(mine, tmp_path / "run")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"data.root={mine}" in line and "data.shapes=null" in line and "nothing was written" in line
    assert_unchanged(before, mine)

    assert main(["data", "shapes", str(mine), "--train", "2", "--val", "1", "--size", "32"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{mine}: is not empty and holds no shapes data set" in line
    assert_unchanged(before, mine)

    a_file = tmp_path / "a_file.txt"
    a_file.write_text("mine")
    assert main(["data", "shapes", str(a_file), "--train", "1", "--val", "1", "--size", "32"]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err) and a_file.read_text() == "mine"


def test_shapes_are_generated_into_a_new_or_empty_folder_and_over_their_own(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for root in (empty, tmp_path / "new" / "shapes", empty):  # the third time: over its own set
        assert main(["data", "shapes", str(root), "--train", "2", "--val", "1", "--size", "32"]) == 0
        assert (root / ".rcnn-shapes").is_file() and len(list((root / "images" / "train").iterdir())) == 2
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# --out and --overwrite: only a run folder of ours is ever deleted, and only that folder


def test_overwrite_never_deletes_a_folder_that_is_not_one_run(shapes_root, tmp_path, capsys):
    proj = tmp_path / "proj"
    runs = proj / "runs"
    for name in ("a", "b"):
        assert main(train_args(shapes_root, runs / name, iterations=1)) == 0
    user_photos(runs / "data")
    (runs / "notes.md").write_text("results of a and b\n")
    capsys.readouterr()
    before = snapshot(proj)
    for extra in ((), ("--overwrite",), ("--resume",)):
        assert main(train_args(shapes_root, runs, *extra, iterations=1)) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{runs}: is not empty" in line and "not a run folder of rcnn" in line and "--overwrite" not in line
        assert_unchanged(before, proj)
    # the same rule for a pretraining, and for a file given as the folder
    assert main(["pretrain", "--backbone", "tiny", "--data", str(shapes_root), "--out", str(runs / "data"),
                 "--overwrite", "--iterations", "1"]) == 2  # fmt: skip
    assert "not a run folder of rcnn" in one_error_line(capsys.readouterr().err)
    assert main(train_args(shapes_root, runs / "notes.md", "--overwrite", iterations=1)) == 2
    assert "is a file, not a folder" in one_error_line(capsys.readouterr().err)
    assert_unchanged(before, proj)


def test_overwrite_of_a_run_of_ours_deletes_that_folder_only(shapes_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(train_args(shapes_root, runs / "a", iterations=2)) == 0
    assert main(train_args(shapes_root, runs / "b", iterations=1)) == 0
    (runs / "a" / "my_notes.txt").write_text("inside the run: goes with it\n")
    capsys.readouterr()
    beside = snapshot(runs / "b")
    assert main(train_args(shapes_root, runs / "a", "--overwrite", iterations=1)) == 0
    assert not (runs / "a" / "my_notes.txt").exists() and (runs / "a" / RUN_MARKER).is_file()
    assert sorted(p.name for p in (runs / "a").glob("step_*")) == ["step_0000001"]
    assert_unchanged(beside, runs / "b")


def test_a_run_without_the_marker_is_resumed_but_never_overwritten(shapes_root, tmp_path, capsys):
    run = tmp_path / "old_run"
    assert main(train_args(shapes_root, run, iterations=1)) == 0
    (run / RUN_MARKER).unlink()  # as rcnn wrote runs before the marker
    capsys.readouterr()
    before = snapshot(run)
    assert main(train_args(shapes_root, run, "--overwrite", iterations=1)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "written by an earlier rcnn" in line and "--resume" in line
    assert_unchanged(before, run)
    assert main(train_args(shapes_root, run, "--resume", iterations=2)) == 0
    assert (run / RUN_MARKER).is_file() and [r["iteration"] for r in rows(run) if "train/lr" in r] == [1, 2]


# ---------------------------------------------------------------------------------------------
# --resume takes the newest intact checkpoint, or refuses


def keep_every_step(iterations: int) -> tuple[str, ...]:
    return ("--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=5", "--set",
            f"train.iterations={iterations}")  # fmt: skip


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_resume_after_the_last_checkpoint_was_lost_takes_the_newest_intact_one(damage, shapes_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(shapes_root, run, *keep_every_step(3))) == 0
    newest = run / "step_0000003"
    if damage == "deleted":  # say, a diverged checkpoint
        shutil.rmtree(newest)
    else:  # a copy interrupted, a full disk
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert main(train_args(shapes_root, run, "--resume", *keep_every_step(4))) == 0
    out = capsys.readouterr().out
    assert "resuming from step_0000002, the newest intact checkpoint" in out and "resumed from" in out
    assert [r["iteration"] for r in rows(run) if "train/lr" in r] == [1, 2, 3, 4]  # 3 and 4 trained again
    assert os.readlink(run / "last") == "step_0000004"


def test_resume_with_no_intact_checkpoint_refuses_and_keeps_the_logs(shapes_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(shapes_root, run, *keep_every_step(2))) == 0
    for step in run.glob("step_*"):
        shutil.rmtree(step)
    capsys.readouterr()
    before = snapshot(run)
    assert main(train_args(shapes_root, run, "--resume", *keep_every_step(3))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no intact checkpoint to resume from" in line and "last -> step_0000002" in line and "--overwrite" in line
    after = {k: v for k, v in snapshot(run).items() if k != ".lock"}  # the lock names its last holder
    assert after == {k: v for k, v in before.items() if k != ".lock"}


# ---------------------------------------------------------------------------------------------
# --resume with settings that do not fit the saved training state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--set", "train.optimizer=adamw"), "its training state is SGD's, and this training uses AdamW"),
        (("--set", "model.trainable_stages=0"), "its optimiser state does not fit this training"),
    ],
)
def test_resume_with_another_optimiser_or_parameters_is_one_line(change, message, shapes_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(shapes_root, run, iterations=1)) == 0
    capsys.readouterr()
    before = {k: v for k, v in snapshot(run).items() if k != ".lock"}
    assert main(train_args(shapes_root, run, "--resume", *change, iterations=2)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line and "--init-from" in line
    assert {k: v for k, v in snapshot(run).items() if k != ".lock"} == before


# ---------------------------------------------------------------------------------------------
# Ctrl-C


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_a_checkpoint_after_the_step_and_says_how_to_resume(signum, shapes_root, tmp_path):
    run = tmp_path / "run"
    args = train_args(shapes_root, run, "--set", "data.workers=1", "--set", "train.checkpoint_every=1000",
                      iterations=1000)  # fmt: skip
    # a session of its own: Ctrl-C in a terminal reaches the whole process group, loader workers included, and
    # so does the SIGTERM of `kill -- -PGID`, a scheduler's preemption or torchrun
    child = subprocess.Popen([sys.executable, "-m", "rcnn.cli", *args], env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").is_file() and len(rows(run)) >= 2):
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.2)
        os.killpg(child.pid, signum)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 130, err
    line = one_error_line(err)
    step = os.readlink(run / "last")
    iteration = int(step.split("_")[1])
    assert line == (f"rcnn train: interrupted at iteration {iteration}: the checkpoint {(run / step).resolve()} "
                    "is saved; continue with the same command and --resume")  # fmt: skip
    assert max(r["iteration"] for r in rows(run)) == iteration
    assert main([*train_args(shapes_root, run, "--resume", iterations=iteration + 1)]) == 0
    assert json.loads((run / "last" / "state.json").read_text())["iteration"] == iteration + 1


def test_a_conversion_never_writes_into_a_folder_that_holds_files(shapes_root, tmp_path, capsys):
    run = tmp_path / "run"  # a run's older checkpoints would have been pruned by the conversion's
    assert main(train_args(shapes_root, run, *keep_every_step(2))) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    for out in (run, tmp_path):
        assert main(["convert", "torchvision", str(tmp_path / "any.pth"), "--arch", "fasterrcnn_resnet50_fpn",
                     "--out", str(out)]) == 2  # fmt: skip
        assert f"{out}: exists and is not empty" in one_error_line(capsys.readouterr().err)
    assert_unchanged(before, tmp_path)
