"""``steerlm-kernels bench``: every section over its shape grid, one process, one device.

Sections (``--sections``, default all):

``ce``      logits in (:mod:`steerlm_kernels.bench`): baseline / train / in-place phases.
``linear``  hidden states in (:mod:`steerlm_kernels.bench_linear`): the fused linear losses.
``group``   SteerLM 2.0's per-prompt ops (:mod:`steerlm_kernels.bench_group`).
``dist``    vocabulary-parallel cross entropy on tp = 2 and 4 gloo processes: collectives and bytes
            communicated per call, ours against megatron-core's (:mod:`steerlm_kernels.bench_dist`).
``peers``   Liger-Kernel and Cut Cross-Entropy against our values (:mod:`steerlm_kernels.peers`).
            On CPU the peers run only under the Triton interpreter, in a subprocess with
            ``TRITON_INTERPRET=1``: correctness only, never speed. On CUDA they are also timed in
            the ``ce`` / ``linear`` tables.

Shapes. The main shape (``--n`` / ``--v`` / ``--h``, defaults below) runs every implementation.
The grid (``--ns`` / ``--vs`` / ``--hs``) adds points for the plots. On CPU it is a cross through
the main shape (V swept at the main N, N at the main V) and the extra points run the comparators
and the auto backend only (the torch reference backend is timed at the main shape), so that the
whole default run stays under ten minutes on two cores; on CUDA it is the full product
``N ∈ {4096, 16384} × V ∈ {32000, 128256, 256000}`` (``× H ∈ {2304, 4096}`` for the fused linear)
with every implementation.

Output (``--output``, default ``bench-out/``): ``bench.md`` (the tables, ready for
``benchmarks/RESULTS.md``), ``bench.json`` (every row, the bandwidths and matmul rates, the
peers' agreement), and PNG plots of time and peak extra memory against V and N per
implementation (``ce_vs_v.png``, ``ce_vs_n.png``, ``linear_vs_v.png`` when matplotlib is installed).
A ``bench.partial.json`` is rewritten after every case, so a run killed by a time limit leaves its rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import steerlm_kernels as sk
from steerlm_kernels import bench, bench_dist, bench_group, bench_linear, registry
from steerlm_kernels.bench import MIB, Row, _fmt, _fmt_err, table_line, value_err_cell

SECTIONS: tuple[str, ...] = ("ce", "linear", "group", "dist", "peers")
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
    parser.add_argument("--grid", choices=("cross", "product"), default=None,
                        help="cross: sweep V at the main N and N at the main V (CPU default); "
                             "product: every (N, V) pair (CUDA default)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(bench.DTYPES), help="input dtype (default bf16)")
    parser.add_argument("--linear-dtype", default=None, choices=sorted(bench.DTYPES),
                        help="fused linear's dtype (default: --dtype on CUDA; fp32 on CPU, where this torch's bf16 "
                             "GEMMs run 4.5-160x slower than fp32 ones (benchmarks/cpu_gemm_dtypes.py) and the "
                             "bf16 comparators would take minutes)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case at the main shape")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per case before timing")
    parser.add_argument("--phases", default=",".join(bench.PHASES),
                        help=f"ce section: comma list of {', '.join(bench.PHASES)}")
    parser.add_argument("--impls", default=None,
                        help="comma list of implementations to run, in every section: eager, compile, liger, "
                             "cce, lce, torch, cpp, triton (default: all that can run here; the fused linear's "
                             "bare-matmul floor always runs)")
    parser.add_argument("--output", default="bench-out", metavar="DIR",
                        help="folder for bench.json, bench.md and the plots (default bench-out/)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="start no new case after this many seconds (the rest is listed as not run); "
                             "main shapes run first, then the peers, then the grid")
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
    linear_dtype: torch.dtype = torch.float32


def _shapes(main: tuple[int, ...], axes: list[list[int]], grid: str) -> list[tuple[int, ...]]:
    """Main shape first, then the cross (one axis swept at a time) or the full product."""
    out = [main]
    if grid == "product":
        import itertools

        out += [tuple(p) for p in itertools.product(*axes)]
    else:
        for i, values in enumerate(axes):
            out += [main[:i] + (x,) + main[i + 1:] for x in values]
    return list(dict.fromkeys(out))


def _selected(ns: argparse.Namespace) -> list[str] | None:
    """``--impls`` as a list (None: every default implementation), validated against every section."""
    if not ns.impls:
        return None
    known = bench.COMPARATORS + bench_linear.COMPARATORS + registry.BACKENDS + bench_linear.VARIANTS
    names = list(dict.fromkeys(i.strip() for i in ns.impls.split(",") if i.strip()))
    for name in names:
        if name not in known:
            raise SystemExit(f"--impls: unknown {name!r}; choose from {tuple(dict.fromkeys(known))}")
    return names


def _ce_impls(selected: list[str] | None, device: torch.device, quick: bool) -> tuple[list[str], dict[str, str]]:
    default, why_not = bench.default_impls(device, quick)
    if selected is None:
        return default, why_not
    impls: list[str] = []
    skipped: dict[str, str] = {}
    for name in selected:
        if name not in bench.COMPARATORS + registry.BACKENDS:
            continue  # another section's implementation
        interpreted = name == "triton" and not bench.available_backends(device)["triton"]
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
    bad = [p for p in phases if p not in bench.PHASES]
    if bad:
        raise SystemExit(f"--phases: unknown {bad}; choose from {bench.PHASES}")
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
    linear_impls = [x for x in bench_linear.default_linear_impls(device)
                    if selected is None or x == "matmuls" or x in selected]
    group_impls = [x for x in bench_group.default_group_impls(device) if selected is None or x in selected]
    return Config(
        sections=sections, device=device, dtype=bench.DTYPES[ns.dtype], n=n, v=v, s=s, ce_shapes=ce_shapes,
        linear_shapes=linear_shapes, linear_s=linear_s, group_shape=(d["group"]["b"], d["group"]["max_group"]),
        repeats=ns.repeats or d["repeats"], grid_repeats=min(ns.repeats or d["grid_repeats"], d["grid_repeats"]),
        warmup=ns.warmup if ns.warmup is not None else d["warmup"], phases=phases, impls=impls, skipped=skipped,
        output=ns.output, plots=not ns.no_plots, quick=quick, seed=ns.seed,
        linear_impls=linear_impls, group_impls=group_impls, budget=ns.budget,
        linear_dtype=bench.DTYPES[ns.linear_dtype or (ns.dtype if device.type == "cuda" else "fp32")],
    )


# ------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------


class Progress:
    """``[#####.....] k/total  elapsed  ETA`` before each case's line (ETA from the mean so far)."""

    def __init__(self, total: int, log: Callable[[str], None], width: int = 24) -> None:
        self.total, self.log, self.width = max(total, 1), log, width
        self.done = 0
        self.start = time.perf_counter()

    def step(self, text: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        filled = round(self.width * self.done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        self.log(f"[{bar}] {self.done:3d}/{self.total} {elapsed:5.0f}s ETA {eta:4.0f}s | {text}")


def _row_text(r: Row) -> str:
    shape = f"N={r.n} V={r.v}" + (f" H={r.h}" if r.h else "") if r.section != "group" else f"B={r.n}"
    head = f"{r.section:6s} {shape:24s} {r.phase:16s} {r.title:32s}"
    if r.error:
        return f"{head} ERROR {r.error}"
    return (f"{head} {r.median_ms:9.2f} ms  extra {_fmt(r.extra_mib, '.1f')} MiB  value err "
            f"{_fmt_err(r.value_rel_err)}  grad err {_fmt_err(r.grad_rel_err)}"
            + ("" if r.agrees is not False else "  <-- MISMATCH"))


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


def _ce_plan(cfg: Config) -> list[tuple[tuple[int, int], list[str]]]:
    auto = registry.resolve("auto", cfg.device)
    plan = []
    for i, shape in enumerate(cfg.ce_shapes):
        names = cfg.impls if (i == 0 or cfg.device.type == "cuda") else [
            x for x in cfg.impls if x in ("eager", "compile", auto)]
        plan.append((shape, names))
    return plan


def _linear_plan(cfg: Config) -> list[tuple[tuple[int, int, int], list[str]]]:
    auto = registry.resolve("auto", cfg.device)
    return [(shape, cfg.linear_impls if (i == 0 or cfg.device.type == "cuda") else
             [x for x in cfg.linear_impls if x in ("matmuls", "eager", "lce", auto)])
            for i, shape in enumerate(cfg.linear_shapes)]


def _count_cases(cfg: Config) -> int:
    total = 0
    if "ce" in cfg.sections:
        for _, names in _ce_plan(cfg):
            total += sum(1 for p in cfg.phases for x in names if not (p == "inplace" and x in bench.COMPARATORS))
    if "linear" in cfg.sections:
        total += sum(len(names) * len(bench_linear.PHASES) for _, names in _linear_plan(cfg))
    if "group" in cfg.sections:
        total += len(cfg.group_impls) * len(bench_group.OPS)
    return total


@dataclass
class Session:
    """What every section's runner shares: settings, timer, progress, results and the time budget."""

    cfg: Config
    timer: bench.Timer
    progress: Progress
    rows: list[Row]
    meta: dict[str, Any]
    on_row: Callable[[list[Row]], None]
    deadline: float | None  # time.perf_counter() after which no new case starts
    ce_impls: dict[str, bench.Impl] = field(default_factory=dict)
    linear_impls: dict[str, bench_linear.LinearImpl] = field(default_factory=dict)

    def out_of_time(self, what: str) -> bool:
        """True (and ``what`` recorded as skipped) once the ``--budget`` is spent."""
        if self.deadline is None or time.perf_counter() < self.deadline:
            return False
        self.meta["skipped"][what] = f"--budget {self.cfg.budget:.0f} s spent"
        return True

    def build(self, names: list[str], builder: Callable[[str, torch.device], Any], skip_prefix: str = ""
              ) -> dict[str, Any]:
        """``{name: builder(name, device)}`` for each of ``names``, each built once; one that cannot
        run here is left out and recorded as skipped (under ``skip_prefix + name``)."""
        impls: dict[str, Any] = {}
        for name in names:
            try:
                impls[name] = builder(name, self.cfg.device)
            except Exception as exc:
                self.meta["skipped"][skip_prefix + name] = f"{type(exc).__name__}: {exc}"
        return impls

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.on_row(self.rows)
        self.progress.step(_row_text(row))


def run_ce(ses: Session, grid: bool) -> None:
    """The logits-in section at its main shape (``grid=False``) or at the other grid points."""
    cfg = ses.cfg
    if not ses.ce_impls:
        ses.ce_impls = ses.build(cfg.impls, bench.build_impl)
    plan = _ce_plan(cfg)
    for (n, v), names in (plan[1:] if grid else plan[:1]):
        if ses.out_of_time(f"ce N={n} V={v}"):
            continue
        w = bench.make_workload(n, v, cfg.s, cfg.dtype, cfg.device, cfg.seed)
        repeats = cfg.grid_repeats if grid else cfg.repeats
        bw = bench.measure_bandwidth(w.logits, ses.timer, repeats)
        ses.meta["bandwidth_gbps"][f"{n}x{v}"] = bw
        if not grid:
            ses.meta["masked_fraction"] = (w.loss_mask == 0).float().mean().item()
        here: list[Row] = []
        for phase in cfg.phases:
            reference = bench.eager_reference(w, phase)
            for name in names:
                impl = ses.ce_impls.get(name)
                if impl is None or (phase == "inplace" and impl.inplace is None):
                    continue
                if ses.out_of_time(f"ce N={n} V={v} {phase} {name}"):
                    continue
                row = bench.run_case(impl, phase, w, ses.timer, repeats, cfg.warmup, reference)
                here.append(row)
                ses.add(row)
            del reference
        bench._fill_ratios(here, w, bw)
        del w
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()


def run_linear(ses: Session, grid: bool) -> None:
    """The fused-linear section at its main shape (``grid=False``) or at the other grid points."""
    cfg = ses.cfg
    if not ses.linear_impls:
        ses.linear_impls = ses.build(cfg.linear_impls, bench_linear.build_linear_impl, "linear/")
    plan = _linear_plan(cfg)
    for (n, v, h), names in (plan[1:] if grid else plan[:1]):
        if ses.out_of_time(f"linear N={n} V={v} H={h}"):
            continue
        repeats = cfg.grid_repeats if grid else cfg.repeats
        try:
            w = bench_linear.make_linear_workload(n, v, h, cfg.linear_s, cfg.linear_dtype, cfg.device, cfg.seed)
        except Exception as exc:  # e.g. out of memory at the largest GPU shape
            ses.meta["skipped"][f"linear N={n} V={v} H={h}"] = f"{type(exc).__name__}: {exc}"
            continue
        for phase in bench_linear.PHASES:
            reference = bench_linear.linear_reference(w, phase)
            for name in names:
                if name not in ses.linear_impls or ses.out_of_time(f"linear N={n} V={v} H={h} {phase} {name}"):
                    continue
                ses.add(bench_linear.run_linear_case(ses.linear_impls[name], phase, w, ses.timer, repeats,
                                                     cfg.warmup, reference))
            del reference
        del w
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    bench_linear.fill_linear_ratios(ses.rows)
    floors = [r for r in ses.rows if r.section == "linear" and r.impl == "matmuls" and r.tflops]
    ses.meta["matmul_tflops"] = {f"{r.n}x{r.v}x{r.h}/{r.phase}": r.tflops for r in floors}


def run_group(ses: Session) -> None:
    """The group-ops section (one shape)."""
    cfg = ses.cfg
    if ses.out_of_time("group"):
        return
    b, max_group = cfg.group_shape
    w = bench_group.make_group_workload(b, max_group, cfg.device, cfg.seed)
    bw = bench_group.copy_bandwidth(w, ses.timer, cfg.repeats)
    ses.meta["group_copy_gbps"] = bw
    impls = ses.build(cfg.group_impls, bench_group.build_group_impl, "group/")
    for op in bench_group.OPS:
        for impl in impls.values():
            ses.add(bench_group.run_group_case(impl, op, w, ses.timer, cfg.repeats, cfg.warmup))
    bench_group.fill_group_ratios(ses.rows, {(w.b, max_group): bw})


def run_peers(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """The peers' agreement with our values: in-process on CUDA, under the interpreter on CPU."""
    if cfg.device.type == "cuda":
        from steerlm_kernels import peers

        rows = peers.check(device=str(cfg.device), seed=cfg.seed)
        return {"mode": "cuda", "rows": rows, "available": peers.available()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "peers.json"
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "steerlm_kernels.peers", "--device", "cpu", "--json", str(path)]
        log("peers: " + " ".join(cmd[1:]) + " (TRITON_INTERPRET=1: correctness only)")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return {"mode": "interpreter", "rows": [], "error": "timed out after 600 s"}
        if not path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"mode": "interpreter", "rows": [], "error": f"exit {proc.returncode}: " + " / ".join(tail)}
        data = json.loads(path.read_text())
    data = data if isinstance(data, dict) else {"rows": data}
    data["mode"] = "interpreter"
    return data


# ------------------------------------------------------------------------------------------------
# Tables and plots
# ------------------------------------------------------------------------------------------------


def _ce_tables(rows: list[Row], meta: dict[str, Any]) -> list[str]:
    ce = [r for r in rows if r.section == "ce"]
    if not ce:
        return []
    main = (meta["n"], meta["v"])
    bw = meta["bandwidth_gbps"].get(f"{main[0]}x{main[1]}", {})
    out = [
        f"### Logits in (`ce`): main shape N={main[0]}, V={main[1]}, {meta['dtype']}",
        "",
        f"{meta['n'] // meta['s']} sequences × {meta['s']} tokens, {meta.get('masked_fraction', 0):.0%} of tokens "
        f"masked; median of {meta['repeats']} runs. READ {bw.get('read', 0):.1f} GB/s (`torch.sum` of the logits), "
        f"COPY {bw.get('copy', 0):.1f} GB/s (`copy_`, read + write), measured in this run. Byte model: baseline "
        "reads the logits once, train reads twice and writes the gradient, in place reads and writes once.",
        "",
        bench.markdown_table([r for r in ce if (r.n, r.v) == main]),
    ]
    grid = [r for r in ce if (r.n, r.v) != main]
    if grid:
        shapes = list(dict.fromkeys((r.n, r.v) for r in ce))
        out += ["", "Grid (median ms, × vs torch.compile, peak extra MiB); the main shape repeated for reference:", "",
                "| phase | implementation | " + " | ".join(f"N={n} V={v}" for n, v in shapes) + " |",
                "|---|---|" + "---|" * len(shapes)]
        by = {(r.phase, r.impl, r.n, r.v): r for r in ce}
        for phase, impl, title in dict.fromkeys((r.phase, r.impl, r.title) for r in ce):
            cells = []
            for n, v in shapes:
                r = by.get((phase, impl, n, v))
                if r is None:
                    cells.append("")
                elif r.error:
                    cells.append("ERROR")
                else:
                    flag = "" if r.agrees is not False else " MISMATCH"
                    cells.append(f"{_fmt(r.median_ms, '.1f')} ({_fmt(r.vs_compile, '.2f', '×')}, "
                                 f"{_fmt(r.extra_mib, '.0f')} MiB){flag}")
            out.append(f"| {phase} | {title} | " + " | ".join(cells) + " |")
    return out


def _linear_table(rows: list[Row], meta: dict[str, Any]) -> list[str]:
    lin = [r for r in rows if r.section == "linear"]
    if not lin:
        return []
    out = [f"### Hidden states in (`linear`): fused linear losses, {meta.get('linear_dtype')}", "",
           "FLOP model: 2·N·V·H per matmul; baseline needs 1 matmul, train 3 (logits, dL/dh, dL/dW). The matmul "
           "rate is the floor row's (bare matmuls in the input dtype into preallocated buffers) measured in this "
           "run; `vs floor` = time / the floor's time (SPEC target ≤ 1.2).", "",
           "| N | V | H | phase | implementation | median ms | TFLOP/s | % matmul rate | vs floor | vs eager "
           "| vs compile | vs F.lce | extra MiB | value rel err | grad rel err |",
           "|" + "---|" * 15]
    def cells(r: Row) -> list[str]:
        return [_fmt(r.median_ms, ".1f"), _fmt(r.tflops, ".3f"), _fmt(r.frac_matmul, ".0%"), _fmt(r.vs_floor, ".2f"),
                _fmt(r.vs_eager, ".2f", "×"), _fmt(r.vs_compile, ".2f", "×"), _fmt(r.vs_lce, ".2f", "×"),
                _fmt(r.extra_mib, ".1f"), value_err_cell(r), _fmt_err(r.grad_rel_err)]

    return out + [table_line([str(r.n), str(r.v), str(r.h), r.phase, r.title], r, cells, 15) for r in lin]


def _group_table(rows: list[Row], meta: dict[str, Any]) -> list[str]:
    grp = [r for r in rows if r.section == "group"]
    if not grp:
        return []
    out = ["### SteerLM 2.0 group ops (`group`)", "",
           f"B={grp[0].n} responses in groups of sizes 1..{grp[0].v} (unequal), float32. Byte model: "
           "`steerlm2_weights` 5 floats per response (3 read, 2 written), `segment_softmax` 2; COPY "
           f"{meta.get('group_copy_gbps', 0):.1f} GB/s on a buffer of the inputs' size (cache-resident: "
           "launch overhead, not bandwidth, decides these).", "",
           "| op | implementation | median ms | vs eager | vs compile | GB/s | % copy BW | extra MiB | rel err |",
           "|" + "---|" * 9]
    def cells(r: Row) -> list[str]:
        return [_fmt(r.median_ms, ".3f"), _fmt(r.vs_eager, ".2f", "×"), _fmt(r.vs_compile, ".2f", "×"),
                _fmt(r.gbps, ".2f"), _fmt(r.frac_copy, ".1%"), _fmt(r.extra_mib, ".1f"), value_err_cell(r)]

    return out + [table_line([r.phase, r.title], r, cells, 9) for r in grp]


def _peers_table(peers_result: dict[str, Any] | None) -> list[str]:
    if peers_result is None:
        return []
    mode = peers_result.get("mode")
    how = ("on CPU tensors under the Triton interpreter (correctness only, never timed)" if mode == "interpreter"
           else "on the GPU")
    out = ["### Peers: agreement with our values", "", f"Liger-Kernel and Cut Cross-Entropy {how}.", ""]
    if peers_result.get("error"):
        return out + [f"**ERROR** {peers_result['error']}"]
    rows = peers_result.get("rows") or []
    for name, why in (peers_result.get("available") or {}).items():
        if why:
            out.append(f"- `{name}` not checked: {why}")
    if not rows:
        return out + ["No peer installed (`pip install --no-deps liger-kernel cut-cross-entropy`)."]
    from steerlm_kernels import peers  # its own table (imports no peer itself)

    return out + [peers.markdown(rows)]


def render(meta: dict[str, Any], rows: list[Row], peers_result: dict[str, Any] | None,
           dist_result: dict[str, Any] | None = None) -> str:
    """Header + one table per section, ready to paste into benchmarks/RESULTS.md."""
    load = meta.get("load_average")
    lines = [
        f"**{meta['device']}** — {meta['date']} — {meta['versions']}",
        "",
        f"Command: `{meta['command']}` ({meta['elapsed_s']:.0f} s"
        + (f"; 1-minute load average {load[0]:.2f} before, {meta['load_average_after'][0]:.2f} after" if load else "")
        + f"). auto backend: `{meta['auto_backend']}`. Memory method check: a 256 MiB tensor reads as "
        + (f"{meta['memory_method_check_mib_of_256']:.1f} MiB." if meta["memory_method_check_mib_of_256"] else "n/a."),
    ]
    for part in (_ce_tables(rows, meta), _linear_table(rows, meta), _group_table(rows, meta),
                 bench_dist.markdown(dist_result) if dist_result is not None else [], _peers_table(peers_result)):
        if part:
            lines += [""] + part
    if meta["skipped"]:
        lines += ["", "Not run: " + "; ".join(f"`{k}` ({why})" for k, why in meta["skipped"].items()) + "."]
    return "\n".join(lines)


def write_plots(rows: list[Row], meta: dict[str, Any], out: Path) -> list[Path]:
    """PNG plots of time and peak extra memory against V and N, one line per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[Path] = []
    specs = [("ce", "v", "n", meta["n"], "ce_vs_v.png", "V (vocabulary)"),
             ("ce", "n", "v", meta["v"], "ce_vs_n.png", "N (tokens)")]
    lin_main = meta.get("linear_main")
    if lin_main:
        specs.append(("linear", "v", "n", lin_main[0], "linear_vs_v.png", "V (vocabulary)"))
    for section, x_attr, fixed_attr, fixed, name, xlabel in specs:
        sel = [r for r in rows if r.section == section and getattr(r, fixed_attr) == fixed and r.median_ms
               and (section != "linear" or r.h == lin_main[2])]
        if len({getattr(r, x_attr) for r in sel}) < 2:
            continue
        phases = list(dict.fromkeys(r.phase for r in sel))
        fig, axes = plt.subplots(2, len(phases), figsize=(5 * len(phases), 7), squeeze=False)
        for j, phase in enumerate(phases):
            for impl, title in dict.fromkeys((r.impl, r.title) for r in sel if r.phase == phase):
                pts = sorted((getattr(r, x_attr), r.median_ms, r.extra_mib) for r in sel
                             if r.phase == phase and r.impl == impl)
                if len(pts) < 2:
                    continue
                xs = [p[0] for p in pts]
                axes[0][j].plot(xs, [p[1] for p in pts], marker="o", label=title)
                axes[1][j].plot(xs, [p[2] if p[2] is not None else math.nan for p in pts], marker="o", label=title)
            axes[0][j].set_title(f"{section}: {phase} ({fixed_attr.upper()}={fixed})")
            axes[0][j].set_ylabel("median ms")
            axes[1][j].set_ylabel("peak extra MiB")
            xs_all = sorted({getattr(r, x_attr) for r in sel if r.phase == phase})
            mem_max = max([r.extra_mib or 0.0 for r in sel if r.phase == phase] + [1.0])
            for ax in (axes[0][j], axes[1][j]):
                ax.set_xlabel(xlabel)
                ax.set_xscale("log")
                ax.set_xticks(xs_all, [str(x) for x in xs_all])
                ax.minorticks_off()
                ax.grid(True, alpha=0.3)
            axes[0][j].set_yscale("log")
            # symlog: 0 MiB (our in-place rows) and 1500 MiB (eager) on one readable axis
            axes[1][j].set_yscale("symlog", linthresh=1.0)
            axes[1][j].set_ylim(0, 2 * mem_max)
            if axes[0][j].get_legend_handles_labels()[0]:
                axes[0][j].legend(fontsize=7)
        fig.suptitle(f"{meta['device']} — {meta['dtype']}", fontsize=9)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def benchmark(
    cfg: Config, log: Callable[[str], None] = print, on_row: Callable[[list[Row]], None] | None = None
) -> dict[str, Any]:
    """Run every section of ``cfg``; return ``{"meta", "rows" (dicts), "peers", "table", "_rows"}``."""
    started = time.perf_counter()
    bench.pin_malloc_mmap_threshold()
    load_before = bench._load_average()
    mem_check = bench.memory_method_check(cfg.device)
    log(f"memory method check: a 256 MiB float32 tensor reads as "
        f"{'n/a' if mem_check is None else f'{mem_check:.1f} MiB'}")
    timer = bench.Timer(cfg.device)
    meta: dict[str, Any] = {
        "device": bench.device_name(cfg.device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": bench.versions(), "command": bench.command_line(), "load_average": load_before,
        "sections": cfg.sections, "n": cfg.n, "v": cfg.v, "s": cfg.s, "b": cfg.n // cfg.s,
        "dtype": str(cfg.dtype).removeprefix("torch."), "repeats": cfg.repeats, "grid_repeats": cfg.grid_repeats,
        "warmup": cfg.warmup, "ce_shapes": cfg.ce_shapes, "linear_shapes": cfg.linear_shapes,
        "linear_main": cfg.linear_shapes[0] if "linear" in cfg.sections else None,
        "linear_dtype": str(cfg.linear_dtype).removeprefix("torch."),
        "group_shape": cfg.group_shape, "auto_backend": registry.resolve("auto", cfg.device),
        "backends": {k: str(v) for k, v in sk.backends().items()}, "memory_method_check_mib_of_256": mem_check,
        "bandwidth_gbps": {}, "skipped": dict(cfg.skipped),
    }
    rows: list[Row] = []
    ses = Session(cfg, timer, Progress(_count_cases(cfg), log), rows, meta, on_row or (lambda _: None),
                  None if cfg.budget is None else started + cfg.budget)
    # Main shapes first, then the peers, then the grid points: a --budget cuts the least important.
    if "ce" in cfg.sections:
        run_ce(ses, grid=False)
    if "linear" in cfg.sections:
        run_linear(ses, grid=False)
    if "group" in cfg.sections:
        run_group(ses)
    dist_result = None
    if "dist" in cfg.sections and not ses.out_of_time("dist"):
        tps, s_, b_ = ((2,), 32, 2) if cfg.quick else ((2, 4), 512, 4)
        log(f"dist: vocabulary-parallel cross entropy on tp={tps} gloo processes, N={s_ * b_}, V={cfg.v}")
        try:
            dist_result = bench_dist.run_dist(tps=tps, s=s_, b=b_, v=cfg.v - cfg.v % 4, repeats=cfg.repeats)
        except Exception as exc:
            dist_result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    peers_result = run_peers(cfg, log) if "peers" in cfg.sections and not ses.out_of_time("peers") else None
    if "ce" in cfg.sections:
        run_ce(ses, grid=True)
    if "linear" in cfg.sections:
        run_linear(ses, grid=True)
    meta["load_average_after"] = bench._load_average()
    meta["elapsed_s"] = time.perf_counter() - started
    return {"meta": meta, "rows": [asdict(r) for r in rows], "peers": peers_result, "dist": dist_result,
            "table": render(meta, rows, peers_result, dist_result), "_rows": rows}


def run(ns: argparse.Namespace) -> int:
    """``steerlm-kernels bench``: run, print the tables, write JSON + markdown + plots.

    Returns 1 when one of OUR rows failed or disagreed with the reference, or a peer disagreed
    with our values; a comparator's failure is printed loudly but does not fail the run.
    """
    cfg = resolve_config(ns)
    print(f"steerlm_kernels bench on {bench.device_name(cfg.device)}: sections {cfg.sections}; "
          f"ce shapes {cfg.ce_shapes if 'ce' in cfg.sections else '-'}; "
          f"linear shapes {cfg.linear_shapes if 'linear' in cfg.sections else '-'}", flush=True)
    out = Path(cfg.output) if cfg.output else None
    partial = out / "bench.partial.json" if out else None

    def save_partial(rows: list[Row]) -> None:
        if partial is not None:  # survives a time limit that kills the run
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps([asdict(r) for r in rows], indent=1))

    result = benchmark(cfg, log=lambda s: print(s, flush=True), on_row=save_partial)
    rows: list[Row] = result.pop("_rows")
    print()
    print(result["table"])
    loud = [r for r in rows if r.error or r.agrees is False]
    bad = [r for r in loud if r.ours]
    peer_bad = [p for p in ((result.get("peers") or {}).get("rows") or []) if not p.get("agrees")]
    dist_res = result.get("dist") or {}
    dist_bad = ([dist_res["error"]] if dist_res.get("error") else []) + [
        f"tp={r['tp']} {r['impl']}: loss rel err vs megatron {r['loss_rel_err_vs_megatron']:.1e}"
        for r in dist_res.get("rows") or [] if (r.get("loss_rel_err_vs_megatron") or 0.0) > 1e-5]
    if loud or peer_bad or dist_bad:
        print()
        print("!" * 78)
        for r in loud:
            what = f"ERROR {r.error}" if r.error else (
                f"DISAGREES with the reference: value rel err {_fmt_err(r.value_rel_err)}, "
                f"grad rel err {_fmt_err(r.grad_rel_err)}")
            print(f"!! {r.section} / {r.phase} / {r.title}: {what}")
        for p in peer_bad:
            print(f"!! peers / {p.get('peer')} / {p.get('op')}: disagrees with ours ({p.get('error') or ''})")
        for what in dist_bad:
            print(f"!! dist: {what}")
        print("!" * 78)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {"meta": result["meta"], "rows": result["rows"], "peers": result["peers"], "dist": result["dist"]}
        (out / "bench.json").write_text(json.dumps(payload, indent=2))
        (out / "bench.md").write_text(result["table"] + "\n")
        plots = write_plots(rows, result["meta"], out) if cfg.plots else []
        if partial is not None and partial.exists():
            partial.unlink()
        print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}"
              + "".join(f", {p}" for p in plots) + f" ({result['meta']['elapsed_s']:.0f} s)")
    return 1 if (bad or peer_bad or dist_bad) else 0


__all__ = ["MIB", "SECTIONS", "add_arguments", "benchmark", "render", "resolve_config", "run", "write_plots"]
