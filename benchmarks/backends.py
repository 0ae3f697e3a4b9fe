"""The inference backends against the peer: our model in eager PyTorch, in ONNX Runtime and in OpenVINO
at each precision they run (fp32; bf16 in OpenVINO where the CPU has it; int8 where a calibrated
model is made), torchvision's same architecture in eager PyTorch, in one process, same weights,
same image.

    python -m benchmarks.backends [--quick] [--threads 2] [--int8 N] [--graphs] [--only 0,4]

For Faster R-CNN ResNet-50-FPN and MobileNetV3-Large-FPN at 800x1066 and 512x512, and Mask R-CNN
ResNet-50-FPN at 800x1066: seconds per image (pre- and post-processing included; the network sees
exactly that size) of each backend, interleaved A B C, C B A, ..., best of the rounds, CPU seconds
(all threads) beside wall; ratios to torchvision's. The models are those of
``benchmarks.faster_rcnn`` (torchvision's random initialisation, BatchNorm statistics from random
images, copied into ours; score threshold 0, so every backend post-processes its 100 best).

Rows, each through the library's inference path (:class:`rcnn.inference.Predictor`):
``eager``; ``onnxruntime`` and ``openvino``, the graph the backends cache (float input);
``openvino_bf16`` (where OpenVINO finds bf16 instructions); ``onnxruntime_int8`` and
``openvino_int8`` (``--int8 N``: the library's QDQ graph calibrated on N random images, a speed
measurement only). With ``--graphs``, the graphs alone too, fed a ready array (what a user deploying the file pays):
``*_graph_float`` the cached float-input graph, ``*_graph_uint8`` the file ``rcnn export`` writes
(uint8 input) — ``openvino_graph_uint8`` is OpenVINO compiling the plain exported file.

Agreement: the share of the eager model's detections that a backend gives too (same label, box
IoU > 0.99, score within 1e-3); the loose agreement of bf16 and int8: IoU > 0.9, score within
0.05. The result records the CPU's model and instruction flags (``cpu``) beside the machine.
Writes ``benchmarks/results/backends.json``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from benchmarks.harness import command_line, read_result, table, time_rounds, write_result
from benchmarks.faster_rcnn import build_pair, calibrate_batchnorm, copy_weights
from rcnn.deploy.backends import cpu_info
from rcnn.deploy.export import OnnxDetector, export_onnx
from rcnn.inference import Predictor
from rcnn.models import mask_rcnn
from rcnn.viz import image_pixels

try:
    import openvino  # noqa: F401

    from rcnn.deploy.openvino import OpenVinoDetector, bf16_supported

    OPENVINO = True
except ImportError:  # the openvino package missing: its rows are left out
    OPENVINO = False

# the instruction-set flags that decide these runtimes' speed, listed in the report
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8",
               "avx512_fp16")  # fmt: skip

CASES = [
    ("faster_rcnn", "resnet50_fpn", (800, 1066)),
    ("faster_rcnn", "resnet50_fpn", (512, 512)),
    ("faster_rcnn", "mobilenet_v3_fpn", (800, 1066)),
    ("faster_rcnn", "mobilenet_v3_fpn", (512, 512)),
    ("mask_rcnn", "resnet50_fpn", (800, 1066)),
]


def mask_pair(height: int, width: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our Mask R-CNN ResNet-50-FPN and torchvision's, ours holding its weights (as ``benchmarks.mask_rcnn``)."""
    small, large = min(height, width), max(height, width)
    torch.manual_seed(0)
    ours = mask_rcnn("resnet50_fpn", 91, min_size=small, max_size=large, roi={"score_thresh": 0.0}, anchor_offset=0.0,
                     aligned=False)  # fmt: skip
    peer = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=small, max_size=large, box_score_thresh=0.0
    )
    calibrate_batchnorm(peer.backbone, height, width)
    copy_weights(peer, ours)
    return ours, peer


def agreement(eager: dict[str, torch.Tensor], other: dict[str, torch.Tensor], iou: float = 0.99,
              score_tol: float = 1e-3) -> float:  # fmt: skip
    """The share of ``eager``'s detections that ``other`` gives too (label, IoU > ``iou``, score within ``score_tol``)."""
    from torchvision.ops import box_iou

    if len(eager["boxes"]) == 0:
        return 1.0 if len(other["boxes"]) == 0 else 0.0
    if len(other["boxes"]) == 0:
        return 0.0
    same = (eager["labels"][:, None] == other["labels"][None]) & (
        (eager["scores"][:, None] - other["scores"][None]).abs() < score_tol
    )
    same &= box_iou(eager["boxes"], other["boxes"]) > iou
    return float(same.any(1).float().mean())


def raw_call(detector: Any, array: np.ndarray) -> Callable[[], Any]:
    """One call of an exported graph's runtime on a ready input array: the graph alone, without the
    library's conversion of the image (what a user who deploys the file pays)."""
    return lambda: detector._run({"image": array})


def case(kind: str, arch: str, size: tuple[int, int], rounds: int, threads: int, workdir: Path,
         int8_calibration: int = 0, graphs: bool = False) -> dict[str, Any]:  # fmt: skip
    ours, peer = mask_pair(*size) if kind == "mask_rcnn" else build_pair(arch, *size)
    for_export = copy.deepcopy(ours).eval()  # BatchNorm unfolded: the runtimes fuse it themselves
    ours.eval().optimize_for_inference()
    peer.eval()
    names = ["__background__"] + [f"class_{i}" for i in range(1, 91)]
    stem = workdir / f"{kind}_{arch}_{size[0]}x{size[1]}"
    onnx_file = export_onnx(for_export, f"{stem}.onnx", names, example_size=size, input_format="float")  # as cached
    if graphs:
        uint8_file = export_onnx(for_export, f"{stem}-uint8.onnx", names, example_size=size)  # as rcnn export writes it
    del for_export
    image = (torch.rand(3, *size, generator=torch.Generator().manual_seed(1)) * 255).round() / 255  # uint8-exact
    # the library's inference path for each backend and precision
    detectors: dict[str, Any] = {"eager": ours, "onnxruntime": OnnxDetector(onnx_file, threads=threads)}
    if OPENVINO:
        detectors["openvino"] = OpenVinoDetector(onnx_file, threads=threads)
        if bf16_supported():
            detectors["openvino_bf16"] = OpenVinoDetector(onnx_file, threads=threads, precision="bf16")
    if int8_calibration:
        from rcnn.deploy.quantize import quantize_onnx

        g = torch.Generator().manual_seed(2)
        pictures = [(torch.rand(3, *size, generator=g) * 255).round() / 255 for _ in range(int8_calibration)]
        int8_file = quantize_onnx(onnx_file, workdir / f"{onnx_file.stem}-int8.onnx", pictures)
        detectors["onnxruntime_int8"] = OnnxDetector(int8_file, threads=threads)
        if OPENVINO:
            detectors["openvino_int8"] = OpenVinoDetector(int8_file, threads=threads)
    predictors = {name: Predictor(d) for name, d in detectors.items()}
    calls: dict[str, Callable[[], Any]] = {"torchvision": lambda: peer([image])}
    calls.update({name: (lambda p=p: p.detect([image])) for name, p in predictors.items()})
    if graphs:  # the graph alone, the float input (the cached graph) against the uint8 one (the file rcnn export writes)
        pixels = np.ascontiguousarray(image_pixels(image))  # [H, W, 3] uint8
        floats = np.ascontiguousarray(image.numpy())  # [3, H, W]
        calls["onnxruntime_graph_float"] = raw_call(detectors["onnxruntime"], floats)
        calls["onnxruntime_graph_uint8"] = raw_call(OnnxDetector(uint8_file, threads=threads), pixels)
        if OPENVINO:
            calls["openvino_graph_float"] = raw_call(detectors["openvino"], floats)
            calls["openvino_graph_uint8"] = raw_call(OpenVinoDetector(uint8_file, threads=threads), pixels)
    with torch.inference_mode():
        best = time_rounds(calls, rounds=rounds)
        outputs = {name: p.detect([image])[0] for name, p in predictors.items()}
    row: dict[str, Any] = {"model": kind, "arch": arch, "size": list(size), "detections": len(outputs["eager"]["boxes"])}
    for name, figures in best.items():
        row[f"{name}_cpu_s"], row[f"{name}_wall_s"] = figures["cpu_s"], figures["wall_s"]
        if name != "torchvision":
            row[f"{name}_ratio_cpu"] = figures["cpu_s"] / best["torchvision"]["cpu_s"]
            row[f"{name}_ratio_wall"] = figures["wall_s"] / best["torchvision"]["wall_s"]
    for name, out in outputs.items():
        if name != "eager":
            row[f"{name}_agreement"] = agreement(outputs["eager"], out)
            if name.endswith(("_bf16", "_int8")):
                row[f"{name}_agreement_loose"] = agreement(outputs["eager"], out, iou=0.9, score_tol=0.05)
    return row


def parse_recipe(text: str) -> dict[str, Any]:
    """``quantize_onnx``'s settings from ``METHOD[+fc][+keep=PATH;PATH...][+keep=][+p=PERCENTILE]``
    (``+keep=`` alone: nothing kept float), e.g. ``entropy+keep=backbone.fpn``."""
    from rcnn.deploy.quantize import CALIBRATION_METHODS

    method, *parts = text.split("+")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"recipe {text!r}: the method must be one of {', '.join(CALIBRATION_METHODS)}")
    settings: dict[str, Any] = {"method": method}
    for part in parts:
        if part == "fc":
            settings["fc"] = True
        elif part.startswith("keep="):
            settings["keep_float"] = [p for p in part[5:].split(";") if p]
        elif part.startswith("p="):
            settings["percentile"] = float(part[2:])
        else:
            raise ValueError(f"recipe {text!r}: unknown part {part!r} (fc, keep=PATHS, p=PERCENTILE)")
    return settings


def int8_accuracy(model: torch.nn.Module, class_names: list[str], train_set: Any, val_set: Any, workdir: Path,
                  threads: int, calibrate_images: int = 100, recipes: list[str] = ()) -> dict[str, Any]:  # fmt: skip
    """AP on ``val_set`` of a trained model in eager PyTorch, and in ONNX Runtime as the fp32 graph,
    the int8 graph (the library's default settings), the int8 graph with the box head's fully
    connected layers too, in OpenVINO as the fp32 graph in f32 and in bf16 (where the CPU has it)
    and the default int8 graph and, for each of ``recipes`` (:func:`parse_recipe`), the int8 graph those
    settings give; each int8 graph calibrated on ``calibrate_images`` images of ``train_set``
    spread evenly over it."""
    from rcnn.inference import evaluate_model
    from rcnn.deploy.quantize import quantize_onnx

    model = copy.deepcopy(model).eval()
    fp32 = export_onnx(model, workdir / "trained-fp32.onnx", class_names, example_size=(256, 256))
    step = max(len(train_set) // calibrate_images, 1)
    picks = range(0, len(train_set), step)[:calibrate_images]
    detectors: dict[str, Any] = {"eager": model.optimize_for_inference(), "onnxruntime": OnnxDetector(fp32, threads=threads)}
    settings = {"onnxruntime_int8": {}, "onnxruntime_int8_fc": {"fc": True}}
    settings.update({f"int8 {r}": parse_recipe(r) for r in recipes})
    for index, (name, options) in enumerate(settings.items()):
        images = (train_set[i][0] for i in picks)
        path = quantize_onnx(fp32, workdir / f"trained-int8-{index}.onnx", images, **options)
        detectors[name] = OnnxDetector(path, threads=threads)
        if name == "onnxruntime_int8" and OPENVINO:  # the same int8 graph in OpenVINO
            detectors["openvino_int8"] = OpenVinoDetector(path, threads=threads)
    if OPENVINO:
        detectors["openvino"] = OpenVinoDetector(fp32, threads=threads)
        if bf16_supported():
            detectors["openvino_bf16"] = OpenVinoDetector(fp32, threads=threads, precision="bf16")
    out: dict[str, Any] = {"val_images": len(val_set), "calibration_images": len(picks)}
    for name, detector in detectors.items():
        with torch.inference_mode():
            metrics = evaluate_model(detector, val_set, class_names=class_names)
        out[name] = {"AP": metrics["bbox"]["AP"], "AP50": metrics["bbox"]["AP50"],
                     "ms_per_image": 1000 * metrics["seconds_per_image"]}  # fmt: skip
        if "segm" in metrics:
            out[name]["mask_AP"] = metrics["segm"]["AP"]
        print(name, out[name], flush=True)
    return out


def run_accuracy(run: str, threads: int, workdir: Path, calibrate_images: int, recipes: list[str] = ()) -> dict[str, Any]:
    """:func:`int8_accuracy` of a trained run folder on its own data set (train split calibrates, val scores)."""
    from rcnn.build import load_model
    from rcnn.data.reading import build_dataset

    loaded = load_model(run, for_inference=False)
    data = loaded.config.data
    masks = bool(getattr(loaded.model, "predicts_masks", False))  # Mask R-CNN: mask AP too
    train_set = build_dataset(data.root, data.train_split, with_masks=masks, **data.reader_options())
    val_set = build_dataset(data.root, data.val_split, with_masks=masks, **data.reader_options())
    result = int8_accuracy(loaded.model, loaded.class_names, train_set, val_set, workdir, threads, calibrate_images, recipes)
    return {"run": str(run), "model": loaded.config.model.name, "backbone": loaded.config.model.backbone,
            "data": str(data.root), **result}  # fmt: skip


def accuracy_markdown(entries: dict[str, dict[str, Any]]) -> str:
    names = {"eager": "eager PyTorch", "onnxruntime": "ONNX Runtime fp32", "onnxruntime_int8": "ONNX Runtime int8",
             "onnxruntime_int8_fc": "ONNX Runtime int8 + box head fc", "openvino": "OpenVINO fp32",
             "openvino_bf16": "OpenVINO bf16", "openvino_int8": "OpenVINO int8"}  # fmt: skip
    masks = any("mask_AP" in e.get("onnxruntime", {}) for e in entries.values())
    rows = []
    for title, e in entries.items():
        recipes = {k: f"ONNX Runtime {k}" for k in e if k.startswith("int8 ")}
        for key, label in {**names, **recipes}.items():
            if key in e:
                delta = e[key]["AP"] - e["onnxruntime"]["AP"]
                row = [title, label, e[key]["AP"], e[key]["AP50"], f"{delta:+.3f}"]
                if masks:
                    mask = "mask_AP" in e[key]
                    row += [e[key]["mask_AP"] if mask else "",
                            f"{e[key]['mask_AP'] - e['onnxruntime']['mask_AP']:+.3f}" if mask else ""]  # fmt: skip
                rows.append(row + [e[key]["ms_per_image"]])
    headers = ["trained model", "backend", "AP", "AP@0.5", "AP vs fp32"]
    headers += ["mask AP", "mask AP vs fp32"] if masks else []
    return "\n".join([
        "int8 accuracy of trained models (box AP on the val split; the int8 graphs calibrated on images of "
        "the train split; mask AP for Mask R-CNN; ms/image include the evaluation's own loading). \"int8\" is the library's default "
        "quantisation (entropy calibration, the FPN float); \"int8 METHOD+keep=...\" rows are other settings: "
        "the calibration method and the module paths kept float (`+keep=` alone: none):", "",
        table(headers + ["ms/image"], rows),
    ])  # fmt: skip


# the rows of the speed table: (key, backend, precision, what runs)
SPEED_ROWS = [
    ("eager", "eager", "fp32", "PyTorch"),
    ("onnxruntime", "onnxruntime", "fp32", "the cached graph (float input)"),
    ("openvino", "openvino", "fp32", "the cached graph (float input)"),
    ("openvino_bf16", "openvino", "bf16", "the cached graph, bf16 inference precision"),
    ("onnxruntime_int8", "onnxruntime", "int8", "the QDQ graph"),
    ("openvino_int8", "openvino", "int8", "the QDQ graph"),
    ("onnxruntime_graph_float", "onnxruntime", "fp32", "graph alone, float input"),
    ("onnxruntime_graph_uint8", "onnxruntime", "fp32", "graph alone, uint8 input (the rcnn export file)"),
    ("openvino_graph_float", "openvino", "fp32", "graph alone, float input"),
    ("openvino_graph_uint8", "openvino", "fp32", "graph alone, uint8 input (the rcnn export file)"),
]


def cpu_line(cpu: dict[str, Any] | None) -> str:
    """The CPU's model and the instruction flags of :data:`SPEED_FLAGS` it has."""
    if not cpu:
        return "CPU not recorded"
    flags = [f for f in SPEED_FLAGS if f in cpu.get("flags", [])]
    return f"{cpu.get('model')} ({cpu.get('cores')} cores; {', '.join(flags) or 'none of ' + ', '.join(SPEED_FLAGS)})"


def markdown(result: dict[str, Any]) -> str:
    headers = ["model", "size", "backend", "precision", "what runs", "CPU s", "CPU ratio", "wall s", "wall ratio",
               "agreement"]  # fmt: skip
    rows = []
    here = cpu_line(result.get("cpu"))
    for r in result["rows"]:
        first = [f"{r['model']} {r['arch']}", f"{r['size'][0]}x{r['size'][1]}"]
        if r.get("cpu", here) != here:  # a row kept from a run on another CPU: its ratios are that CPU's
            first[0] += f" (on {r['cpu']})"
        rows.append(first + ["torchvision", "fp32", "torchvision's eager model", r["torchvision_cpu_s"], 1.0,
                             r["torchvision_wall_s"], 1.0, ""])  # fmt: skip
        for key, backend, precision, what in SPEED_ROWS:
            if f"{key}_cpu_s" not in r:
                continue
            agree = r.get(f"{key}_agreement")
            agree = "" if agree is None else f"{100 * agree:.0f}%"
            if f"{key}_agreement_loose" in r:
                agree += f" ({100 * r[key + '_agreement_loose']:.0f}% loose)"
            rows.append(first + [backend, precision, what, r[f"{key}_cpu_s"], r[f"{key}_ratio_cpu"], r[f"{key}_wall_s"],
                                 r[f"{key}_ratio_wall"], agree])  # fmt: skip
    text = [f"Seconds per image, {result['threads']} threads, best of {result['rounds']} interleaved rounds "
            "(CPU = all threads; ratio = to torchvision's eager model, same weights, same image), on "
            f"{here} (a row measured on another CPU names it):", "",
            table(headers, rows), "",
            "agreement: the share of the eager model's detections that the backend gives too (same label, box "
            "IoU > 0.99, score within 1e-3); loose: IoU > 0.9, score within 0.05."]  # fmt: skip
    for r in result["rows"]:
        for runtime in ("onnxruntime", "openvino"):
            if f"{runtime}_graph_uint8_cpu_s" in r:
                ratio = r[f"{runtime}_graph_uint8_cpu_s"] / r[f"{runtime}_graph_float_cpu_s"]
                text.append(f"- {r['model']} {r['arch']} {r['size'][0]}x{r['size'][1]}, {runtime}: the uint8-input "
                            f"file takes {ratio:.3f}x the CPU time of the float-input graph")  # fmt: skip
    if result.get("notes"):
        text += ["", result["notes"]]
    text += _commands("The speed rows", result["rows"])
    if result.get("accuracy"):
        text += ["", accuracy_markdown(result["accuracy"])] + _commands("The accuracy rows", result["accuracy"].values())
    return "\n".join(text)


def _commands(what: str, entries: Any) -> list[str]:
    """A paragraph naming the distinct commands that measured ``entries`` (none if none says)."""
    commands = list(dict.fromkeys(e["command"] for e in entries if e.get("command")))
    return ["", f"{what}: " + "; ".join(f"`{c}`" for c in commands) + "."] if commands else []


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 5")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="comma-separated case numbers (0-based) of CASES")
    parser.add_argument("--int8", type=int, default=0, metavar="N", help="also an int8 model calibrated on N images")
    parser.add_argument("--graphs", action="store_true",
                        help="also the exported graphs alone, the float-input graph against the uint8-input file of "
                        "rcnn export, in ONNX Runtime and OpenVINO")
    parser.add_argument("--accuracy", nargs="+", default=[], metavar="[TITLE=]RUN",
                        help="trained run folders whose AP to measure in eager, ONNX Runtime fp32 and int8 "
                        "(e.g. the demo's demo_out/run); with no speed --only, the speed rows stay as they are")
    parser.add_argument("--calibrate-images", type=int, default=100, help="int8 calibration images for --accuracy")
    parser.add_argument("--recipes", nargs="+", default=[], metavar="RECIPE",
                        help="for --accuracy, int8 settings to measure besides the default: "
                        "METHOD[+fc][+keep=PATH;PATH][+p=PERCENTILE], e.g. minmax+keep= entropy+keep=backbone.fpn")
    parser.add_argument("--notes", default="", help="a line on the conditions, shown under the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else 5
    chosen = [CASES[int(i)] for i in args.only.split(",")] if args.only else ([] if args.accuracy else CASES)
    previous = read_result("backends")
    # --only / --accuracy: the other speed rows stay; the accuracy entries stay in every run
    rows = [r for r in (previous or {}).get("rows", [])] if args.only or args.accuracy else []
    command = command_line("benchmarks.backends", argv)
    accuracy = dict((previous or {}).get("accuracy", {}))
    result: dict[str, Any] = {"rows": rows, "threads": args.threads, "accuracy": accuracy, "cpu": cpu_info(),
                              "rounds": rounds if chosen else (previous or {}).get("rounds", rounds),
                              "notes": args.notes or (previous or {}).get("notes", "")}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.accuracy:
            title, _, run = spec.rpartition("=") if "=" in spec else (spec, "", spec)
            accuracy[title] = {**run_accuracy(run, args.threads, Path(tmp), args.calibrate_images, args.recipes),
                               "command": command}  # fmt: skip
            write_result("backends", result, command)
        for kind, arch, size in chosen:
            row = case(kind, arch, size, rounds, args.threads, Path(tmp), args.int8, args.graphs)
            row["command"], row["cpu"] = command, cpu_line(result["cpu"])  # each row's CPU: rows of other runs stay
            print(row, flush=True)
            rows = [r for r in rows if (r["model"], r["arch"], r["size"]) != (kind, arch, list(size))] + [row]
            rows.sort(key=lambda r: [c[:3] for c in CASES].index((r["model"], r["arch"], tuple(r["size"]))))
            result.update(rows=rows, rounds=rounds)
            write_result("backends", result, command)  # after each case: a long run keeps what it measured
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
