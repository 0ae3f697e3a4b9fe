"""Mask R-CNN against torchvision's Mask R-CNN, and the seed's RoIAlign-versus-RoIPool claim.

    python -m benchmarks.mask_rcnn [--quick] [--skip-accuracy]
    python -m benchmarks.mask_rcnn --skip-timing --budget S --accuracy-models ours_align   # retrain a row
    python -m benchmarks.mask_rcnn --skip-timing --accuracy-models "" --equal-steps 1500  # only the equal-steps pair
    python -m benchmarks.mask_rcnn --skip-timing --accuracy-models "" --seeds 1,2  # only the seed repeats

- Inference seconds per image, ResNet-50-FPN, torchvision's random initialisation copied into
  ours, same input, both keeping their 100 best detections (so the mask head does the same
  work), 2 threads.
- Accuracy at an equal training budget on the shapes data: ours and torchvision's built on the
  same tiny backbone, anchors, box head and mask head (7 x 7 RoIAlign, 2 x 16 convolutions,
  14 x 14 masks: the packaged config's), trained by the same loop.
- Ablation (Mask R-CNN §3, Table 2c): the same model with RoI max pooling instead of RoIAlign in
  both branches, trained the same budget; mask AP, AP@0.5 and AP@0.75.
- The same RoIAlign model without its mask branch (a Faster R-CNN), trained the same budget: box AP
  with and without masks, also over more seeds (``--seeds``: weight initialisation, data order and
  augmentation), since one run's box AP moves by about 0.01 from seed to seed; and both trained the
  same number of steps (``--equal-steps``), where the paper's claim that the mask branch helps the
  boxes (Table 3) can be seen apart from its cost.

Writes ``benchmarks/results/mask_rcnn.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision

from benchmarks.harness import (
    accuracy_model_names,
    accuracy_provenance,
    command_line,
    keep_accuracy,
    merge_accuracy,
    rewrite_result,
    shapes_data,
    table,
    time_pair,
    train_and_evaluate,
    write_result,
)
from benchmarks.faster_rcnn import Features, calibrate_batchnorm, copy_weights
from rcnn.inference import Predictor
from rcnn.models import mask_rcnn

CONFIG = "mask_rcnn_tiny_shapes"
ACCURACY_MODELS = {
    "ours_align": "rcnn, RoIAlign",
    "ours_pool": "rcnn, RoIPool",
    "peer": "torchvision, RoIAlign",
    "faster": "rcnn Faster R-CNN: the RoIAlign model without its mask branch",
}


def inference(size: tuple[int, int], rounds: int) -> dict[str, Any]:
    small, large = min(size), max(size)
    torch.manual_seed(0)
    ours = mask_rcnn(
        "resnet50_fpn", 91, min_size=small, max_size=large, roi={"score_thresh": 0.0}, anchor_offset=0.0, aligned=False
    )  # torchvision's geometry, as in benchmarks.faster_rcnn.build
    peer = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=small, max_size=large, box_score_thresh=0.0
    )
    calibrate_batchnorm(peer.backbone, *size)
    copy_weights(peer, ours)  # same weights, same proposals: see benchmarks.faster_rcnn.build_pair
    ours.eval().optimize_for_inference()
    peer.eval()
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(1))
    predictor = Predictor(ours)  # ours through the library's inference path; torchvision's model as it is
    with torch.inference_mode():
        result = time_pair(lambda: predictor.detect([image]), lambda: peer([image]), rounds=rounds)
    return {"arch": "resnet50_fpn", "size": list(size), **result}


def tiny_models(num_classes: int, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Ours (RoIAlign and RoIPool) and torchvision's, on the same tiny backbone and heads; each
    initialised from the random state ``seed``."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    from rcnn.build import build_model
    from rcnn.components.backbones import build_backbone
    from rcnn.components.box_heads import MLPHead
    from rcnn.components.mask_heads import MaskSettings
    from rcnn.config import MODEL_SECTIONS, load_config

    cfg = load_config(CONFIG).model
    modern_rpn = ["model.rpn.allowed_border=null", "model.rpn.loss_normalization=batch", "model.rpn.beta=0.111"]
    models = {}
    for pooler in ("align", "pool"):
        torch.manual_seed(seed)
        models[f"ours_{pooler}"] = build_model(load_config(CONFIG, [f"model.pooler={pooler}", *modern_rpn]).model, num_classes)
    # for box AP with and without masks: the very same model and settings, no mask branch
    torch.manual_seed(seed)
    section = load_config(CONFIG, ["model.pooler=align", *modern_rpn]).model.model_dump()
    for mask_option in ("mask", "mask_probabilities"):
        section.pop(mask_option)
    models["faster"] = build_model(MODEL_SECTIONS["faster_rcnn"].model_validate({**section, "name": "faster_rcnn"}), num_classes)
    torch.manual_seed(seed)
    backbone = build_backbone("tiny").backbone
    rpn, roi = models["ours_align"].rpn.settings, models["ours_align"].roi_heads.settings
    mask = MaskSettings().merged(cfg.mask, "mask")
    models["peer"] = MaskRCNN(
        Features(backbone.body, backbone._body_forward, backbone.out_channels),
        rpn_anchor_generator=AnchorGenerator((tuple(cfg.anchor_sizes[0]),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        box_head=MLPHead(backbone.out_channels, 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(["0"], mask.pool_size, 2),
        mask_head=MaskRCNNHeads(backbone.out_channels, [mask.channels] * mask.num_convs, 1),
        mask_predictor=MaskRCNNPredictor(mask.channels, mask.channels, num_classes),
        min_size=cfg.min_size, max_size=cfg.max_size,
        rpn_pre_nms_top_n_train=rpn.pre_nms_top_n_train, rpn_post_nms_top_n_train=rpn.post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn.pre_nms_top_n_test, rpn_post_nms_top_n_test=rpn.post_nms_top_n_test,
        box_batch_size_per_image=roi.batch_size_per_image, box_nms_thresh=roi.nms_thresh,
    )  # fmt: skip
    return models


def accuracy(budget_s: float, data_root: Path, names: Sequence[str] = tuple(ACCURACY_MODELS)) -> dict[str, Any]:
    data = shapes_data(CONFIG, data_root)
    out: dict[str, Any] = {"budget_s": budget_s, "train_images": len(data.train), "val_images": len(data.val)}
    models = tiny_models(data.train.num_classes)
    for name in names:
        out[name] = train_and_evaluate(models[name], CONFIG, data, budget_s, f"mask_{name}")
        print(name, out[name], flush=True)
    return out


def equal_steps(steps: int, data_root: Path) -> dict[str, Any]:
    """Box AP with and without the mask branch after the same number of steps (the config's schedule
    spread over ``steps``): the same RoIAlign model, with and without its mask branch."""
    data = shapes_data(CONFIG, data_root)
    models = tiny_models(data.train.num_classes)
    out: dict[str, Any] = {"iterations": steps}
    for name in ("ours_align", "faster"):
        out[name] = train_and_evaluate(models[name], CONFIG, data, None, f"mask_steps_{name}", iterations=steps)
        print("equal steps", name, out[name], flush=True)
    return out


def seed_repeats(budget_s: float, data_root: Path, seeds: Sequence[int]) -> dict[str, Any]:
    """The RoIAlign model with and without its mask branch trained again from other seeds (weights,
    data order, augmentation), same budget: ``{"seeds": [...], "ours_align": [row, ...], "faster": [...]}``."""
    data = shapes_data(CONFIG, data_root)
    out: dict[str, Any] = {"seeds": list(seeds), "ours_align": [], "faster": []}
    for seed in seeds:
        models = tiny_models(data.train.num_classes, seed)
        for name in ("ours_align", "faster"):
            out[name].append(train_and_evaluate(models[name], CONFIG, data, budget_s, f"mask_{name}_{seed}", seed=seed))
            print("seed", seed, name, out[name][-1], flush=True)
    return out


def box_ap_differences(acc: dict[str, Any]) -> list[float]:
    """Box AP with masks minus without, seed by seed: seed 0 (the table's rows), then the repeats."""
    rep = acc.get("repeats") or {"ours_align": [], "faster": []}
    diffs = [acc["ours_align"]["AP"] - acc["faster"]["AP"]]
    return diffs + [m["AP"] - f["AP"] for m, f in zip(rep["ours_align"], rep["faster"], strict=True)]


def _over_seeds(acc: dict[str, Any]) -> list[str]:
    """Markdown: box AP with and without masks over seed 0 (the table's rows) and the repeats."""
    rep = acc.get("repeats")
    if not rep or "ours_align" not in acc or "faster" not in acc:
        return []
    seeds = [0, *rep["seeds"]]
    rows, means = [], {}
    for key, title in (("ours_align", "with the mask branch"), ("faster", "without it")):
        values = [acc[key]["AP"], *(r["AP"] for r in rep[key])]
        means[key] = sum(values) / len(values)
        rows.append([title, *values, means[key]])
    diffs = box_ap_differences(acc)
    text = [
        "", f"Box AP over {len(seeds)} seeds (weights, data order and augmentation; seed 0 is the table above), "
        f"same budget:", "",
        table(["model", *(f"seed {s}" for s in seeds), "mean"], rows), "",
        f"With masks minus without, seed by seed: {', '.join(f'{d:+.3f}' for d in diffs)} (mean "
        f"{means['ours_align'] - means['faster']:+.3f}).",
    ]  # fmt: skip
    if "command" in rep:
        text[-1] += f" Seeds {', '.join(map(str, rep['seeds']))} trained afterwards by `{rep['command']}`."
    return text


def markdown(result: dict[str, Any]) -> str:
    rows = [[f"{r['size'][0]}x{r['size'][1]}", r["ours_cpu_s"], r["peer_cpu_s"], r["ratio_cpu"], r["ours_wall_s"],
             r["peer_wall_s"], r["ratio_wall"]] for r in result["inference"]]  # fmt: skip
    parts = ["Inference, ResNet-50-FPN, one image, 100 detections with masks, seconds:", "",
             table(["size", "ours CPU", "torchvision CPU", "ratio CPU", "ours wall", "torchvision wall", "ratio wall"], rows)]  # fmt: skip
    acc = result.get("accuracy")
    if acc:
        rows = [[n, acc[k]["iterations"], acc[k]["AP"], acc[k].get("mask_AP", ""), acc[k].get("mask_AP50", ""),
                 acc[k].get("mask_AP75", "")] for k, n in ACCURACY_MODELS.items() if k in acc]  # fmt: skip
        parts += ["", f"Shapes val ({acc['val_images']} images) after {acc['budget_s']:.0f} s of training on "
                  f"{acc['train_images']} images, same tiny backbone and heads:", "",
                  table(["model", "iterations", "box AP", "mask AP", "mask AP@0.5", "mask AP@0.75"], rows)]  # fmt: skip
        if "ours_align" in acc and "faster" in acc:
            m, f = acc["ours_align"], acc["faster"]
            per_step = (m["train_s"] / max(m["iterations"], 1)) / (f["train_s"] / max(f["iterations"], 1))
            parts += ["", f"Box AP with the mask branch {m['AP']:.3f} (AP@0.5 {m['AP50']:.3f}), without it {f['AP']:.3f} "
                      f"(AP@0.5 {f['AP50']:.3f}): same model, data and budget; a step with masks costs {per_step:.2f}x "
                      f"one without ({m['iterations']} steps against {f['iterations']})."]  # fmt: skip
        parts += _over_seeds(acc)
        steps = result.get("equal_steps")
        if steps:
            m, f = steps["ours_align"], steps["faster"]
            parts += ["", f"At an equal number of steps instead ({steps['iterations']} each, the schedule spread over them): "
                      f"box AP with the mask branch {m['AP']:.3f} (AP@0.5 {m['AP50']:.3f}), without it {f['AP']:.3f} "
                      f"(AP@0.5 {f['AP50']:.3f}); {m['train_s']:.0f} s of training against {f['train_s']:.0f} s."]  # fmt: skip
            if "command" in steps:
                parts[-1] += f" Measured afterwards by `{steps['command']}`."
        parts += accuracy_provenance(result, ACCURACY_MODELS)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true",
                        help="only the timings; the accuracy part of the existing results file is kept")
    parser.add_argument("--budget", type=float, help="training seconds per model (default 600, quick 120)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default="data/shapes")
    parser.add_argument("--skip-timing", action="store_true",
                        help="only the accuracy part, merged into the existing results file (same budget)")
    parser.add_argument("--accuracy-models", default=",".join(ACCURACY_MODELS),
                        help=f"comma-separated, of {', '.join(ACCURACY_MODELS)}")
    parser.add_argument("--seeds", type=_seed_list,
                        help="comma-separated extra seeds for the RoIAlign model with and without masks at the "
                             "same budget (default 1,2, quick none; with --skip-timing only when given)")
    parser.add_argument("--equal-steps", type=int,
                        help="also train the RoIAlign model with and without masks this many steps each "
                             "(default 1500, quick 300; 0: not; with --skip-timing only when given)")
    args = parser.parse_args(argv)
    if args.equal_steps is not None and args.equal_steps < 0:
        parser.error(f"--equal-steps must be >= 0, got {args.equal_steps}")
    torch.set_num_threads(args.threads)
    names = accuracy_model_names(parser, args.accuracy_models, ACCURACY_MODELS)
    budget = args.budget or (120.0 if args.quick else 600.0)
    command = command_line("benchmarks.mask_rcnn", argv)
    steps = args.equal_steps if args.equal_steps is not None else (300 if args.quick else 1500)
    seeds = args.seeds if args.seeds is not None else ([] if args.quick else [1, 2])
    if args.skip_timing:
        result = merge_accuracy("mask_rcnn", budget, names, command, lambda: accuracy(budget, Path(args.data), names))
        if args.seeds:
            result["accuracy"]["repeats"] = {**seed_repeats(budget, Path(args.data), args.seeds), "command": command}
            rewrite_result("mask_rcnn", result)
        if args.equal_steps:
            result["equal_steps"] = {**equal_steps(args.equal_steps, Path(args.data)), "command": command}
            rewrite_result("mask_rcnn", result)
        print(markdown(result))
        return result
    rounds = 3 if args.quick else 5
    result: dict[str, Any] = {"inference": []}
    for size in ((800, 1066), (512, 512)):
        result["inference"].append(inference(size, rounds))
        print(result["inference"][-1], flush=True)
    if args.skip_accuracy:
        keep_accuracy("mask_rcnn", result)
    else:
        result["accuracy"] = accuracy(budget, Path(args.data), names)
        if seeds:
            result["accuracy"]["repeats"] = seed_repeats(budget, Path(args.data), seeds)
        if steps:
            result["equal_steps"] = equal_steps(steps, Path(args.data))
    write_result("mask_rcnn", result, command)
    print(markdown(result))
    return result


def _seed_list(value: str) -> list[int]:
    try:
        seeds = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if 0 in seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct and not 0 (seed 0 trains the table's rows), got {value!r}")
    return seeds


if __name__ == "__main__":
    main()
