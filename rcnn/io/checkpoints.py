"""Checkpoints: safetensors weights + a small JSON of training state, written atomically.

A checkpoint is a directory ``step_000500/`` inside the run directory holding

- ``model.safetensors``: the model's weights;
- ``optimizer.safetensors``: the optimiser's tensors (momentum buffers ...), when training;
- ``state.json``: iteration, base learning rate, RNG states, the optimiser's non-tensor state;
- ``config.yaml`` and ``classes.json``: what is needed to rebuild the model for inference;
  ``categories.json``: the category id of each label, where the data had its own (COCO).

Files are written to a temporary directory that is renamed into place when complete, and the
run's ``last`` link is then switched to it with an atomic rename, so a kill at any moment leaves
either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rcnn.io.files import read_json, write_json, write_text

__all__ = [
    "LEGACY_KEYS",
    "checkpoint_problem",
    "find_checkpoint",
    "load_checkpoint",
    "has_optimizer_state",
    "load_weights",
    "point_last",
    "read_checkpoint_weights",
    "restore_rng",
    "resume_checkpoint",
    "rng_state",
    "save_checkpoint",
]


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The torch (CPU, CUDA), NumPy and Python RNG states, as tensors and JSON-able values."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    np_state = np.random.get_state()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"rng.cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _model_state(model: nn.Module) -> dict[str, Tensor]:
    """Weights as contiguous CPU tensors (each tensor of the library's models is registered once)."""
    return {key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()}


def save_checkpoint(
    run_dir: Path,
    iteration: int,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    extra_state: dict[str, Any] | None = None,
    config_yaml: str | None = None,
    class_names: list[str] | None = None,
    categories: list[dict[str, Any]] | None = None,
    keep: int = 2,
    extra_files: dict[str, dict[str, Tensor]] | None = None,
) -> Path:
    """Write ``run_dir/step_{iteration}`` atomically and point ``run_dir/last`` at it.

    ``class_names`` (index = label, 0 the background) go to ``classes.json``; ``categories`` (one
    ``{"id", "name"}`` per label, the data set's own category ids, e.g. COCO's) to ``categories.json``.
    ``extra_files``: further safetensors files of the checkpoint, ``{file name: tensors}`` (the
    training weights beside averaged ones, see ``rcnn.training.control``).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{iteration:07d}"
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    current = tmp
    try:
        tmp.mkdir()
        current = tmp / "model.safetensors"
        save_file(_model_state(model), str(current))
        for file_name, tensors in (extra_files or {}).items():
            current = tmp / file_name
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(current))
        state: dict[str, Any] = {"iteration": iteration, **(extra_state or {})}
        if optimizer is not None:
            tensors, meta = _split_optimizer_state(optimizer.state_dict())
            rng_tensors, rng_meta = rng_state()
            current = tmp / "optimizer.safetensors"
            save_file({**tensors, **rng_tensors}, str(current))
            state["optimizer"] = {"class": type(optimizer).__name__, **meta}
            state["rng"] = rng_meta
        current = tmp / "state.json"
        write_json(current, state)
        if config_yaml is not None:
            write_text(tmp / "config.yaml", config_yaml)
        if class_names is not None:
            write_json(tmp / "classes.json", class_names)
        if categories is not None:
            write_json(tmp / "categories.json", categories)
        current = final
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except (OSError, SafetensorError) as exc:  # disk full, permissions, ...: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(exc, current, run_dir) from None
    point_last(run_dir, name)
    old = sorted(p for p in run_dir.glob("step_*") if p.is_dir() and p.name != name)
    for path in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def point_last(run_dir: Path, name: str) -> None:
    """Switch ``run_dir/last`` to the checkpoint folder ``name`` with an atomic rename."""
    link_tmp = run_dir / ".last.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(name)
    os.replace(link_tmp, run_dir / "last")


def checkpoint_problem(path: Path, *, training_state: bool = True) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, or None when it is intact: its
    ``state.json`` reads, and each safetensors file's header and length agree (a file cut short by
    a kill or a full disk does not), the optimiser's state included when ``training_state``."""
    if not path.is_dir():
        return "missing"
    try:
        state = read_json(path / "state.json")
    except (OSError, ValueError) as exc:
        return str(exc)
    if not isinstance(state, dict) or not isinstance(state.get("iteration"), int):
        return f"{path / 'state.json'}: no iteration"
    files = ["model.safetensors"]
    if training_state and "optimizer" in state:
        files.append("optimizer.safetensors")
    for name in files:
        try:
            with safe_open(str(path / name), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            return f"{path / name}: {exc}"
    return None


def resume_checkpoint(run_dir: str | os.PathLike, log: Callable[[str], None] = print, *, repoint: bool = True) -> Path | None:
    """The checkpoint a run resumes from: ``last`` when it is intact, else the newest intact
    ``step_*`` (``last`` is switched to it where ``repoint``, and ``log`` says why); None for a run that has no
    checkpoint yet. ``ValueError`` when it had checkpoints and none is intact: resuming would
    start over and overwrite the run's logs."""
    run_dir = Path(run_dir)
    last = run_dir / "last"
    steps = sorted((p for p in run_dir.glob("step_*") if p.is_dir()), reverse=True)
    if not steps and not last.is_symlink() and not last.exists():
        return None
    if last.exists() and checkpoint_problem(last.resolve()) is None:
        return last.resolve()
    reasons = []
    if last.is_symlink() or last.exists():
        target = os.readlink(last) if last.is_symlink() else "last"
        reasons.append(f"last -> {target}: {checkpoint_problem(last.resolve()) or 'missing'}")
    for step in steps:
        problem = checkpoint_problem(step)
        if problem is None:
            if repoint:
                log(f"{run_dir}: {reasons[0] if reasons else 'no last link'}; resuming from {step.name}, "
                    "the newest intact checkpoint")  # fmt: skip
                point_last(run_dir, step.name)
            return step.resolve()
        reasons.append(f"{step.name}: {problem}")
    raise ValueError(
        f"{run_dir}: no intact checkpoint to resume from ({'; '.join(reasons)}); start over with --overwrite, "
        "or give another --out"
    )


def _write_error(exc: Exception, file: Path, run_dir: Path) -> OSError:
    """An ``OSError`` naming the checkpoint file that could not be written, with the system's
    reason (safetensors reports it inside its own error) and the checkpoint that is still there."""
    code = getattr(exc, "errno", None)
    if code is None:  # SafetensorError: "... I/O error: No space left on device (os error 28)"
        found = re.search(r"(?:os error |code: )(\d+)", str(exc))
        code = int(found.group(1)) if found else None
    reason = os.strerror(code) if code else str(exc)
    last = run_dir / "last"
    kept = f"; the previous checkpoint {os.readlink(last)} is intact" if last.is_symlink() and last.exists() else ""
    return OSError(code or 0, f"cannot write the checkpoint: {reason}{kept}", str(file))


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory for a run directory, a checkpoint directory or its ``model.safetensors``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (expected a run folder, a step_* folder or a model.safetensors)")
    if path.is_file() and path.name == "model.safetensors":
        path = path.parent
    if path.is_dir() and not (path / "model.safetensors").is_file() and (path / "last").exists():
        path = path / "last"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path}: no checkpoint here (expected a run directory with 'last', or a directory "
            "with model.safetensors)"
        )
    return path.resolve()


# Checkpoints written by rcnn 0.1 registered the box head twice (under the backbone and the RoI
# heads; it was stored once, under the backbone) and named the mask branch's layers differently.
# Their keys are renamed on loading, so older run folders keep working.
LEGACY_KEYS: tuple[tuple[str, str], ...] = (
    ("backbone.box_head.", "roi_heads.box_head."),  # Fast / Faster / Mask R-CNN
    ("backbone.box_head.", "box_head."),  # R-CNN
    ("roi_heads.mask_branch.head.convs.", "roi_heads.mask_head.convs."),
    ("roi_heads.mask_branch.head.deconv.", "roi_heads.mask_predictor.deconv."),
    ("roi_heads.mask_branch.head.predictor.", "roi_heads.mask_predictor.logits."),
)


def _rename_legacy(weights: dict[str, Tensor], own: set[str]) -> dict[str, Tensor]:
    """``weights`` with keys of older checkpoints renamed to this model's (see ``LEGACY_KEYS``)."""
    renamed = {}
    for key, value in weights.items():
        if key not in own:
            for old, new in LEGACY_KEYS:
                if key.startswith(old) and new + key[len(old) :] in own:
                    key = new + key[len(old) :]
                    break
        renamed[key] = value
    return renamed


def load_weights(model: nn.Module, weights: dict[str, Tensor], source: str | os.PathLike) -> None:
    """Load ``weights`` into ``model``, every tensor and no other: ``ValueError`` naming ``source``
    and the first mismatching keys otherwise."""
    own = model.state_dict()
    weights = _rename_legacy(weights, set(own))
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    wrong = [k for k in weights if k in own and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        details = []
        if wrong:
            k = wrong[0]
            details.append(f"{k} has shape {list(weights[k].shape)}, the model expects {list(own[k].shape)}")
        if missing:
            details.append(f"missing {missing[:5]}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}")
        raise ValueError(
            f"{source}: weights do not fit this model ({'; '.join(details)}); was it trained with another config?"
        )
    model.load_state_dict(weights)


def read_checkpoint_weights(path: str | os.PathLike, own: set[str] | None = None) -> dict[str, Tensor]:
    """The weights of a checkpoint (older checkpoints' keys renamed to ``own``'s, see ``LEGACY_KEYS``)."""
    ckpt = find_checkpoint(path)
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
    except Exception as exc:
        raise ValueError(f"{ckpt / 'model.safetensors'}: cannot read weights ({exc})") from None
    return _rename_legacy(weights, own) if own is not None else weights


def has_optimizer_state(path: str | os.PathLike) -> bool:
    """Whether a checkpoint holds the optimiser's state (a converted model's does not)."""
    return (find_checkpoint(path) / "optimizer.safetensors").is_file()


def _optimizer_kind(meta: dict[str, Any]) -> str:
    """The optimiser class a checkpoint's state belongs to (older checkpoints: told by its settings)."""
    if "class" in meta:
        return str(meta["class"])
    group = meta["param_groups"][0] if meta.get("param_groups") else {}
    if "betas" in group:
        return "AdamW" if group.get("decoupled_weight_decay", True) else "Adam"
    return "SGD" if "momentum" in group else "unknown"


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], ckpt: Path) -> None:
    """Load a checkpoint's optimiser state, or say in one line why it does not fit ``optimizer``
    (another optimiser, other trainable parameters) instead of failing inside torch."""
    saved, current = _optimizer_kind(state), type(optimizer).__name__
    if saved != current:
        raise ValueError(
            f"{ckpt}: its training state is {saved}'s, and this training uses {current} (train.optimizer): resume "
            f"with the optimiser it was trained with, or start a new run from its weights with --init-from {ckpt}"
        )
    try:
        optimizer.load_state_dict({"state": state["state"], "param_groups": state["param_groups"]})
    except (ValueError, KeyError, IndexError, RuntimeError) as exc:
        raise ValueError(
            f"{ckpt}: its optimiser state does not fit this training ({exc}); were the trainable parameters "
            f"changed (model.trainable_stages, the model)? Resume with the run's own config, or start a new run "
            f"from its weights with --init-from {ckpt}"
        ) from None


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng_state: bool = False,
) -> dict[str, Any]:
    """Load weights (and optionally the optimiser and RNG states) from a checkpoint; return its state."""
    ckpt = find_checkpoint(path)
    load_weights(model, read_checkpoint_weights(ckpt), ckpt)
    state = read_json(ckpt / "state.json")
    if optimizer is not None or restore_rng_state:
        try:
            tensors = load_file(str(ckpt / "optimizer.safetensors"))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{ckpt / 'optimizer.safetensors'}: cannot read the training state ({exc})") from None
        if optimizer is not None:
            optim_tensors = {k: v for k, v in tensors.items() if k.startswith("state.")}
            _load_optimizer_state(optimizer, _join_optimizer_state(optim_tensors, state["optimizer"]), ckpt)
        if restore_rng_state:
            restore_rng({k: v for k, v in tensors.items() if k.startswith("rng.")}, state["rng"])
    return state
