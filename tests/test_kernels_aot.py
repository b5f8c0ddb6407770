"""Ahead-of-time GPU compilation of every Triton kernel (sm_80, sm_90), with no GPU needed.

The interpreter (switched on for this session by ``conftest.py``) runs kernels that a GPU
compiler may reject, and says nothing of registers or spills. ``python -m steerlm_kernels.kernels.aot``
compiles each kernel's declared ``AOT_SPECS`` variants for real; it runs here in a subprocess
with ``TRITON_INTERPRET`` removed, because under the interpreter ``@triton.jit`` yields objects
that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from steerlm_kernels.kernels import cross_entropy, segment
from steerlm_kernels.kernels._triton import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")

ROOT = Path(__file__).resolve().parents[1]
KNOWN = {"_ce_forward_kernel", "_ce_backward_kernel", "_segment_sum_kernel"}


def _aot(*args: str, interpret: bool = False, pythonpath: str = "", timeout: int = 300):
    """Run ``python -m steerlm_kernels.kernels.aot ARGS`` in a fresh process, without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, str(ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "steerlm_kernels.kernels.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The full matrix (all dtypes, sm_80 and sm_90), compiled once for this module."""
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    proc = _aot("--jobs", str(min(4, os.cpu_count() or 1)), "--json", str(out))
    # Shown by `pytest -rA`, and in the failure report of any test below.
    sys.stdout.write(proc.stdout)
    print(proc.stderr)
    results = json.loads(out.read_text()) if out.exists() else []
    return {"proc": proc, "results": results}


def test_every_kernel_dtype_arch_compiles(report):
    proc, results = report["proc"], report["results"]
    assert results, f"no results:\n{proc.stdout}\n{proc.stderr}"
    failed = [f"{r['kernel']} sm_{r['arch']} {r['dtype']} [{r['note']}]: {r['error']}"
              for r in results if r["error"]]
    assert not failed, "\n".join(failed)
    got = {(r["kernel"], r["dtype"], r["arch"]) for r in results}
    want = {(k, dt, a) for k in ("_ce_forward_kernel", "_ce_backward_kernel")
            for dt in ("bf16", "fp16", "fp32") for a in (80, 90)}
    want |= {("_segment_sum_kernel", "fp32", a) for a in (80, 90)}
    assert want <= got, f"missing: {sorted(want - got)}"
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_spills_at_default_blocks(report):
    spilled = [r for r in report["results"] if r["local"] != 0 or r["stack"] != 0]
    assert not spilled, "\n".join(f"{r['kernel']} sm_{r['arch']} {r['dtype']} [{r['note']}]: "
                                  f"LOCAL={r['local']} STACK={r['stack']} REG={r['reg']}" for r in spilled)


def test_logit_transform_variants_compile(report):
    """The softcap / logit_scale variants (TRANSFORM constexpr 2 / 1) of the CE and the tile kernels
    are compiled for both archs: softcap at every dtype, logit_scale at least once per kernel (the
    no-spill and error checks above cover them like every variant)."""
    got = {(r["kernel"], r["dtype"], r["arch"], r["note"].rsplit(" ", 1)[-1]) for r in report["results"]
           if not r["error"]}
    kernels = ("_ce_forward_kernel", "_ce_backward_kernel", "_lce_forward_kernel", "_lce_backward_kernel")
    want = {(k, dt, a, "softcap") for k in kernels for dt in ("bf16", "fp16", "fp32") for a in (80, 90)}
    want |= {(k, "bf16", a, "scale") for k in kernels for a in (80, 90)}
    assert want <= got, f"missing: {sorted(want - got)}"


def test_known_kernels_discovered(report):
    assert KNOWN <= {r["kernel"] for r in report["results"]}


def test_ce_loads_are_128_bit_when_rows_divide_by_16(report):
    """V=128256: the runtime marks stride and pointers divisible by 16, so each thread loads its
    contiguous elements with 16-byte LDG.E.128 (without the hint they are 16-bit scalar loads)."""
    rows = [r for r in report["results"]
            if r["kernel"].startswith("_ce_") and r["note"].startswith("V=128256")]
    assert rows
    scalar = [f"{r['kernel']} sm_{r['arch']} {r['dtype']} [{r['note']}]" for r in rows if r["ldg128"] < 1]
    assert not scalar, "no 128-bit loads: " + ", ".join(scalar)


@pytest.mark.parametrize(
    ("module", "kernel", "n_cols", "dtype", "transform"),
    [(cross_entropy, "_ce_forward_kernel", 128256, torch.bfloat16, (None, None)),
     (cross_entropy, "_ce_forward_kernel", 1000, torch.float16, (None, None)),
     (cross_entropy, "_ce_backward_kernel", 128256, torch.float32, (None, None)),
     (cross_entropy, "_ce_backward_kernel", 1000, torch.bfloat16, (None, None)),
     (cross_entropy, "_ce_forward_kernel", 256000, torch.bfloat16, (30.0, None)),
     (cross_entropy, "_ce_backward_kernel", 256000, torch.float32, (30.0, None)),
     (cross_entropy, "_ce_backward_kernel", 1000, torch.bfloat16, (50.0, 0.5)),
     (cross_entropy, "_ce_forward_kernel", 256000, torch.bfloat16, (None, 0.0625))],
)
def test_ce_specs_match_runtime_specialisation(module, kernel, n_cols, dtype, transform):
    """The spec's types and divisibility are what Triton's launcher derives from the wrapper's
    real arguments (its C++ ``native_specialize_impl``), so the AOT cubin is the one a launch runs."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    from triton.backends.nvidia.compiler import CUDABackend

    block, num_warps = cross_entropy.launch_config(n_cols)
    x = torch.empty(4, n_cols, dtype=dtype)
    rows = torch.empty(4, dtype=torch.float32)
    args = {"logits_ptr": x, "grad_ptr": torch.empty_like(x), "labels_ptr": torch.empty(4, dtype=torch.int64),
            "max_ptr": rows, "lse_ptr": rows, "target_ptr": rows, "coef_ptr": rows, "n_cols": n_cols,
            "stride_row": x.stride(0), "grad_stride_row": x.stride(0), "vocab_start": 0, "ignore_index": -100}
    pre, cap, scale, kind = cross_entropy.transform_args(*transform)
    args |= {"pre": pre, "cap": cap, "scale": scale}
    matches = []
    for spec in module.AOT_SPECS[kernel]:
        sig = spec["signature"]
        runtime = {k: libtriton.native_specialize_impl(CUDABackend, args[k], False, True, True)
                   for k in sig if sig[k] != "constexpr"}
        if ({k: t for k, (t, _) in runtime.items()} == {k: t for k, t in sig.items() if t != "constexpr"}
                and {k for k, (_, a) in runtime.items() if a == "D"} == set(spec.get("divisible_by_16", ()))
                and spec["constexprs"] == {"BLOCK_V": block, "TRANSFORM": kind} and spec["num_warps"] == num_warps):
            matches.append(spec["note"])
    assert matches, f"no AOT variant of {kernel} matches a launch at V={n_cols} {dtype}"


def test_segment_spec_uses_the_wrapper_block():
    for spec in segment.AOT_SPECS["_segment_sum_kernel"]:
        assert spec["constexprs"] == {"BLOCK": segment.SEGMENT_BLOCK}
        assert spec["num_warps"] == 4  # as hard-coded in triton_segment_sum


def test_kernel_without_spec_is_an_error(tmp_path):
    """Discovery fails, naming each problem, on a kernel with no spec, a stale spec and a
    signature that does not list the kernel's arguments."""
    pkg = tmp_path / "fakeops"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    kernel = textwrap.dedent("""
        import triton
        import triton.language as tl


        @triton.jit
        def {name}(x_ptr, n, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n), mask=i < n)
        """)
    (pkg / "orphan.py").write_text(kernel.format(name="_orphan_kernel"))
    (pkg / "stale.py").write_text("AOT_SPECS = {'_gone_kernel': []}\n")
    (pkg / "badsig.py").write_text(kernel.format(name="_badsig_kernel") + textwrap.dedent("""
        AOT_SPECS = {"_badsig_kernel": [{"signature": {"x_ptr": "*fp32", "BLOCK": "constexpr"},
                                         "constexprs": {"BLOCK": 64}, "num_warps": 1}]}
        """))
    # a @triton.jit device function named in DEVICE_FUNCTIONS needs no spec (it is compiled inside
    # the kernels that call it); the same function not named there is flagged
    (pkg / "helpers.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        DEVICE_FUNCTIONS = ("twice",)


        @triton.jit
        def twice(x):
            return x * 2


        @triton.jit
        def thrice(x):
            return x * 3
        """))
    proc = _aot("--package", "fakeops", "--discover-only", pythonpath=str(tmp_path), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "fakeops.helpers.thrice: @triton.jit kernel has no entry in AOT_SPECS" in proc.stderr
    assert "fakeops.helpers.twice" not in proc.stderr
    assert "fakeops.orphan._orphan_kernel: @triton.jit kernel has no entry in AOT_SPECS" in proc.stderr
    assert "AOT_SPECS['_gone_kernel']: no @triton.jit kernel" in proc.stderr
    assert "AOT_SPECS['_badsig_kernel'][0]: signature names" in proc.stderr


def test_refuses_under_the_interpreter():
    proc = _aot("--discover-only", interpret=True, timeout=120)
    assert proc.returncode == 2
    assert "TRITON_INTERPRET is set" in proc.stderr
