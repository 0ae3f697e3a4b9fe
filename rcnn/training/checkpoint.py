"""Checkpoints: safetensors weights + a small JSON of training state, written atomically.

A checkpoint is a directory ``step_000500/`` inside the run directory holding

- ``model.safetensors``: the model's weights;
- ``optimizer.safetensors``: the optimiser's tensors (momentum buffers ...), when training;
- ``state.json``: iteration, base learning rate, RNG states, the optimiser's non-tensor state;
- ``config.yaml`` and ``classes.json``: what is needed to rebuild the model for inference.

Files are written to a temporary directory that is renamed into place when complete, and the
run's ``last`` link is then switched to it with an atomic rename, so a kill at any moment leaves
either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "find_checkpoint",
    "load_checkpoint",
    "load_model",
    "read_json",
    "restore_rng",
    "rng_state",
    "save_checkpoint",
    "write_json",
]


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt JSON ({exc})") from None


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
    """Weights as contiguous CPU tensors; tensors shared between modules are stored once."""
    state, seen = {}, {}
    for key, value in model.state_dict().items():
        ptr = (value.data_ptr(), value.shape, value.dtype) if value.numel() else None
        if ptr is not None and ptr in seen:
            continue  # safetensors refuses shared storage; load_state_dict(strict=False) fills aliases
        if ptr is not None:
            seen[ptr] = key
        state[key] = value.detach().cpu().contiguous().clone()
    return state


def save_checkpoint(
    run_dir: Path,
    iteration: int,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    extra_state: dict[str, Any] | None = None,
    config_yaml: str | None = None,
    class_names: list[str] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``run_dir/step_{iteration}`` atomically and point ``run_dir/last`` at it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{iteration:07d}"
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_model_state(model), str(tmp / "model.safetensors"))
    state: dict[str, Any] = {"iteration": iteration, **(extra_state or {})}
    if optimizer is not None:
        tensors, meta = _split_optimizer_state(optimizer.state_dict())
        rng_tensors, rng_meta = rng_state()
        save_file({**tensors, **rng_tensors}, str(tmp / "optimizer.safetensors"))
        state["optimizer"] = meta
        state["rng"] = rng_meta
    write_json(tmp / "state.json", state)
    if config_yaml is not None:
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    if class_names is not None:
        write_json(tmp / "classes.json", class_names)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    link_tmp = run_dir / ".last.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(name)
    os.replace(link_tmp, run_dir / "last")
    old = sorted(p for p in run_dir.glob("step_*") if p.is_dir() and p.name != name)
    for path in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory for a run directory, a checkpoint directory or its ``model.safetensors``."""
    path = Path(path)
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


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng_state: bool = False,
) -> dict[str, Any]:
    """Load weights (and optionally the optimiser and RNG states) from a checkpoint; return its state."""
    ckpt = find_checkpoint(path)
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
    except Exception as exc:
        raise ValueError(f"{ckpt / 'model.safetensors'}: cannot read weights ({exc})") from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = str(exc).split("\n\t", 1)[-1].replace("\n\t", "; ")
        raise ValueError(f"{ckpt}: weights do not fit this model ({detail}); was it trained with another config?") from None
    # keys missing only because their tensor is shared with a stored key (stored once) are fine
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in weights if k in own and own[k].numel()}
    really_missing = [k for k in missing if not (own[k].numel() and own[k].data_ptr() in loaded_ptrs)]
    if really_missing or unexpected:
        raise ValueError(
            f"{ckpt}: weights do not fit this model (missing {really_missing[:5]}, unexpected "
            f"{unexpected[:5]}); was it trained with another config?"
        )
    state = read_json(ckpt / "state.json")
    if optimizer is not None or restore_rng_state:
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
        if optimizer is not None:
            optim_tensors = {k: v for k, v in tensors.items() if k.startswith("state.")}
            optimizer.load_state_dict(_join_optimizer_state(optim_tensors, state["optimizer"]))
        if restore_rng_state:
            restore_rng({k: v for k, v in tensors.items() if k.startswith("rng.")}, state["rng"])
    return state


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, list[str]]:
    """Rebuild a trained model from its checkpoint alone: ``(model, config, class names)``.

    The model is in eval mode and optimised for inference (it cannot be trained further; to
    continue training, use ``rcnn train --resume``).
    """
    from rcnn.config import build_model, load_config

    ckpt = find_checkpoint(path)
    if not (ckpt / "config.yaml").is_file():
        raise FileNotFoundError(f"{ckpt}: no config.yaml beside the weights; pass --config too")
    config = load_config(ckpt / "config.yaml")
    class_names = read_json(ckpt / "classes.json") if (ckpt / "classes.json").is_file() else None
    num_classes = len(class_names) if class_names else None
    config.model.pretrained_backbone = None  # the checkpoint holds the trained weights
    model = build_model(config.model, num_classes)
    load_checkpoint(ckpt, model)
    model.to(device).eval()
    if hasattr(model, "optimize_for_inference"):
        model.optimize_for_inference()
    return model, config, class_names or [f"class_{i}" for i in range(model.num_classes)]
