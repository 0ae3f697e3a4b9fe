"""Where the eager model's CPU time goes at 800x1066, and what channels_last and bf16 would change.

    python -m benchmarks.eager_profile [--rounds 5] [--threads 2] [--arch resnet50_fpn]

Our Faster R-CNN (the weights of ``benchmarks.faster_rcnn``: torchvision's random initialisation
copied in, BatchNorm folded, score threshold 0 so post-processing handles its 100 best) on one
800x1066 image:

- **stages**: CPU and wall milliseconds of each part of one call, best of the rounds, taken by
  forward hooks on the model's own modules: resize and normalise (``transform``), the backbone's trunk
  (``backbone`` without its ``fpn``), the FPN, the RPN head's convolutions, the rest of the RPN (anchors, top-k,
  box decoding, NMS), RoIAlign (``pooler``), the box head's fully connected layers and predictor,
  the rest of the RoI heads (per-class NMS, top-k) and what remains of the call (input checks,
  mapping boxes back to the image);
- **operators**: the ten operators with the most self CPU time (``torch.profiler``);
- **options**: ``channels_last`` weights and input (measured faster with the same detections, so
  :meth:`optimize_for_inference` gives it by default, and the stages above are of that model) and
  ``torch.autocast("cpu", torch.bfloat16)`` (where the CPU has bf16 instructions), each timed
  interleaved with the plain model (contiguous weights, fp32; A B, B A, ...), with the share of
  the plain model's detections each keeps (same label, box IoU > 0.99).

- **physical limit**: the model's FLOPs per call (``torch.utils.flop_counter`` on the plain path:
  convolutions and matrix products, the work that can run near the machine's peak) and the GFLOP/s each backend
  achieves (eager, ONNX Runtime fp32, int8 calibrated on 8 random images), timed interleaved,
  against the machine's measured peak: the best 4096x4096 fp32 matrix product with the same
  threads, by PyTorch or by ONNX Runtime.

Writes ``benchmarks/results/eager_profile.json``.
"""

from __future__ import annotations

import argparse
import copy
from collections import defaultdict
from contextlib import contextmanager
from typing import Any

import torch

from benchmarks.harness import command_line, table, time_rounds, write_result
from benchmarks.faster_rcnn import build_pair
from rcnn.inference import Clock, Predictor

CLOCK = Clock()  # CPU and wall seconds (the CPU: no device to synchronise)

STAGES = {  # name -> the module (a dotted path in the model) whose forward is that stage
    "resize + normalise": "transform",
    "FPN": "backbone.fpn",
    "RPN head convolutions": "rpn.head",
    "RoIAlign": "roi_heads.pooler",
    "box head fc6/fc7": "roi_heads.box_head",
    "box predictor": "roi_heads.predictor",
}
WHOLE = {"backbone": "backbone", "rpn": "rpn", "roi_heads": "roi_heads"}  # their parts' times are taken out


def _has(model: torch.nn.Module, path: str) -> bool:
    try:
        return model.get_submodule(path) is not None
    except AttributeError:
        return False


@contextmanager
def stage_clock(model: torch.nn.Module, totals: dict[str, list[float]]):
    """Add each hooked module's CPU and wall seconds of a call into ``totals[name] = [cpu, wall]``."""
    handles = []
    for name, path in {**STAGES, **WHOLE}.items():
        found = [p for p in ((path,) if isinstance(path, str) else path) if _has(model, p)]
        if not found:  # a part this model does not have (the tiny backbone's FPN)
            continue
        module = model.get_submodule(found[0])
        started: list[tuple[float, float]] = []

        def before(_m, _a, started=started):
            started.append(CLOCK.now())

        def after(_m, _a, _o, name=name, started=started):
            (cpu, wall), (cpu_end, wall_end) = started.pop(), CLOCK.now()
            totals[name][0] += cpu_end - cpu
            totals[name][1] += wall_end - wall

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def stage_split(model: torch.nn.Module, image: torch.Tensor, rounds: int) -> dict[str, dict[str, float]]:
    """Best-of-``rounds`` milliseconds of each stage (CPU, wall), the derived "rest" stages included."""
    best: dict[str, dict[str, float]] = {}
    predictor = Predictor(model)
    with torch.inference_mode():
        predictor.detect([image])  # warm-up
        for _ in range(rounds):
            totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
            with stage_clock(model, totals):
                cpu, wall, _ = CLOCK.measure(lambda: predictor.detect([image]))
            totals["whole call"] = [cpu, wall]
            t = defaultdict(lambda: (0.0, 0.0), {k: tuple(v) for k, v in totals.items()})
            derived = {
                "backbone trunk": [t["backbone"][i] - t["FPN"][i] for i in (0, 1)],
                "RPN anchors, top-k, decoding, NMS": [t["rpn"][i] - t["RPN head convolutions"][i] for i in (0, 1)],
                "RoI heads post-processing (per-class NMS)": [
                    t["roi_heads"][i] - sum(t[s][i] for s in ("RoIAlign", "box head fc6/fc7", "box predictor")) for i in (0, 1)
                ],
                "the rest (checks, boxes back to the image)": [
                    t["whole call"][i] - sum(t[s][i] for s in ("resize + normalise", "backbone", "rpn", "roi_heads"))
                    for i in (0, 1)
                ],
            }  # fmt: skip
            for name, (c, w) in {**{k: v for k, v in t.items() if k not in WHOLE and k in totals}, **derived}.items():
                entry = best.setdefault(name, {"cpu_ms": float("inf"), "wall_ms": float("inf")})
                entry["cpu_ms"] = min(entry["cpu_ms"], 1000 * c)
                entry["wall_ms"] = min(entry["wall_ms"], 1000 * w)
    order = ["resize + normalise", "backbone trunk", "FPN", "RPN head convolutions", "RPN anchors, top-k, decoding, NMS",
             "RoIAlign", "box head fc6/fc7", "box predictor", "RoI heads post-processing (per-class NMS)",
             "the rest (checks, boxes back to the image)", "whole call"]  # fmt: skip
    return {name: best[name] for name in order if name in best}


def top_operators(model: torch.nn.Module, image: torch.Tensor, count: int = 10) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    predictor = Predictor(model)
    with torch.inference_mode():
        predictor.detect([image])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            predictor.detect([image])
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"operator": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000,
             "share": e.self_cpu_time_total / total} for e in events[:count]]  # fmt: skip


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    from torchvision.ops import box_iou

    if len(a["boxes"]) == 0 or len(b["boxes"]) == 0:
        return float(len(a["boxes"]) == len(b["boxes"]))
    same = (a["labels"][:, None] == b["labels"][None]) & (box_iou(a["boxes"], b["boxes"]) > 0.99)
    return float(same.any(1).float().mean())


def options(model: torch.nn.Module, last: torch.nn.Module, image: torch.Tensor, rounds: int) -> dict[str, Any]:
    """channels_last (``last``, what :meth:`optimize_for_inference` gives by default) and bf16
    autocast against the plain model (``model``: contiguous weights), interleaved; each one's agreement."""
    image_last = image[None].contiguous(memory_format=torch.channels_last)[0]
    model, last = Predictor(model), Predictor(last)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.detect([image])

    calls = {"plain": lambda: model.detect([image]), "channels_last": lambda: last.detect([image_last]), "bf16_autocast": bf16}
    with torch.inference_mode():
        (plain,) = model.detect([image])
        outs = {"channels_last": last.detect([image_last])[0]}
        # bf16 only where the CPU has bf16 instructions: elsewhere autocast is emulated, many
        # times slower (a full-size call takes minutes on AVX2), and says nothing worth timing
        native = bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))
        if native:
            outs["bf16_autocast"] = bf16()[0]
        else:
            del calls["bf16_autocast"]
        best = time_rounds(calls, rounds=rounds)
    out: dict[str, Any] = {"plain": best["plain"]}
    if "bf16_autocast" not in best:
        out["bf16_autocast"] = {"skipped": "no bf16 instructions (avx512_bf16, amx_bf16) on this CPU"}
    for name in [n for n in ("channels_last", "bf16_autocast") if n in best]:
        out[name] = {**best[name], "ratio_cpu": best[name]["cpu_s"] / best["plain"]["cpu_s"],
                     "ratio_wall": best[name]["wall_s"] / best["plain"]["wall_s"],
                     "agreement": agreement(plain, outs[name]) if name in outs else None}  # fmt: skip
    return out


def matmul_peak_gflops(threads: int, n: int = 4096, rounds: int = 15) -> dict[str, float]:
    """The machine's fp32 peak with this process's threads: the best of ``rounds`` n x n products,
    by PyTorch (its BLAS) and by ONNX Runtime (MLAS), GFLOP/s of each and ``peak``, the larger.
    Both are measured as BLAS libraries reach different shares of a CPU's peak (on an AMD EPYC with
    AVX-512, PyTorch's matrix product runs at half of ONNX Runtime's). 15 rounds: on a shared 2-core
    machine the best of 5 ONNX Runtime products varied from 178 to 274 GFLOP/s between runs, the best
    of 15 from 360 to 383."""
    import numpy as np
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    a, b = torch.randn(n, n), torch.randn(n, n)

    def best_of(call) -> float:
        call()
        best = float("inf")
        for _ in range(rounds):
            best = min(best, CLOCK.measure(call)[1])
        return 2 * n**3 / best / 1e9

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])], [numpy_helper.from_array(b.numpy(), "b")],
    )  # fmt: skip
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), options,
        providers=["CPUExecutionProvider"],
    )  # fmt: skip
    a_np = np.ascontiguousarray(a.numpy())
    out = {"pytorch": best_of(lambda: a @ b), "onnxruntime": best_of(lambda: session.run(None, {"a": a_np}))}
    return {**out, "peak": max(out.values())}


def model_gflop(model: torch.nn.Module, image: torch.Tensor) -> float:
    """GFLOP of one call, counted on the plain path: the CPU fast paths' RoIAlign is a sparse matrix
    product, which the counter would count as a dense one (1248 instead of 355 GFLOP for R50-FPN
    at 800x1066)."""
    from torch.utils.flop_counter import FlopCounterMode

    from rcnn.core import fastpaths

    with torch.inference_mode(), fastpaths.enabled_as(False), FlopCounterMode(display=False) as counter:
        model([image])  # any callable of the model API (the test counts one layer's)
    return counter.get_total_flops() / 1e9


def physical_limit(plain: torch.nn.Module, optimized: torch.nn.Module, image: torch.Tensor, threads: int,
                   rounds: int, workdir) -> dict[str, Any]:  # fmt: skip
    """Achieved GFLOP/s of each backend against the matmul peak (see the module docstring)."""
    from pathlib import Path

    from rcnn.deploy.export import OnnxDetector, export_onnx
    from rcnn.deploy.quantize import quantize_onnx

    names = ["__background__"] + [f"class_{i}" for i in range(1, plain.num_classes)]
    fp32 = export_onnx(plain, Path(workdir) / "model.onnx", names, example_size=tuple(image.shape[1:]), input_format="float")
    g = torch.Generator().manual_seed(2)
    pictures = [(torch.rand(*image.shape, generator=g) * 255).round() / 255 for _ in range(8)]
    int8 = quantize_onnx(fp32, Path(workdir) / "model-int8.onnx", pictures)
    detectors = {"eager": Predictor(optimized), "onnxruntime": Predictor(OnnxDetector(fp32, threads=threads)),
                 "onnxruntime_int8": Predictor(OnnxDetector(int8, threads=threads))}  # fmt: skip
    with torch.inference_mode():
        best = time_rounds({k: (lambda d=d: d.detect([image])) for k, d in detectors.items()}, rounds=rounds)
    gflop = model_gflop(optimized, image)
    matmul = matmul_peak_gflops(threads)
    peak = matmul["peak"]
    out: dict[str, Any] = {"gflop_per_image": gflop, "matmul_peak_gflops": peak, "matmul_gflops": matmul}
    for name, figures in best.items():
        achieved = gflop / figures["wall_s"]
        out[name] = {**figures, "gflops": achieved, "of_peak": achieved / peak}
    return out


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "avx_vnni"))


def markdown(result: dict[str, Any]) -> str:
    whole = result["stages"]["whole call"]["cpu_ms"]
    rows = [[name, f"{s['cpu_ms']:.0f}", f"{s['wall_ms']:.0f}", f"{100 * s['cpu_ms'] / whole:.1f}%"]
            for name, s in result["stages"].items()]  # fmt: skip
    ops = [[o["operator"], o["calls"], f"{o['self_cpu_ms']:.0f}", f"{100 * o['share']:.1f}%"] for o in result["operators"]]
    opt = result["options"]
    option_rows = [[name, "not run: " + opt[name]["skipped"], "", "", ""] if "skipped" in opt[name] else [name, f"{opt[name]['cpu_s']:.3f}", f"{opt[name]['ratio_cpu']:.2f}", f"{opt[name]['ratio_wall']:.2f}",
                    "-" if opt[name]["agreement"] is None else f"{100 * opt[name]['agreement']:.0f}%"]
                   for name in ("channels_last", "bf16_autocast")]  # fmt: skip
    size = "x".join(map(str, result["size"]))
    return "\n".join([
        f"Our eager Faster R-CNN {result['arch']} on one {size} image, {result['threads']} threads, best of "
        f"{result['rounds']} calls; milliseconds per stage from forward hooks on the model's modules (CPU = all threads):", "",
        table(["stage", "CPU ms", "wall ms", "share of CPU"], rows), "",
        "The operators with the most self CPU time in one call (`torch.profiler`):", "",
        table(["operator", "calls", "self CPU ms", "share"], ops), "",
        f"Options, interleaved with the plain model (plain: {opt['plain']['cpu_s']:.3f} CPU s per image; ratio = option / "
        f"plain; agreement = the plain model's detections the option keeps, same label and box IoU > 0.99; CPU "
        f"flags: {', '.join(result['cpu_flags']) or 'none listed'}):", "",
        table(["option", "CPU s", "CPU ratio", "wall ratio", "agreement"], option_rows),
    ] + physical_markdown(result.get("physical")))  # fmt: skip


def physical_markdown(phys: dict[str, Any] | None) -> list[str]:
    if not phys:
        return []
    labels = {"eager": "eager PyTorch", "onnxruntime": "ONNX Runtime fp32", "onnxruntime_int8": "ONNX Runtime int8"}
    rows = [[label, f"{phys[k]['wall_s']:.3f}", f"{phys[k]['cpu_s']:.3f}", f"{phys[k]['gflops']:.0f}",
             f"{100 * phys[k]['of_peak']:.0f}%"] for k, label in labels.items() if k in phys]  # fmt: skip
    matmul = phys.get("matmul_gflops", {})
    by = f" (PyTorch's {matmul['pytorch']:.0f}, ONNX Runtime's {matmul['onnxruntime']:.0f})" if matmul else ""
    return ["", f"Physical limit: one call is {phys['gflop_per_image']:.0f} GFLOP of convolutions and matrix products "
            f"(`torch.utils.flop_counter`); the machine's peak, the best 4096x4096 fp32 matrix product with the same "
            f"threads, is {phys['matmul_peak_gflops']:.0f} GFLOP/s{by}. Achieved (FLOPs / wall seconds, int8 counted "
            "as the same operations, so int8 can pass the fp32 peak):", "",
            table(["backend", "wall s", "CPU s", "GFLOP/s", "of the fp32 peak"], rows)]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", default="resnet50_fpn", choices=["resnet50_fpn", "mobilenet_v3_fpn"])
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"))
    parser.add_argument("--skip-physical", action="store_true", help="no ONNX Runtime timing / GFLOP/s section")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ours, _ = build_pair(args.arch, *args.size)
    plain = copy.deepcopy(ours).eval()  # BatchNorm unfolded, for the export (ONNX Runtime fuses it itself)
    contiguous = copy.deepcopy(ours).eval().optimize_for_inference(channels_last=False)
    ours.eval().optimize_for_inference()  # channels_last, the default
    image = (torch.rand(3, *args.size, generator=torch.Generator().manual_seed(1)) * 255).round() / 255
    result = {"arch": args.arch, "size": list(args.size), "threads": args.threads, "rounds": args.rounds,
              "cpu_flags": cpu_flags()}  # fmt: skip
    result["stages"] = stage_split(ours, image, args.rounds)
    result["operators"] = top_operators(ours, image)
    result["options"] = options(contiguous, ours, image, args.rounds)
    if not args.skip_physical:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            result["physical"] = physical_limit(plain, ours, image, args.threads, args.rounds, tmp)
    write_result("eager_profile", result, command_line("benchmarks.eager_profile", argv))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
