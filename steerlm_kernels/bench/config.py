"""``steerlm-kernels bench``'s options and their resolution into a :class:`Config`.

Device-dependent defaults (:data:`CPU`, :data:`GPU`, :data:`QUICK`), the shape grid (a cross
through the main shape, or the full product) and the implementations each section runs.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from steerlm_kernels import registry
from steerlm_kernels.bench import ce, group, harness, linear

SECTIONS: tuple[str, ...] = ("ce", "linear", "group", "dist", "peers", "score", "train", "dropin")
#: ``--grid``: the shapes besides the main one (``main``: none; ``make gpu-check QUICK=1`` uses it).
GRIDS: tuple[str, ...] = ("cross", "product", "main")
CPU = {
    "n": 2048, "v": 32000, "s": 512, "ns": [1024, 2048, 4096], "vs": [8192, 32000, 65536], "repeats": 5,
    "grid_repeats": 3, "warmup": 1, "grid": "cross",
    "linear": {"n": 1024, "v": 32000, "h": 256, "s": 256, "vs": [8192, 32000], "hs": [256]},  # float32
    "group": {"b": 65536, "max_group": 8},
}
GPU = {
    "n": 16384, "v": 128256, "s": 4096, "ns": [4096, 16384], "vs": [32000, 128256, 256000], "repeats": 10,
    "grid_repeats": 5, "warmup": 3, "grid": "product",
    "linear": {"n": 16384, "v": 128256, "h": 4096, "s": 4096, "vs": [32000, 128256, 256000], "hs": [2304, 4096]},
    "group": {"b": 1 << 20, "max_group": 8},
}
QUICK = {
    "n": 128, "v": 1000, "s": 32, "ns": [128], "vs": [1000], "repeats": 2, "grid_repeats": 1, "warmup": 1,
    "grid": "cross",
    "linear": {"n": 128, "v": 1000, "h": 64, "s": 32, "vs": [1000], "hs": [64]},
    "group": {"b": 512, "max_group": 8},
}


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{what}: expected a comma list of integers, got {text!r}") from None
    if not vals or min(vals) <= 0:
        raise SystemExit(f"{what}: expected positive integers, got {text!r}")
    return vals


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``steerlm-kernels bench``."""
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--n", type=int, default=None,
                        help="main shape: tokens N = B*S (default: 2048 on CPU, 16384 on CUDA, 128 with --quick)")
    parser.add_argument("--v", type=int, default=None,
                        help="main shape: vocabulary V (default: 32000 on CPU, 128256 on CUDA, 1000 with --quick)")
    parser.add_argument("--s", type=int, default=None,
                        help="sequence length S, must divide every N (default: 512 on CPU, 4096 on CUDA)")
    parser.add_argument("--h", type=int, default=None, help="fused linear: hidden size of the main shape")
    parser.add_argument("--ns", default=None, help="grid: comma list of N (a single --n alone means no N sweep)")
    parser.add_argument("--vs", default=None, help="grid: comma list of V (a single --v alone means no V sweep)")
    parser.add_argument("--hs", default=None, help="grid: comma list of H for the fused linear")
    parser.add_argument("--grid", choices=GRIDS, default=None,
                        help="cross: sweep V at the main N and N at the main V (CPU default); "
                             "product: every (N, V) pair (CUDA default); main: the main shapes only")
    parser.add_argument("--dtype", default="bf16", choices=sorted(harness.DTYPES), help="input dtype (default bf16)")
    parser.add_argument("--linear-dtype", default=None, choices=sorted(harness.DTYPES),
                        help="fused linear's dtype (default: --dtype on CUDA; fp32 on CPU, where this torch's bf16 "
                             "GEMMs run 4.5-160x slower than fp32 ones (benchmarks/cpu_gemm_dtypes.py) and the "
                             "bf16 comparators would take minutes)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case at the main shape")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per case before timing")
    parser.add_argument("--phases", default=",".join(ce.PHASES),
                        help=f"ce section: comma list of {', '.join(ce.PHASES)}")
    parser.add_argument("--impls", default=None,
                        help="comma list of implementations to run, in every section: eager, compile, liger, "
                             "cce, lce, torch, cpp, triton, cuda (default: all that can run here; the fused linear's "
                             "bare-matmul floor always runs)")
    parser.add_argument("--output", default="bench-out", metavar="DIR",
                        help="folder for bench.json, bench.md and the plots (default bench-out/)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="start no new case after this many seconds (the rest is listed as not run); "
                             "main shapes run first, then the peers, then the grid")
    parser.add_argument("--memory-budget", type=float, default=None, metavar="MIB",
                        help="train section: report the largest micro-batch each implementation fits in MIB")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and 1-2 repeats (a smoke test; numbers mean little)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the batch")


@dataclass
class Config:
    """Resolved benchmark settings."""

    sections: list[str]
    device: torch.device
    dtype: torch.dtype
    n: int
    v: int
    s: int
    ce_shapes: list[tuple[int, int]]  # (N, V), the main shape first
    linear_shapes: list[tuple[int, int, int]]  # (N, V, H), the main shape first
    linear_s: int
    group_shape: tuple[int, int]  # (B, largest group)
    repeats: int
    grid_repeats: int
    warmup: int
    phases: list[str]
    impls: list[str]
    skipped: dict[str, str]
    output: str | None
    plots: bool
    quick: bool
    seed: int
    linear_impls: list[str] = field(default_factory=list)
    group_impls: list[str] = field(default_factory=list)
    budget: float | None = None
    memory_budget: float | None = None
    linear_dtype: torch.dtype = torch.float32


def _shapes(main: tuple[int, ...], axes: list[list[int]], grid: str) -> list[tuple[int, ...]]:
    """Main shape first, then the cross (one axis swept at a time) or the full product (nothing
    more for ``grid="main"``)."""
    out = [main]
    if grid == "main":
        return out
    if grid == "product":
        out += [tuple(p) for p in itertools.product(*axes)]
    else:
        for i, values in enumerate(axes):
            out += [main[:i] + (x,) + main[i + 1:] for x in values]
    return list(dict.fromkeys(out))


def _selected(ns: argparse.Namespace) -> list[str] | None:
    """``--impls`` as a list (None: every default implementation), validated against every section."""
    if not ns.impls:
        return None
    known = ce.COMPARATORS + linear.COMPARATORS + registry.BACKENDS + linear.VARIANTS
    names = list(dict.fromkeys(i.strip() for i in ns.impls.split(",") if i.strip()))
    for name in names:
        if name not in known:
            raise SystemExit(f"--impls: unknown {name!r}; choose from {tuple(dict.fromkeys(known))}")
    return names


def _ce_impls(selected: list[str] | None, device: torch.device, quick: bool) -> tuple[list[str], dict[str, str]]:
    default, why_not = ce.default_impls(device, quick)
    if selected is None:
        return default, why_not
    impls: list[str] = []
    skipped: dict[str, str] = {}
    for name in selected:
        if name not in ce.COMPARATORS + registry.BACKENDS:
            continue  # another section's implementation
        interpreted = name == "triton" and not ce.available_backends(device)["triton"]
        if name in default or interpreted:
            impls.append(name)
        else:
            skipped[name] = why_not.get(name, "not available")
    return impls, skipped


def resolve_config(ns: argparse.Namespace) -> Config:
    """Fill the device-dependent defaults and validate the options."""
    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    quick = bool(getattr(ns, "quick", False))
    d: dict[str, Any] = QUICK if quick else (GPU if device.type == "cuda" else CPU)
    sections = [x.strip() for x in ns.sections.split(",") if x.strip()]
    bad = [x for x in sections if x not in SECTIONS]
    if bad:
        raise SystemExit(f"--sections: unknown {bad}; choose from {SECTIONS}")
    phases = [p.strip() for p in ns.phases.split(",") if p.strip()]
    bad = [p for p in phases if p not in ce.PHASES]
    if bad:
        raise SystemExit(f"--phases: unknown {bad}; choose from {ce.PHASES}")
    n, v = ns.n or d["n"], ns.v or d["v"]
    ns_grid = _ints(ns.ns, "--ns") or ([] if ns.n else d["ns"])
    vs_grid = _ints(ns.vs, "--vs") or ([] if ns.v else d["vs"])
    grid = ns.grid or d["grid"]
    s = ns.s or min(d["s"], n, *ns_grid)
    ce_shapes = _shapes((n, v), [ns_grid or [n], vs_grid or [v]], grid)
    lin = d["linear"]
    ln, lv, lh = (ns.n or lin["n"]), (ns.v or lin["v"]), (ns.h or lin["h"])
    hs_grid = _ints(ns.hs, "--hs") or ([] if ns.h else lin["hs"])
    lvs = _ints(ns.vs, "--vs") or ([] if ns.v else lin["vs"])
    lns = _ints(ns.ns, "--ns") or ([] if ns.n else ([4096, 16384] if device.type == "cuda" and not quick else []))
    linear_shapes = _shapes((ln, lv, lh), [lns or [ln], lvs or [lv], hs_grid or [lh]], grid)
    linear_s = ns.s or min(lin["s"], *(x[0] for x in linear_shapes))
    bad_n = [x[0] for x in ce_shapes if x[0] % s] + [x[0] for x in linear_shapes if x[0] % linear_s]
    if bad_n:
        raise SystemExit(f"--s must divide every N of the grid; it does not divide {sorted(set(bad_n))}")
    selected = _selected(ns)
    impls, skipped = _ce_impls(selected, device, quick)
    linear_impls = [x for x in linear.default_linear_impls(device)
                    if selected is None or x == "matmuls" or x in selected]
    group_impls = [x for x in group.default_group_impls(device) if selected is None or x in selected]
    return Config(
        sections=sections, device=device, dtype=harness.DTYPES[ns.dtype], n=n, v=v, s=s, ce_shapes=ce_shapes,
        linear_shapes=linear_shapes, linear_s=linear_s, group_shape=(d["group"]["b"], d["group"]["max_group"]),
        repeats=ns.repeats or d["repeats"], grid_repeats=min(ns.repeats or d["grid_repeats"], d["grid_repeats"]),
        warmup=ns.warmup if ns.warmup is not None else d["warmup"], phases=phases, impls=impls, skipped=skipped,
        output=ns.output, plots=not ns.no_plots, quick=quick, seed=ns.seed,
        linear_impls=linear_impls, group_impls=group_impls, budget=ns.budget,
        memory_budget=getattr(ns, "memory_budget", None),
        linear_dtype=harness.DTYPES[ns.linear_dtype or (ns.dtype if device.type == "cuda" else "fp32")],
    )
