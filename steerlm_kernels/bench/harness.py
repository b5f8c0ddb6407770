"""The benchmark harness: timing, memory measurement, the result rows and their formatting.

Every section (:mod:`.ce`, :mod:`.linear`, :mod:`.group`) measures through :func:`measure`:

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
* agreement with the section's reference (:func:`check_outputs`): ``value rel err`` = max |a - b| /
  max |b|; ``grad rel err`` = ||g - g_ref|| / ||g_ref|| (Frobenius, float32). Above the tolerance
  the row is marked ``MISMATCH``.

Also here: the random SteerLM-like batch the ``ce`` and ``linear`` sections share
(:func:`make_batch`) and their eager comparator's formula (:func:`naive_sequence_nll`), the
implementation titles and which of our backends run on a device (:func:`available_backends`,
:func:`backend_title`), and the table cells (:func:`fmt`,
:func:`fmt_err`, :func:`table_line`).
"""

from __future__ import annotations

import functools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import steerlm_kernels as sk
from steerlm_kernels import registry
from steerlm_kernels.memory import measure_extra_memory

#: Table titles: the logits-in comparators and our backends (the other sections add their own).
IMPL_TITLES: dict[str, str] = {
    "eager": "eager PyTorch",
    "compile": "torch.compile",
    "liger": "Liger-Kernel CE",
    "torch": "sk backend=torch",
    "cpp": "sk backend=cpp",
    "triton": "sk backend=triton",
    "cuda": "sk backend=cuda",
}
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
#: Separate calls whose peak extra memory is measured; the median is reported (the CPU's RSS
#: reading is occasionally inflated by the allocator's state: one outlier must not decide a row).
MEMORY_SAMPLES = 3
VALUE_TOL = 1e-4
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def available_backends(device: torch.device) -> dict[str, str]:
    """``{backend: ""}`` for each backend that can run on ``device``, else ``{backend: why not}``."""
    out: dict[str, str] = {}
    for name in registry.BACKENDS:
        try:
            registry.resolve(name, device)
            out[name] = ""
        except ValueError as exc:
            out[name] = str(exc)
    return out


def backend_title(backend: str, device: torch.device) -> str:
    """The table title of our ``backend`` ("(auto)" appended when ``auto`` picks it on ``device``)."""
    return IMPL_TITLES[backend] + (" (auto)" if backend == registry.resolve("auto", device) else "")


# ------------------------------------------------------------------------------------------------
# Memory measurement: steerlm_kernels.memory (shared with `steerlm-kernels demo`)
# ------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# The random batch
# ------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """The non-logits part of a SteerLM-like micro-batch of ``B`` sequences of ``S`` tokens."""

    labels: Tensor  # [B, S] int64, uniform in [0, V)
    loss_mask: Tensor  # [B, S] float32, 0 on the prompt-like prefix
    weight: Tensor  # [B] float32 (ws - baseline, signed)
    normalizer: Tensor  # [B] float32 (group mean of loss tokens)
    labels_ignored: Tensor  # [B, S] labels with masked positions set to -100


def make_batch(n: int, v: int, s: int, device: torch.device, seed: int = 0) -> Batch:
    """Labels, loss mask (15-35 % prompt-like prefixes), weights and normalizers of ``n / s`` sequences."""
    if n <= 0 or v <= 0 or s <= 0 or n % s:
        raise ValueError(f"need positive N, V, S with S dividing N; got N={n}, V={v}, S={s}")
    b = n // s
    gen = torch.Generator(device="cpu").manual_seed(seed)
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
    return Batch(labels.to(device), loss_mask.to(device), weight.to(device), normalizer.to(device),
                 labels_ignored.to(device))


def random_fill(x: Tensor, gen: torch.Generator, scale: float) -> Tensor:
    """Fill ``x`` (2-D) with ``scale * randn`` in row chunks (no full-size float32 temporary)."""
    rows = max(1, (1 << 26) // max(x.shape[1], 1))
    for start in range(0, x.shape[0], rows):
        chunk = x[start:start + rows]
        chunk.copy_(torch.randn(chunk.shape, generator=gen, device=x.device, dtype=torch.float32).mul_(scale))
    return x


def naive_sequence_nll(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """What a user writes: float32 cross entropy of every token, masked, summed per sequence."""
    v = logits.shape[-1]
    tok = F.cross_entropy(logits.float().view(-1, v), labels.view(-1), reduction="none")
    return (tok.view(labels.shape) * loss_mask).sum(-1)


# ------------------------------------------------------------------------------------------------
# Rows, timing, checks
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
    section: str = "ce"  # "ce" (logits in), "linear" (hidden states in), "group" (SteerLM group ops)
    flops: float | None = None  # fused linear: model FLOPs (2·N·V·H per matmul the phase needs)
    tflops: float | None = None  # model FLOPs / median time
    frac_matmul: float | None = None  # tflops / the matmul rate measured in the same run
    vs_floor: float | None = None  # this row's time / the bare matmuls' time (SPEC: within 1.2x)
    vs_lce: float | None = None  # F.linear_cross_entropy's time / this row's
    n: int = 0  # tokens (CE, linear) or sequences (group)
    v: int = 0  # vocabulary (CE, linear); largest group size (group)
    h: int = 0  # hidden size (linear)
    dtype: str = ""


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


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().float().reshape(-1), b.detach().float().reshape(-1)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def grad_rel_err(g: Tensor, ref: Tensor) -> float:
    g, ref = g.reshape(ref.shape[0], -1), ref.reshape(ref.shape[0], -1)
    num = den = 0.0
    rows = max(1, (1 << 24) // max(ref.shape[1], 1))
    for start in range(0, ref.shape[0], rows):
        r = ref[start:start + rows].float()
        num += (g[start:start + rows].float() - r).pow(2).sum().item()
        den += r.pow(2).sum().item()
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def row_timeout(timeout: float, deadline: float | None) -> float | None:
    """The time limit of a benchmark row's process under the suite's ``--budget`` (``deadline``, a
    ``time.perf_counter()`` value): None once the deadline has passed (the row is skipped), else
    ``timeout`` capped at the time left, but at least 30 s."""
    if deadline is None:
        return timeout
    left = deadline - time.perf_counter()
    return None if left <= 0 else max(30.0, min(timeout, left))


def error_text(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of ``exc``, its first line, at most ``limit`` characters (a table cell)."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:limit]


def measure(
    row: Row, prepare: Callable[[], Any], call: Callable[[Any], Any], device: torch.device, timer: Timer,
    repeats: int, warmup: int, check: Callable[[Any], None] | None = None, warmup_extra: int = 0,
) -> Row:
    """Fill ``row``: first call (timed as ``first_call_s``, passed to ``check``), warm-up, peak extra
    memory (median of :data:`MEMORY_SAMPLES` calls), then ``repeats`` timed calls.

    Any exception lands in ``row.error`` (reported loudly in the table, never raised).
    """
    try:
        t0 = time.perf_counter()
        first = call(prepare())
        sync(device)
        row.first_call_s = time.perf_counter() - t0
        if check is not None:
            check(first)
        del first
        for _ in range(max(0, warmup - 1) + warmup_extra):
            call(prepare())
        sync(device)
        for _ in range(MEMORY_SAMPLES):
            args = prepare()
            row.extra_mib_samples.append(measure_extra_memory(functools.partial(call, args), device)[0])
            args = None
        if all(m is not None for m in row.extra_mib_samples):
            row.extra_mib = statistics.median(row.extra_mib_samples)  # type: ignore[type-var]
        row.times_ms = timer(prepare, call, repeats)
        row.median_ms = statistics.median(row.times_ms)
    except Exception as exc:  # reported in the table, loudly
        row.error = error_text(exc)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def check_outputs(row: Row, first: Any, reference: dict[str, Any], value_tol: float, grad_tol: float) -> None:
    """Fill ``row``'s errors and verdict from one call's output ``first``: the value (no-grad phases)
    or ``(value, *grads)``, against ``reference`` (``"value"`` and, when training, ``"grads"`` in
    the same order; the gradient error is the worst of them)."""
    if "grads" not in reference:
        row.value_rel_err = rel_err(first, reference["value"])
    else:
        row.value = first[0].item()
        row.value_rel_err = rel_err(first[0], reference["value"])
        row.grad_rel_err = max(grad_rel_err(g, r) for g, r in zip(first[1:], reference["grads"], strict=True))
    errs = [(row.value_rel_err, value_tol)] + ([(row.grad_rel_err, grad_tol)] if row.grad_rel_err is not None else [])
    row.agrees = all(math.isfinite(e) and e <= t for e, t in errs)


def fill_speedups(rows: list[Row], key: Callable[[Row], Any],
                  refs: tuple[tuple[str, str], ...] = (("eager", "vs_eager"), ("compile", "vs_compile"))) -> None:
    """``row.<attr> = median of the row with the same key(row) and impl ``name`` / row's median``
    for each ``(name, attr)`` of ``refs`` (> 1 means faster than that comparator)."""
    by = {(key(r), r.impl): r for r in rows}
    for r in rows:
        if r.median_ms is None:
            continue
        for name, attr in refs:
            ref = by.get((key(r), name))
            if ref is not None and ref.median_ms:
                setattr(r, attr, ref.median_ms / r.median_ms)



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


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def fmt_err(x: float | None) -> str:
    return "–" if x is None else ("0" if x == 0 else f"{x:.1e}")


def value_err_cell(r: Row) -> str:
    """The value error of a row, flagged ``**MISMATCH**`` when it is above the tolerance."""
    return fmt_err(r.value_rel_err) + ("" if r.agrees is not False else " **MISMATCH**")


def table_line(head: list[str], r: Row, cells: Callable[[Row], list[str]], width: int) -> str:
    """One markdown table line of ``width`` columns: the ``head`` cells, then ``cells(r)``; a row
    that failed shows its error in their place (the line padded to ``width`` columns)."""
    if r.error:
        return "| " + " | ".join([*head, f"**ERROR** {r.error}"]) + " |" + " |" * (width - len(head) - 1)
    return "| " + " | ".join([*head, *cells(r)]) + " |"


def load_average() -> list[float] | None:
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

