"""Ahead-of-time compile check of every Triton kernel of :mod:`steerlm_kernels.kernels`.

A kernel the interpreter runs may still fail to compile for a GPU (layout or type rules that only
the real compiler enforces), and one that compiles may spill. This module compiles every
``@triton.jit`` kernel of the kernel modules for sm_80 and sm_90 with no GPU and no driver, at the
variants each module declares next to its kernels in a module-level ``AOT_SPECS`` dict::

    AOT_SPECS = {"kernel_name": [{"signature": {"x_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"},
                                  "constexprs": {"BLOCK": 1024}, "num_warps": 4,
                                  "divisible_by_16": ["x_ptr", "n"],   # optional
                                  "note": "..."}]}                      # optional

``divisible_by_16`` names the arguments the runtime launcher would mark as multiples of 16
(aligned pointers, ints ``% 16 == 0``); they become ``tt.divisibility`` attributes, so the AOT
code matches what a launch produces (notably its vectorised loads). A kernel without a spec, a
spec without a kernel or a signature that does not name the kernel's arguments in order is an
error: no kernel escapes the check.

It reads registers, stack, local and shared memory of each cubin with the ``cuobjdump`` bundled
in the Triton wheel and counts 128-bit global loads/stores in the SASS. Run it as
``python -m steerlm_kernels.kernels.aot`` (not under ``TRITON_INTERPRET=1``, where ``@triton.jit``
yields interpreter objects that cannot be compiled).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from types import ModuleType
from typing import Any

from steerlm_kernels.kernels._triton import interpreting

ARCHS: tuple[int, ...] = (80, 90)
DTYPES: tuple[str, ...] = ("bf16", "fp16", "fp32")
PACKAGE = "steerlm_kernels.kernels"
#: Modules not searched: ``cpp`` needs the compiled extension; neither it, ``reference`` nor this
#: module holds Triton code.
SKIP_MODULES = frozenset({"aot", "cpp", "reference"})

_INTERPRETER_MESSAGE = (
    "TRITON_INTERPRET is set: @triton.jit returns interpreter objects, which cannot be compiled "
    "for a GPU. Run the AOT check without it, e.g. `env -u TRITON_INTERPRET python -m steerlm_kernels.kernels.aot`."
)
_LDG128 = re.compile(r"\bLDG\.E(?:\.[A-Z0-9_]+)*\.128\b")
_STG128 = re.compile(r"\bSTG\.E(?:\.[A-Z0-9_]+)*\.128\b")
_LDG = re.compile(r"\bLDG\.")


class AotSpecError(RuntimeError):
    """A Triton kernel without an AOT spec, a stale spec, or a malformed one."""


@dataclass(frozen=True)
class Variant:
    """One compile job: a kernel's spec variant at one target architecture."""

    module: str
    kernel: str
    index: int
    arch: int


@dataclass
class Result:
    """Outcome of compiling one :class:`Variant`; ``error`` is set when compilation failed."""

    module: str
    kernel: str
    index: int
    arch: int
    dtype: str
    num_warps: int
    block: str
    note: str
    reg: int = -1
    stack: int = -1
    local: int = -1
    shared: int = -1
    dyn_shared: int = -1
    ldg128: int = -1
    ldg: int = -1
    stg128: int = -1
    error: str = ""

    @property
    def spills(self) -> bool:
        """Whether ptxas put anything in local memory or on the stack."""
        return self.local > 0 or self.stack > 0


def _jit_function(obj: Any) -> Any | None:
    """The ``JITFunction`` under ``obj`` (also under autotune/heuristics wrappers), else None.

    Raises when ``obj`` is an interpreter object: discovery would silently find nothing.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, KernelInterface

    seen = 0
    while isinstance(obj, KernelInterface) and seen < 8:
        if isinstance(obj, InterpretedFunction):
            raise RuntimeError(_INTERPRETER_MESSAGE)
        if isinstance(obj, JITFunction):
            return obj
        obj, seen = getattr(obj, "fn", None), seen + 1
    return None


def jit_functions(module: ModuleType) -> dict[str, Any]:
    """``{name: JITFunction}`` of the Triton kernels *defined* in ``module`` (not imported ones).

    ``@triton.jit`` device functions that are only called from kernels (never launched) are named
    in the module's ``DEVICE_FUNCTIONS`` tuple and left out: they are compiled, and checked, inside
    every kernel variant that calls them."""
    found = {}
    device_functions = set(getattr(module, "DEVICE_FUNCTIONS", ()))
    for name, obj in vars(module).items():
        fn = _jit_function(obj)
        if name in device_functions:
            continue
        if fn is not None and getattr(fn.fn, "__module__", None) == module.__name__:
            found[name] = fn
    return found


def check_specs(module: ModuleType) -> dict[str, list[dict]]:
    """The module's ``AOT_SPECS`` for its kernels, validated against the kernels themselves.

    Raises :class:`AotSpecError` naming every kernel without a spec, every spec without a kernel
    and every variant whose signature or constexprs do not match the kernel's arguments.
    """
    kernels = jit_functions(module)
    specs = getattr(module, "AOT_SPECS", None)
    if specs is None:
        specs = {}
    problems = [f"{module.__name__}.{k}: @triton.jit kernel has no entry in AOT_SPECS"
                for k in kernels if k not in specs]
    problems += [f"{module.__name__}.AOT_SPECS[{k!r}]: no @triton.jit kernel of that name"
                 for k in specs if k not in kernels]
    for name in kernels.keys() & specs.keys():
        fn, variants = kernels[name], specs[name]
        if not variants:
            problems.append(f"{module.__name__}.{name}: AOT_SPECS lists no variant")
        for i, v in enumerate(variants):
            where = f"{module.__name__}.AOT_SPECS[{name!r}][{i}]"
            sig = v.get("signature", {})
            if list(sig) != list(fn.arg_names):
                problems.append(f"{where}: signature names {list(sig)} != kernel arguments {fn.arg_names}")
                continue
            wanted = {k for k, t in sig.items() if t == "constexpr"}
            if set(v.get("constexprs", {})) != wanted:
                problems.append(f"{where}: constexprs {sorted(v.get('constexprs', {}))} != {sorted(wanted)}")
            bad = set(v.get("divisible_by_16", ())) - (set(sig) - wanted)
            if bad:
                problems.append(f"{where}: divisible_by_16 names non-runtime arguments {sorted(bad)}")
            if not isinstance(v.get("num_warps"), int):
                problems.append(f"{where}: num_warps missing")
    if problems:
        raise AotSpecError("\n".join(problems))
    return {k: specs[k] for k in kernels}


def discover(package: str = PACKAGE) -> dict[str, dict[str, list[dict]]]:
    """``{module: {kernel: variants}}`` over the modules of ``package`` (except ``cpp``).

    Every problem of every module is collected before raising :class:`AotSpecError`.
    """
    if interpreting():
        raise RuntimeError(_INTERPRETER_MESSAGE)
    pkg = importlib.import_module(package)
    found: dict[str, dict[str, list[dict]]] = {}
    problems = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in SKIP_MODULES:
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        try:
            specs = check_specs(module)
        except AotSpecError as e:
            problems.append(str(e))
            continue
        if specs:
            found[module.__name__] = specs
    if problems:
        raise AotSpecError("\n".join(problems))
    return found


def variants(
    found: dict[str, dict[str, list[dict]]],
    archs: Iterable[int] = ARCHS,
    dtypes: dict[int, Sequence[str]] | None = None,
) -> list[Variant]:
    """Compile jobs of ``found`` at each arch; ``dtypes`` (arch -> dtypes) may thin an arch out."""
    jobs = []
    for arch in archs:
        for module, specs in found.items():
            for kernel, vs in specs.items():
                for i, v in enumerate(vs):
                    if dtypes is None or arch not in dtypes or _dtype(v) in dtypes[arch]:
                        jobs.append(Variant(module, kernel, i, arch))
    return jobs


def _dtype(spec: dict) -> str:
    """The data dtype of a variant: the element type of its first pointer argument."""
    return next((t[1:] for t in spec["signature"].values() if t.startswith("*")), "-")


def cubin_stats(cubin: bytes, kernel: str) -> dict[str, int]:
    """REG/STACK/SHARED/LOCAL of ``kernel`` in ``cubin`` and its 128-bit global loads/stores.

    Uses the ``cuobjdump`` Triton bundles (``triton.knobs.nvidia.cuobjdump``).
    """
    import triton

    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage, sass = (
            subprocess.run([tool, flag, f.name], check=True, capture_output=True, text=True).stdout
            for flag in ("--dump-resource-usage", "--dump-sass")
        )
    m = re.search(rf"Function {re.escape(kernel)}:\s*\n\s*(.*)", usage)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for {kernel}:\n{usage}")
    fields = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", m.group(1)))
    return {
        "reg": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"]),
        "shared": int(fields["SHARED"]), "ldg128": len(_LDG128.findall(sass)), "ldg": len(_LDG.findall(sass)),
        "stg128": len(_STG128.findall(sass)),
    }


def compile_variant(job: Variant) -> Result:
    """Compile one job with ``triton.compile`` (no GPU needed) and measure its cubin.

    Compile errors are caught into ``Result.error`` so that one broken kernel does not hide the
    others.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    fn = jit_functions(importlib.import_module(job.module))[job.kernel]
    spec = importlib.import_module(job.module).AOT_SPECS[job.kernel][job.index]
    sig = spec["signature"]
    constexprs = spec.get("constexprs", {})
    res = Result(job.module, job.kernel, job.index, job.arch, _dtype(spec), spec["num_warps"],
                 ",".join(str(v) for v in constexprs.values()) or "-", spec.get("note", ""))
    attrs = {(list(sig).index(a),): [["tt.divisibility", 16]] for a in spec.get("divisible_by_16", ())}
    try:
        with warnings.catch_warnings():  # the launcher gets the same default; not ours to fix
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
            src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                                      options={"num_warps": spec["num_warps"]})
        for k, v in cubin_stats(compiled.asm["cubin"], compiled.metadata.name).items():
            setattr(res, k, v)
        res.dyn_shared = int(compiled.metadata.shared)
    except Exception as e:  # noqa: BLE001 - reported per variant
        res.error = f"{type(e).__name__}: {e}".strip()
    return res


def run(jobs: Sequence[Variant], workers: int = 1) -> list[Result]:
    """Compile ``jobs``, in a spawn process pool when ``workers > 1`` (compiles are CPU-bound)."""
    if workers <= 1 or len(jobs) <= 1:
        return [compile_variant(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(compile_variant, jobs))


def format_table(results: Sequence[Result]) -> str:
    """The resource report, one row per compiled variant (errors after the table)."""
    head = ("kernel", "dtype", "arch", "warps", "BLOCK", "REG", "STACK", "LOCAL", "SHARED", "DYN_SH",
            "spills", "LDG128", "LDG", "STG128", "variant")
    rows = [head]
    for r in results:
        key = (r.kernel, r.dtype, f"sm_{r.arch}", str(r.num_warps), r.block)
        if r.error:
            rows.append((*key, *["-"] * 9, "FAILED " + r.note))
            continue
        spills = "yes" if r.spills else "no"
        stats = (r.reg, r.stack, r.local, r.shared, r.dyn_shared, spills, r.ldg128, r.ldg, r.stg128)
        rows.append((*key, *map(str, stats), r.note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"ERROR {r.kernel} sm_{r.arch} [{r.note}]: {r.error}" for r in results if r.error]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the resource table; exit 1 on compile errors or spills, 2 on spec errors."""
    p = argparse.ArgumentParser(prog="python -m steerlm_kernels.kernels.aot", description=__doc__.splitlines()[0])
    p.add_argument("--package", default=PACKAGE, help="package whose modules are searched (%(default)s)")
    p.add_argument("--arch", type=int, action="append", help="compute capability, repeatable (80 and 90)")
    p.add_argument("--lean", action="store_true", help="sm_80: bf16 variants only (all dtypes on the others)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--discover-only", action="store_true", help="list kernels and variants, compile nothing")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if interpreting():
        print(f"error: {_INTERPRETER_MESSAGE}", file=sys.stderr)
        return 2
    try:
        found = discover(args.package)
    except AotSpecError as e:
        print(f"error: Triton kernels failing the AOT spec check:\n{e}", file=sys.stderr)
        return 2
    jobs = variants(found, args.arch or ARCHS, {80: ("bf16",)} if args.lean else None)
    if args.discover_only:
        for module, specs in found.items():
            for kernel, vs in specs.items():
                print(f"{module}.{kernel}: {len(vs)} variant(s)")
        return 0
    results = run(jobs, args.jobs)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"spills": r.spills} for r in results], f, indent=1)
    failed = [r for r in results if r.error or r.spills]
    print(f"\n{len(results) - len(failed)}/{len(results)} variants compiled without spills", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
