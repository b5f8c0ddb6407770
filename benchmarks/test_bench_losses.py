"""pytest-benchmark suite: phase × implementation × dtype at a small CPU shape.

Run with ``.venv/bin/python -m pytest benchmarks -q`` (not part of ``make test``). Each case times
one call of the phase's function (the fresh logits copy of the in-place phase is made in the
untimed setup) and records the result's agreement with eager PyTorch in ``extra_info``.
Unavailable backends (and Liger-Kernel off CUDA) are skipped, with the reason.
"""

from __future__ import annotations

import os

import pytest
import torch

from steerlm_kernels import _dispatch, bench

DEVICE = torch.device(os.environ.get("STEERLM_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
N, V, S = (4096, 32000, 1024) if DEVICE.type == "cuda" else (512, 8192, 128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("eager", "compile", "liger", *_dispatch.BACKENDS)

_workloads: dict[torch.dtype, bench.Workload] = {}
_references: dict[tuple[torch.dtype, str], dict[str, torch.Tensor]] = {}
_impls: dict[str, bench.Impl] = {}


def _workload(dtype: torch.dtype) -> bench.Workload:
    if dtype not in _workloads:
        _workloads.clear()  # one shape at a time in memory
        _references.clear()
        _workloads[dtype] = bench.make_workload(N, V, S, dtype, DEVICE)
    return _workloads[dtype]


def _impl(name: str) -> bench.Impl:
    if name == "triton" and DEVICE.type != "cuda":
        pytest.skip("the Triton interpreter on CPU is not worth timing")
    default, why_not = bench.default_impls(DEVICE, quick=False)
    if name not in default:
        pytest.skip(why_not.get(name, "not available"))
    if name not in _impls:
        _impls[name] = bench.build_impl(name, DEVICE)
    return _impls[name]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("phase", bench.PHASES)
def test_loss(benchmark, phase: str, impl: str, dtype: str) -> None:
    implementation = _impl(impl)
    fns = bench.phase_fns(implementation, phase, _workload(DTYPES[dtype]))
    if fns is None:
        pytest.skip(f"{impl} has no in-place mode")
    prepare, call = fns
    w = _workload(DTYPES[dtype])
    key = (w.logits.dtype, phase)
    if key not in _references:
        _references[key] = bench.eager_reference(w, phase)
    check = bench.run_case(implementation, phase, w, bench.Timer(DEVICE), repeats=1, warmup=1,
                           reference=_references[key])  # warms up (compiles) and checks values
    assert check.error is None, check.error
    assert check.agrees, f"value rel err {check.value_rel_err}, grad rel err {check.grad_rel_err}"

    def timed(x: torch.Tensor) -> None:
        call(x)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update({
        "n": N, "v": V, "s": S, "device": str(DEVICE), "extra_mib": check.extra_mib,
        "value_rel_err": check.value_rel_err, "grad_rel_err": check.grad_rel_err,
        "bytes_per_elem": check.bytes_per_elem,
    })
    benchmark.pedantic(timed, setup=lambda: ((prepare(),), {}), rounds=5, iterations=1, warmup_rounds=0)
