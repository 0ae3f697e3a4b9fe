"""The runtime profile benchmark's report, from a result of its shape (the measurement itself takes
minutes: ``python -m benchmarks.runtime_profile``)."""

from __future__ import annotations


def test_the_report_gives_the_uint8_ratio_and_each_runtimes_heaviest_parts():
    from benchmarks.runtime_profile import markdown

    timings = {"onnxruntime_float": {"cpu_s": 2.0, "wall_s": 1.0}, "openvino_float": {"cpu_s": 1.6, "wall_s": 0.8},
               "onnxruntime_uint8": {"cpu_s": 2.1, "wall_s": 1.05}, "openvino_uint8": {"cpu_s": 1.6, "wall_s": 0.8}}  # fmt: skip
    profile = {"onnxruntime_float": {"ms_by_op": {"Conv": 800.0, "RoiAlign": 90.0}, "ms_total": 950.0},
               "openvino_bf16": {"ms_by_kernel": {"brgconv_avx512_amx_bf16": 120.0}, "ms_by_op": {"Convolution": 120.0},
                                 "ms_total": 200.0}}  # fmt: skip
    result = {"size": [800, 1066], "rounds": 7, "threads": 2, "timings": timings, "profile": profile,
              "cpu": {"model": "Some CPU", "flags": ["avx2", "amx_bf16"], "cores": 2},
              "openvino_cpu": {"name": "Some CPU", "capabilities": ["FP32", "BF16"]}}  # fmt: skip
    text = markdown(result)
    assert "on Some CPU (2 cores; avx2, amx_bf16)" in text and "OpenVINO finds FP32, BF16" in text
    assert "1.050x the CPU time in ONNX Runtime, 1.000x in OpenVINO" in text
    assert "- onnxruntime_float (950 ms a run in its profile): Conv 800 ms, RoiAlign 90 ms" in text
    assert "- openvino_bf16 (200 ms a run in its profile): brgconv_avx512_amx_bf16 120 ms" in text
