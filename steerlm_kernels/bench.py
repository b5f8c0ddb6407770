"""Benchmarks: ``steerlm-kernels bench`` (the results table) and ``steerlm-kernels demo``.

Everything here is measured side by side in ONE process, on one random SteerLM-like batch:

* logits ``[N, V]`` (bfloat16 by default), ``N = B * S`` tokens in ``B`` sequences of length ``S``;
  labels uniform in ``[0, V)``; a loss mask that hides a prompt-like prefix of each sequence
  (15-35 % of it, ~25 % overall); SteerLM weights ``ws - baseline`` (signed) per group of up to 4
  responses; the normalizer is the group's mean number of loss tokens (NeMo's
  ``avg_num_valid_tokens_in_ub`` with M = G).

Phases (rows of the table):

``baseline``  per-sequence NLL under ``torch.no_grad()`` (SteerLM 2.0's phase 1).
``train``     ``weighted_sequence_loss`` forward + backward (``torch.autograd.grad`` w.r.t. the
              logits, so the gradient buffer is returned and counted, never accumulated).
``inplace``   the same with ``inplace_backward=True``: each iteration gets a fresh copy of the logits,
              made outside the timed (and memory-measured) region. Only our backends have an
              in-place mode; this phase's ratios are against the ``train`` phase's eager /
              ``torch.compile`` rows.

Implementations:

``eager``     the naive user code: ``F.cross_entropy(logits.float().view(-1, V), labels.view(-1),
              reduction="none")``, times the mask, per-sequence sum, weighted sum.
``compile``   ``torch.compile`` of that same function (compiled during warm-up, outside timing).
``liger``     (CUDA only, when ``liger_kernel`` is importable) Liger-Kernel's cross entropy with
              ``reduction="none"`` and masked labels set to ``ignore_index``. Liger writes its
              gradient into the logits during the forward, so it gets a fresh copy per iteration.
``torch`` / ``cpp`` / ``triton``  our public functions with ``backend=`` each backend that
              :func:`steerlm_kernels.backends` reports available for the device. (Triton on CPU
              tensors runs in the interpreter: far too slow to time, so it is only included with
              ``--quick`` or when named in ``--impls``.)

Measurements per row:

* time: median of ``--repeats`` runs after warm-up. CUDA: CUDA events around the call, the L2
  cache flushed before each run (as ``triton.testing.do_bench``). CPU: ``time.perf_counter``.
* peak EXTRA memory beyond the inputs: the median over 3 separate calls. CUDA:
  ``max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus ``memory_allocated()``
  before. CPU: the process's resident-set high-water mark: ``VmHWM`` is reset to the current RSS
  by writing ``5`` to ``/proc/self/clear_refs``, read after the call, minus ``VmRSS`` before.
  For that to be honest, glibc's malloc must give freed buffers back to the OS: its dynamic mmap
  threshold is pinned at 64 KiB (``mallopt(M_MMAP_THRESHOLD, 65536)``, plus ``malloc_trim(0)``)
  when the benchmark starts and around every memory measurement. The method is checked on every
  run: a 256 MiB float32 tensor must read as ~256 MiB (printed; also a test). The timed runs use
  the thresholds glibc's dynamic adjustment settles at in a long-running process (mmap 32 MiB,
  trim 64 MiB), so chunked implementations recycle their mid-sized buffers as they would in a
  training loop instead of paying fresh page faults for each; ``[N, V]`` buffers (> 32 MiB) are
  ``mmap``-ed either way.
* the byte model: bytes that must move per logit element (``baseline`` 1 read = 2 B/elem for
  bf16; ``train`` 2 reads + 1 write = 6 B/elem; ``inplace`` 1 read + 1 write = 4 B/elem when the
  row stays in cache), achieved GB/s = model bytes / time, and that as a fraction of two
  bandwidths measured in the same run on a buffer the size of the logits: READ = ``torch.sum``
  of the logits (a streaming multi-threaded read of every byte; ``2·N·V`` bytes / time) and
  COPY = ``dst.copy_(logits)`` (device-to-device on CUDA; bytes read + written / time).
  The model counts all ``N`` rows; our kernels never read the ~25 % masked rows in the forward,
  so they can exceed 100 % of it.
* agreement with eager (float32 math on both sides): ``value rel err`` = max |a - b| / max |b| of
  the per-sequence NLL (baseline) or the loss (train); ``grad rel err`` = ||g - g_eager|| /
  ||g_eager|| (Frobenius, float32). Above the tolerance the row is marked ``MISMATCH`` and a
  banner is printed; ``run`` then returns 1 (for our backends; a comparator's failure is loud but
  does not fail the run).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import steerlm_kernels as sk
from steerlm_kernels import _dispatch

PHASES: tuple[str, ...] = ("baseline", "train", "inplace")
PHASE_TITLES: dict[str, str] = {
    "baseline": "baseline: per-sequence NLL, no grad",
    "train": "train: weighted loss forward + backward",
    "inplace": "train, inplace_backward=True",
}
#: Logit element reads + writes the phase must do, in units of one element's size.
ACCESSES_PER_ELEM: dict[str, int] = {"baseline": 1, "train": 3, "inplace": 2}
COMPARATORS: tuple[str, ...] = ("eager", "compile", "liger")
IMPL_TITLES: dict[str, str] = {
    "eager": "eager PyTorch",
    "compile": "torch.compile",
    "liger": "Liger-Kernel CE",
    "torch": "sk backend=torch",
    "cpp": "sk backend=cpp",
    "triton": "sk backend=triton",
}
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
CPU_DEFAULT = {"n": 2048, "v": 32000, "s": 512, "repeats": 5, "warmup": 1}
GPU_DEFAULT = {"n": 16384, "v": 128256, "s": 4096, "repeats": 20, "warmup": 3}
QUICK_DEFAULT = {"n": 128, "v": 1000, "s": 32, "repeats": 2, "warmup": 1}
#: Separate calls whose peak extra memory is measured; the median is reported (the CPU's RSS
#: reading is occasionally inflated by the allocator's state: one outlier must not decide a row).
MEMORY_SAMPLES = 3
VALUE_TOL = 1e-4
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters
M_TRIM_THRESHOLD = -1
MIB = 2.0**20


# ------------------------------------------------------------------------------------------------
# Memory measurement
# ------------------------------------------------------------------------------------------------

_LIBC: Any = None
_LIBC_LOADED = False


def _glibc() -> Any:
    """glibc through ctypes, or None (another libc, or not Linux)."""
    global _LIBC, _LIBC_LOADED
    if not _LIBC_LOADED:
        _LIBC_LOADED = True
        try:
            libc = ctypes.CDLL(None)
            if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
                _LIBC = libc
        except OSError:
            _LIBC = None
    return _LIBC


def pin_malloc_mmap_threshold(threshold: int = 65536) -> bool:
    """Pin glibc's mmap threshold low (disabling its dynamic growth) so freed buffers leave RSS.

    Every allocation of ``threshold`` bytes or more is then its own ``mmap``, given back to the
    OS when freed; free heap memory is returned too (``malloc_trim(0)``). Returns True when glibc
    accepted it. Used for the memory measurements (and the whole run starts pinned).
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024))
    libc.malloc_trim(0)
    return ok


def malloc_steady_state() -> None:
    """Set glibc's thresholds to the values its dynamic adjustment reaches in a long-running process
    (mmap threshold at its 32 MiB maximum, trim threshold twice that), so timed runs recycle
    mid-sized buffers the way a training loop does instead of paying fresh page faults for each.
    Buffers above 32 MiB (every ``[N, V]`` one) are ``mmap``-ed in either mode."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)


def _proc_status_bytes(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes (None where unreadable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (False where ``clear_refs`` is not writable)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device: torch.device) -> None:
    """Wait for the device (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_extra_memory(fn: Callable[[], Any], device: torch.device) -> tuple[float | None, Any]:
    """Run ``fn()`` once and return ``(peak extra MiB beyond what was allocated before, result)``.

    CUDA: the caching allocator's peak. CPU: the RSS high-water mark (see the module docstring);
    ``None`` where ``/proc/self/clear_refs`` cannot be written.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB, out
    pin_malloc_mmap_threshold()
    before = _proc_status_bytes("VmRSS")
    ok = _reset_rss_peak()
    out = fn()
    peak = _proc_status_bytes("VmHWM")
    malloc_steady_state()
    if not ok or before is None or peak is None:
        return None, out
    return (peak - before) / MIB, out


def memory_method_check(device: torch.device | str = "cpu", mib: int = 256) -> float | None:
    """Measured extra MiB of allocating a ``mib`` MiB float32 tensor (should read ~``mib``)."""
    device = torch.device(device)
    extra, out = measure_extra_memory(
        lambda: torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device), device
    )
    del out
    return extra


# ------------------------------------------------------------------------------------------------
# Workload and implementations
# ------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """One random SteerLM-like micro-batch."""

    logits: Tensor  # [N, V]
    labels: Tensor  # [B, S] int64
    loss_mask: Tensor  # [B, S] float32, 0 on the prompt-like prefix
    weight: Tensor  # [B] float32 (ws - baseline)
    normalizer: Tensor  # [B] float32 (group mean of loss tokens)
    labels_ignored: Tensor  # [B, S] labels with masked positions set to -100 (for Liger)

    @property
    def n(self) -> int:
        return self.logits.shape[0]

    @property
    def v(self) -> int:
        return self.logits.shape[1]

    @property
    def b(self) -> int:
        return self.labels.shape[0]

    @property
    def s(self) -> int:
        return self.labels.shape[1]


def make_workload(
    n: int, v: int, s: int, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> Workload:
    """Random logits ``[n, v]`` in ``dtype`` and the matching labels / mask / weights."""
    if n <= 0 or v <= 0 or s <= 0 or n % s:
        raise ValueError(f"need positive N, V, S with S dividing N; got N={n}, V={v}, S={s}")
    b = n // s
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.empty(n, v, dtype=dtype, device=device)
    dgen = torch.Generator(device=device).manual_seed(seed)
    rows = max(1, (1 << 26) // v)  # fill in chunks: no [N, V] float32 temporary
    for start in range(0, n, rows):
        chunk = logits[start:start + rows]
        chunk.copy_(torch.randn(chunk.shape, generator=dgen, device=device, dtype=torch.float32).mul_(2.0))
    labels = torch.randint(0, v, (b, s), generator=gen)
    # Prompt-like prefixes of 15..35 % of each sequence, evenly spread (25 % overall), shuffled.
    frac = 0.15 + 0.2 * (torch.arange(b) + 0.5) / b
    prompt = (s * frac[torch.randperm(b, generator=gen)]).round().long()
    loss_mask = (torch.arange(s).unsqueeze(0) >= prompt.unsqueeze(1)).float()
    group = next(g for g in (4, 2, 1) if b % g == 0)
    ws = torch.softmax(torch.randn(b // group, group, generator=gen), dim=1)
    baseline = torch.softmax(torch.randn(b // group, group, generator=gen), dim=1)
    weight = (ws - baseline).reshape(b)
    tokens = loss_mask.sum(1).view(b // group, group).mean(1, keepdim=True).expand(-1, group).reshape(b)
    normalizer = tokens.clamp_min(1.0)
    labels_ignored = labels.masked_fill(loss_mask == 0, -100)
    return Workload(
        logits=logits,
        labels=labels.to(device),
        loss_mask=loss_mask.to(device),
        weight=weight.to(device),
        normalizer=normalizer.to(device),
        labels_ignored=labels_ignored.to(device),
    )


def naive_sequence_nll(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """What a user writes: float32 cross entropy of every token, masked, summed per sequence."""
    v = logits.shape[-1]
    tok = F.cross_entropy(logits.float().view(-1, v), labels.view(-1), reduction="none")
    return (tok.view(labels.shape) * loss_mask).sum(-1)


def naive_weighted_loss(logits: Tensor, labels: Tensor, loss_mask: Tensor, weight: Tensor,
                        normalizer: Tensor) -> Tensor:
    """The naive SteerLM 2.0 micro-batch loss ``sum_b weight_b * nll_b / normalizer_b``."""
    return (weight * naive_sequence_nll(logits, labels, loss_mask) / normalizer).sum()


@dataclass
class Impl:
    """One implementation: the baseline-phase and loss functions of ``(workload, logits)``."""

    name: str
    title: str
    seq_nll: Callable[[Workload, Tensor], Tensor]
    loss: Callable[[Workload, Tensor], Tensor] | None
    ours: bool = False
    fresh_copy: bool = False  # needs a private copy of the logits each call (writes into them)
    inplace: Callable[[Workload, Tensor], Tensor] | None = None
    warmup_extra: int = 0


def _eager_impl() -> Impl:
    """The naive user code, run eagerly."""
    return Impl(
        "eager", IMPL_TITLES["eager"],
        seq_nll=lambda w, x: naive_sequence_nll(x, w.labels, w.loss_mask),
        loss=lambda w, x: naive_weighted_loss(x, w.labels, w.loss_mask, w.weight, w.normalizer),
    )


def _compile_impl() -> Impl:
    """``torch.compile`` of the naive code (one compiled function per phase; compiles on first call)."""
    seq_c = torch.compile(naive_sequence_nll)
    loss_c = torch.compile(naive_weighted_loss)
    return Impl(
        "compile", IMPL_TITLES["compile"],
        seq_nll=lambda w, x: seq_c(x, w.labels, w.loss_mask),
        loss=lambda w, x: loss_c(x, w.labels, w.loss_mask, w.weight, w.normalizer),
        warmup_extra=1,
    )


def _liger_impl() -> Impl:
    """Liger-Kernel's cross entropy (``reduction="none"``), masked tokens as ``ignore_index``."""
    from liger_kernel.transformers import LigerCrossEntropyLoss

    ce = LigerCrossEntropyLoss(reduction="none", ignore_index=-100)

    def seq_nll(w: Workload, x: Tensor) -> Tensor:
        tok = ce(x.view(-1, w.v), w.labels_ignored.view(-1))
        tok = tok[0] if isinstance(tok, tuple) else tok
        return (tok.float().view(w.b, w.s) * w.loss_mask).sum(-1)

    def loss(w: Workload, x: Tensor) -> Tensor:
        return (w.weight * seq_nll(w, x) / w.normalizer).sum()

    return Impl("liger", IMPL_TITLES["liger"], seq_nll=seq_nll, loss=loss, fresh_copy=True)


def _our_impl(backend: str, auto: str) -> Impl:
    """Our public functions forced to ``backend`` (titled "(auto)" when ``auto`` picks it)."""
    def seq_nll(w: Workload, x: Tensor) -> Tensor:
        return sk.sequence_nll(x.view(w.b, w.s, w.v), w.labels, w.loss_mask, backend=backend)

    def loss(w: Workload, x: Tensor, inplace: bool = False) -> Tensor:
        return sk.weighted_sequence_loss(
            x.view(w.b, w.s, w.v), w.labels, w.loss_mask, w.weight, w.normalizer,
            inplace_backward=inplace, backend=backend,
        )

    title = IMPL_TITLES[backend] + (" (auto)" if backend == auto else "")
    return Impl(backend, title, seq_nll=seq_nll, loss=loss, ours=True,
                inplace=lambda w, x: loss(w, x, inplace=True))


def available_backends(device: torch.device) -> dict[str, str]:
    """``{backend: ""}`` for each backend that can run on ``device``, else ``{backend: why not}``."""
    out: dict[str, str] = {}
    for name in _dispatch.BACKENDS:
        try:
            _dispatch.resolve(name, device)
            out[name] = ""
        except ValueError as exc:
            out[name] = str(exc)
    return out


def default_impls(device: torch.device, quick: bool) -> tuple[list[str], dict[str, str]]:
    """The implementations run by default on ``device`` and ``{name: why not}`` for the others."""
    names = ["eager", "compile"]
    skipped: dict[str, str] = {}
    if device.type == "cuda":
        try:
            import liger_kernel  # noqa: F401

            names.append("liger")
        except Exception as exc:
            skipped["liger"] = f"liger_kernel not importable ({type(exc).__name__})"
    else:
        skipped["liger"] = "Liger-Kernel needs CUDA"
    for name, why in available_backends(device).items():
        if why:
            skipped[name] = why
        elif name == "triton" and device.type != "cuda" and not quick:
            skipped[name] = "Triton interpreter on CPU tensors: correct, far too slow to time (use --quick)"
        else:
            names.append(name)
    return names, skipped


def build_impl(name: str, device: torch.device) -> Impl:
    """Instantiate implementation ``name`` (raises when it cannot run here)."""
    if name == "eager":
        return _eager_impl()
    if name == "compile":
        return _compile_impl()
    if name == "liger":
        if device.type != "cuda":
            raise ValueError("Liger-Kernel needs CUDA")
        return _liger_impl()
    if name in _dispatch.BACKENDS:
        _dispatch.resolve(name, device)  # raises ValueError with the reason
        return _our_impl(name, _dispatch.resolve("auto", device))
    raise ValueError(f"unknown implementation {name!r}; choose from {COMPARATORS + _dispatch.BACKENDS}")


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table."""

    phase: str
    impl: str
    title: str
    ours: bool
    median_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    extra_mib: float | None = None
    extra_mib_samples: list[float | None] = field(default_factory=list)
    bytes_per_elem: float = 0.0
    gbps: float | None = None
    frac_read: float | None = None
    frac_copy: float | None = None
    vs_eager: float | None = None
    vs_compile: float | None = None
    value: float | None = None  # the loss (train phases) of the first call
    value_rel_err: float | None = None
    grad_rel_err: float | None = None
    agrees: bool | None = None
    first_call_s: float | None = None
    error: str | None = None


class Timer:
    """Times a callable on ``device``: CUDA events (with an L2 flush) or ``time.perf_counter``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        cuda = device.type == "cuda"
        self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if cuda else None

    def __call__(self, prepare: Callable[[], Any], call: Callable[[Any], Any], repeats: int) -> list[float]:
        """Milliseconds of ``call(prepare())`` for each of ``repeats`` runs (prepare is not timed)."""
        times: list[float] = []
        if self.device.type == "cuda":
            events = []
            for _ in range(repeats):
                args = prepare()
                assert self._flush is not None
                self._flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = call(args)
                end.record()
                events.append((start, end))
                del out, args
            torch.cuda.synchronize(self.device)
            return [s.elapsed_time(e) for s, e in events]
        for _ in range(repeats):
            args = prepare()
            t0 = time.perf_counter()
            out = call(args)
            t1 = time.perf_counter()
            times.append((t1 - t0) * 1e3)
            del out, args
        return times


def measure_bandwidth(x: Tensor, timer: Timer, repeats: int) -> dict[str, float]:
    """READ (``torch.sum(x)``) and COPY (``dst.copy_(x)``) bandwidths in GB/s over ``x``'s bytes."""
    nbytes = x.numel() * x.element_size()
    dst = torch.empty_like(x)
    reps = max(repeats, 5)
    out: dict[str, float] = {}
    for key, fn, traffic in (
        ("read", lambda _: torch.sum(x), nbytes),
        ("copy", lambda _: dst.copy_(x), 2 * nbytes),
    ):
        timer(lambda: None, fn, 2)
        ms = statistics.median(timer(lambda: None, fn, reps))
        out[key] = traffic / (ms * 1e-3) / 1e9
        out[f"{key}_ms"] = ms
    return out


def _rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().float().reshape(-1), b.detach().float().reshape(-1)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _grad_rel_err(g: Tensor, ref: Tensor) -> float:
    g, ref = g.reshape(ref.shape[0], -1), ref.reshape(ref.shape[0], -1)
    num = den = 0.0
    rows = max(1, (1 << 24) // max(ref.shape[1], 1))
    for start in range(0, ref.shape[0], rows):
        r = ref[start:start + rows].float()
        num += (g[start:start + rows].float() - r).pow(2).sum().item()
        den += r.pow(2).sum().item()
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def phase_fns(impl: Impl, phase: str, w: Workload) -> tuple[Callable[[], Any], Callable[[Any], Any]] | None:
    """``(prepare, call)`` for ``impl`` in ``phase``, or None when it has no such phase."""
    fresh = impl.fresh_copy or phase == "inplace"
    if phase == "baseline":
        def prepare() -> Tensor:
            return w.logits.clone() if fresh else w.logits

        def call(x: Tensor) -> Any:
            with torch.no_grad():
                return impl.seq_nll(w, x)

        return prepare, call
    fn = impl.inplace if phase == "inplace" else impl.loss
    if fn is None:
        return None

    def prepare_leaf() -> Tensor:
        return (w.logits.clone() if fresh else w.logits.detach()).requires_grad_(True)

    def call_train(x: Tensor) -> Any:
        loss = fn(w, x)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    return prepare_leaf, call_train


def eager_reference(w: Workload, phase: str) -> dict[str, Tensor]:
    """Eager PyTorch's outputs for ``phase``: ``{"value": ...}`` (+ ``"grad"`` when training)."""
    prepare, call = phase_fns(_eager_impl(), "train" if phase == "inplace" else phase, w)  # type: ignore[misc]
    out = call(prepare())
    return {"value": out} if phase == "baseline" else {"value": out[0], "grad": out[1]}


def run_case(
    impl: Impl, phase: str, w: Workload, timer: Timer, repeats: int, warmup: int,
    reference: dict[str, Tensor] | None,
) -> Row:
    """Warm up, check values against ``reference``, measure extra memory, then time one case."""
    row = Row(phase=phase, impl=impl.name, title=impl.title, ours=impl.ours)
    row.bytes_per_elem = ACCESSES_PER_ELEM[phase] * w.logits.element_size()
    fns = phase_fns(impl, phase, w)
    if fns is None:
        row.error = "no such phase"
        return row
    prepare, call = fns
    device = w.logits.device
    try:
        t0 = time.perf_counter()
        first = call(prepare())
        _sync(device)
        row.first_call_s = time.perf_counter() - t0
        if reference is not None:
            if phase == "baseline":
                row.value_rel_err = _rel_err(first, reference["value"])
            else:
                row.value = first[0].item()
                row.value_rel_err = _rel_err(first[0], reference["value"])
                row.grad_rel_err = _grad_rel_err(first[1], reference["grad"])
            checks = [(row.value_rel_err, VALUE_TOL)]
            if row.grad_rel_err is not None:
                checks.append((row.grad_rel_err, GRAD_TOL.get(w.logits.dtype, 1e-2)))
            row.agrees = all(math.isfinite(e) and e <= tol for e, tol in checks)
        del first
        for _ in range(max(0, warmup - 1) + impl.warmup_extra):
            call(prepare())
        _sync(device)
        for _ in range(MEMORY_SAMPLES):
            args = prepare()
            row.extra_mib_samples.append(measure_extra_memory(functools.partial(call, args), device)[0])
            args = None
        if all(m is not None for m in row.extra_mib_samples):
            row.extra_mib = statistics.median(row.extra_mib_samples)
        row.times_ms = timer(prepare, call, repeats)
        row.median_ms = statistics.median(row.times_ms)
    except Exception as exc:  # reported in the table, loudly
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return row


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """A human name for the device: GPU model, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {model}, {cores} cores, {torch.get_num_threads()} torch threads, no GPU used"


def versions() -> str:
    """``torch X, triton Y, steerlm_kernels Z``."""
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    return f"torch {torch.__version__}, triton {tv}, steerlm_kernels {sk.__version__}"


def _fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def _fmt_err(x: float | None) -> str:
    return "–" if x is None else ("0" if x == 0 else f"{x:.1e}")


def markdown_table(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    head = ("| phase | implementation | median ms | vs eager | vs compile | extra MiB | model B/elem "
            "| GB/s | % read BW | % copy BW | value rel err | grad rel err |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        if r.error:
            lines.append(f"| {r.phase} | {r.title} | **ERROR** {r.error} |" + " |" * 9)
            continue
        flag = "" if r.agrees is not False else " **MISMATCH**"
        lines.append(
            f"| {r.phase} | {r.title} | {_fmt(r.median_ms, '.1f')} | {_fmt(r.vs_eager, '.2f', '×')} "
            f"| {_fmt(r.vs_compile, '.2f', '×')} | {_fmt(r.extra_mib, '.1f')} | {r.bytes_per_elem:g} "
            f"| {_fmt(r.gbps, '.1f')} | {_fmt(r.frac_read, '.0%')} | {_fmt(r.frac_copy, '.0%')} "
            f"| {_fmt_err(r.value_rel_err)}{flag} | {_fmt_err(r.grad_rel_err)} |"
        )
    return "\n".join(lines)


def _fill_ratios(rows: list[Row], w: Workload, bw: dict[str, float]) -> None:
    by = {(r.phase, r.impl): r for r in rows}
    nbytes_elem = w.n * w.v
    for r in rows:
        if r.median_ms is None:
            continue
        ref_phase = "train" if r.phase == "inplace" else r.phase
        for key, attr in (("eager", "vs_eager"), ("compile", "vs_compile")):
            ref = by.get((ref_phase, key))
            if ref is not None and ref.median_ms:
                setattr(r, attr, ref.median_ms / r.median_ms)
        r.gbps = nbytes_elem * r.bytes_per_elem / (r.median_ms * 1e-3) / 1e9
        if bw.get("read"):
            r.frac_read = r.gbps / bw["read"]
        if bw.get("copy"):
            r.frac_copy = r.gbps / bw["copy"]


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages (other processes skew CPU timings), None where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def command_line() -> str:
    """How this process was started, for the results header."""
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        return "python -m steerlm_kernels " + " ".join(argv[1:])
    if argv:
        argv[0] = os.path.basename(argv[0])
    return " ".join(argv)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``steerlm-kernels bench``."""
    parser.add_argument("--n", type=int, default=None,
                        help="tokens N = B*S (default: 2048 on CPU, 16384 on CUDA, 128 with --quick)")
    parser.add_argument("--v", type=int, default=None,
                        help="vocabulary V (default: 32000 on CPU, 128256 on CUDA, 1000 with --quick)")
    parser.add_argument("--s", type=int, default=None,
                        help="sequence length S, must divide N (default: 512 on CPU, 4096 on CUDA)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="logits dtype (default bf16)")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per case before timing")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    parser.add_argument("--impls", default=None,
                        help="comma list of eager, compile, liger, torch, cpp, triton "
                             "(default: eager, compile, liger on CUDA, and every available backend)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="write bench.json (all rows) and bench.md (the table) there")
    parser.add_argument("--quick", action="store_true",
                        help="tiny default shape and 2 repeats (a smoke test; numbers mean little)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the batch")


@dataclass
class Config:
    """Resolved benchmark settings."""

    n: int
    v: int
    s: int
    dtype: torch.dtype
    device: torch.device
    repeats: int
    warmup: int
    phases: list[str]
    impls: list[str]
    skipped: dict[str, str]
    output: str | None
    quick: bool
    seed: int


def resolve_config(ns: argparse.Namespace) -> Config:
    """Fill device-dependent defaults and validate the options."""
    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    quick = bool(getattr(ns, "quick", False))
    d = QUICK_DEFAULT if quick else (GPU_DEFAULT if device.type == "cuda" else CPU_DEFAULT)
    n = ns.n or d["n"]
    s = ns.s or min(d["s"], n)
    phases = [p.strip() for p in ns.phases.split(",") if p.strip()]
    bad = [p for p in phases if p not in PHASES]
    if bad:
        raise SystemExit(f"--phases: unknown {bad}; choose from {PHASES}")
    default, why_not = default_impls(device, quick)
    if ns.impls:
        impls: list[str] = []
        skipped: dict[str, str] = {}
        for name in dict.fromkeys(i.strip() for i in ns.impls.split(",") if i.strip()):
            if name not in COMPARATORS + _dispatch.BACKENDS:
                raise SystemExit(f"--impls: unknown {name!r}; choose from {COMPARATORS + _dispatch.BACKENDS}")
            named_ok = name == "triton" and not available_backends(device)["triton"]  # interpreted
            if name in default or named_ok:
                impls.append(name)
            else:
                skipped[name] = why_not.get(name, "not available")
    else:
        impls, skipped = default, why_not
    if n % s:
        raise SystemExit(f"--s {s} must divide --n {n}")
    return Config(
        n=n, v=ns.v or d["v"], s=s, dtype=DTYPES[ns.dtype], device=device,
        repeats=ns.repeats or d["repeats"], warmup=ns.warmup if ns.warmup is not None else d["warmup"],
        phases=phases, impls=impls, skipped=skipped, output=ns.output, quick=quick, seed=ns.seed,
    )


def benchmark(
    cfg: Config, log: Callable[[str], None] = print, on_row: Callable[[list[Row]], None] | None = None
) -> dict[str, Any]:
    """Run every (phase, implementation) case of ``cfg``; return the results (rows, meta, table).

    ``on_row(rows so far)`` is called after each case (``run`` saves partial results with it).
    """
    pin_malloc_mmap_threshold()
    load_before = _load_average()
    device = cfg.device
    mem_check = memory_method_check(device)
    log(f"memory method check: a 256 MiB float32 tensor reads as "
        f"{'n/a' if mem_check is None else f'{mem_check:.1f} MiB'}")
    w = make_workload(cfg.n, cfg.v, cfg.s, cfg.dtype, device, cfg.seed)
    timer = Timer(device)
    bw = measure_bandwidth(w.logits, timer, cfg.repeats)
    log(f"logits [{cfg.n}, {cfg.v}] {str(cfg.dtype).removeprefix('torch.')} "
        f"({w.logits.numel() * w.logits.element_size() / MIB:.0f} MiB), {w.b} sequences of {w.s}, "
        f"{(w.loss_mask == 0).float().mean().item():.0%} masked; "
        f"READ {bw['read']:.1f} GB/s (torch.sum), COPY {bw['copy']:.1f} GB/s (copy_)")
    impls: dict[str, Impl] = {}
    errors: dict[str, str] = {}
    for name in cfg.impls:
        try:
            impls[name] = build_impl(name, device)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    cases = [(p, i) for p in cfg.phases for i in impls
             if i in cfg.impls and not (p == "inplace" and impls[i].inplace is None)]
    rows: list[Row] = []
    for phase in cfg.phases:
        reference = eager_reference(w, phase)
        for name in impls:
            if (phase, name) not in cases:
                continue
            row = run_case(impls[name], phase, w, timer, cfg.repeats, cfg.warmup, reference)
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            head = f"[{len(rows)}/{len(cases)}] {phase:8s} {row.title:26s}"
            if row.error:
                log(f"{head} ERROR {row.error}")
            else:
                log(f"{head} {row.median_ms:9.1f} ms  extra {_fmt(row.extra_mib, '.1f')} MiB  "
                    f"value err {_fmt_err(row.value_rel_err)}  grad err {_fmt_err(row.grad_rel_err)}  "
                    f"(first call {row.first_call_s:.1f} s)"
                    + ("" if row.agrees is not False else "  <-- MISMATCH"))
        del reference
    _fill_ratios(rows, w, bw)
    skipped = dict(cfg.skipped)
    skipped.update(errors)
    meta = {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(),
        "command": command_line(),
        "load_average": load_before,
        "load_average_after": _load_average(),
        "n": cfg.n, "v": cfg.v, "s": cfg.s, "b": w.b,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "repeats": cfg.repeats, "warmup": cfg.warmup,
        "masked_fraction": (w.loss_mask == 0).float().mean().item(),
        "auto_backend": _dispatch.resolve("auto", device),
        "backends": {k: str(v) for k, v in sk.backends().items()},
        "memory_method_check_mib_of_256": mem_check,
        "bandwidth_gbps": bw,
        "skipped": skipped,
    }
    return {"meta": meta, "rows": [asdict(r) for r in rows], "table": render(meta, rows), "_rows": rows}


def render(meta: dict[str, Any], rows: list[Row]) -> str:
    """Header + markdown table + notes, ready to paste into benchmarks/RESULTS.md."""
    bw = meta["bandwidth_gbps"]
    lines = [
        f"**{meta['device']}** — {meta['date']} — {meta['versions']}",
        "",
        f"Command: `{meta['command']}`"
        + (f" (1-minute load average: {meta['load_average'][0]:.2f} before, "
           f"{meta['load_average_after'][0]:.2f} after)" if meta["load_average"] else ""),
        "",
        f"Logits [{meta['n']}, {meta['v']}] {meta['dtype']} ({meta['b']} sequences × {meta['s']}, "
        f"{meta['masked_fraction']:.0%} of tokens masked), median of {meta['repeats']} runs after "
        f"{meta['warmup']} warm-up. READ bandwidth {bw['read']:.1f} GB/s (`torch.sum` of the logits), "
        f"COPY {bw['copy']:.1f} GB/s (`copy_` of the logits, read + write). auto backend: "
        f"`{meta['auto_backend']}`.",
        "",
        markdown_table(rows),
    ]
    if meta["skipped"]:
        lines += ["", "Not run: " + "; ".join(f"`{k}` ({why})" for k, why in meta["skipped"].items()) + "."]
    return "\n".join(lines)


def run(ns: argparse.Namespace) -> int:
    """``steerlm-kernels bench``: run, print the table, optionally write JSON + markdown."""
    cfg = resolve_config(ns)
    print(f"steerlm_kernels bench on {device_name(cfg.device)}: phases {cfg.phases}, impls {cfg.impls}",
          flush=True)
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
    bad = [r for r in rows if r.ours and (r.error or r.agrees is False)]
    loud = [r for r in rows if r.error or r.agrees is False]
    if loud:
        print()
        print("!" * 78)
        for r in loud:
            what = f"ERROR {r.error}" if r.error else (
                f"DISAGREES with eager: value rel err {_fmt_err(r.value_rel_err)}, "
                f"grad rel err {_fmt_err(r.grad_rel_err)}")
            print(f"!! {r.phase} / {r.title}: {what}")
        print("!" * 78)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {"meta": result["meta"], "rows": result["rows"]}
        (out / "bench.json").write_text(json.dumps(payload, indent=2))
        (out / "bench.md").write_text(result["table"] + "\n")
        if partial is not None and partial.exists():
            partial.unlink()
        print(f"\nwrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------------
# make demo
# ------------------------------------------------------------------------------------------------


def demo(n: int = 2048, v: int = 32000, s: int = 512, repeats: int = 3) -> int:
    """Our fused loss beside eager PyTorch on one random batch: values, time and memory ratios."""
    pin_malloc_mmap_threshold()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    auto = _dispatch.resolve("auto", device)
    w = make_workload(n, v, s, torch.bfloat16, device)
    mib = w.logits.numel() * w.logits.element_size() / MIB
    print(f"A random SteerLM-like batch on {device.type.upper()}: {w.b} responses × {w.s} tokens, vocabulary "
          f"{w.v}, bfloat16 logits ({mib:.0f} MiB), {(w.loss_mask == 0).float().mean().item():.0%} "
          "prompt tokens masked.")
    print(f"Fused loss: steerlm_kernels, backend auto -> {auto!r}.  Reference: eager PyTorch "
          "(F.cross_entropy on logits.float(), mask, per-sequence sum).")
    timer = Timer(device)
    eager, ours = _eager_impl(), _our_impl(auto, auto)
    ok = True
    for phase, title in (("baseline", "Phase 1, baseline (no grad): per-sequence NLL"),
                         ("train", "Phase 2, training: weighted loss forward + backward")):
        ref = eager_reference(w, phase)
        e_row = run_case(eager, phase, w, timer, repeats, 1, ref)
        o_row = run_case(ours, phase, w, timer, repeats, 1, ref)
        print(f"\n{title}")
        for r in (e_row, o_row):
            if r.error:
                print(f"  {r.title:22s} ERROR {r.error}")
                continue
            print(f"  {r.title:22s} {r.median_ms:8.1f} ms   +{_fmt(r.extra_mib, '.0f')} MiB extra memory")
        if e_row.error or o_row.error:
            ok = False
            continue
        assert e_row.median_ms and o_row.median_ms
        speed = e_row.median_ms / o_row.median_ms
        mem = ""
        if e_row.extra_mib is not None and o_row.extra_mib is not None:
            mem = (f", {e_row.extra_mib / max(o_row.extra_mib, 1.0):.0f}× less extra memory"
                   if o_row.extra_mib >= 1.0 else f", extra memory {o_row.extra_mib:.1f} MiB vs "
                   f"{e_row.extra_mib:.0f} MiB")
        print(f"  -> {speed:.1f}× faster{mem}")
        if phase == "baseline":
            vals = ", ".join(f"{x:.2f}" for x in ref["value"][:4].tolist())
            print(f"  per-sequence NLL (first {min(4, w.b)}): {vals}")
        else:
            print(f"  loss: eager {ref['value'].item():.6f}, fused {_fmt(o_row.value, '.6f')}; "
                  f"gradient rel err {_fmt_err(o_row.grad_rel_err)}")
        agree = "agree" if o_row.agrees else "DISAGREE"
        print(f"  values {agree} with eager (rel err {_fmt_err(o_row.value_rel_err)})")
        ok = ok and bool(o_row.agrees)
    print("\nFull table (torch.compile, every backend, in-place backward, bandwidth): steerlm-kernels bench")
    return 0 if ok else 1
