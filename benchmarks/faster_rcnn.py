"""Faster R-CNN against its peer, torchvision's Faster R-CNN, on the same inputs in one process.

    python -m benchmarks.faster_rcnn [--quick] [--budget S] [--skip-accuracy]
    python -m benchmarks.faster_rcnn --skip-timing --budget S --accuracy-models ours_paper   # add a row

Measures, for ResNet-50-FPN and MobileNetV3-Large-FPN (torchvision's random initialisation with BatchNorm
statistics set from random images, copied into ours; ours with torchvision's anchor centres and RoIAlign
offset, so both do the same work; no downloads): inference seconds per image at 800x1066 and
512x512 (2 threads; resizing and post-processing included; the network sees exactly that size), one
training step on a batch of 2 at 512x512, and peak memory. Accuracy: both detectors built on the
*same* tiny backbone, anchors and settings, trained by the same loop for the same wall-clock budget on
the shapes data, then COCO AP on its val split; beside them our packaged config as it is (the paper's
RPN settings).
Writes ``benchmarks/results/faster_rcnn.json``.
"""

from __future__ import annotations

import argparse
import copy
import gc
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from benchmarks.harness import (
    accuracy_model_names,
    accuracy_provenance,
    command_line,
    keep_accuracy,
    merge_accuracy,
    peak_rss_mb,
    print_peak_rss,
    reset_peak_rss,
    shapes_data,
    table,
    time_pair,
    train_and_evaluate,
    write_result,
)
from rcnn.inference import Predictor
from rcnn.models import faster_rcnn

ARCHS = {
    "resnet50_fpn": (torchvision.models.detection.fasterrcnn_resnet50_fpn, {}),
    # torchvision's MobileNetV3 Faster R-CNN drops proposals scoring under 0.05
    "mobilenet_v3_fpn": (torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn, {"score_thresh": 0.05}),
}


def build(which: str, arch: str, height: int, width: int) -> nn.Module:
    """Our model (``which="ours"``) or torchvision's, same architecture and settings, processing exactly H x W."""
    small, large = min(height, width), max(height, width)
    peer_fn, rpn = ARCHS[arch]
    torch.manual_seed(0)
    # score threshold 0: both keep their 100 best detections, so post-processing does equal work
    # torchvision's geometry (anchors on cell corners, legacy RoIAlign): with the same weights the
    # two then propose nearly the same boxes (torchvision rounds its anchors to whole pixels), so
    # the heads and NMS do the same work
    if which == "ours":
        return faster_rcnn(
            arch, 91, min_size=small, max_size=large, rpn=rpn, roi={"score_thresh": 0.0}, anchor_offset=0.0, aligned=False
        )
    return peer_fn(weights=None, weights_backbone=None, num_classes=91, min_size=small, max_size=large, box_score_thresh=0.0)


def build_pair(arch: str, height: int, width: int) -> tuple[nn.Module, nn.Module]:
    """Our model and torchvision's (see :func:`build`), ours holding torchvision's random weights.

    Same weights, so the same proposals and the same work in the heads: left with their own random
    initialisations the two RPNs keep different numbers of proposals after NMS (1000 against 266
    for ResNet-50-FPN at 512x512), which would time the initialisations rather than the code.
    """
    ours, peer = build("ours", arch, height, width), build("peer", arch, height, width)
    calibrate_batchnorm(peer.backbone, height, width)
    copy_weights(peer, ours)
    return ours, peer


def calibrate_batchnorm(backbone: nn.Module, height: int, width: int, images: int = 4) -> None:
    """Set the BatchNorm statistics of a randomly initialised backbone from a few random images.

    Left at their initial values (mean 0, variance 1), MobileNetV3's activations shrink layer by
    layer to about 1e-8 at the FPN's output: every anchor then gets the same objectness, 0.5, and
    which 1000 anchors a detector proposes is down to how its top-k breaks ties, so two
    implementations would time different work. With the statistics of real activations, as any
    trained network has, the scores are distinct.
    """
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    g = torch.Generator().manual_seed(3)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    batch = torch.stack([(torch.rand(3, height, width, generator=g) - mean) / std for _ in range(images)])
    was_training = backbone.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batch
    backbone.train()
    with torch.no_grad():
        backbone(batch)
    backbone.train(was_training)


def copy_weights(peer: nn.Module, ours: nn.Module) -> None:
    """Load a torchvision detector's parameters and buffers into ours, matched in registration order.

    Our box deltas and mask logits have no background class where
    torchvision's do, so the peer's leading background rows (4 deltas, 1 mask) are dropped; every
    other tensor must match the peer's one for one in shape.
    """
    mine = {k: v for k, v in ours.state_dict().items() if "num_batches_tracked" not in k}
    theirs = {k: v for k, v in peer.state_dict().items() if "num_batches_tracked" not in k}
    if len(mine) != len(theirs):
        raise ValueError(f"{len(mine)} tensors in our model, {len(theirs)} in torchvision's")
    state = {}
    for (key, own), (peer_key, value) in zip(mine.items(), theirs.items()):
        extra = value.shape[0] - own.shape[0] if value.dim() == own.dim() else 0
        if extra in (1, 4) and value.shape[1:] == own.shape[1:] and peer_key.endswith(("bbox_pred.weight", "bbox_pred.bias", "mask_fcn_logits.weight", "mask_fcn_logits.bias")):
            value = value[extra:]  # the background class's rows
        if own.shape != value.shape:
            raise ValueError(f"{key} {tuple(own.shape)} against {peer_key} {tuple(value.shape)}")
        state[key] = value
    ours.load_state_dict(state, strict=False)


def inference(arch: str, size: tuple[int, int], rounds: int) -> dict[str, Any]:
    ours, peer = build_pair(arch, *size)
    ours.eval().optimize_for_inference()
    peer.eval()
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(1))
    predictor = Predictor(ours)  # ours through the library's inference path; torchvision's model as it is
    with torch.inference_mode():
        result = time_pair(lambda: predictor.detect([image]), lambda: peer([image]), rounds=rounds)
    return {"arch": arch, "size": list(size), **result}


def train_step(arch: str, size: tuple[int, int], rounds: int) -> dict[str, Any]:
    ours, peer = build_pair(arch, *size)
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, *size, generator=g) for _ in range(2)]
    targets = []
    for _ in images:
        xy = torch.rand(3, 2, generator=g) * (min(size) / 2)
        wh = torch.rand(3, 2, generator=g) * (min(size) / 3) + 16
        targets.append({"boxes": torch.cat((xy, xy + wh), 1), "labels": torch.randint(1, 91, (3,), generator=g)})

    def stepper(model: nn.Module):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

        def step() -> None:
            losses = model(images, copy.deepcopy(targets))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()

        return step

    return {"arch": arch, "size": list(size), "batch": 2, **time_pair(stepper(ours), stepper(peer), rounds=rounds)}


def _memory_probe(which: str, arch: str, height: int, width: int) -> None:
    """Run inference in this process and report the peak memory of that alone (for ``peak_rss_mb``)."""
    ours, peer = build_pair(arch, height, width)
    model = Predictor(ours.eval().optimize_for_inference()).detect if which == "ours" else peer.eval()
    del ours, peer  # only the measured model stays alive
    gc.collect()
    reset_peak_rss()
    with torch.inference_mode():
        for _ in range(2):
            model([torch.rand(3, height, width)])
    print_peak_rss()


class Features(nn.Module):
    """Present our tiny backbone's body the way torchvision's detectors expect a backbone."""

    def __init__(self, body: nn.Module, forward: Any, out_channels: int) -> None:
        super().__init__()
        self.body, self._forward, self.out_channels = body, forward, out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return OrderedDict([("0", self._forward(self.body, x)[0])])


def tiny_pair(num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Ours and torchvision's Faster R-CNN on the same tiny backbone, anchors, head and settings."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    from rcnn.components.backbones import build_backbone
    from rcnn.components.box_heads import MLPHead
    from rcnn.config import load_config

    cfg = load_config("faster_rcnn_tiny_shapes").model
    torch.manual_seed(0)
    ours = faster_rcnn(
        "tiny", num_classes, min_size=cfg.min_size, max_size=cfg.max_size, anchor_sizes=cfg.anchor_sizes,
        rpn={**cfg.rpn.given(), "allowed_border": None, "loss_normalization": "batch", "beta": 1 / 9},
        roi={**cfg.roi.given(), "predictor_init": "uniform"}, pooler="align",
        # torchvision's geometry too: anchors centred on cell corners, legacy RoIAlign. With these
        # and the same weights the two give identical detections (checked to the last digit).
        anchor_offset=0.0, aligned=False,
    )  # fmt: skip
    torch.manual_seed(0)
    backbone = build_backbone("tiny").backbone
    s = ours.rpn.settings
    r = ours.roi_heads.settings
    peer = FasterRCNN(
        Features(backbone.body, backbone._body_forward, backbone.out_channels),
        rpn_anchor_generator=AnchorGenerator((tuple(cfg.anchor_sizes[0]),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        box_head=MLPHead(backbone.out_channels, 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        min_size=cfg.min_size, max_size=cfg.max_size,
        rpn_pre_nms_top_n_train=s.pre_nms_top_n_train, rpn_post_nms_top_n_train=s.post_nms_top_n_train,
        rpn_pre_nms_top_n_test=s.pre_nms_top_n_test, rpn_post_nms_top_n_test=s.post_nms_top_n_test,
        box_batch_size_per_image=r.batch_size_per_image, box_nms_thresh=r.nms_thresh,
    )  # fmt: skip
    return ours, peer


ACCURACY_MODELS = {
    "ours": "rcnn, torchvision's settings (initialisation, anchor centres, RoIAlign offset)",
    "peer": "torchvision",
    "ours_paper": "rcnn, packaged config (paper RPN loss, cross-border anchors ignored)",
}


def accuracy(budget_s: float, data_root: Path, names: Sequence[str] = tuple(ACCURACY_MODELS)) -> dict[str, Any]:
    """Tiny detectors trained by the same loop for ``budget_s`` seconds; COCO AP on shapes val.

    ``ours`` and ``peer`` share every setting (:func:`tiny_pair`); ``ours_paper`` is the packaged
    config ``faster_rcnn_tiny_shapes`` as it is, with the Faster R-CNN paper's RPN loss
    normalisation and cross-border anchors ignored in training.
    """
    from rcnn.build import build_model
    from rcnn.config import load_config

    out: dict[str, Any] = {"budget_s": budget_s}
    data = shapes_data("faster_rcnn_tiny_shapes", data_root)
    out.update(train_images=len(data.train), val_images=len(data.val))
    pair = dict(zip(("ours", "peer"), tiny_pair(data.train.num_classes))) if {"ours", "peer"} & set(names) else {}
    for name in names:
        if name == "ours_paper":
            torch.manual_seed(0)
            model = build_model(load_config("faster_rcnn_tiny_shapes").model, data.train.num_classes)
        else:
            model = pair[name]
        out[name] = train_and_evaluate(model, "faster_rcnn_tiny_shapes", data, budget_s, f"frcnn_{name}")
        print(name, out[name], flush=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    rows = [[r["arch"], f"{r['size'][0]}x{r['size'][1]}", r["ours_cpu_s"], r["peer_cpu_s"], r["ratio_cpu"],
             r["ours_wall_s"], r["peer_wall_s"], r["ratio_wall"]] for r in result["inference"]]  # fmt: skip
    parts = ["Inference, one image, seconds (best of the rounds; CPU = all threads):", "",
             table(["architecture", "size", "ours CPU", "torchvision CPU", "ratio CPU", "ours wall",
                    "torchvision wall", "ratio wall"], rows)]  # fmt: skip
    rows = [[r["arch"], f"{r['batch']} x {r['size'][0]}x{r['size'][1]}", r["ours_cpu_s"], r["peer_cpu_s"], r["ratio_cpu"],
             r["ours_wall_s"], r["peer_wall_s"], r["ratio_wall"]] for r in result["train_step"]]  # fmt: skip
    parts += ["", "One training step (forward, backward, SGD), seconds:", "",
              table(["architecture", "batch", "ours CPU", "torchvision CPU", "ratio CPU", "ours wall",
                     "torchvision wall", "ratio wall"], rows)]  # fmt: skip
    if result.get("memory"):
        rows = [[m["arch"], f"{m['size'][0]}x{m['size'][1]}", m["ours_mb"], m["peer_mb"], m["ours_mb"] / m["peer_mb"]]
                for m in result["memory"]]  # fmt: skip
        parts += ["", "Peak resident memory of a process running inference, MiB:", "",
                  table(["architecture", "size", "ours", "torchvision", "ratio"], rows)]  # fmt: skip
    acc = result.get("accuracy")
    if acc:
        rows = [[n, acc[k]["iterations"], acc[k]["train_s"], acc[k]["AP"], acc[k]["AP50"], acc[k]["ms_per_image"]]
                for k, n in ACCURACY_MODELS.items() if k in acc]  # fmt: skip
        parts += ["", f"Accuracy on shapes val ({acc['val_images']} images) after {acc['budget_s']:.0f} s of training "
                  f"on {acc['train_images']} images, same tiny backbone, anchors, heads and loop:", "",
                  table(["library", "iterations", "train s", "AP", "AP@0.5", "ms/image"], rows)]  # fmt: skip
        if "ours" in acc and "peer" in acc:
            gap = acc["ours"]["AP"] - acc["peer"]["AP"]
            line = (f"With torchvision's settings ours {'leads' if gap >= 0 else 'trails'} torchvision by {abs(gap):.3f} AP "
                    f"at this budget, having made {acc['ours']['iterations']} steps against {acc['peer']['iterations']}")
            if "ours_paper" in acc:
                line += (f"; the packaged config (the papers' predictor initialisation, anchors at cell centres, "
                         f"aligned RoIAlign, the paper's RPN loss) reaches {acc['ours_paper']['AP']:.3f}")
            parts += ["", line + ". Same weights and settings give identical detections from the two libraries, so "
                      "the difference at an equal budget is the number of steps each makes in it, and the "
                      "randomness of sampling."]  # fmt: skip
        parts += accuracy_provenance(result, ACCURACY_MODELS)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, a shorter training budget")
    parser.add_argument("--skip-accuracy", action="store_true",
                        help="only the timings; the accuracy part of the existing results file is kept")
    parser.add_argument("--budget", type=float, help="training seconds per detector for the accuracy part")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default="data/shapes", help="shapes data root (generated if absent)")
    parser.add_argument("--skip-timing", action="store_true",
                        help="only the accuracy part, merged into the existing results file (same budget)")
    parser.add_argument("--accuracy-models", default=",".join(ACCURACY_MODELS),
                        help=f"comma-separated, of {', '.join(ACCURACY_MODELS)}")
    parser.add_argument("--memory-probe", nargs=4, metavar=("WHICH", "ARCH", "H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        which, arch, h, w = args.memory_probe
        _memory_probe(which, arch, int(h), int(w))
        return {}
    rounds = 3 if args.quick else 5
    command = command_line("benchmarks.faster_rcnn", argv)
    names = accuracy_model_names(parser, args.accuracy_models, ACCURACY_MODELS)
    budget = args.budget or (120.0 if args.quick else 600.0)
    if args.skip_timing:
        result = merge_accuracy("faster_rcnn", budget, names, command, lambda: accuracy(budget, Path(args.data), names))
        print(markdown(result))
        return result
    result: dict[str, Any] = {"inference": [], "train_step": [], "memory": []}
    for arch in ARCHS:
        for size in ((800, 1066), (512, 512)):
            result["inference"].append(inference(arch, size, rounds))
            print(result["inference"][-1], flush=True)
        result["train_step"].append(train_step(arch, (512, 512), rounds))
        print(result["train_step"][-1], flush=True)
        mem = {"arch": arch, "size": [800, 1066]}
        for which in ("ours", "peer"):
            mem[f"{which}_mb"] = peak_rss_mb("benchmarks.faster_rcnn", "--memory-probe", which, arch, "800", "1066")
        result["memory"].append(mem)
        print(mem, flush=True)
    if args.skip_accuracy:
        keep_accuracy("faster_rcnn", result)
    else:
        result["accuracy"] = accuracy(budget, Path(args.data), names)
    write_result("faster_rcnn", result, command)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
