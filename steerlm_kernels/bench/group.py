"""Benchmark section "group": SteerLM 2.0's per-prompt ops, ``steerlm2_weights`` and ``segment_softmax``.

Workload: ``B`` responses in consecutive groups of unequal sizes (cycling through 1..``max_group``,
as prompts with different numbers of sampled responses), float32 ``seq_nll`` / ``log_q`` / ``ws``.
These are O(B) ops: what matters is one launch instead of a dozen small ones, so the rows report
time and the bytes model (``steerlm2_weights`` reads three and writes two float32 per response,
``segment_softmax`` reads one and writes one), as a fraction of the copy bandwidth measured in the
same run on a buffer of the inputs' size (small buffers: expect a small fraction).

Implementations: ``eager`` (the vectorised PyTorch a user would write for unequal groups: group ids,
``scatter_reduce`` max, ``index_add`` sums), ``compile`` (``torch.compile`` of it) and our backends.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import steerlm_kernels as sk
from steerlm_kernels import registry
from steerlm_kernels.bench.harness import (
    Row,
    Timer,
    available_backends,
    backend_title,
    fill_speedups,
    measure,
    rel_err,
)

OPS: tuple[str, ...] = ("steerlm2_weights", "segment_softmax")
#: float32 values read + written per response.
ACCESSES: dict[str, int] = {"steerlm2_weights": 5, "segment_softmax": 2}
TITLES: dict[str, str] = {"eager": "eager PyTorch (scatter)", "compile": "torch.compile of eager"}
EPS = 1e-8


@dataclass
class GroupWorkload:
    """``B`` responses in groups of sizes ``sizes`` (consecutive)."""

    seq_nll: Tensor  # [B] float32
    log_q: Tensor  # [B] float32
    ws: Tensor  # [B] float32, sums to 1 within each group
    sizes: Tensor  # [G] int64 (device)
    group_id: Tensor  # [B] int64 (device): the eager code's index
    max_group: int

    @property
    def b(self) -> int:
        return self.seq_nll.shape[0]


def make_group_workload(b: int, max_group: int, device: torch.device, seed: int = 0) -> GroupWorkload:
    """About ``b`` responses (rounded down to whole groups of sizes 1, 2, ..., max_group, 1, ...)."""
    cycle = list(range(1, max_group + 1))
    sizes_list = cycle * max(1, b // sum(cycle))
    sizes = torch.tensor(sizes_list, dtype=torch.int64)
    n = int(sizes.sum())
    gen = torch.Generator().manual_seed(seed)
    group_id = torch.repeat_interleave(torch.arange(len(sizes_list)), sizes)
    raw = torch.rand(n, generator=gen) + 0.05
    ws = raw / torch.zeros(len(sizes_list)).index_add_(0, group_id, raw)[group_id]
    return GroupWorkload(
        seq_nll=(torch.rand(n, generator=gen) * 200).to(device),
        log_q=(-torch.rand(n, generator=gen) * 200).to(device),
        ws=ws.to(device), sizes=sizes.to(device), group_id=group_id.to(device), max_group=max_group,
    )


def eager_group_softmax(x: Tensor, group_id: Tensor, n_groups: int) -> Tensor:
    """Softmax within groups with scatter ops (what a user writes for groups of unequal sizes)."""
    m = torch.full((n_groups,), -math.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, group_id, x, "amax")
    e = (x - m[group_id]).exp()
    return e / torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add(0, group_id, e)[group_id]


def eager_steerlm2_weights(
    seq_nll: Tensor, log_q: Tensor, ws: Tensor, group_id: Tensor, n_groups: int
) -> tuple[Tensor, Tensor, Tensor]:
    """NeMo's SteerLM 2.0 baseline / weight / distance, vectorised over unequal groups."""
    baseline = eager_group_softmax(-seq_nll - log_q, group_id, n_groups)
    p = ws + EPS
    terms = p * (p / (baseline + EPS)).log()
    kl = torch.zeros(n_groups, dtype=ws.dtype, device=ws.device).index_add(0, group_id, terms)
    return ws - baseline, baseline, kl.mean()


@dataclass
class GroupImpl:
    name: str
    title: str
    call: Callable[[str, GroupWorkload], Tensor]  # (op, workload) -> the op's main output
    ours: bool = False
    warmup_extra: int = 0


def build_group_impl(name: str, device: torch.device) -> GroupImpl:
    """Implementation ``name`` of the group section (raises ValueError when it cannot run here)."""
    if name in ("eager", "compile"):
        softmax, weights = eager_group_softmax, eager_steerlm2_weights
        if name == "compile":
            softmax, weights = torch.compile(softmax), torch.compile(weights)

        def call_eager(op: str, w: GroupWorkload) -> Tensor:
            g = w.sizes.shape[0]
            if op == "segment_softmax":
                return softmax(w.seq_nll, w.group_id, g)
            return weights(w.seq_nll, w.log_q, w.ws, w.group_id, g)[0]

        return GroupImpl(name, TITLES[name], call_eager, warmup_extra=int(name == "compile"))
    if name in registry.BACKENDS:
        registry.resolve(name, device)

        def call_ours(op: str, w: GroupWorkload) -> Tensor:
            if op == "segment_softmax":
                return sk.segment_softmax(w.seq_nll, w.sizes, backend=name)
            return sk.steerlm2_weights(w.seq_nll, w.log_q, w.ws, w.sizes, backend=name).weight

        return GroupImpl(name, backend_title(name, device), call_ours, ours=True)
    raise ValueError(f"unknown group implementation {name!r}")


def default_group_impls(device: torch.device) -> list[str]:
    """eager, compile and every backend that runs on ``device`` (Triton interpreted too: O(B) work),
    but ``cuda``, whose group ops are the torch backend's (:mod:`steerlm_kernels.kernels.cuda`)."""
    return ["eager", "compile", *(b for b, why in available_backends(device).items() if not why and b != "cuda")]


def run_group_case(impl: GroupImpl, op: str, w: GroupWorkload, timer: Timer, repeats: int, warmup: int) -> Row:
    """One (op, implementation) case; checked against float64 eager."""
    row = Row(phase=op, impl=impl.name, title=impl.title, ours=impl.ours, section="group", n=w.b,
              v=w.max_group, dtype="float32")
    row.bytes_per_elem = 4.0 * ACCESSES[op]
    g = w.sizes.shape[0]
    d = {k: getattr(w, k).double() for k in ("seq_nll", "log_q", "ws")}
    if op == "segment_softmax":
        ref = eager_group_softmax(d["seq_nll"], w.group_id, g)
    else:
        ref = eager_steerlm2_weights(d["seq_nll"], d["log_q"], d["ws"], w.group_id, g)[0]

    def check(first: Tensor) -> None:
        row.value_rel_err = rel_err(first, ref)
        row.agrees = math.isfinite(row.value_rel_err) and row.value_rel_err <= 1e-5

    def call(_: Any) -> Tensor:
        with torch.no_grad():
            return impl.call(op, w)

    return measure(row, lambda: None, call, w.seq_nll.device, timer, repeats, warmup, check, impl.warmup_extra)


def copy_bandwidth(w: GroupWorkload, timer: Timer, repeats: int) -> float:
    """GB/s of copying a float32 buffer of 3·B elements (the op's inputs) on this device."""
    src = torch.cat([w.seq_nll, w.log_q, w.ws])
    dst = torch.empty_like(src)
    timer(lambda: None, lambda _: dst.copy_(src), 3)
    ms = statistics.median(timer(lambda: None, lambda _: dst.copy_(src), max(repeats, 10)))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def fill_group_ratios(rows: list[Row], copy_gbps: dict[tuple[int, int], float]) -> None:
    """GB/s of the bytes model, fraction of the copy bandwidth, ratios to eager and compile."""
    grp = [r for r in rows if r.section == "group"]
    fill_speedups(grp, key=lambda r: (r.n, r.v, r.phase))
    for r in grp:
        if r.median_ms is None:
            continue
        r.gbps = r.n * r.bytes_per_elem / (r.median_ms * 1e-3) / 1e9
        bw = copy_gbps.get((r.n, r.v))
        if bw:
            r.frac_copy = r.gbps / bw
