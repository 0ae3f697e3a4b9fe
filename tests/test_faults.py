"""Fault injection: what a hostile or careless user, a full disk or a kill -9 can do, and what the
library does about it (docs/reliability.md lists the promises these tests hold).

- the run folder: kill -9 while a checkpoint is written (resume is bit-identical), two trainings
  on one folder, reusing a folder without --resume, logs cut back on resume;
- the file system: a full disk (tmpfs), a size-limited file (RLIMIT_FSIZE), a read-only file
  system, a folder without write permission: one line naming the file, nothing half-written;
- hostile pickles in every place a weights file is read: refused, never run;
- the bad-image corpus (tests/data/bad/) through predict, evaluate and serve;
- silently wrong numbers: degenerate boxes, an object-less data set, classes by position, NaN in
  JSON, polygons outside the image or their box, nested settings out of range.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fault_run import QUIET, REPO, cfg, child_env, one_error_line, rows, small_model, train_args, training_set
from rcnn.cli import describe_os_error, main
from rcnn.config import load_config
from rcnn.data.coco import CocoDetection
from rcnn.io.runs import claim_run_folder
from rcnn.training.loop import train
from tiny_runs import TWO_STAGE, tiny_run

BAD = Path(__file__).parent / "data" / "bad"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# The run folder


def test_kill_9_while_a_checkpoint_is_written_then_resume_is_bit_identical(shapes_root, tmp_path):
    data = training_set(shapes_root)
    straight = small_model(data.dataset.num_classes)
    train(straight, data, cfg(), tmp_path / "a", **QUIET)

    run = tmp_path / "b"  # killed halfway through the weights file of its 2nd checkpoint (iteration 6)
    child = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fault_run.py"), str(shapes_root), str(run), "--kill-in-checkpoint", "2"],
        env=child_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert (run / ".step_0000006.tmp" / "model.safetensors").is_file()  # the half-written file, out of the way
    assert os.readlink(run / "last") == "step_0000003" and not (run / "step_0000006").exists()

    resumed = small_model(data.dataset.num_classes, seed=123)  # another init: everything comes from disk
    result = train(resumed, data, cfg(), run, resume=True, **QUIET)
    assert result.iterations == 6 and not list(run.glob(".*.tmp"))
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_two_processes_on_one_run_folder(shapes_root, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom rcnn.io.runs import claim_run_folder\n"
         "with claim_run_folder(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n", str(run)],
        env=child_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(train_args(shapes_root, run)) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{run}: process {holder.pid} is training into this run folder" in line and "another --out" in line
        assert not (run / "last").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # killed while holding the lock: no stale lock may remain
        holder.wait(timeout=60)
    with claim_run_folder(run):
        pass
    assert main(train_args(shapes_root, run)) == 0 and (run / "last").exists()


def test_a_run_folder_is_reused_only_with_resume_or_overwrite(shapes_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(shapes_root, run)) == 0
    first = (run / "last" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(train_args(shapes_root, run)) == 2  # the silent restart of old
    line = one_error_line(capsys.readouterr().err)
    assert "holds an earlier run (last)" in line and "--resume" in line and "--overwrite" in line
    assert (run / "last" / "model.safetensors").read_bytes() == first  # untouched

    assert main(train_args(shapes_root, run, "--resume", iterations=3)) == 0
    assert [r["iteration"] for r in rows(run) if "train/lr" in r] == [1, 2, 3]
    assert main(train_args(shapes_root, run, "--overwrite")) == 0
    assert [r["iteration"] for r in rows(run) if "train/lr" in r] == [1, 2]  # one run's rows, not two
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000002"]


class KillAt(Exception):
    pass


def test_resume_cuts_metrics_and_tensorboard_back_to_the_checkpoint(shapes_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = training_set(shapes_root)
    model = small_model(data.dataset.num_classes)
    original, calls = model.forward, {"n": 0}

    def dying_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # iterations 1..5 logged, the checkpoint at 3
            raise KillAt()
        return original(*args, **kwargs)

    model.forward = dying_forward
    with pytest.raises(KillAt):
        train(model, data, cfg(), tmp_path, **QUIET)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"iteration": 6, "train/lr"')  # a row cut by the kill
    train(small_model(data.dataset.num_classes), data, cfg(), tmp_path, resume=True, **QUIET)
    assert [r["iteration"] for r in rows(tmp_path) if "train/lr" in r] == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# The file system


def checkpoint_bytes(shapes_root: Path) -> int:
    """Bytes of one checkpoint of the tiny run (weights + momentum buffers of the same size)."""
    from rcnn.build import build_model

    config = load_config("faster_rcnn_tiny_shapes", [f"data.root={shapes_root}", "data.shapes=null", *TWO_STAGE])
    model = build_model(config.model, 6)
    return 2 * sum(v.numel() * v.element_size() for v in model.state_dict().values())


@pytest.fixture
def tmpfs(tmp_path):
    """A mount point for a size-limited tmpfs (root on Linux only; skipped elsewhere)."""
    if not IS_ROOT or not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root on Linux")
    point = tmp_path / "mnt"
    point.mkdir()
    mounted = []

    def mount(size: int, *options: str) -> Path:
        opts = ",".join([f"size={size}", *options])
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for p in mounted:
        subprocess.run(["umount", "-l", str(p)], check=False)


def test_disk_full_while_checkpointing(shapes_root, tmpfs, capsys):
    size = checkpoint_bytes(shapes_root)
    disk = tmpfs(int(size * 1.6))  # room for one checkpoint, not for two
    run = disk / "run"
    assert main(train_args(shapes_root, run, "--set", "train.checkpoint_every=2", iterations=4)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "step_0000004.tmp" in line and "No space left on device" in line and "the disk is full" in line
    assert "the previous checkpoint step_0000002 is intact" in line
    assert not list(run.glob(".*.tmp"))  # the partial checkpoint is removed, freeing the space
    from rcnn.build import load_model

    load_model(run)  # the previous checkpoint loads


def test_read_only_file_system(shapes_root, tmpfs, capsys):
    disk = tmpfs(1 << 20, "ro")
    assert main(train_args(shapes_root, disk / "run")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(disk / "run") in line and "Read-only file system" in line and "write elsewhere" in line


def test_size_limited_file(shapes_root, tmp_path):
    """RLIMIT_FSIZE (works without privileges): the weights file cannot grow past 64 KiB."""
    resource = pytest.importorskip("resource")
    limit = 64 * 1024

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "rcnn.cli", *train_args(shapes_root, run)], env=child_env(),
                          preexec_fn=limited, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1, done.stderr
    line = one_error_line(done.stderr)
    assert "model.safetensors: cannot write the checkpoint: File too large" in line and "write elsewhere" in line
    assert not list(run.glob(".*.tmp")) and not (run / "last").exists()


def test_folder_without_write_permission(shapes_root, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    kwargs = {}
    if IS_ROOT:  # root writes anywhere: the training runs as an unprivileged user instead
        nobody = 65534
        os.chmod(tmp_path, 0o755)
        kwargs["preexec_fn"] = lambda: (os.setgid(nobody), os.setuid(nobody))
    else:
        locked.chmod(0o555)
    try:
        done = subprocess.run([sys.executable, "-m", "rcnn.cli", *train_args(shapes_root, locked / "run")],
                              env=child_env(), capture_output=True, text=True, timeout=300, **kwargs)  # fmt: skip
    except PermissionError as exc:  # root's Python is not readable by the unprivileged user
        pytest.skip(f"an unprivileged user cannot run this Python: {exc}")
    finally:
        locked.chmod(0o755)
    if IS_ROOT and "Permission denied" in done.stderr and str(locked) not in done.stderr:
        pytest.skip(f"an unprivileged user cannot read the library here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 1, done.stderr
    line = one_error_line(done.stderr)
    assert str(locked / "run") in line and "Permission denied" in line and "write to a folder you own" in line


@pytest.mark.parametrize(
    "code, advice",
    [(errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "quota"), (errno.EFBIG, "file size limit"),
     (errno.EACCES, "folder you own"), (errno.EPERM, "folder you own"), (errno.EROFS, "remount it writable"),
     (errno.EISDIR, "a folder is in the way"), (errno.ENOTDIR, "a file is in the way"), (errno.EIO, "check it")],
)  # fmt: skip
def test_every_os_error_kind_gets_its_advice(code, advice):
    line = describe_os_error(OSError(code, os.strerror(code), "/data/out/x.json"))
    assert line.startswith(f"/data/out/x.json: {os.strerror(code)} (") and advice in line


# ---------------------------------------------------------------------------------------------
# Hostile pickles: every place a weights file is read


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def frcnn_run(shapes_root, tmp_path_factory):
    return tiny_run("faster_rcnn", shapes_root, tmp_path_factory)


def hostile_files(folder: Path, marker: Path) -> dict[str, Path]:
    """A torch.save zip and a bare pickle, each running ``touch marker`` when unpickled."""
    folder.mkdir(parents=True, exist_ok=True)
    zipped, bare = folder / "evil.pth", folder / "evil.pkl"
    torch.save({"weight": _Evil(marker)}, zipped)
    bare.write_bytes(pickle.dumps({"weight": _Evil(marker)}))
    return {"torch.save": zipped, "pickle": bare}


def hostile_run(frcnn_run: Path, out: Path, evil: Path, member: str) -> Path:
    """A copy of a run folder whose ``member`` file (weights or optimiser state) is a hostile pickle."""
    shutil.copytree(frcnn_run, out, symlinks=True)
    target = (out / "last").resolve() / member
    target.unlink()
    shutil.copy(evil, target)
    return out


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_hostile_pickles_never_run(kind, frcnn_run, shapes_root, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = hostile_files(tmp_path / "files", marker)[kind]
    image = str(sorted((shapes_root / "images" / "val").glob("*.png"))[0])
    sets = lambda *s: [a for x in s for a in ("--set", x)]  # noqa: E731
    calls = {
        "pretrained backbone (model.pretrained_backbone)":
            train_args(shapes_root, tmp_path / "t1", *sets(f"model.pretrained_backbone={evil}")),
        "rcnn convert torchvision": ["convert", "torchvision", str(evil), "--arch", "fasterrcnn_resnet50_fpn",
                                     "--out", str(tmp_path / "converted")],
        "rcnn predict --weights (model.safetensors)":
            ["predict", "--weights", str(hostile_run(frcnn_run, tmp_path / "r1", evil, "model.safetensors")), image,
             "--out", str(tmp_path / "p")],
        "rcnn evaluate --weights FILE": ["evaluate", "--weights", str(evil)],
        "rcnn train --init-from": train_args(shapes_root, tmp_path / "t2", "--init-from", str(tmp_path / "r1")),
        "rcnn train --resume (optimizer.safetensors)":
            train_args(shapes_root, hostile_run(frcnn_run, tmp_path / "r2", evil, "optimizer.safetensors"),
                       "--resume", iterations=6),
        "rcnn export --weights": ["export", "--weights", str(tmp_path / "r1"), "--out", str(tmp_path / "m.onnx")],
    }  # fmt: skip
    for where, argv in calls.items():
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (where, err)
        line = one_error_line(err)
        assert "weights_only" not in line and "arbitrary code" not in line, (where, line)
        assert not marker.exists(), f"code ran from a hostile file: {where}"
    # the one naming of a refused pickle (no advice to run it)
    from rcnn.io.tensors import read_state_dict

    with pytest.raises(ValueError) as info:
        read_state_dict(evil)
    message = str(info.value)
    assert str(evil) in message and "weights_only" not in message and "arbitrary code" not in message
    if kind == "torch.save":
        assert "not loaded" in message and "never by running its code" in message
        assert "posix.system" in message or "nt.system" in message
    else:
        assert "not a torch.save or safetensors file" in message
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# The bad-image corpus through predict, evaluate and serve

GOOD_IMAGES = ["ok.png", "gray.png", "rgba.png", "palette.png", "gray16.png", "cmyk.jpg"]
BROKEN_IMAGES = {"corrupt.png": "cannot decode the image", "notanimage.png": "cannot decode the image",
                 "empty.png": "cannot decode the image"}  # fmt: skip


def test_bad_images_through_predict(frcnn_run, tmp_path, capsys):
    images = BAD / "images"
    assert main(["predict", "--weights", str(frcnn_run), *(str(images / n) for n in GOOD_IMAGES),
                 "--out", str(tmp_path / "ok")]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == len(GOOD_IMAGES) and summary["sources"] == len(GOOD_IMAGES), summary
    for n in GOOD_IMAGES:  # every readable mode gives its own record, naming the file it came from
        record = json.loads((tmp_path / "ok" / f"{n}.json").read_text())
        assert record["source"] == str(images / n) and len(record["size"]) == 2, record
    cases = {**{n: (images / n, m) for n, m in BROKEN_IMAGES.items()},
             "a folder with a broken image": (images, "cannot decode the image"),
             "an empty folder": (tmp_path / "empty", "no image or video files in this folder"),
             "missing": (images / "missing.png", "no such file or folder")}  # fmt: skip
    (tmp_path / "empty").mkdir()
    for name, (path, message) in cases.items():
        assert main(["predict", "--weights", str(frcnn_run), str(path), "--out", str(tmp_path / "bad")]) == 2, name
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"rcnn predict: error: {path}") and message in line, (name, line)
    # a missing --weights path is not found, not "no checkpoint here"
    assert main(["predict", "--weights", str(tmp_path / "nope"), str(images / "ok.png"), "--out", str(tmp_path)]) == 2
    assert f"{tmp_path / 'nope'}: not found" in one_error_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def cat_dog_run(frcnn_run, tmp_path_factory):
    """The tiny run with class names that include the corpus's (cat, dog): evaluation maps them by name."""
    run = tmp_path_factory.mktemp("cat_dog") / "run"
    shutil.copytree(frcnn_run, run, symlinks=True)
    classes = (run / "last").resolve() / "classes.json"
    classes.write_text(json.dumps(["__background__", "cat", "dog", "c3", "c4", "c5"]))
    return run


EVALUATE_CASES = {
    "coco_image_modes.json": (0, None),
    "coco_corrupt_image.json": (2, "cannot decode the image"),
    "coco_empty_image_file.json": (2, "cannot decode the image"),
    "coco_not_an_image.json": (2, "cannot decode the image"),
    "coco_missing_image.json": (2, "image file not found"),
    "coco_size_mismatch.json": (2, "its annotations say"),
}


@pytest.mark.parametrize("case", list(EVALUATE_CASES))
def test_bad_images_through_evaluate(case, cat_dog_run, tmp_path, capsys):
    code, message = EVALUATE_CASES[case]
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--weights", str(cat_dog_run), "--data", str(BAD / case), "--split", "all",
                 "--out", str(out)]) == code  # fmt: skip
    err = capsys.readouterr().err
    if code == 0:
        json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {out}"))  # strict JSON
    else:
        line = one_error_line(err)
        assert line.startswith(f"rcnn evaluate: error: {BAD}") and message in line, line


def test_bad_images_through_serve(frcnn_run):
    from rcnn.serve import ServedModel, create_app

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
        from fastapi.testclient import TestClient

    images = BAD / "images"
    with TestClient(create_app([ServedModel.load(frcnn_run)])) as client:
        for name in GOOD_IMAGES:
            kind = "image/jpeg" if name.endswith(".jpg") else "image/png"
            response = client.post("/predict", files={"image": (name, (images / name).read_bytes(), kind)})
            assert response.status_code == 200, (name, response.text)
        expected = {"corrupt.png": "truncated_image", "notanimage.png": "not_an_image", "empty.png": "empty_upload"}
        for name, error in expected.items():
            response = client.post("/predict", files={"image": (name, (images / name).read_bytes(), "image/png")})
            assert response.status_code == 400 and response.json()["error"] == error, (name, response.text)
        assert client.get("/health").json()["status"] == "ok"


# ---------------------------------------------------------------------------------------------
# Silently wrong numbers


def test_degenerate_ground_truth_boxes_are_refused_by_the_model_api():
    model = small_model(3)
    image = torch.rand(3, 64, 64)
    good = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
    for flat in ([10.0, 10.0, 10.0, 40.0], [5.0, 20.0, 30.0, 20.0]):
        bad = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0], flat]), "labels": torch.tensor([1, 2])}
        with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]\[1\] = .* has zero width or height"):
            model([image, image], [good, bad])
    assert set(model([image], [good])) >= {"loss_cls", "loss_box"}


def test_a_data_set_without_objects_is_refused_for_training(tmp_path, capsys):
    from rcnn.data.shapes import make_shapes

    root = make_shapes(tmp_path / "empty", n_train=4, n_val=2, seed=0, image_size=64)
    for split in ("train", "val"):
        ann = root / "annotations" / f"instances_{split}.json"
        data = json.loads(ann.read_text())
        data["annotations"] = []
        ann.write_text(json.dumps(data))
    argv = train_args(root, tmp_path / "run")
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "the training split (train, 4 images) has no object to learn from" in line and "rcnn data check" in line


def test_json_outputs_are_strict(tmp_path):
    from rcnn.commands.train import _brief
    from rcnn.io.files import dumps_json, write_json

    data = {"AP": float("nan"), "nested": [float("inf"), 1.5], "voc": {"mAP": float("-inf")}}
    write_json(tmp_path / "m.json", data)
    assert json.loads((tmp_path / "m.json").read_text()) == {"AP": None, "nested": [None, 1.5], "voc": {"mAP": None}}
    summary = {"metrics": {"bbox": {"AP": float("nan"), "AP50": 0.5}, "voc": {"mAP": float("nan")}}}
    assert json.loads(dumps_json(_brief(summary))) == {"bbox_AP": None, "bbox_AP50": 0.5, "voc_mAP": None}


def shifted_categories(root: Path, out: Path) -> Path:
    """The shapes val split with an extra category, id 0, in front of the others."""
    ann = json.loads((root / "annotations" / "instances_val.json").read_text())
    ann["categories"] = [{"id": 0, "name": "extra"}, *ann["categories"]]
    out.write_text(json.dumps(ann))
    return out


def test_evaluate_with_other_classes_is_refused_with_both_lists(frcnn_run, shapes_root, tmp_path, capsys):
    root = tmp_path / "set"
    shutil.copytree(shapes_root, root)
    shifted_categories(root, root / "annotations" / "instances_val.json")
    assert main(["evaluate", "--weights", str(frcnn_run), "--data", str(root), "--split", "val"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "classes the model does not know: ['extra']" in line
    assert "The model's classes: ['circle'" in line and "['extra', 'circle'" in line


def test_data_check_warns_when_the_splits_classes_differ(shapes_root, tmp_path):
    from rcnn.data.check import check_dataset

    root = tmp_path / "set"
    shutil.copytree(shapes_root, root)
    shifted_categories(root, root / "annotations" / "instances_val.json")
    reports = {r.source.split: r for r in check_dataset(root, decode_images=False)}
    warnings_ = [p.message for p in reports["val"].problems if p.severity == "warning"]
    assert any("has other classes than split train" in w and "'extra'" in w for w in warnings_), warnings_
    assert not [p for p in reports["train"].problems if "classes" in p.message]

    ann = json.loads((shapes_root / "annotations" / "instances_val.json").read_text())
    names = [c["name"] for c in ann["categories"]]  # the same set in another order: the ids' names reversed
    for cat, name in zip(ann["categories"], names[::-1]):
        cat["name"] = name
    (root / "annotations" / "instances_val.json").write_text(json.dumps(ann))
    reports = {r.source.split: r for r in check_dataset(root, decode_images=False)}
    assert any("same classes in another order" in p.message for p in reports["val"].problems)

    ann = json.loads((shapes_root / "annotations" / "instances_val.json").read_text())
    for cat in ann["categories"]:
        cat["id"] += 10
    for a in ann["annotations"]:
        a["category_id"] += 10
    (root / "annotations" / "instances_val.json").write_text(json.dumps(ann))
    reports = {r.source.split: r for r in check_dataset(root, decode_images=False)}
    assert any("same class names with other category ids" in p.message for p in reports["val"].problems)


@pytest.mark.parametrize(
    "case, message",
    [("coco_polygon_outside.json", "polygon 0 has the point (60, 3), outside the 32x24 image"),
     ("coco_polygon_off_box.json", "the segmentation spans [20.0, 12.0, 30.0, 20.0] but the bbox is [2.0, 3.0, 12.0, 11.0]"),
     ("coco_rle_off_box.json", "the segmentation spans [20.0, 12.0, 30.0, 20.0] but the bbox is [2.0, 3.0, 12.0, 11.0]")],
)  # fmt: skip
def test_masks_are_checked_against_the_image_and_their_box(case, message):
    with pytest.raises(ValueError) as info:
        CocoDetection(BAD / "images", BAD / case, with_masks=True)
    assert case in str(info.value) and "annotation id 1" in str(info.value) and message in str(info.value)
    boxes_only = CocoDetection(BAD / "images", BAD / case)  # the boxes alone are fine: masks are checked when loaded
    assert len(boxes_only.records[0].boxes) == 1


def test_nested_settings_are_range_checked_on_the_command_line(shapes_root, tmp_path, capsys):
    for setting, message in [("model.rpn={nms_thresh: 7}", "model.rpn.nms_thresh: Input should be less than or equal to 1"),
                             ("model.rpn={nms_thresh: abc}", "model.rpn.nms_thresh: Input should be a valid number"),
                             ("model.roi={batch_size_per_image: 0}", "model.roi.batch_size_per_image: Input should be greater than 0")]:  # fmt: skip
        assert main(train_args(shapes_root, tmp_path / "run", "--set", setting)) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()  # refused before anything is written


def test_weights_file_messages(tmp_path):
    from rcnn.io.tensors import read_state_dict

    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pth: empty file \(0 bytes\), not a weights file"):
        read_state_dict(tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="is a folder, not a weights file"):
        read_state_dict(tmp_path)
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"cannot read weights from .*junk.pth: not a torch.save or safetensors file"):
        read_state_dict(tmp_path / "junk.pth")


def test_the_lock_file_names_its_holder_and_outlives_it(tmp_path):
    with claim_run_folder(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").read_text() == str(os.getpid())
    with claim_run_folder(tmp_path / "run"):  # released at the end of the block
        pass
