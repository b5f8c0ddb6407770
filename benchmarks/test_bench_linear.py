"""pytest-benchmark suite, hidden states in: phase × implementation × dtype × (N, V, H).

Run with ``.venv/bin/python -m pytest benchmarks -q`` (not part of ``make test``). Each case is
first checked against eager PyTorch (or our chunked torch backend where eager runs out of memory);
``extra_info`` holds the peak extra memory, the model FLOPs and the error.

Shapes: CPU ``(N, V, H) ∈ {(512, 8192, 128), (1024, 32000, 256)}``; CUDA ``N ∈ {4096, 16384} ×
V ∈ {32000, 128256, 256000} × H ∈ {2304, 4096}``. On CPU bf16 / fp16 run only our backends and the
floor (this torch's CPU bf16 GEMMs make eager minutes long; ``steerlm_kernels.bench.config`` explains).
"""

from __future__ import annotations

import os

import pytest
import torch

from steerlm_kernels.bench import harness, linear

DEVICE = torch.device(os.environ.get("STEERLM_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
SHAPES = ([(n, v, h) for n in (4096, 16384) for v in (32000, 128256, 256000) for h in (2304, 4096)]
          if DEVICE.type == "cuda" else [(512, 8192, 128), (1024, 32000, 256)])
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("matmuls", "eager", "compile", "lce", "liger", "cce", "torch", "cpp", "triton", "triton-tiles")

_state: dict[str, object] = {}


def _workload(shape: tuple[int, int, int], dtype: torch.dtype) -> linear.LinearWorkload:
    key = (shape, dtype)
    if _state.get("key") != key:
        _state.clear()  # one shape at a time in memory
        n, v, h = shape
        _state["key"] = key
        _state["w"] = linear.make_linear_workload(n, v, h, min(n, 1024), dtype, DEVICE)
    return _state["w"]  # type: ignore[return-value]


def _reference(w: linear.LinearWorkload, phase: str) -> dict[str, torch.Tensor] | None:
    if f"ref/{phase}" not in _state:
        _state[f"ref/{phase}"] = linear.linear_reference(w, phase)
    return _state[f"ref/{phase}"]  # type: ignore[return-value]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-V{v}-H{h}" for n, v, h in SHAPES])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("phase", linear.PHASES)
def test_linear(benchmark, phase: str, impl: str, dtype: str, shape: tuple[int, int, int]) -> None:
    if impl not in linear.default_linear_impls(DEVICE):
        pytest.skip(f"{impl} does not run on {DEVICE.type} here")
    if DEVICE.type == "cpu" and dtype != "fp32" and impl in ("eager", "compile", "lce"):
        pytest.skip("CPU bf16/fp16 GEMMs of this torch make the unfused comparators minutes long")
    implementation = linear.build_linear_impl(impl, DEVICE)
    w = _workload(shape, DTYPES[dtype])
    row = linear.run_linear_case(implementation, phase, w, harness.Timer(DEVICE), 1, 1, _reference(w, phase))
    assert row.error is None, row.error
    # True, not merely "not False": a row whose check did not run (no reference) fails here
    assert row.agrees is True, f"value rel err {row.value_rel_err}, grad rel err {row.grad_rel_err}"
    prepare, call = linear.phase_fns(implementation, phase, w)

    def timed(args: object) -> None:
        call(args)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update({"n": w.n, "v": w.v, "h": w.h, "device": str(DEVICE), "flops": row.flops,
                                 "extra_mib": row.extra_mib, "value_rel_err": row.value_rel_err,
                                 "grad_rel_err": row.grad_rel_err})
    benchmark.pedantic(timed, setup=lambda: ((prepare(),), {}), rounds=3, iterations=1, warmup_rounds=0)
