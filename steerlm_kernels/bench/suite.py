"""``steerlm-kernels bench``: every section over its shape grid, one process, one device.

Sections (``--sections``, default all):

``ce``      logits in (:mod:`.ce`): baseline / train / in-place phases.
``linear``  hidden states in (:mod:`.linear`): the fused linear losses.
``group``   SteerLM 2.0's per-prompt ops (:mod:`.group`).
``dist``    vocabulary-parallel cross entropy on tp = 2 and 4 gloo processes: collectives and bytes
            communicated per call, ours against megatron-core's (:mod:`.dist`).
``score``   ``steerlm-kernels score``'s engine against the plain Hugging Face scoring loop: tokens/s
            and peak extra memory (:mod:`.score`).
``train``   one full SteerLM 2.0 step at V = 128,256: ours fused / ours logits / NeMo-style eager,
            step time, tokens/s, peak extra memory (each row in its own process; :mod:`.train_step`).
``dropin``  a Hugging Face ``Trainer`` SFT step at V = 128,256 unpatched / ``hf.patch`` / Liger / CCE /
            ``F.linear_cross_entropy``, and the loss op alone (each row in its own process; :mod:`.dropin`).
``peers``   Liger-Kernel and Cut Cross-Entropy against our values (:mod:`.peers`).
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
Options and their defaults: :mod:`.config`; tables and plots: :mod:`.report`.
"""

from __future__ import annotations

import argparse
import datetime
import json
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
from steerlm_kernels import memory, registry
from steerlm_kernels.bench import ce, dist, group, harness, linear, peers, peers_check
from steerlm_kernels.bench import dropin as dropin_section
from steerlm_kernels.bench import score as score_section
from steerlm_kernels.bench import train_step as train_section
from steerlm_kernels.bench.config import SECTIONS, Config, add_arguments, resolve_config
from steerlm_kernels.bench.harness import Row, fmt, fmt_err
from steerlm_kernels.bench.report import render, write_plots

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
    return (f"{head} {r.median_ms:9.2f} ms  extra {fmt(r.extra_mib, '.1f')} MiB  value err "
            f"{fmt_err(r.value_rel_err)}  grad err {fmt_err(r.grad_rel_err)}"
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
            total += sum(1 for p in cfg.phases for x in names if not (p == "inplace" and x in ce.COMPARATORS))
    if "linear" in cfg.sections:
        total += sum(len(names) * len(linear.PHASES) for _, names in _linear_plan(cfg))
    if "group" in cfg.sections:
        total += len(cfg.group_impls) * len(group.OPS)
    return total


@dataclass
class Session:
    """What every section's runner shares: settings, timer, progress, results and the time budget."""

    cfg: Config
    timer: harness.Timer
    progress: Progress
    rows: list[Row]
    meta: dict[str, Any]
    on_row: Callable[[list[Row]], None]
    deadline: float | None  # time.perf_counter() after which no new case starts
    ce_impls: dict[str, ce.Impl] = field(default_factory=dict)
    linear_impls: dict[str, linear.LinearImpl] = field(default_factory=dict)

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
        ses.ce_impls = ses.build(cfg.impls, ce.build_impl)
    plan = _ce_plan(cfg)
    for (n, v), names in (plan[1:] if grid else plan[:1]):
        if ses.out_of_time(f"ce N={n} V={v}"):
            continue
        w = ce.make_workload(n, v, cfg.s, cfg.dtype, cfg.device, cfg.seed)
        repeats = cfg.grid_repeats if grid else cfg.repeats
        bw = harness.measure_bandwidth(w.logits, ses.timer, repeats)
        ses.meta["bandwidth_gbps"][f"{n}x{v}"] = bw
        if not grid:
            ses.meta["masked_fraction"] = (w.loss_mask == 0).float().mean().item()
        here: list[Row] = []
        for phase in cfg.phases:
            reference = ce.eager_reference(w, phase)
            for name in names:
                impl = ses.ce_impls.get(name)
                if impl is None or (phase == "inplace" and impl.inplace is None):
                    continue
                if ses.out_of_time(f"ce N={n} V={v} {phase} {name}"):
                    continue
                row = ce.run_case(impl, phase, w, ses.timer, repeats, cfg.warmup, reference)
                here.append(row)
                ses.add(row)
            del reference
        ce.fill_ratios(here, w, bw)
        del w
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()


def run_linear(ses: Session, grid: bool) -> None:
    """The fused-linear section at its main shape (``grid=False``) or at the other grid points."""
    cfg = ses.cfg
    if not ses.linear_impls:
        ses.linear_impls = ses.build(cfg.linear_impls, linear.build_linear_impl, "linear/")
    plan = _linear_plan(cfg)
    for (n, v, h), names in (plan[1:] if grid else plan[:1]):
        if ses.out_of_time(f"linear N={n} V={v} H={h}"):
            continue
        repeats = cfg.grid_repeats if grid else cfg.repeats
        try:
            w = linear.make_linear_workload(n, v, h, cfg.linear_s, cfg.linear_dtype, cfg.device, cfg.seed)
        except Exception as exc:  # e.g. out of memory at the largest GPU shape
            ses.meta["skipped"][f"linear N={n} V={v} H={h}"] = f"{type(exc).__name__}: {exc}"
            continue
        for phase in linear.PHASES:
            reference = linear.linear_reference(w, phase)
            for name in names:
                if name not in ses.linear_impls or ses.out_of_time(f"linear N={n} V={v} H={h} {phase} {name}"):
                    continue
                ses.add(linear.run_linear_case(ses.linear_impls[name], phase, w, ses.timer, repeats,
                                                     cfg.warmup, reference))
            del reference
        del w
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    linear.fill_linear_ratios(ses.rows)
    floors = [r for r in ses.rows if r.section == "linear" and r.impl == "matmuls" and r.tflops]
    ses.meta["matmul_tflops"] = {f"{r.n}x{r.v}x{r.h}/{r.phase}": r.tflops for r in floors}


def run_group(ses: Session) -> None:
    """The group-ops section (one shape)."""
    cfg = ses.cfg
    if ses.out_of_time("group"):
        return
    b, max_group = cfg.group_shape
    w = group.make_group_workload(b, max_group, cfg.device, cfg.seed)
    bw = group.copy_bandwidth(w, ses.timer, cfg.repeats)
    ses.meta["group_copy_gbps"] = bw
    impls = ses.build(cfg.group_impls, group.build_group_impl, "group/")
    for op in group.OPS:
        for impl in impls.values():
            ses.add(group.run_group_case(impl, op, w, ses.timer, cfg.repeats, cfg.warmup))
    group.fill_group_ratios(ses.rows, {(w.b, max_group): bw})


def run_peers(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """The peers' agreement with our values: in-process on CUDA, under the interpreter on CPU."""
    if cfg.device.type == "cuda":
        rows = peers_check.check(device=str(cfg.device), seed=cfg.seed)
        return {"mode": "cuda", "rows": rows, "available": peers.available()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "peers.json"
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "steerlm_kernels.bench.peers_check", "--device", "cpu", "--json", str(path)]
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
# Driver
# ------------------------------------------------------------------------------------------------


def benchmark(
    cfg: Config, log: Callable[[str], None] = print, on_row: Callable[[list[Row]], None] | None = None
) -> dict[str, Any]:
    """Run every section of ``cfg``; return ``{"meta", "rows" (dicts), "peers", "table", "_rows"}``."""
    started = time.perf_counter()
    memory.pin_malloc_mmap_threshold()
    load_before = harness.load_average()
    mem_check = memory.memory_method_check(cfg.device)
    log(f"memory method check: a 256 MiB float32 tensor reads as "
        f"{'n/a' if mem_check is None else f'{mem_check:.1f} MiB'}")
    timer = harness.Timer(cfg.device)
    meta: dict[str, Any] = {
        "device": harness.device_name(cfg.device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": harness.versions(), "command": harness.command_line(), "load_average": load_before,
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
            dist_result = dist.run_dist(tps=tps, s=s_, b=b_, v=cfg.v - cfg.v % 4, repeats=cfg.repeats)
        except Exception as exc:
            dist_result = {"error": harness.error_text(exc)}
    peers_result = run_peers(cfg, log) if "peers" in cfg.sections and not ses.out_of_time("peers") else None
    score_result = None
    if "score" in cfg.sections and not ses.out_of_time("score"):
        try:
            score_result = score_section.run_score(cfg.device, quick=cfg.quick, seed=cfg.seed, log=log)
        except Exception as exc:
            score_result = {"error": harness.error_text(exc)}
    train_result = None
    if "train" in cfg.sections and not ses.out_of_time("train"):
        try:
            train_result = train_section.run_train(cfg.device, quick=cfg.quick, seed=cfg.seed,
                                                   memory_budget=cfg.memory_budget, deadline=ses.deadline, log=log)
        except Exception as exc:
            train_result = {"error": harness.error_text(exc)}
    dropin_result = None
    if "dropin" in cfg.sections and not ses.out_of_time("dropin"):
        try:
            dropin_result = dropin_section.run_dropin(cfg.device, quick=cfg.quick, seed=cfg.seed,
                                                      deadline=ses.deadline, log=log)
        except Exception as exc:
            dropin_result = {"error": harness.error_text(exc)}
    if "ce" in cfg.sections:
        run_ce(ses, grid=True)
    if "linear" in cfg.sections:
        run_linear(ses, grid=True)
    meta["load_average_after"] = harness.load_average()
    meta["elapsed_s"] = time.perf_counter() - started
    table = render(meta, rows, peers_result, dist_result)
    if score_result is not None:
        table += "\n\n" + "\n".join(score_section.markdown(score_result))
    if train_result is not None:
        table += "\n\n" + "\n".join(train_section.markdown(train_result))
    if dropin_result is not None:
        table += "\n\n" + "\n".join(dropin_section.markdown(dropin_result))
    return {"meta": meta, "rows": [asdict(r) for r in rows], "peers": peers_result, "dist": dist_result,
            "score": score_result, "train": train_result, "dropin": dropin_result, "table": table, "_rows": rows}


def run(ns: argparse.Namespace) -> int:
    """``steerlm-kernels bench``: run, print the tables, write JSON + markdown + plots.

    Returns 1 when one of OUR rows failed or disagreed with the reference, or a peer disagreed
    with our values; a comparator's failure is printed loudly but does not fail the run.
    """
    cfg = resolve_config(ns)
    print(f"steerlm_kernels bench on {harness.device_name(cfg.device)}: sections {cfg.sections}; "
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
    section_bad = ([f"dist: {dist_res['error']}"] if dist_res.get("error") else []) + [
        f"dist: tp={r['tp']} {r['impl']}: loss rel err vs megatron {r['loss_rel_err_vs_megatron']:.1e}"
        for r in dist_res.get("rows") or [] if (r.get("loss_rel_err_vs_megatron") or 0.0) > 1e-5]
    score_res = result.get("score") or {}
    section_bad += [f"score: {score_res['error']}"] if score_res.get("error") else []
    section_bad += ["score: ours disagrees with the plain loop"] if score_res.get("agrees") is False else []
    train_res = result.get("train") or {}
    section_bad += [f"train: {train_res['error']}"] if train_res.get("error") else []
    section_bad += ["train: a row failed or disagrees with eager"] if train_res.get("agrees") is False else []
    dropin_res = result.get("dropin") or {}
    section_bad += [f"dropin: {dropin_res['error']}"] if dropin_res.get("error") else []
    section_bad += ["dropin: a row failed or disagrees"] if dropin_res.get("agrees") is False else []
    if loud or peer_bad or section_bad:
        print()
        print("!" * 78)
        for r in loud:
            what = f"ERROR {r.error}" if r.error else (
                f"DISAGREES with the reference: value rel err {fmt_err(r.value_rel_err)}, "
                f"grad rel err {fmt_err(r.grad_rel_err)}")
            print(f"!! {r.section} / {r.phase} / {r.title}: {what}")
        for p in peer_bad:
            print(f"!! peers / {p.get('peer')} / {p.get('op')}: disagrees with ours ({p.get('error') or ''})")
        for what in section_bad:
            print(f"!! {what}")
        print("!" * 78)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {"meta": result["meta"], "rows": result["rows"], "peers": result["peers"], "dist": result["dist"],
                   "score": result["score"], "train": result.get("train"), "dropin": result.get("dropin")}
        (out / "bench.json").write_text(json.dumps(payload, indent=2))
        (out / "bench.md").write_text(result["table"] + "\n")
        plots = write_plots(rows, result["meta"], out) if cfg.plots else []
        if partial is not None and partial.exists():
            partial.unlink()
        print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}"
              + "".join(f", {p}" for p in plots) + f" ({result['meta']['elapsed_s']:.0f} s)")
    return 1 if (bad or peer_bad or section_bad) else 0


__all__ = ["SECTIONS", "Config", "add_arguments", "benchmark", "render", "resolve_config", "run", "write_plots"]
