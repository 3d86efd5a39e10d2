"""The roofline accounting of ``scripts/benchmark.py``: FLOPs counted by the dtype each product
runs in, against the analytic counts, and the mixed-dtype roofline against figures worked out by
hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import benchmark  # scripts/benchmark.py


def test_flops_are_counted_by_the_dtype_each_product_runs_in_with_the_cpus_fused_attention():
    linear = torch.nn.Linear(64, 32)
    q, k, v = (torch.rand(1, 2, 16, 8) for _ in range(3))
    counter = benchmark.FlopsByDtype()
    with counter, torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            linear(torch.rand(10, 64))  # a bf16 product under autocast
        torch.rand(5, 8) @ torch.rand(8, 3)  # a float32 one
        F.scaled_dot_product_attention(q, k, v)  # QK^T and AV: 2 x (2 B H L L D)
    assert counter.by_dtype == {"bfloat16": 2 * 10 * 64 * 32, "float32": 2 * 5 * 8 * 3 + 2 * 2 * 1 * 2 * 16 * 16 * 8}
    assert counter.get_total_flops() == sum(counter.by_dtype.values())


def test_the_roofline_of_a_mixed_program_runs_each_dtype_at_its_own_peak():
    flops = {"bf16": {"bfloat16": 8.0, "float32": 2.0}, "fp32": {"float32": 10.0}}
    peaks = {"bfloat16": {"torch.matmul": 4.0, "oneDNN": 8.0}, "float32": {"torch.matmul": 1.0, "oneDNN": 2.0}}
    rates = {"torch_bf16": 0.25, "torch_fp32": 0.1, "onnxruntime": 0.2}
    result = benchmark.roofline(flops, peaks, rates, lambda name: "bf16" if "bf16" in name else "fp32")
    assert result["matmul_peak_gflops"] == {"bfloat16": 8.0, "float32": 2.0}  # the faster library
    # bf16: 8 GFLOP at 8 GFLOP/s and 2 at 2 take 2 s an image; fp32: 10 at 2 take 5 s
    assert result["roofline_images_per_second"] == {"bf16": 0.5, "fp32": 0.2}
    assert result["roofline_fraction_of_peak"] == {"bf16": pytest.approx(0.625), "fp32": pytest.approx(1.0)}
    assert result["fraction_of_peak"] == {"torch_bf16": pytest.approx(0.3125), "torch_fp32": pytest.approx(0.5),
                                          "onnxruntime": pytest.approx(1.0)}
    assert result["fraction_of_roofline"] == {"torch_bf16": pytest.approx(0.5), "torch_fp32": pytest.approx(0.5),
                                              "onnxruntime": pytest.approx(1.0)}
    assert result["gflop_per_image"] == {"bf16": 10.0, "fp32": 10.0}


def test_the_benchmark_times_bf16_by_default_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    from medad.model import backbone

    monkeypatch.setattr(backbone, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert benchmark.native_precisions(torch.device("cpu")) == ["fp32"]
    monkeypatch.setattr(backbone, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert benchmark.native_precisions(torch.device("cpu")) == ["fp32", "bf16"]
