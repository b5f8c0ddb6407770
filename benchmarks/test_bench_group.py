"""pytest-benchmark suite, SteerLM 2.0 group ops: op × implementation × number of responses.

Run with ``.venv/bin/python -m pytest benchmarks -q`` (not part of ``make test``). Groups of unequal
sizes 1..8; float32 (the ops' inputs are per-sequence float32 statistics). Each case is checked
against float64 eager first.
"""

from __future__ import annotations

import os

import pytest
import torch

from steerlm_kernels.bench import group, harness

DEVICE = torch.device(os.environ.get("STEERLM_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
SIZES = (4096, 1 << 20) if DEVICE.type == "cuda" else (512, 65536)
IMPLS = ("eager", "compile", "torch", "cpp", "triton")


@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", group.OPS)
def test_group(benchmark, op: str, impl: str, b: int) -> None:
    if impl not in group.default_group_impls(DEVICE) or (impl == "triton" and DEVICE.type != "cuda"):
        pytest.skip(f"{impl} is not timed on {DEVICE.type} here")
    implementation = group.build_group_impl(impl, DEVICE)
    w = group.make_group_workload(b, 8, DEVICE)
    row = group.run_group_case(implementation, op, w, harness.Timer(DEVICE), 1, 1)
    assert row.error is None and row.agrees, (row.error, row.value_rel_err)

    def timed() -> None:
        with torch.no_grad():
            implementation.call(op, w)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update({"b": w.b, "device": str(DEVICE), "value_rel_err": row.value_rel_err})
    benchmark.pedantic(timed, rounds=5, iterations=1, warmup_rounds=1)
