"""Where ONNX Runtime's and OpenVINO's time goes on one graph, and what the uint8 input costs.

    python -m benchmarks.runtime_profile [--rounds 7] [--threads 2]

Faster R-CNN ResNet-50-FPN at 800x1066 (the weights of ``benchmarks.faster_rcnn``: torchvision's
random initialisation, BatchNorm statistics from random images), exported twice by
:func:`rcnn.deploy.export.export_onnx`: the float-input graph the backends cache, and the
uint8-input file ``rcnn export`` writes. Measured in one process:

- each graph in ONNX Runtime and in OpenVINO (f32), fed a ready array, interleaved A B C D,
  D C B A, ..., best of ``--rounds``, CPU seconds beside wall;
- ONNX Runtime's own profile of each graph (milliseconds per operator type and the heaviest
  nodes, per run);
- OpenVINO's performance counters of the float graph with inference precision f32 and bf16
  (milliseconds per kernel, e.g. ``brgconv_avx512_f32`` against ``brgconv_avx512_amx_bf16``: which
  instruction set each runtime's convolutions use on this CPU, the reason a ranking measured on
  one CPU does not hold on another);
- the CPU's model and flags, and OpenVINO's view of it (``OPTIMIZATION_CAPABILITIES``).

Writes ``benchmarks/results/runtime_profile.json``; docs/export.md explains the figures.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import command_line, table, write_result

SIZE = (800, 1066)


def _ort_session(path: Path, threads: int, profile_prefix: Path | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ov_request(core: Any, path: Path, threads: int, hint: str = "f32", counters: bool = False) -> Any:
    config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
              "PERF_COUNT": counters}  # fmt: skip
    return core.compile_model(str(path), "CPU", config).create_infer_request()


def _ort_profile(path: Path, feed: np.ndarray, threads: int, work: Path, runs: int = 3) -> dict[str, Any]:
    """ONNX Runtime's profile of ``runs`` calls: ms per run by operator type and the heaviest nodes."""
    session = _ort_session(path, threads, work / path.stem)
    for _ in range(runs):
        session.run(None, {"image": feed})
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op, by_node = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
            by_node[e["name"].removesuffix("_kernel_time")] += e["dur"] / 1e3 / runs
    return {"ms_by_op": dict(by_op.most_common(10)), "ms_by_node": dict(by_node.most_common(6)),
            "ms_total": sum(by_op.values())}  # fmt: skip


def _ov_counters(core: Any, path: Path, feed: np.ndarray, threads: int, hint: str) -> dict[str, Any]:
    """OpenVINO's performance counters of one call (after a warm-up): ms by kernel and by operator."""
    request = _ov_request(core, path, threads, hint, counters=True)
    request.infer({"image": feed})
    request.infer({"image": feed})
    kernels, ops = collections.Counter(), collections.Counter()
    for info in request.profiling_info:
        ms = info.real_time.total_seconds() * 1e3
        kernels[info.exec_type] += ms
        ops[info.node_type] += ms
    return {"ms_by_kernel": dict(kernels.most_common(8)), "ms_by_op": dict(ops.most_common(6)), "ms_total": sum(ops.values())}


def measure(rounds: int, threads: int) -> dict[str, Any]:
    import openvino

    from benchmarks.faster_rcnn import build_pair
    from rcnn.deploy.export import export_onnx

    torch.set_num_threads(threads)
    ours, _ = build_pair("resnet50_fpn", *SIZE)
    names = ["__background__"] + [f"class_{i}" for i in range(1, 91)]
    pixels = np.random.default_rng(1).integers(0, 256, size=(*SIZE, 3), dtype=np.uint8)
    floats = np.ascontiguousarray(pixels.transpose(2, 0, 1).astype(np.float32) / 255)
    core = openvino.Core()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        graphs = {"float": export_onnx(copy.deepcopy(ours).eval(), work / "float.onnx", names, example_size=SIZE,
                                       input_format="float"),
                  "uint8": export_onnx(copy.deepcopy(ours).eval(), work / "uint8.onnx", names, example_size=SIZE)}  # fmt: skip
        del ours
        feeds = {"float": floats, "uint8": pixels}
        calls = {}
        for kind, path in graphs.items():
            session = _ort_session(path, threads)
            request = _ov_request(core, path, threads)
            calls[f"onnxruntime_{kind}"] = lambda s=session, f=feeds[kind]: s.run(None, {"image": f})
            calls[f"openvino_{kind}"] = lambda r=request, f=feeds[kind]: r.infer({"image": f})
        for call in calls.values():
            call()
        best = {name: {"cpu_s": float("inf"), "wall_s": float("inf")} for name in calls}
        for r in range(rounds):
            for name in list(calls) if r % 2 == 0 else list(calls)[::-1]:
                cpu, wall = time.process_time(), time.perf_counter()
                calls[name]()
                best[name]["cpu_s"] = min(best[name]["cpu_s"], time.process_time() - cpu)
                best[name]["wall_s"] = min(best[name]["wall_s"], time.perf_counter() - wall)
        profile = {f"onnxruntime_{kind}": _ort_profile(path, feeds[kind], threads, work) for kind, path in graphs.items()}
        for hint in ("f32", "bf16"):
            if hint == "bf16" and "BF16" not in [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]:
                continue
            profile[f"openvino_{hint}"] = _ov_counters(core, graphs["float"], floats, threads, hint)
    from rcnn.deploy.backends import cpu_info

    return {"size": list(SIZE), "rounds": rounds, "threads": threads, "timings": best, "profile": profile,
            "cpu": cpu_info(), "openvino_cpu": {"name": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
            "capabilities": [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]}}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    from benchmarks.backends import cpu_line

    t = result["timings"]
    rows = [[name, v["cpu_s"], v["wall_s"]] for name, v in t.items()]
    parts = [f"Faster R-CNN ResNet-50-FPN at {result['size'][0]}x{result['size'][1]}, {result['threads']} threads, "
             f"best of {result['rounds']} interleaved rounds, on {cpu_line(result['cpu'])}; OpenVINO finds "
             f"{', '.join(result['openvino_cpu']['capabilities'])}:", "",
             table(["graph and runtime", "CPU s", "wall s"], rows), "",
             f"The uint8-input file of `rcnn export` against the float-input graph: "
             f"{t['onnxruntime_uint8']['cpu_s'] / t['onnxruntime_float']['cpu_s']:.3f}x the CPU time in ONNX Runtime, "
             f"{t['openvino_uint8']['cpu_s'] / t['openvino_float']['cpu_s']:.3f}x in OpenVINO.", ""]  # fmt: skip
    for name, p in result["profile"].items():
        what = p.get("ms_by_kernel") or p["ms_by_op"]
        parts.append(f"- {name} ({p['ms_total']:.0f} ms a run in its profile): "
                     + ", ".join(f"{k} {v:.0f} ms" for k, v in list(what.items())[:6]))  # fmt: skip
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args(argv)
    result = measure(3 if args.quick else args.rounds, args.threads)
    write_result("runtime_profile", result, command_line("benchmarks.runtime_profile", argv))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
