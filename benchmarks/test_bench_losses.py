"""pytest-benchmark suite, logits in: phase × implementation × dtype × shape.

Run with ``.venv/bin/python -m pytest benchmarks -q`` (not part of ``make test``; add
``--benchmark-json out.json`` to keep the numbers). Each case times one call of the phase's
function (the fresh logits copy of the in-place phase is made in the untimed setup) and records
its agreement with eager PyTorch and its peak extra memory in ``extra_info``. Unavailable
backends (and Liger-Kernel off CUDA) are skipped, with the reason.

Shapes: CPU ``(N, V) ∈ {(512, 8192), (2048, 32000)}``; CUDA ``N ∈ {4096, 16384} × V ∈ {32000,
128256, 256000}`` (``STEERLM_BENCH_DEVICE`` overrides the device).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import steerlm_kernels as sk
from steerlm_kernels import registry
from steerlm_kernels.bench import ce, harness

DEVICE = torch.device(os.environ.get("STEERLM_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
SHAPES = ([(n, v, 1024) for n in (4096, 16384) for v in (32000, 128256, 256000)] if DEVICE.type == "cuda"
          else [(512, 8192, 128), (2048, 32000, 512)])
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("eager", "compile", "liger", *registry.BACKENDS)

_workloads: dict[tuple[int, int, int, torch.dtype], ce.Workload] = {}
_references: dict[tuple[int, int, int, torch.dtype, str], dict[str, torch.Tensor]] = {}
_impls: dict[str, ce.Impl] = {}


def _workload(shape: tuple[int, int, int], dtype: torch.dtype) -> ce.Workload:
    key = (*shape, dtype)
    if key not in _workloads:
        _workloads.clear()  # one shape at a time in memory
        _references.clear()
        _workloads[key] = ce.make_workload(*shape, dtype, DEVICE)
    return _workloads[key]


def _impl(name: str) -> ce.Impl:
    if name == "triton" and DEVICE.type != "cuda":
        pytest.skip("the Triton interpreter on CPU is not worth timing")
    default, why_not = ce.default_impls(DEVICE, quick=False)
    if name not in default:
        pytest.skip(why_not.get(name, "not available"))
    if name not in _impls:
        _impls[name] = ce.build_impl(name, DEVICE)
    return _impls[name]


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-V{v}" for n, v, _ in SHAPES])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("phase", ce.PHASES)
def test_loss(benchmark, phase: str, impl: str, dtype: str, shape: tuple[int, int, int]) -> None:
    implementation = _impl(impl)
    w = _workload(shape, DTYPES[dtype])
    fns = ce.phase_fns(implementation, phase, w)
    if fns is None:
        pytest.skip(f"{impl} has no in-place mode")
    prepare, call = fns
    key = (*shape, w.logits.dtype, phase)
    if key not in _references:
        _references[key] = ce.eager_reference(w, phase)
    check = ce.run_case(implementation, phase, w, harness.Timer(DEVICE), repeats=1, warmup=1,
                           reference=_references[key])  # warms up (compiles) and checks values
    assert check.error is None, check.error
    assert check.agrees, f"value rel err {check.value_rel_err}, grad rel err {check.grad_rel_err}"

    def timed(x: torch.Tensor) -> None:
        call(x)
        _sync()

    benchmark.extra_info.update({
        "n": w.n, "v": w.v, "s": w.s, "device": str(DEVICE), "extra_mib": check.extra_mib,
        "value_rel_err": check.value_rel_err, "grad_rel_err": check.grad_rel_err,
        "bytes_per_elem": check.bytes_per_elem,
    })
    benchmark.pedantic(timed, setup=lambda: ((prepare(),), {}), rounds=5, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("shape", SHAPES[:1], ids=[f"N{n}-V{v}" for n, v, _ in SHAPES[:1]])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("impl", ("eager", *registry.BACKENDS))
def test_token_nll(benchmark, impl: str, dtype: str, shape: tuple[int, int, int]) -> None:
    """``token_nll`` forward (per-token NLL, ignore_index) against ``F.cross_entropy(reduction="none")``."""
    if impl != "eager":
        _impl(impl)  # skips what cannot run here
    w = _workload(shape, DTYPES[dtype])
    labels = w.labels_ignored.reshape(-1)
    ref = F.cross_entropy(w.logits.float(), labels, reduction="none", ignore_index=-100)

    def call() -> torch.Tensor:
        with torch.no_grad():
            if impl == "eager":
                return F.cross_entropy(w.logits.float(), labels, reduction="none", ignore_index=-100)
            return sk.token_nll(w.logits, labels, backend=impl)

    out = call()
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)

    def timed() -> None:
        call()
        _sync()

    benchmark.extra_info.update({"n": w.n, "v": w.v, "device": str(DEVICE)})
    benchmark.pedantic(timed, rounds=5, iterations=1, warmup_rounds=1)
