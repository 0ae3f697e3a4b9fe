"""Converting other libraries' detection checkpoints into rcnn run folders.

``convert_torchvision(FILE, arch, OUT)`` (``rcnn convert torchvision FILE --arch NAME --out OUT``)
reads a torchvision detection checkpoint (a ``state_dict`` saved with ``torch.save``, e.g.
``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth`` from the torch hub cache; read with
``weights_only=True``, so no code in the file runs) and writes a normal run folder: the weights,
the config that rebuilds the model (resolved: every setting the converted model runs with, see
``rcnn.build.resolved_config``), the class names and, for COCO-trained files, the COCO
category ids. ``rcnn predict``, ``evaluate``, ``export``, ``train --resume`` and
``train --init-from`` (fine-tuning on other classes) take it.

Every tensor is matched by its name and shape through the architecture's renaming rules (never by
registration order); a file of another architecture is refused with the first tensor that does
not fit. The model settings that change outputs — torchvision's anchors (rounded, at cell
corners), its resize rule, the legacy RoIAlign, its mask pasting, image sizes, score
thresholds — are set (``model.torchvision_compat`` and the per-architecture options below) so
that the converted model reproduces torchvision's detections (``tests/test_convert.py``).

Two layout differences are converted: torchvision's box regressor and mask predictor have an
output for the background class, ours not (its rows are dropped: torchvision ignores them too).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from rcnn.build import build_model, resolved_config
from rcnn.config import Config, config_from_dict, config_to_yaml
from rcnn.io.checkpoints import save_checkpoint
from rcnn.io.files import read_json, write_json
from rcnn.io.runs import claim_run_folder
from rcnn.io.tensors import read_state_dict

__all__ = ["TORCHVISION_ARCHS", "ConversionReport", "TorchvisionArch", "convert_torchvision", "torchvision_state_dict"]


@dataclass(frozen=True)
class TorchvisionArch:
    """How one torchvision detector maps onto rcnn: the model section, and its key renames."""

    model: dict[str, Any]  # the config's model section (name, backbone, options)
    mask_head_step: int = 2  # modules per conv in our MaskHead's Sequential: conv + ReLU (+ BN: 3)


# torchvision's defaults: 800 / 1333 images, frozen BatchNorm in the backbone, its last 3 stages trained
_COMMON = {"min_size": 800, "max_size": 1333, "torchvision_compat": True, "backbone_norm": "frozen", "trainable_stages": 3}
TORCHVISION_ARCHS: dict[str, TorchvisionArch] = {
    "fasterrcnn_resnet50_fpn": TorchvisionArch({"name": "faster_rcnn", "backbone": "resnet50_fpn", **_COMMON}),
    "fasterrcnn_resnet50_fpn_v2": TorchvisionArch(
        {"name": "faster_rcnn", "backbone": "resnet50_fpn_v2", **_COMMON, "rpn": {"conv_depth": 2}}
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": TorchvisionArch(
        {"name": "faster_rcnn", "backbone": "mobilenet_v3_fpn", **_COMMON, "rpn": {"score_thresh": 0.05}}
    ),
    "fasterrcnn_mobilenet_v3_large_320_fpn": TorchvisionArch(
        {"name": "faster_rcnn", "backbone": "mobilenet_v3_fpn", **_COMMON, "min_size": 320, "max_size": 640,
         "rpn": {"score_thresh": 0.05, "pre_nms_top_n_test": 150, "post_nms_top_n_test": 150}}
    ),  # fmt: skip
    "maskrcnn_resnet50_fpn": TorchvisionArch({"name": "mask_rcnn", "backbone": "resnet50_fpn", **_COMMON}),
    "maskrcnn_resnet50_fpn_v2": TorchvisionArch(
        {"name": "mask_rcnn", "backbone": "resnet50_fpn_v2", **_COMMON, "rpn": {"conv_depth": 2},
         "mask": {"batch_norm": True}},
        mask_head_step=3,
    ),  # fmt: skip
}


def _rules(arch: TorchvisionArch) -> list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]:
    """``torchvision key -> our key`` rules, the first match applies."""
    step = arch.mask_head_step

    def mask_conv(m: re.Match[str]) -> str:
        index = int(m.group(1)) * step + int(m.group(2))  # .0 the conv, .1 its BatchNorm
        return f"roi_heads.mask_head.convs.{index}.{m.group(3)}"

    def rpn_conv(m: re.Match[str]) -> str:
        i = int(m.group(1))
        return f"rpn.head.conv.{m.group(2)}" if i == 0 else f"rpn.head.more_convs.{i - 1}.{m.group(2)}"

    table = [
        (r"backbone\.(body|fpn)\.(.+)", lambda m: f"backbone.{m.group(1)}.{m.group(2)}"),
        (r"rpn\.head\.conv\.(\d+)\.0\.(weight|bias)", rpn_conv),
        (r"rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)", lambda m: f"rpn.head.{m.group(1)}.{m.group(2)}"),
        (r"roi_heads\.box_head\.(fc6|fc7)\.(.+)", lambda m: f"roi_heads.box_head.{m.group(1)}.{m.group(2)}"),
        (r"roi_heads\.box_head\.(\d+.*)", lambda m: f"roi_heads.box_head.layers.{m.group(1)}"),
        (r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(.+)", lambda m: f"roi_heads.predictor.{m.group(1)}.{m.group(2)}"),
        (r"roi_heads\.mask_head\.(\d+)\.([01])\.(.+)", mask_conv),
        (r"roi_heads\.mask_predictor\.conv5_mask\.(.+)", lambda m: f"roi_heads.mask_predictor.deconv.{m.group(1)}"),
        (r"roi_heads\.mask_predictor\.mask_fcn_logits\.(.+)", lambda m: f"roi_heads.mask_predictor.logits.{m.group(1)}"),
    ]
    return [(re.compile(pattern + r"$"), fn) for pattern, fn in table]


# torchvision's background outputs, which ours do not have: the leading rows to drop
_BACKGROUND_ROWS = {"roi_heads.predictor.bbox_pred.": 4, "roi_heads.mask_predictor.logits.": 1}


@dataclass
class ConversionReport:
    """What :func:`torchvision_state_dict` matched: counts and the conversions applied."""

    arch: str
    num_classes: int
    tensors: int
    renamed: dict[str, str] = field(default_factory=dict)  # torchvision prefix -> ours, one per kind
    background_rows_dropped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # BatchNorm counters our frozen BatchNorm has no use for

    def as_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "num_classes": self.num_classes, "tensors": self.tensors, "renamed": self.renamed,
                "background_rows_dropped": self.background_rows_dropped, "ignored": len(self.ignored)}  # fmt: skip

    def __str__(self) -> str:
        lines = [f"{self.tensors} tensors of {self.arch} matched by name and shape ({self.num_classes} classes)"]
        lines += [f"  {src} -> {dst}" for src, dst in self.renamed.items()]
        lines += [f"  {key}: the background class's rows dropped" for key in self.background_rows_dropped]
        if self.ignored:
            lines.append(f"  {len(self.ignored)} BatchNorm counters (num_batches_tracked) not needed by frozen BatchNorm")
        return "\n".join(lines)


def _arch(arch: str) -> TorchvisionArch:
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"unknown torchvision architecture {arch!r}; choose one of {', '.join(TORCHVISION_ARCHS)}")
    return TORCHVISION_ARCHS[arch]


def _num_classes(state: dict[str, Tensor], source: str) -> int:
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in state:
        raise ValueError(
            f"{source}: no {key!r}: not a torchvision Faster / Mask R-CNN checkpoint (first keys: {list(state)[:3]})"
        )
    return int(state[key].shape[0])


def model_config(arch: str, num_classes: int) -> Config:
    """The config of the rcnn model that reproduces torchvision's ``arch`` with ``num_classes`` (K + 1)."""
    return config_from_dict({"model": {**_arch(arch).model, "num_classes": num_classes}}, f"the {arch} conversion")


def torchvision_state_dict(
    state: dict[str, Tensor], arch: str, own: dict[str, Tensor], source: str = "the checkpoint"
) -> tuple[dict[str, Tensor], ConversionReport]:
    """torchvision's ``state`` in our names for a model whose state dict is ``own``.

    Every tensor of ``own`` must come from the file with the same shape (after dropping the
    background rows), and every tensor of the file must go somewhere: ``ValueError`` naming the
    first one that does not.
    """
    spec = _arch(arch)
    rules = _rules(spec)
    out: dict[str, Tensor] = {}
    report = ConversionReport(arch, _num_classes(state, source), 0)
    for key, value in state.items():
        target = None
        for pattern, rename in rules:
            match = pattern.match(key)
            if match:
                target = rename(match)
                break
        if target is None:
            raise ValueError(f"{source}: tensor {key!r} has no place in rcnn's {arch}; is the file a {arch} checkpoint?")
        if target not in own:
            if key.endswith("num_batches_tracked"):
                report.ignored.append(key)
                continue
            raise ValueError(
                f"{source}: tensor {key!r} (as {target!r}) is not part of rcnn's {arch}; is the file a {arch} checkpoint?"
            )
        for prefix, rows in _BACKGROUND_ROWS.items():
            if target.startswith(prefix):
                value = value[rows:]
                report.background_rows_dropped.append(key)
        if tuple(value.shape) != tuple(own[target].shape):
            raise ValueError(
                f"{source}: tensor {key!r} has shape {list(value.shape)} but {arch} needs {list(own[target].shape)} "
                f"for it; is the file a {arch} checkpoint?"
            )
        out[target] = value
        head = key.rsplit(".", 2)[0]
        report.renamed.setdefault(re.sub(r"\.\d+", ".N", head), re.sub(r"\.\d+", ".N", target.rsplit(".", 2)[0]))
    missing = [k for k in own if k not in out and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{source}: no tensor for {missing[0]!r} ({len(missing)} missing); is the file a {arch} checkpoint?")
    for key in own:  # BatchNorm counters of our trainable BatchNorm: keep ours where the file has none
        out.setdefault(key, own[key])
    report.tensors = len(out)
    report.renamed = {k: v for k, v in report.renamed.items() if k != v}
    return out, report


def coco_categories() -> list[dict[str, Any]]:
    """torchvision's COCO classes (91 labels, background and the unused ids as ``N/A``) with their
    COCO category ids (= the label): what its COCO-trained detectors predict."""
    import torchvision

    names = torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return [{"id": i, "name": name} for i, name in enumerate(names)]


def _class_names(path: str | os.PathLike | None, num_classes: int) -> tuple[list[str], list[dict[str, Any]] | None]:
    if path is not None:
        path = Path(path)
        names = read_json(path) if path.suffix == ".json" else path.read_text(encoding="utf-8").split("\n")
        names = [str(n).strip() for n in names if str(n).strip()]
        if len(names) == num_classes - 1:
            names = ["__background__", *names]
        if len(names) != num_classes:
            raise ValueError(
                f"{path}: {len(names)} class names, but the checkpoint has {num_classes - 1} classes + background"
            )
        return names, None
    if num_classes == 91:
        categories = coco_categories()
        return [c["name"] for c in categories], categories
    return ["__background__", *(f"class_{i}" for i in range(1, num_classes))], None


def convert_torchvision(
    checkpoint: str | os.PathLike,
    arch: str,
    out_dir: str | os.PathLike,
    *,
    class_names: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> ConversionReport:
    """Convert a torchvision detection checkpoint into the run folder ``out_dir`` (see the module docstring).

    ``class_names``: a ``.txt`` (one per line) or ``.json`` list of the classes (background
    first or not); default COCO's for 91-class files, else ``class_1`` ...
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):  # before the work, not after
        raise ValueError(f"{out_dir}: exists and is not empty; a converted model goes into a new or empty run folder")
    state = read_state_dict(checkpoint, "torchvision checkpoint")
    num_classes = _num_classes(state, str(checkpoint))
    config = model_config(arch, num_classes)
    model = build_model(config.model)
    weights, report = torchvision_state_dict(state, arch, model.state_dict(), str(checkpoint))
    model.load_state_dict(weights)
    names, categories = _class_names(class_names, num_classes)
    with claim_run_folder(out_dir):  # a run folder of ours, which `rcnn train --resume` may continue
        save_checkpoint(
            out_dir, 0, model, config_yaml=config_to_yaml(resolved_config(config, model)), class_names=names,
            categories=categories,
            extra_state={"converted_from": {"file": str(checkpoint), "arch": arch}},
        )  # fmt: skip
        write_json(out_dir / "conversion.json", {"file": str(checkpoint), **report.as_dict()})
    log(str(report))
    return report
