"""The seed's speed story at the papers' scale: R-CNN -> Fast R-CNN -> Faster R-CNN, timed as the papers timed them.

    python -m benchmarks.paper_scale [--quick] [--device cpu|cuda] [--backbones alexnet,vgg16]

Real photographs of VOC size (the raccoon set, ``../shared/data/raccoon``, read in place: images
whose longer side is 400 to 1000 px), each given to the detectors as the papers do: R-CNN warps
regions of the original image to 227 x 227 with 16 px of context; Fast and Faster R-CNN rescale it
to a shorter side of 600 (longer at most 1000). Proposals: selective search in fast mode (OpenCV's,
with the fast mode's segmentation scales k = 50, 100, on the image at VOC size, at most 500 px a
side), the first 2000 boxes kept. The papers' backbones, AlexNet and VGG16, with random weights
(speed does not depend on them) and the papers' heads: fc6/fc7 of 4096, 7 x 7 RoI pooling (6 x 6
for AlexNet, its pool5), 21 classes, per-class NMS 0.3, the RPN's 6000 / 300 proposals at test.

Test time per image, split into proposals and the network:

- R-CNN: one CNN pass per warped region, batched. Where a whole image would take too long (VGG16
  over 2000 regions), it is timed on two subsets of each image's regions and extrapolated
  linearly to the image's region count; the two subsets show the cost is linear, and (in the
  training part) the feature caching of every region of an image with AlexNet checks the
  extrapolation against a full pass.
- Fast R-CNN on the same proposals, with and without truncated SVD (fc6 rank 1024, fc7 rank 256).
- Faster R-CNN: the RPN's time (the proposal stage) and the rest.

Training time per image: R-CNN's stages — a fine-tuning step on a 128-region batch (32 + 96),
timed on two subsets of the batch and scaled to 128; feature caching of every region of an image
(the library's ``extract_features``); the SVMs with hard negative mining and the box regressors
(``train_svms``, ``train_box_regressors``) on those cached features — against Fast R-CNN's one
multi-task step on N = 2 images of R = 128 RoIs. Both generations fine-tune the same layers
(VGG16 from conv3_1, AlexNet from conv2, Fast R-CNN §4.5) with SGD (momentum 0.9).

Every timing follows the benchmarks' protocol (``benchmarks.harness``): the methods interleaved
round by round (A B C, C B A, ...) after a warm-up, best of the rounds per image, then the median
over the images; CPU seconds (all threads) beside wall seconds. Writes
``benchmarks/results/paper_scale.json`` and ``docs/img/paper_scale_lineage.png``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.harness import ROOT, RESULTS, command_line, table, time_rounds, write_result
from rcnn.components.proposals.selective_search import SelectiveSearch
from rcnn.data.reading import build_dataset, find_splits
from rcnn.inference import Clock, Predictor
from rcnn.models import fast_rcnn, faster_rcnn, rcnn
from rcnn.training.rcnn_stages import extract_features, train_box_regressors, train_svms
from rcnn.viz import image_pixels

NAME = "paper_scale"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "raccoon"
NUM_CLASSES = 21  # VOC's 20 classes and the background: the heads' sizes are the papers'
VOC_CLASSES = 20
# the training schedule both generations are given per image: 40k SGD steps over VOC07 trainval
# (Fast R-CNN §3: 30k + 10k iterations; the library's R-CNN VOC config has the same count)
SCHEDULE_STEPS = 40_000
VOC07_TRAINVAL = 5011
FINETUNE_BATCH = 128  # R-CNN: 32 positive + 96 background windows per step (§2.3)
FAST_IMAGES_PER_STEP = 2  # Fast R-CNN: N = 2 images, R = 128 RoIs (§2.3)
TRAINABLE_STAGES = {"vgg16": 3, "alexnet": 4}  # conv3_1 and up / conv2 and up (Fast R-CNN §4.5)
TITLES = {"rcnn": "R-CNN", "fast_rcnn": "Fast R-CNN", "fast_rcnn_svd": "Fast R-CNN, truncated SVD",
          "faster_rcnn": "Faster R-CNN"}  # fmt: skip

# What the papers report: one K40 GPU (selective search on a CPU), VOC07 images, seconds per image.
PAPERS = {
    "vgg16": {
        "rcnn_s": 47.0, "fast_rcnn_s": 0.32, "fast_rcnn_svd_s": 0.22, "faster_rcnn_s": 0.198,
        "selective_search_s": 1.51, "rpn_s": 0.010, "rcnn_train_h": 84.0, "fast_rcnn_train_h": 9.5,
        "source": "Fast R-CNN Table 4 (VGG16: 47 s, 0.32 s, 0.22 s with SVD; training 84 h against 9.5 h); "
                  "Faster R-CNN Tables 5 and 6 (198 ms in all, proposals 10 ms; selective search 1.51 s)",
    },
    "alexnet": {
        "rcnn_s": 10.0, "fast_rcnn_s": 0.10,
        "source": "Fast R-CNN Table 4, the AlexNet-class model S: about 10 s against 0.1 s per image",
    },
}  # fmt: skip


def _sync(device: torch.device) -> None:
    Clock(device).now()  # the device's queued work done


class ModuleClock:
    """CPU and wall seconds spent inside one submodule's forward (the RPN's), summed per call (the
    library's :class:`rcnn.inference.Clock`, read by forward hooks)."""

    def __init__(self, module: nn.Module, device: torch.device, name: str = "rpn") -> None:
        self.name, self.clock, self.cpu, self.wall, self._start = name, Clock(device), 0.0, 0.0, (0.0, 0.0)
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._leave)

    def _enter(self, *_: Any) -> None:
        self._start = self.clock.now()

    def _leave(self, *_: Any) -> None:
        cpu, wall = self.clock.now()
        self.cpu += cpu - self._start[0]
        self.wall += wall - self._start[1]

    def read(self) -> dict[str, float]:
        """The seconds since the last read, then reset."""
        out = {f"{self.name}_cpu_s": self.cpu, f"{self.name}_wall_s": self.wall}
        self.cpu = self.wall = 0.0
        return out


# -- data ---------------------------------------------------------------------------------------
def load_images(data: Path, split: str | None, count: int, long_side: tuple[int, int]) -> list[dict[str, Any]]:
    """The first ``count`` images (in file-name order) whose longer side lies in ``long_side``:
    ``{"name", "image" [3, H, W], "target"}``."""
    if split is None:
        dataset = build_dataset(data, "all", val_fraction=0.2) if not find_splits(data) else None
        if dataset is None:
            split = find_splits(data)[0]
    if split is not None:
        dataset = build_dataset(data, split)
    lo, hi = long_side
    order = sorted(range(len(dataset.records)), key=lambda i: _natural(dataset.records[i].path.name))
    chosen = [i for i in order if lo <= max(dataset.records[i].height, dataset.records[i].width) <= hi][:count]
    if len(chosen) < count:
        raise ValueError(f"{data}: only {len(chosen)} images with the longer side in {lo}..{hi} px, {count} wanted")
    out = []
    for i in chosen:
        image, target = dataset[i]
        out.append({"name": dataset.records[i].path.name, "image": image, "target": target})
    return out


def _natural(name: str) -> tuple[Any, ...]:
    import re

    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


# -- models -------------------------------------------------------------------------------------
def paper_models(backbone: str, min_size: int, max_size: int, svd_ranks: tuple[int, int]) -> dict[str, nn.Module]:
    """R-CNN, Fast R-CNN (with and without truncated SVD) and Faster R-CNN at the papers' settings."""
    torch.manual_seed(0)
    scale = {"min_size": min_size, "max_size": max_size}
    models = {
        "rcnn": rcnn(backbone, NUM_CLASSES, warp_size=227, context_padding=16, feature_batch_size=64),
        "fast_rcnn": fast_rcnn(backbone, NUM_CLASSES, pooler="pool", **scale),
        "faster_rcnn": faster_rcnn(backbone, NUM_CLASSES, pooler="pool", **scale),
    }
    models["fast_rcnn_svd"] = copy.deepcopy(models["fast_rcnn"])
    models["fast_rcnn_svd"].svd_reports = models["fast_rcnn_svd"].compress_fc(*svd_ranks)
    return {name: model.eval() for name, model in models.items()}


# -- test time ----------------------------------------------------------------------------------
def _linear(counts: Sequence[int], seconds: Sequence[float], regions: int) -> float:
    """The time of ``regions`` regions from the line through two (count, seconds) points."""
    (n1, n2), (t1, t2) = counts, seconds
    slope = (t2 - t1) / (n2 - n1)
    return t1 + slope * (regions - n1)


def time_test(
    backbone: str, images: list[dict[str, Any]], search: SelectiveSearch, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """Test time per image of every generation (see the module doc), median over ``images``."""
    models = {name: model.to(device) for name, model in paper_models(backbone, args.min_size, args.max_size, args.svd_ranks).items()}
    predictors = {name: Predictor(model) for name, model in models.items()}  # the library's one inference path
    clock = ModuleClock(models["faster_rcnn"].rpn, device)
    # the RPN's 3x3 conv and sibling 1x1 convs, apart from its proposal selection (top-k, decoding, NMS)
    head_clock = ModuleClock(models["faster_rcnn"].rpn.head, device, "rpn_head")
    counts = args.rcnn_regions[backbone]
    per_image = []
    for k, item in enumerate(images):
        image, boxes = item["image"].to(device), item["proposals"].to(device)
        array = image_pixels(item["image"])

        def call(name: str, proposals: Tensor | None = None) -> Callable[[], None]:
            def run() -> None:
                predictors[name].detect([image], proposals=None if proposals is None else [proposals])
                _sync(device)

            return run

        def faster() -> dict[str, float]:
            clock.read(), head_clock.read()
            call("faster_rcnn")()
            return {**clock.read(), **head_clock.read()}

        calls: dict[str, Callable[[], Any]] = {"selective_search": lambda: search(array)}
        for n in counts:
            calls[f"rcnn_{n}"] = call("rcnn", boxes[:n])
        calls["fast_rcnn"] = call("fast_rcnn", boxes)
        calls["fast_rcnn_svd"] = call("fast_rcnn_svd", boxes)
        calls["faster_rcnn"] = faster
        with torch.inference_mode():
            best = time_rounds(calls, rounds=args.rounds, warmup=1 if k == 0 else 0)
        regions = int(boxes.shape[0])
        row: dict[str, Any] = {"name": item["name"], "regions": regions}
        for key in ("cpu_s", "wall_s"):
            subset = [best[f"rcnn_{n}"][key] for n in counts]
            row[f"rcnn_{key}"] = _linear(counts, subset, regions)
            row[f"rcnn_subsets_{key}"] = subset
            for name in ("selective_search", "fast_rcnn", "fast_rcnn_svd", "faster_rcnn"):
                row[f"{name}_{key}"] = best[name][key]
            row[f"rpn_{key}"] = best["faster_rcnn"][f"rpn_{key}"]
            row[f"rpn_head_{key}"] = best["faster_rcnn"][f"rpn_head_{key}"]
        per_image.append(row)
        print(f"  {backbone} {item['name']}: {regions} regions, R-CNN {row['rcnn_cpu_s']:.1f} CPU s (from "
              f"{counts[0]} and {counts[1]} regions), Fast {row['fast_rcnn_cpu_s']:.2f}, SVD {row['fast_rcnn_svd_cpu_s']:.2f}, "
              f"Faster {row['faster_rcnn_cpu_s']:.2f} (RPN {row['rpn_cpu_s']:.3f}), selective search "
              f"{row['selective_search_cpu_s']:.2f}", flush=True)  # fmt: skip
    flops = count_flops(models, images[0], counts[0], device)
    med = {key: statistics.median(r[key] for r in per_image) for key, v in per_image[0].items() if isinstance(v, float)}
    n1, n2 = counts
    t1, t2 = (statistics.median(r["rcnn_subsets_cpu_s"][j] for r in per_image) for j in (0, 1))
    return {
        "per_image": per_image,
        "median": med,
        "rcnn_subsets": {"regions": list(counts), "cpu_s": [t1, t2], "ratio": t2 / t1, "regions_ratio": n2 / n1,
                         "cpu_ms_per_region": 1000 * (t2 - t1) / (n2 - n1)},
        "svd": models["fast_rcnn_svd"].svd_reports,
        "gflops": flops,
    }  # fmt: skip


def count_flops(models: dict[str, nn.Module], item: dict[str, Any], subset: int, device: torch.device) -> dict[str, float]:
    """Arithmetic per image (GFLOPs, a multiply-add counted as 2; ``torch.utils.flop_counter``) of
    each network on ``item``: R-CNN's counted on ``subset`` regions and scaled to all (exactly
    linear: the same pass per region), the RPN's alone beside Faster R-CNN's in all."""
    from torch.utils.flop_counter import FlopCounterMode

    image, boxes = item["image"].to(device), item["proposals"].to(device)
    runs = {"rcnn": (models["rcnn"], {"proposals": [boxes[:subset]]}),
            "fast_rcnn": (models["fast_rcnn"], {"proposals": [boxes]}),
            "fast_rcnn_svd": (models["fast_rcnn_svd"], {"proposals": [boxes]}),
            "faster_rcnn": (models["faster_rcnn"], {})}  # fmt: skip
    out = {}
    for name, (model, kwargs) in runs.items():
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            model([image], **kwargs)
        out[name] = counter.get_total_flops() / 1e9
        for key, ops in counter.get_flop_counts().items():
            if key.count(".") == 1 and key.endswith((".backbone", ".roi_heads")):  # the conv layers, the per-RoI head
                out[f"{name}_{key.split('.')[1]}"] = sum(ops.values()) / 1e9
        if name == "faster_rcnn":
            per_module = counter.get_flop_counts()
            out["rpn"] = sum(sum(v.values()) for key, v in per_module.items() if key.split(".")[-1] == "rpn") / 1e9
    for key in [k for k in out if k.startswith("rcnn")]:
        out[key] *= boxes.shape[0] / subset
    return out


# -- training time ------------------------------------------------------------------------------
class _Images:
    """The chosen images as a data set for R-CNN's feature caching (``extract_features``)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.image_ids = [int(item["target"]["image_id"]) for item in items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        return self.items[index]["image"], self.items[index]["target"]


def _sgd_step(model: nn.Module, device: torch.device, *inputs: Any) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        losses = model(*inputs)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)

    return step


def time_training(backbone: str, items: list[dict[str, Any]], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Training time per image of R-CNN's stages and of Fast R-CNN's step (see the module doc)."""
    torch.manual_seed(0)
    stages = TRAINABLE_STAGES.get(backbone)
    pair = items[:FAST_IMAGES_PER_STEP]
    images = [item["image"].to(device) for item in pair]
    targets = [{"boxes": item["target"]["boxes"].to(device), "labels": item["target"]["labels"].to(device)} for item in pair]
    proposals = [item["proposals"].to(device) for item in pair]
    fast = fast_rcnn(backbone, NUM_CLASSES, pooler="pool", min_size=args.min_size, max_size=args.max_size,
                     trainable_stages=stages, roi={"batch_size_per_image": 64}).to(device).train()  # fmt: skip
    counts = args.finetune_regions[backbone]
    calls: dict[str, Callable[[], Any]] = {"fast_rcnn": _sgd_step(fast, device, images, targets, proposals)}
    for n in counts:
        model = rcnn(backbone, NUM_CLASSES, warp_size=227, context_padding=16, batch_size=n, trainable_stages=stages)
        calls[f"rcnn_{n}"] = _sgd_step(model.to(device).train(), device, images, targets, proposals)
    best = time_rounds(calls, rounds=args.rounds, warmup=1)
    del calls, fast
    out: dict[str, Any] = {"fast_rcnn_step": best["fast_rcnn"], "finetune_subsets": {}}
    for key in ("cpu_s", "wall_s"):
        subset = [best[f"rcnn_{n}"][key] for n in counts]
        out["finetune_subsets"][key] = subset
        out.setdefault("rcnn_finetune_step", {})[key] = _linear(counts, subset, FINETUNE_BATCH)
    out["finetune_subsets"]["regions"] = list(counts)
    print(f"  {backbone} training: Fast R-CNN step {best['fast_rcnn']['cpu_s']:.1f} CPU s; R-CNN fine-tuning "
          f"{out['rcnn_finetune_step']['cpu_s']:.1f} CPU s per 128 regions (from {counts[0]} and {counts[1]})", flush=True)  # fmt: skip

    # feature caching, on the whole region set or a stated part of it, then the SVMs and regressors
    cache_regions = args.cache_regions[backbone]  # None: every region
    cache_items = items[: args.cache_images]
    num_classes = int(max(int(item["target"]["labels"].max()) for item in cache_items)) + 1 if cache_items else 2
    torch.manual_seed(0)
    model = rcnn(backbone, max(num_classes, 2), warp_size=227, context_padding=16, feature_batch_size=64).to(device)
    by_id = {int(item["target"]["image_id"]): item["proposals"] for item in cache_items}

    def regions_of(image_id: int) -> Tensor:
        boxes = by_id[image_id]
        return boxes if cache_regions is None else boxes[:cache_regions]

    quiet = {"progress": False, "log": lambda s: None}
    clock = Clock(device)
    with tempfile.TemporaryDirectory(prefix="rcnn_paper_scale_") as tmp:
        features = clock.measure(lambda: extract_features(model, _Images(cache_items), regions_of, Path(tmp) / "features", **quiet))
        cache, _ = features[2]
        total_regions = sum(int(regions_of(i).shape[0]) for i in by_id)
        full_regions = sum(int(by_id[i].shape[0]) for i in by_id)
        scale = full_regions / total_regions
        out["features"] = {"images": len(cache_items), "regions": total_regions, "regions_full": full_regions,
                           "cpu_s_per_image": features[0] * scale / len(cache_items),
                           "wall_s_per_image": features[1] * scale / len(cache_items),
                           "scaled": cache_regions is not None}  # fmt: skip
        if cache_regions is None:
            svm_s = clock.measure(lambda: train_svms(model, cache, **quiet))
            svms = svm_s[2]
            try:
                reg_s: tuple[float, ...] | None = clock.measure(lambda: train_box_regressors(model, cache, log=lambda s: None))
            except ValueError as exc:  # too few regression examples (IoU >= 0.6) on these images
                reg_s, out["box_regression_error"] = None, str(exc)
            classes = model.num_classes - 1
            out["svms"] = {"classes": classes, "images": len(cache_items),
                           "cpu_s_per_image": svm_s[0] / len(cache_items), "wall_s_per_image": svm_s[1] / len(cache_items),
                           "voc_cpu_s_per_image": svm_s[0] / len(cache_items) * VOC_CLASSES / classes,
                           "voc_wall_s_per_image": svm_s[1] / len(cache_items) * VOC_CLASSES / classes,
                           "negatives": int(sum(r.hard_added for r in svms.history))}  # fmt: skip
            if reg_s is not None:
                out["box_regression"] = {"cpu_s_per_image": reg_s[0] / len(cache_items), "wall_s_per_image": reg_s[1] / len(cache_items)}
    print(f"  {backbone} feature caching: {out['features']['cpu_s_per_image']:.1f} CPU s per image "
          f"({total_regions} regions of {full_regions} computed)", flush=True)  # fmt: skip
    return out


def training_per_image(train: dict[str, Any], svms: dict[str, Any] | None, key: str) -> dict[str, float]:
    """Seconds per training image over the schedule (``SCHEDULE_STEPS`` steps over VOC07 trainval):
    R-CNN's fine-tuning share, its features, SVMs and regressors (once per image); Fast R-CNN's share."""
    visits = SCHEDULE_STEPS / VOC07_TRAINVAL  # steps per training image
    finetune = visits * train["rcnn_finetune_step"][key]
    features = train["features"][f"{key}_per_image"]
    svm = svms[f"voc_{key}_per_image"] if svms else 0.0
    regression = train.get("box_regression", {}).get(f"{key}_per_image", 0.0)
    return {"rcnn_finetune": finetune, "rcnn_features": features, "rcnn_svms": svm, "rcnn_box_regression": regression,
            "rcnn": finetune + features + svm + regression, "fast_rcnn": visits * train["fast_rcnn_step"][key]}  # fmt: skip


# -- the run ------------------------------------------------------------------------------------
def speedups(test: dict[str, Any], key: str = "cpu_s") -> dict[str, float]:
    """The papers' ratios from our medians (network only: proposals excluded)."""
    m = test["median"]
    rcnn_s, fast, svd, faster = m[f"rcnn_{key}"], m[f"fast_rcnn_{key}"], m[f"fast_rcnn_svd_{key}"], m[f"faster_rcnn_{key}"]
    ss, rpn = m[f"selective_search_{key}"], m[f"rpn_{key}"]
    return {
        "fast_over_rcnn": rcnn_s / fast, "fast_svd_over_rcnn": rcnn_s / svd, "svd_cut": 1 - svd / fast,
        "selective_search_over_rpn": ss / rpn, "faster_over_fast_pipeline": (ss + fast) / faster,
        "faster_over_fast_network": fast / faster,
    }  # fmt: skip


def _ranks(text: str) -> tuple[int, int]:
    try:
        fc6, fc7 = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--svd-ranks: two ranks 'fc6,fc7' expected, got {text!r}") from None
    return fc6, fc7


def parse_pairs(text: str, what: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{what}: two region counts 'A,B' expected, got {text!r}") from None
    if not 0 < a < b:
        raise ValueError(f"{what}: need 0 < A < B, got {text!r}")
    return a, b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds (under 20 minutes on 2 CPU cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (selective search always runs on the CPU)")
    parser.add_argument("--backbones", default="alexnet,vgg16", help="comma-separated (the papers': alexnet, vgg16)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a data set folder (default the raccoon photographs)")
    parser.add_argument("--split", default=None, help="the split to read (default: all images)")
    parser.add_argument("--long-side", default="400,1000", help="use images whose longer side lies in A..B px (VOC size)")
    parser.add_argument("--images", type=int, help="images timed at test (default 2 quick, 5 full)")
    parser.add_argument("--rounds", type=int, help="timing rounds per image (default 2 quick, 3 full)")
    parser.add_argument("--max-proposals", type=int, default=2000, help="selective search boxes kept per image (2000)")
    parser.add_argument("--min-size", type=int, default=600, help="Fast/Faster R-CNN's shorter side (600)")
    parser.add_argument("--max-size", type=int, default=1000, help="... and longest side (1000)")
    parser.add_argument("--svd-ranks", default="1024,256", help="truncated SVD ranks of fc6, fc7 (1024,256)")
    parser.add_argument("--rcnn-regions", help="R-CNN's two region subsets per image at test, per backbone: "
                        "'alexnet=128,256;vgg16=8,16' (default per mode)")  # fmt: skip
    parser.add_argument("--finetune-regions", help="R-CNN's two fine-tuning batch subsets, same form")
    parser.add_argument("--cache-images", type=int, help="images whose regions are cached for the SVMs (default 2 quick, 4 full)")
    parser.add_argument("--cache-regions", help="regions cached per image, per backbone ('vgg16=16'; default all for "
                        "AlexNet, a subset for VGG16)")  # fmt: skip
    parser.add_argument("--no-training", action="store_true", help="test times only")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where paper_scale.json goes")
    parser.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img", help="where the plot goes")
    args = parser.parse_args(argv)
    tic = time.perf_counter()
    load_before = os.getloadavg()[0]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    args.images = args.images or (2 if args.quick else 5)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.cache_images = args.cache_images or (2 if args.quick else 4)
    args.svd_ranks = _ranks(args.svd_ranks)
    args.long_side = parse_pairs(args.long_side, "--long-side")
    quick_regions = {"alexnet": (128, 256), "vgg16": (8, 16)}
    full_regions = {"alexnet": (256, 512), "vgg16": (16, 32)}
    args.rcnn_regions = _per_backbone(args.rcnn_regions, "--rcnn-regions", backbones, quick_regions if args.quick else full_regions, True)
    args.finetune_regions = _per_backbone(args.finetune_regions, "--finetune-regions", backbones,
                                          {"alexnet": (32, 64), "vgg16": (8, 16)} if args.quick else
                                          {"alexnet": (32, 64), "vgg16": (16, 32)}, True)  # fmt: skip
    args.cache_regions = _per_backbone(args.cache_regions, "--cache-regions", backbones,
                                       {"alexnet": None, "vgg16": 16 if args.quick else 32}, False)  # fmt: skip

    images = load_images(args.data, args.split, max(args.images, args.cache_images), args.long_side)
    search = SelectiveSearch(mode="fast", max_proposals=args.max_proposals, base_k=50, inc_k=50, max_side=500)
    for item in images:
        item["proposals"] = search(image_pixels(item["image"]))
    print(f"{len(images)} images; selective search gave {[int(i['proposals'].shape[0]) for i in images]} proposals", flush=True)
    result: dict[str, Any] = {
        "settings": {"quick": args.quick, "device": str(device), "images": args.images, "rounds": args.rounds,
                     "min_size": args.min_size, "max_size": args.max_size, "svd_ranks": list(args.svd_ranks),
                     "selective_search": search.settings(), "rcnn_regions": args.rcnn_regions,
                     "finetune_regions": args.finetune_regions, "cache_images": args.cache_images,
                     "cache_regions": args.cache_regions, "schedule_steps": SCHEDULE_STEPS, "train_images": VOC07_TRAINVAL,
                     "data": str(args.data), "long_side": list(args.long_side)},
        "images": [{"name": i["name"], "size": list(i["image"].shape[1:]), "proposals": int(i["proposals"].shape[0])}
                   for i in images],
        "papers": PAPERS,
        "test": {}, "speedups": {}, "training": {},
    }  # fmt: skip
    for backbone in backbones:
        print(f"== {backbone}: test time", flush=True)
        test = time_test(backbone, images[: args.images], search, args, device)
        result["test"][backbone] = test
        result["speedups"][backbone] = {"cpu": speedups(test, "cpu_s"), "wall": speedups(test, "wall_s")}
        if not args.no_training:
            print(f"== {backbone}: training time", flush=True)
            train = time_training(backbone, images, args, device)
            train["per_image"] = {key: training_per_image(train, train.get("svms"), key) for key in ("cpu_s", "wall_s")}
            result["training"][backbone] = train
    # the SVMs' cost depends on fc7's size (4096 for both), not on the backbone: lend it where it was not measured
    svm_source = next((b for b, t in result["training"].items() if "svms" in t), None)
    for backbone, train in result["training"].items():
        if "svms" not in train and svm_source:
            train["svms_from"] = svm_source
            train["per_image"] = {key: training_per_image(train, result["training"][svm_source]["svms"], key)
                                  for key in ("cpu_s", "wall_s")}  # fmt: skip
        for key in ("cpu_s", "wall_s"):
            p = train["per_image"][key]
            p["speedup"] = p["rcnn"] / p["fast_rcnn"]
    result["run_s"] = time.perf_counter() - tic
    # other processes' share of the cores while this ran (1-minute load averages, before and after)
    result["load_average"] = [load_before, os.getloadavg()[0]]
    result["plot"] = plot(result, args.img_dir)
    path = write_result(NAME, result, command_line("benchmarks.paper_scale", argv), args.results_dir)
    print(markdown(result))
    print(f"wrote {path} ({result['run_s']:.0f} s)")
    return 0


def _per_backbone(text: str | None, what: str, backbones: list[str], default: dict[str, Any], pairs: bool) -> dict[str, Any]:
    values = {b: default.get(b, default.get("vgg16")) for b in backbones}
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        if name.strip() not in backbones:
            raise ValueError(f"{what}: {name.strip()!r} is not one of the backbones timed ({', '.join(backbones)})")
        if pairs:
            values[name.strip()] = parse_pairs(value, what)
        else:
            values[name.strip()] = None if value.strip() in ("all", "") else int(value)
    return values


# -- the report ---------------------------------------------------------------------------------
def _span(lo: int, hi: int) -> str:
    return f"{lo}" if lo == hi else f"{lo} to {hi}"


def _ms(seconds: float) -> str:
    ms = 1000 * seconds
    return f"{ms:,.0f}" if ms >= 10 else f"{ms:.1f}"


def plot(result: dict[str, Any], img_dir: Path) -> str:
    """ms/image of each generation, ours (CPU seconds) beside the papers' (K40), log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir = Path(img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = [("rcnn", "R-CNN"), ("fast_rcnn", "Fast R-CNN"), ("fast_rcnn_svd", "Fast R-CNN, SVD"),
            ("faster_rcnn", "Faster R-CNN"), ("selective_search", "selective search"), ("rpn", "RPN")]  # fmt: skip
    series = []
    where = f"{torch.get_num_threads()} CPU threads" if result["settings"]["device"] == "cpu" else result["settings"]["device"]
    for backbone, test in result["test"].items():
        series.append((f"ours, {backbone}, {where}", {name: test["median"][f"{name}_cpu_s"] for name, _ in rows}))
        if backbone in result["papers"]:
            paper = result["papers"][backbone]
            series.append((f"paper, {backbone}, K40 GPU", {name: paper.get(f"{name}_s") for name, _ in rows}))
    fig, ax = plt.subplots(figsize=(7.6, 4.8))
    height = 0.8 / max(len(series), 1)
    colours = ["tab:blue", "lightsteelblue", "tab:red", "lightsalmon"]
    for j, (label, values) in enumerate(series):
        ys = [i + (j - (len(series) - 1) / 2) * height for i in range(len(rows))]
        xs = [1000 * values[name] if values.get(name) else 0 for name, _ in rows]
        ax.barh(ys, xs, height=height * 0.95, label=label, color=colours[j % len(colours)])
        for y, x in zip(ys, xs):
            if x:
                ax.text(x * 1.08, y, _ms(x / 1000), va="center", fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([title for _, title in rows])
    ax.invert_yaxis()
    ax.axhline(3.5, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    xmax = max(1000 * v for _, values in series for v in values.values() if v)
    ax.set_xlim(left=1, right=xmax * 8)
    ax.set_xlabel("test time per image, ms (log scale; ours: CPU seconds; networks without proposals)")
    ax.set_title("The lineage at the papers' scale: ~2000 proposals, 600 px, random weights")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    path = img_dir / "paper_scale_lineage.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def markdown(result: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md: test and training tables beside the papers', and why they differ."""
    s = result["settings"]
    props = [i["proposals"] for i in result["images"]]
    n_test = s["images"]
    parts = [
        f"R-CNN, Fast R-CNN and Faster R-CNN at the papers' scale: {n_test} photographs of `{Path(s['data']).name}` "
        f"(longer side {s['long_side'][0]} to {s['long_side'][1]} px, VOC's size: {', '.join(i['name'] + ' ' + 'x'.join(map(str, i['size'][::-1])) for i in result['images'][:n_test])}), "
        f"rescaled to a shorter side of {s['min_size']} (longer at most {s['max_size']}) for Fast and Faster R-CNN, "
        f"R-CNN's regions warped to 227x227 with 16 px of context; selective search in fast mode gave "
        f"{_span(min(props), max(props))} proposals per image (capped at {s['selective_search']['max_proposals']}; the papers: ~2000). Random weights, "
        "21 classes, fc6/fc7 of 4096. Test times are medians over the images of the best of "
        f"{s['rounds']} interleaved rounds, in CPU seconds (wall seconds in the JSON); the networks' times "
        "exclude the proposals, as the papers' do.",
        "",
    ]
    for backbone, test in result["test"].items():
        m, sp, paper = test["median"], result["speedups"][backbone]["cpu"], result["papers"].get(backbone, {})
        sub = test["rcnn_subsets"]

        def pp(key: str) -> str:
            return f"{1000 * paper[key]:,.0f}" if key in paper else "-"

        def ratio(value: float | None) -> str:
            return f"{value:.0f}x" if value is not None else "-"

        p_fast = paper["rcnn_s"] / paper["fast_rcnn_s"] if "fast_rcnn_s" in paper else None
        p_svd = paper["rcnn_s"] / paper["fast_rcnn_svd_s"] if "fast_rcnn_svd_s" in paper else None
        rows = [
            ["R-CNN (network)", _ms(m["rcnn_cpu_s"]), "1x", pp("rcnn_s"), "1x"],
            ["Fast R-CNN (network)", _ms(m["fast_rcnn_cpu_s"]), ratio(sp["fast_over_rcnn"]), pp("fast_rcnn_s"), ratio(p_fast)],
            [f"Fast R-CNN, truncated SVD {s['svd_ranks'][0]}/{s['svd_ranks'][1]}", _ms(m["fast_rcnn_svd_cpu_s"]),
             ratio(sp["fast_svd_over_rcnn"]), pp("fast_rcnn_svd_s"), ratio(p_svd)],
            ["Faster R-CNN (RPN included)", _ms(m["faster_rcnn_cpu_s"]), ratio(m["rcnn_cpu_s"] / m["faster_rcnn_cpu_s"]),
             pp("faster_rcnn_s"), ratio(paper["rcnn_s"] / paper["faster_rcnn_s"]) if "faster_rcnn_s" in paper else "-"],
            ["selective search (proposals)", _ms(m["selective_search_cpu_s"]), "", pp("selective_search_s"), ""],
            ["RPN (proposals)", _ms(m["rpn_cpu_s"]), "", pp("rpn_s"), ""],
            ["Fast R-CNN + selective search", _ms(m["fast_rcnn_cpu_s"] + m["selective_search_cpu_s"]), "",
             f"{1000 * (paper['fast_rcnn_s'] + paper['selective_search_s']):,.0f}" if "selective_search_s" in paper else "-", ""],
        ]  # fmt: skip
        gf = test.get("gflops")
        if gf:
            flops = {"R-CNN (network)": gf["rcnn"], "Fast R-CNN (network)": gf["fast_rcnn"],
                     f"Fast R-CNN, truncated SVD {s['svd_ranks'][0]}/{s['svd_ranks'][1]}": gf["fast_rcnn_svd"],
                     "Faster R-CNN (RPN included)": gf["faster_rcnn"], "RPN (proposals)": gf["rpn"]}  # fmt: skip
            for row in rows:
                row.insert(2, f"{flops[row[0]]:,.0f}" if row[0] in flops else "")
        headers = ["", "ours, ms", *(["GFLOPs"] if gf else []), "ours, speed-up", "paper, ms", "paper, speed-up"]
        parts += [f"**{backbone}, test time** (ms per image; ours on {result.get('machine', {}).get('cores', os.cpu_count())} CPU cores, the papers' on a K40 GPU, "
                  "selective search on a CPU):", "",
                  table(headers, rows), ""]  # fmt: skip
        parts.append(
            f"R-CNN timed on {sub['regions'][0]} and {sub['regions'][1]} regions of each image and extrapolated linearly "
            f"to its {_span(min(r['regions'] for r in test['per_image']), max(r['regions'] for r in test['per_image']))} regions: "
            f"{sub['regions_ratio']:.0f}x the regions took {sub['ratio']:.2f}x the time ({sub['cpu_ms_per_region']:.0f} CPU ms "
            f"per region). Speed-ups of Fast R-CNN over R-CNN: {sp['fast_over_rcnn']:.0f}x (paper {ratio(p_fast)}), "
            f"{sp['fast_svd_over_rcnn']:.0f}x with truncated SVD (paper {ratio(p_svd)}); SVD cuts Fast R-CNN's time by "
            f"{100 * sp['svd_cut']:.0f}% (paper ~30%). The RPN proposes {sp['selective_search_over_rpn']:.0f}x faster than "
            f"selective search (paper 1.51 s / 10 ms = 151x); whole pipelines, Faster R-CNN over Fast R-CNN with selective "
            f"search: {sp['faster_over_fast_pipeline']:.1f}x (paper 1.83 s / 0.198 s = 9.2x)."
        )  # fmt: skip
        if gf:
            parts[-1] += (
                f" In arithmetic (GFLOPs of one image, `torch.utils.flop_counter`), R-CNN does {gf['rcnn'] / gf['fast_rcnn']:.0f}x "
                f"Fast R-CNN's work; Fast R-CNN's {gf['fast_rcnn']:,.0f} GFLOPs are {gf['fast_rcnn_backbone']:,.0f} in the conv "
                f"layers over the whole image and {gf['fast_rcnn_roi_heads']:,.0f} in fc6/fc7 over the "
                f"{test['per_image'][0]['regions']} RoIs ({gf['fast_rcnn_svd_roi_heads']:,.0f} after truncated SVD)."
            )  # fmt: skip
        parts.append("")
    for backbone, train in result["training"].items():
        p = train["per_image"]["cpu_s"]
        paper = result["papers"].get(backbone, {})
        f = train["features"]
        sv = train.get("svms") or result["training"].get(train.get("svms_from", ""), {}).get("svms")
        rows = [
            ["R-CNN fine-tuning step, 128 regions", f"{train['rcnn_finetune_step']['cpu_s']:.1f}", f"{p['rcnn_finetune']:.1f}"],
            ["R-CNN feature caching, every region", "", f"{p['rcnn_features']:.1f}"],
            ["R-CNN SVMs (hard negatives), 20 classes", "", f"{p['rcnn_svms']:.2f}"],
            ["R-CNN box regressors", "", f"{p['rcnn_box_regression']:.3f}" if "box_regression" in train else "not timed"],
            ["**R-CNN, all stages**", "", f"**{p['rcnn']:.1f}**"],
            ["Fast R-CNN multi-task step, 2 images x 64 RoIs", f"{train['fast_rcnn_step']['cpu_s']:.1f}", f"**{p['fast_rcnn']:.1f}**"],
        ]  # fmt: skip
        paper_line = (f" (paper: {paper['rcnn_train_h']:.0f} h against {paper['fast_rcnn_train_h']:.1f} h, "
                      f"{paper['rcnn_train_h'] / paper['fast_rcnn_train_h']:.1f}x)") if "rcnn_train_h" in paper else ""  # fmt: skip
        parts += [f"**{backbone}, training time** (CPU seconds; per training image over a schedule of "
                  f"{s['schedule_steps'] // 1000}k SGD steps on VOC07 trainval's {s['train_images']} images, "
                  f"i.e. {s['schedule_steps'] / s['train_images']:.1f} steps per image for each generation):", "",
                  table(["stage", "s per step", "s per training image"], rows), "",
                  f"Fast R-CNN trains **{p['speedup']:.1f}x** faster per image{paper_line}. R-CNN's fine-tuning step was "
                  f"timed on {train['finetune_subsets']['regions'][0]} and {train['finetune_subsets']['regions'][1]} regions "
                  f"and extrapolated to 128; its feature caching ran the library's `extract_features` on "
                  f"{f['regions']} of the {f['regions_full']} regions of {f['images']} images"
                  f"{' (scaled to all)' if f['scaled'] else ''}"
                  + (f"; the SVMs were trained on the cached features of {sv['images']} images for the raccoon class "
                     f"({sv['classes']} class, {sv['negatives']} hard negatives) and scaled to VOC's 20 classes (one SVM each)"
                     + (f", measured with {train['svms_from']} features (fc7 is 4096-d in both)" if "svms_from" in train else "")
                     if sv else "")
                  + "." + _extrapolation_check(result, backbone, f), ""]  # fmt: skip
    parts += _differences(result)
    parts += ["", "![test time per image at the papers' scale](img/paper_scale_lineage.png)"]
    if result["settings"]["device"] == "cpu":
        parts += ["", "The CUDA run (`--device cuda`) was not run: no GPU was available. The benchmark is "
                  "device-agnostic and takes `--device cuda` as it is (selective search stays on the CPU)."]  # fmt: skip
    took = f"{result['run_s'] / 60:.0f} minutes" if result["run_s"] >= 120 else f"{result['run_s']:.0f} s"
    parts += ["", f"This run took {took} ({'--quick' if s['quick'] else 'the full setting'})."]
    return "\n".join(parts)


def _extrapolation_check(result: dict[str, Any], backbone: str, features: dict[str, Any]) -> str:
    """R-CNN's test time extrapolated from two region subsets, against the full pass of feature caching."""
    test = result["test"].get(backbone)
    if features["scaled"] or test is None:
        return ""
    return (f" Caching every region is one full R-CNN pass per image: {features['cpu_s_per_image']:.1f} CPU s for "
            f"{features['regions_full'] / features['images']:.0f} regions (and the ground-truth boxes), against the "
            f"{test['median']['rcnn_cpu_s']:.1f} s extrapolated at test time from {test['rcnn_subsets']['regions'][0]} "
            f"and {test['rcnn_subsets']['regions'][1]} regions.")


def _differences(result: dict[str, Any]) -> list[str]:
    """Where our figures and the papers' differ, and why, from the figures themselves."""
    notes = []
    for backbone, test in result["test"].items():
        m, sp, wall = test["median"], result["speedups"][backbone]["cpu"], result["speedups"][backbone]["wall"]
        paper, gf = result["papers"].get(backbone, {}), test.get("gflops")
        if gf and "fast_rcnn_s" in paper:
            work = gf["rcnn"] / gf["fast_rcnn"]
            notes.append(
                f"{backbone}, R-CNN against Fast R-CNN: {sp['fast_over_rcnn']:.0f}x measured, {work:.0f}x in arithmetic "
                f"(GFLOPs), {paper['rcnn_s'] / paper['fast_rcnn_s']:.0f}x in the paper. On a CPU the speed-up follows "
                "the arithmetic: the CPU does about as many FLOPs per second in R-CNN's batched crops as in Fast R-CNN's "
                "one large image and its fc6/fc7 matrix products. "
                + (f"With AlexNet the conv layers are cheap ({gf['fast_rcnn_backbone']:,.0f} GFLOPs over the whole "
                   f"image) and fc6/fc7 over 2000 RoIs ({gf['fast_rcnn_roi_heads']:,.0f} GFLOPs) cost almost as much as "
                   "R-CNN's own fc layers over its 2000 regions, so Fast R-CNN saves little arithmetic; truncated SVD, "
                   "which shrinks exactly those layers, helps most here. "
                   if gf["fast_rcnn_roi_heads"] > gf["fast_rcnn_backbone"] * 2 else "")
                + (f"The paper's {paper['rcnn_s'] / paper['fast_rcnn_s']:.0f}x against {work:.0f}x of arithmetic means that "
                   f"on the K40 R-CNN's implementation ran at about 1/{paper['rcnn_s'] / paper['fast_rcnn_s'] / work:.0f} of "
                   "Fast R-CNN's FLOPs per second (a GPU's efficiency, which this CPU run cannot check)."
                   if paper["rcnn_s"] / paper["fast_rcnn_s"] > 1.5 * work else "")
            )  # fmt: skip
        net_share = m["fast_rcnn_cpu_s"] / (m["fast_rcnn_cpu_s"] + m["selective_search_cpu_s"])
        note = (
            f"{backbone}, Faster R-CNN: on a CPU the network, not selective search, dominates Fast R-CNN's time "
            f"({100 * net_share:.0f}% of {_ms(m['fast_rcnn_cpu_s'] + m['selective_search_cpu_s'])} ms here, against "
            "0.32 s of 1.83 s on the papers' GPU), so replacing selective search by the RPN gains "
            f"{sp['faster_over_fast_pipeline']:.1f}x for the whole pipeline rather than 9.2x. The proposal stage alone, "
            f"RPN against selective search, is the like-for-like comparison of the papers' 1.51 s against 10 ms: "
            f"{sp['selective_search_over_rpn']:.0f}x here in CPU seconds, {wall['selective_search_over_rpn']:.0f}x in "
            "wall seconds (selective search runs on one core, the RPN on all of them)."
        )
        if gf:
            share = (f"take {100 * m['rpn_head_cpu_s'] / m['rpn_cpu_s']:.0f}% of its {_ms(m['rpn_cpu_s'])} CPU ms, the "
                     "proposal selection (top 6000, decoding, NMS to 300) the rest"
                     if "rpn_head_cpu_s" in m else f"are its work ({_ms(m['rpn_cpu_s'])} CPU ms)")  # fmt: skip
            note += (
                f" {'Profiled' if 'rpn_head_cpu_s' in m else 'Counted'}: the RPN's 3x3 and 1x1 convolutions, {gf['rpn']:.0f} GFLOPs on the {_rpn_input(backbone)} "
                f"feature map, {share}: the RPN is arithmetic, which a GPU does in a few ms and two CPU cores in a "
                "tenth of a second or more, while selective search is a CPU algorithm on both machines, so the ratio "
                "shrinks by about the GPU's advantage in arithmetic."
            )  # fmt: skip
        notes.append(note)
    notes.append(
        "Our absolute times are CPU times on a 2-core machine shared with other work"
        + (f" (1-minute load average {result['load_average'][0]:.1f} before the run, {result['load_average'][1]:.1f} after)"
           if result.get("load_average") else "")
        + ", not a K40 GPU: "
        "the networks are tens to hundreds of times slower than the papers', selective search (a CPU algorithm in "
        "both) about as fast."
    )
    if result["training"]:
        notes.append(
            "Training: the paper's R-CNN total (84 h) includes 2.5 GPU-days of feature extraction written to disk "
            "(hundreds of GB) and the SVMs; ours caches the features of a few images in a temporary folder and "
            "scales them per image, and the per-image shares assume both generations make the same number of SGD "
            "steps (40k), each on 128 regions or RoIs."
        )
    return ["Where ours differ from the papers, and why:", ""] + [f"- {n}" for n in notes]


def _rpn_input(backbone: str) -> str:
    """How the RPN's input is described: the stride-16 conv5 map of a 600-pixel image."""
    return {"vgg16": "conv5_3", "alexnet": "conv5"}.get(backbone, "last") + " (stride 16, about 38 x 50)"


if __name__ == "__main__":
    sys.exit(main())
