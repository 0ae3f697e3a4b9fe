"""Faster R-CNN on real photographs from random initialisation: our photographs recipe against
torchvision's same detector and against our previous setting, under one wall-clock budget.

    python -m benchmarks.raccoon [--quick] [--budget S] [--models NAME ...] [--ablation] [--split-seed N]

The raccoon photographs (``../shared/data/raccoon``: 200 photographs, LabelImg XML, one class)
with their author's split (images 1-160 train, 161-200 val; ``--split-seed N`` draws another
160/40 split), written as split files with an ``rcnn_dataset.json`` into a temporary folder (the
data is read in place). Each detector is trained by the library's loop for the same wall-clock
budget with the same image sizes and batch, then evaluated on val by the same COCO evaluator
(pycocotools):

- ``ours``: the packaged photographs recipe (``rcnn/configs/faster_rcnn_photos.yaml``, what
  ``rcnn train --data FOLDER`` trains): its backbone, heads, losses, augmentation and schedule;
- ``previous``: the setting this benchmark used before that recipe (every ingredient of
  :data:`INGREDIENTS` off: MobileNetV3-FPN at stride 32, torchvision's RoI/RPN sampling sizes,
  smooth L1, flips only);
- ``peer``: torchvision's ``fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)``,
  trained by the same loop with the recipe's schedule and augmentation;
- ``ours_pretrained`` (only with ``--models``): ``previous`` from a backbone pre-trained first
  (``--pretrain-budget`` seconds, not counted in the detector's budget) by ``rcnn pretrain``'s code.

``--ablation`` adds ``ours`` with each ingredient of :data:`INGREDIENTS` turned off in turn.
Writes ``benchmarks/results/raccoon.json`` (``raccoon_seedN.json`` for another split,
``raccoon_1800s.json`` for another budget, ``raccoon_260steps.json`` for ``--iterations 260``:
:func:`result_name`) and, with ``--picture``, a picture of the detectors' predictions on val
photographs. The page's section (:func:`markdown` of ``raccoon.json``) adds the curve of AP
against the budget from every budget measured, and the recipe's ablation at equal steps
(``raccoon_steps.json``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from benchmarks.harness import ROOT, command_line, read_result, table, write_result
from rcnn.build import build_model
from rcnn.config import Config, TrainConfig, load_config
from rcnn.data import build_dataset

DATA = ROOT.parent / "shared" / "data" / "raccoon"
TRAIN_IMAGES, VAL_IMAGES = range(1, 161), range(161, 201)  # the author's split, by image number
MODELS = {
    "ours": "rcnn, photographs recipe",
    "previous": "rcnn, previous setting",
    "peer": "torchvision, same loop and budget",
    "ours_pretrained": "rcnn, previous setting, backbone from `rcnn pretrain`",
}
DEFAULT_MODELS = ("ours", "previous", "peer")
RECIPE = "faster_rcnn_photos"  # the packaged config of `rcnn train --data FOLDER`
# Each ingredient of the recipe, as the --set overrides that turn it off (the previous setting: all off).
INGREDIENTS: dict[str, list[str]] = {
    "lighter step (128 RoIs, 1000/500 proposals)": [
        "model.roi.batch_size_per_image=512", "model.rpn.pre_nms_top_n_train=2000", "model.rpn.post_nms_top_n_train=2000"],
    "GIoU box loss": ["model.roi.box_loss=smooth_l1", "model.roi.box_loss_weight=1.0"],
}
# shared by every training
MIN_SIZE, MAX_SIZE = 320, 640  # torchvision's low-resolution MobileNetV3 detector's sizes
BATCH, LR = 4, 0.02


def random_split(seed: int) -> tuple[list[int], list[int]]:
    """Another 160 / 40 split of the 200 photographs, drawn with ``seed`` (image numbers, sorted)."""
    import random

    numbers = list(range(1, 201))
    random.Random(seed).shuffle(numbers)
    return sorted(numbers[:160]), sorted(numbers[160:])


def author_split(data: Path, folder: Path, train: Sequence[int] = TRAIN_IMAGES, val: Sequence[int] = VAL_IMAGES) -> Path:
    """Write the author's split of the raccoon photographs into ``folder`` (``train.txt``, ``val.txt``
    and an ``rcnn_dataset.json`` naming the data in place): a data set path for ``build_dataset``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, numbers in (("train", train), ("val", val)):
        (folder / f"{name}.txt").write_text("".join(f"raccoon-{i}\n" for i in numbers), encoding="utf-8")
    spec = {"format": "labelimg", "root": str(data.resolve()), "annotations": str((data / "annotations").resolve()),
            "images": str((data / "images").resolve())}  # fmt: skip
    (folder / "rcnn_dataset.json").write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    return folder


EXTRA: list[str] = []  # --set overrides of the recipe (every row that trains it), recorded in the result


def recipe(off: Sequence[str] = ()) -> Config:
    """The photographs recipe with the ingredients named in ``off`` turned off, at this benchmark's
    image sizes and batch (the recipe's own, unless a smoke run changes them), and :data:`EXTRA`."""
    overrides = [o for name in off for o in INGREDIENTS[name]]
    sizes = [f"model.min_size={MIN_SIZE}", f"model.max_size={MAX_SIZE}", f"train.batch_size={BATCH}", f"train.lr={LR}",
             f"train.lr_batch_size={BATCH}"]  # fmt: skip
    return load_config(RECIPE, [*overrides, *sizes, *EXTRA])


def model_recipe(name: str) -> Config:
    """The config a row of the table trains with (the peer: the recipe's schedule and augmentation)."""
    if name in ("previous", "ours_pretrained"):
        return recipe(tuple(INGREDIENTS))
    if name.startswith("ours -"):
        return recipe((name.removeprefix("ours -"),))
    return recipe()


def train_config(config: Config, budget_s: float | None, iterations: int | None = None) -> TrainConfig:
    """``config``'s training section bounded by the budget (or ``iterations``), without checkpoints or logs."""
    return config.train.model_copy(update={
        "iterations": iterations or 10**7, "time_budget_s": budget_s if iterations is None else None,
        "checkpoint_every": 10**9, "log_every": 10**9, "seed": 0})  # fmt: skip


def build(name: str, num_classes: int, pretrained: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    if name == "peer":
        return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
            weights=None, weights_backbone=None, num_classes=num_classes, min_size=MIN_SIZE, max_size=MAX_SIZE
        )
    section = model_recipe(name).model
    if pretrained is not None:
        section = section.model_copy(update={"pretrained_backbone": pretrained})
    return build_model(section, num_classes)


def pretrain_backbone(train_set: Any, val_set: Any, budget_s: float | None, out: Path, iterations: int | None = None) -> dict[str, Any]:
    """``rcnn pretrain``'s path: MobileNetV3 classifying 128-px crops of raccoons against background regions."""
    from rcnn.config import TrainConfig
    from rcnn.training.pretrain import CropDataset, pretrain

    crops = CropDataset(train_set, 128, background=True)
    val_crops = CropDataset(val_set, 128, augment=False, background=True)
    cfg = TrainConfig(
        iterations=iterations or 10**7, time_budget_s=budget_s if iterations is None else None, batch_size=min(32, len(crops)),
        lr=0.02, schedule="cosine", warmup_iterations=20, checkpoint_every=10**9, log_every=10**9, weight_decay=1e-4,
    )  # fmt: skip
    summary = pretrain("mobilenet_v3_fpn", crops, len(crops.class_names), cfg, out, val_set=val_crops, overwrite=True,
                       progress=False, log=lambda s: None)  # fmt: skip
    return {"iterations": summary["iterations"], "train_s": summary["train_seconds"], "crops": len(crops),
            "val_accuracy": summary["metrics"].get("top1"), "weights": summary["weights"]}  # fmt: skip


def train_and_evaluate(
    model: nn.Module, data: Any, budget_s: float | None, run_dir: Path, iterations: int | None = None, config: Config | None = None
) -> dict[str, Any]:
    """Train ``model`` with ``config``'s schedule and augmentation (default the recipe's) and evaluate
    it on val (with a weight EMA, the averaged weights: those a run folder keeps)."""
    from safetensors.torch import load_file

    from rcnn.data.transforms import augmentation
    from rcnn.inference import evaluate_model
    from rcnn.training.datasets import TrainingSet
    from rcnn.training.loop import train

    config = config or recipe()
    cfg = train_config(config, budget_s, iterations)
    transforms = augmentation(config.data.hflip, config.data.scale_jitter, config.data.color_jitter)
    result = train(model, TrainingSet(data["train"], transforms), cfg, run_dir, progress=False, log=lambda s: None)
    if cfg.ema_decay is not None and result.checkpoint is not None:
        model.load_state_dict(load_file(str(result.checkpoint / "model.safetensors")))
    metrics = evaluate_model(model, data["val"])
    return {"iterations": result.iterations, "train_s": result.seconds, "AP": metrics["bbox"]["AP"],
            "AP50": metrics["bbox"]["AP50"], "AP75": metrics["bbox"]["AP75"],
            "ms_per_image": 1000 * metrics["seconds_per_image"]}  # fmt: skip


def run(
    data_dir: Path,
    work: Path,
    budget_s: float | None,
    pretrain_budget_s: float | None,
    names: Sequence[str] = DEFAULT_MODELS,
    split: tuple[Sequence[int], Sequence[int]] = (TRAIN_IMAGES, VAL_IMAGES),
    iterations: int | None = None,
) -> tuple[dict[str, Any], dict[str, nn.Module], Any]:
    """Train and evaluate ``names``; returns the accuracy part, the trained models and the val set.

    ``iterations`` instead of budgets (the test's path): that many steps for every training."""
    folder = author_split(data_dir, work / "split", *split)
    data = {"train": build_dataset(folder, "train", train=True), "val": build_dataset(folder, "val")}
    num_classes = data["train"].num_classes
    out: dict[str, Any] = {"budget_s": budget_s, "fixed_iterations": iterations, "pretrain_budget_s": pretrain_budget_s, "train_images": len(data["train"]),
                           "val_images": len(data["val"]), "min_size": MIN_SIZE, "max_size": MAX_SIZE, "batch": BATCH,
                           "lr": LR, "class_names": list(data["train"].class_names)}  # fmt: skip
    models = {}
    for name in names:
        pretrained = None
        if name == "ours_pretrained":
            out["pretrain"] = pretrain_backbone(data["train"], data["val"], pretrain_budget_s, work / "pretrain", iterations)
            pretrained = out["pretrain"]["weights"]
            print("pretrain", out["pretrain"], flush=True)
        models[name] = build(name, num_classes, pretrained)
        out[name] = train_and_evaluate(models[name], data, budget_s, work / name.replace(" ", "_"), iterations,
                                       model_recipe("ours" if name == "peer" else name))  # fmt: skip
        print(name, out[name], flush=True)
    return out, models, data["val"]


def picture(models: dict[str, nn.Module], val: Any, path: Path, images: int = 4, score: float = 0.5) -> Path:
    """One row per val photograph, one column per detector: detections scoring ``score`` or more, ground truth dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = list(range(0, len(val), max(len(val) // images, 1)))[:images]
    fig, axes = plt.subplots(len(picks), len(models), figsize=(3.2 * len(models), 2.6 * len(picks)), squeeze=False)
    for row, index in enumerate(picks):
        image, target = val[index]
        for col, (name, model) in enumerate(models.items()):
            model.eval()
            with torch.inference_mode():
                det = model([image])[0]
            ax = axes[row][col]
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            for x1, y1, x2, y2 in target["boxes"].tolist():
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ls="--", lw=1.5, ec="white"))
            for (x1, y1, x2, y2), s in zip(det["boxes"].tolist(), det["scores"].tolist()):
                if s >= score:
                    ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2, ec="orange"))
                    ax.text(x1, y1, f"{s:.2f}", color="black", backgroundcolor="orange", fontsize=7, va="bottom")
            if row == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(f"val photographs: detections scoring {score} or more (orange), ground truth (dashed)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


CONVERT_COMMAND = ("rcnn convert torchvision fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth "
                   "--arch fasterrcnn_mobilenet_v3_large_fpn --out runs/coco_mobilenet")  # fmt: skip


def title(name: str) -> str:
    """A row's title: the detector's description, or the recipe without one ingredient."""
    return MODELS[name] if name in MODELS else f"rcnn, photographs recipe without {name.removeprefix('ours -')}"


DEFAULT_BUDGET = 600.0
# the from-scratch recipe's targets: (budget s, metric, its name, at least)
TARGETS = ((600.0, "AP50", "AP@0.5", 0.65), (1800.0, "AP50", "AP@0.5", 0.75), (1800.0, "AP", "AP", 0.35))


def result_name(split_seed: int | None = None, budget: float = DEFAULT_BUDGET, iterations: int | None = None,
                tag: str | None = None) -> str:  # fmt: skip
    """The result file of a run: ``raccoon`` for the author's split at the default budget,
    ``raccoon_1800s``, ``raccoon_seed1``, ``raccoon_260steps``, ``raccoon_1800s_jitter`` (``--tag``) ... otherwise."""
    name = "raccoon" if split_seed is None else f"raccoon_seed{split_seed}"
    if iterations is not None:
        name = f"{name}_{iterations}steps"
    elif budget != DEFAULT_BUDGET:
        name = f"{name}_{budget:g}s"
    return name if not tag else f"{name}_{tag}"


def budget_markdown() -> str:
    """The table of AP against the budget: every budget and split measured (``raccoon*.json``)."""
    import benchmarks.harness

    found = []
    for path in sorted(Path(benchmarks.harness.RESULTS).glob("raccoon*.json")):
        result = read_result(path.stem)
        acc = (result or {}).get("accuracy", {})
        if acc.get("budget_s") is None or acc.get("fixed_iterations") or acc.get("train_images", 0) < 100:
            continue  # steps, not a budget; a smoke run
        found.append((-1 if acc.get("split_seed") is None else acc["split_seed"], acc["budget_s"], bool(acc.get("overrides")), path.stem, result))
    rows = []
    for seed, budget, _, _, result in sorted(found, key=lambda f: f[:4]):
        acc = result["accuracy"]
        split = "author's" if seed == -1 else f"seed {seed}"
        extra = f" + `{' '.join(acc['overrides'])}`" if acc.get("overrides") else ""
        for name in [k for k in MODELS if k in acc]:
            a = acc[name]
            rows.append([title(name) + (extra if name == "ours" else ""), split, f"{budget:g}", a["iterations"], a["AP"],
                         a["AP50"], a.get("AP75"), result.get("machine", {}).get("date", "?")])  # fmt: skip
    if len(rows) < 2:
        return ""
    verdicts = []  # the targets, on the author's split, for the plain recipe
    plain = {budget: r["accuracy"]["ours"] for seed, budget, tagged, _, r in found
             if seed == -1 and not tagged and "ours" in r["accuracy"]}  # fmt: skip
    for budget, metric, label, target in TARGETS:
        if budget in plain:
            value = plain[budget][metric]
            verdicts.append(f"{label} >= {target} at {budget:g} s: {'met' if value >= target else 'missed'} ({value:.3f})")
    return "\n".join([
        "AP against the budget (each cell one training, the command of each in its result file, "
        "`benchmarks/results/raccoon*.json`; the targets of the from-scratch recipe: AP@0.5 >= 0.65 at 600 s, "
        "AP@0.5 >= 0.75 and AP >= 0.35 at 1800 s):", "",
        table(["detector", "split", "budget s", "steps", "AP", "AP@0.5", "AP@0.75", "measured"], rows),
        *(["", "The recipe's targets on the author's split: " + "; ".join(verdicts) + "."] if verdicts else [])])  # fmt: skip


def steps_markdown(result: dict[str, Any]) -> str:
    """The recipe ingredient by ingredient at equal steps (``benchmarks/results/raccoon_steps.json``)."""
    rows = [[(f"**{r['setting']}**" if r.get("recipe") else r["setting"]), r["steps"], r["cpu_s_per_step"],
             r["AP"], r["AP50"], r["AP75"]] for r in result["rows"]]  # fmt: skip
    return "\n".join(["### The photographs recipe, ingredient by ingredient (equal steps)", "", result["intro"], "",
                      table(["setting", "steps", "CPU-s per step (1 thread)", "AP", "AP@0.5", "AP@0.75"], rows), "",
                      *result["discussion"]])  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    acc = result["accuracy"]
    names = [k for k in MODELS if k in acc] + [k for k in acc if k.startswith("ours -")]
    rows = [[title(k), acc[k]["iterations"], acc[k]["train_s"], acc[k]["AP"], acc[k]["AP50"], acc[k].get("AP75"),
             acc[k]["ms_per_image"]] for k in names]  # fmt: skip
    split = ("the author's split, images 1-160 / 161-200" if acc.get("split_seed") is None
             else f"a random split drawn with seed {acc['split_seed']}")  # fmt: skip
    parts = [
        f"Faster R-CNN from random initialisation on the raccoon photographs (`../shared/data/raccoon`, read in place; "
        f"{split}: {acc['train_images']} train, {acc['val_images']} val), each detector trained for "
        + (f"{acc['fixed_iterations']} steps" if acc.get("fixed_iterations") else f"{acc['budget_s']:.0f} s of wall clock")
        + f" by the library's loop at {acc['min_size']} px on the short side (at "
        f"most {acc['max_size']}), batch {acc['batch']}, the photographs recipe's schedule (`{RECIPE}`: SGD lr "
        f"{acc['lr']}, warm-up then cosine over the budget) and augmentation; the previous setting with flips only. "
        "COCO AP on val by the library's evaluator (pycocotools):", "",
        table(["detector", "steps", "train s", "AP", "AP@0.5", "AP@0.75", "ms/image"], rows),
    ]  # fmt: skip
    parts += ["", "The split is two split files and an `rcnn_dataset.json` naming the photographs in place "
              "(what the benchmark writes into a temporary folder; `rcnn data split` would draw a random one):", "",
              "```sh", "mkdir -p splits/raccoon", "seq 1 160 | sed 's/^/raccoon-/' > splits/raccoon/train.txt",
              "seq 161 200 | sed 's/^/raccoon-/' > splits/raccoon/val.txt",
              """printf '{"format": "labelimg", "root": "%s"}\\n' "$(realpath ../shared/data/raccoon)" """
              "> splits/raccoon/rcnn_dataset.json", "```"]  # fmt: skip
    if "pretrain" in acc:
        p = acc["pretrain"]
        top1 = "accuracy not recorded" if p.get("val_accuracy") is None else f"{p['val_accuracy']:.3f} accuracy"
        parts += ["", f"The pre-trained backbone: `rcnn pretrain`'s code (`CropDataset(..., background=True)`, "
                  f"`pretrain`) trained MobileNetV3-Large for {p['train_s']:.0f} s ({p['iterations']} steps of 32) "
                  f"on {p['crops']} 128-px crops of the training photographs (raccoons and as many background "
                  f"regions), {top1} on the val photographs' crops; its time is not "
                  "counted in the detector's budget. From the command line:", "",
                  "```sh", "rcnn pretrain --backbone mobilenet_v3_fpn --data splits/raccoon --background --size 128 "
                  "--batch-size 32 --out runs/raccoon_backbone", "```"]  # fmt: skip
    parts += ["", "From COCO weights: torchvision's converted COCO checkpoint is not part of this table, as no "
              "torchvision checkpoint was on the measuring machine (`~/.cache/torch/hub` absent, nothing "
              "downloaded). Run it yourself: convert the checkpoint, then fine-tune it on the same split with the "
              "same settings ([convert.md](convert.md)):", "", "```sh", CONVERT_COMMAND,
              "rcnn train --config runs/coco_mobilenet/last/config.yaml --init-from runs/coco_mobilenet "
              "--out runs/raccoon_coco --set data.root=splits/raccoon --set model.min_size=320 "
              "--set model.max_size=640 --set train.batch_size=4 --set train.lr=0.02 --set train.schedule=cosine "
              "--set train.time_budget_s=600", "```"]  # fmt: skip
    if "int8" in acc:
        from benchmarks.backends import accuracy_markdown

        q = acc["int8"]
        parts += ["", f"The best rcnn detector here ({MODELS[q['model']]}) exported to ONNX and quantised to int8 "
                  f"(`rcnn export --int8 --calibrate`, {q['calibration_images']} training photographs), on the same "
                  "val photographs:", "", accuracy_markdown({"raccoon, " + q["model"]: q})]  # fmt: skip
    if result.get("picture"):
        parts += ["", f"![predictions of the three detectors on val photographs]({result['picture']})"]
    if result.get("wall_s"):
        parts += ["", f"The whole run (data, pre-training, three trainings, evaluations, picture) took "
                  f"{result['wall_s'] / 60:.0f} minutes of wall clock."]  # fmt: skip
    if result.get("notes"):
        parts += ["", result["notes"]]
    if result.get("benchmark") == "raccoon":  # the page's section: the budget curve and the equal-steps ablation
        curve = budget_markdown()
        if curve:
            parts += ["", curve]
        steps = read_result("raccoon_steps")
        if steps is not None:
            parts += ["", steps_markdown(steps)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter budgets (120 s, pre-training 60 s)")
    parser.add_argument("--budget", type=float, help="training seconds per detector (default 600; --quick 120)")
    parser.add_argument("--pretrain-budget", type=float, help="backbone pre-training seconds (default 300; --quick 60)")
    parser.add_argument("--data", default=str(DATA), help="the raccoon photographs (default ../shared/data/raccoon)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--picture", default="docs/img/raccoon_predictions.png",
                        help="where to draw predictions on val photographs ('' for none)")  # fmt: skip
    parser.add_argument("--first", type=int, help="only the first N photographs of each split (a smoke run)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(DEFAULT_MODELS),
                        help="the detectors to train (default: %(default)s)")
    parser.add_argument("--ablation", action="store_true",
                        help="also the recipe with each ingredient turned off in turn (one training each)")
    parser.add_argument("--split-seed", type=int, help="a random 160/40 split drawn with this seed instead of the author's")
    parser.add_argument("--iterations", type=int,
                        help="train every detector for this many steps instead of the budget (an ablation at equal "
                        "steps, unaffected by the machine's load; the budget then only labels the run)")
    parser.add_argument("--int8", type=int, default=0, metavar="N",
                        help="also the AP of the best-trained rcnn detector as int8 (ONNX Runtime, calibrated on N "
                        "training photographs) beside its fp32 graph")  # fmt: skip
    parser.add_argument("--recipes", nargs="+", default=[], metavar="RECIPE",
                        help="with --int8, other int8 settings to measure beside the default "
                        "(benchmarks.backends' METHOD[+fc][+keep=PATH;PATH][+p=PERCENTILE], e.g. minmax+keep=)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override of the recipe (e.g. data.scale_jitter=[0.5,1.5]), for every row that "
                        "trains it; recorded in the result")  # fmt: skip
    parser.add_argument("--tag", help="a suffix of the result file's name (a run with --set beside the plain one)")
    parser.add_argument("--notes", default="", help="a line of context for the report (e.g. the machine's load)")
    args = parser.parse_args(argv)
    EXTRA[:] = args.overrides
    recipe()  # a bad override: refused before any training
    if args.recipes and not args.int8:
        parser.error("--recipes needs --int8 N")
    data = Path(args.data)
    if not (data / "annotations").is_dir():
        raise SystemExit(f"{data}: the raccoon photographs are not there (expected annotations/ and images/)")
    torch.set_num_threads(args.threads)
    budget = args.budget or (120.0 if args.quick else DEFAULT_BUDGET)
    pretrain_budget = args.pretrain_budget or (60.0 if args.quick else 300.0)
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rcnn_bench_raccoon_") as work:
        split = random_split(args.split_seed) if args.split_seed is not None else (TRAIN_IMAGES, VAL_IMAGES)
        if args.first:
            split = (split[0][: args.first], split[1][: args.first])
        names = [*args.models, *(f"ours -{i}" for i in INGREDIENTS if args.ablation)]
        accuracy, models, val = run(data, Path(work), budget, pretrain_budget, names, split=split,
                                    iterations=args.iterations)  # fmt: skip
        accuracy["split_seed"] = args.split_seed
        accuracy["overrides"] = list(args.overrides)
        if args.int8:
            from benchmarks.backends import int8_accuracy

            name = max((n for n in models if n != "peer"), key=lambda n: accuracy[n]["AP"])
            train_set = build_dataset(Path(work) / "split", "train")
            accuracy["int8"] = {"model": name, **int8_accuracy(models[name], accuracy["class_names"], train_set, val,
                                                               Path(work), args.threads, args.int8, args.recipes)}  # fmt: skip
    result: dict[str, Any] = {"accuracy": accuracy}
    if args.picture:
        picture({k: m for k, m in models.items() if k in MODELS}, val, ROOT / args.picture)
        result["picture"] = str(Path(args.picture).relative_to("docs")) if args.picture.startswith("docs/") else args.picture
    result["wall_s"] = time.perf_counter() - tic
    if args.notes:
        result["notes"] = args.notes
    write_result(result_name(args.split_seed, budget, args.iterations, args.tag), result, command_line("benchmarks.raccoon", argv))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
