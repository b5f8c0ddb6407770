"""Benchmark section "ce": logits in, the per-sequence NLL and the weighted SteerLM 2.0 loss.

Every implementation is measured side by side in ONE process, on one random SteerLM-like batch
(:func:`.harness.make_batch`):

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
``torch`` / ``cpp`` / ``triton`` / ``cuda``  our public functions with ``backend=`` each backend
              that :func:`steerlm_kernels.backends` reports available for the device: on a GPU
              ``triton`` (the default) beside ``cuda`` (the hand-written CUDA kernels, row
              ``sk backend=cuda``, when the extension was built with CUDA) and ``torch``; on CPU
              ``cpp`` and ``torch`` (``cuda`` is listed as skipped, with the reason). (Triton on CPU
              tensors runs in the interpreter: far too slow to time, so it is only included with
              ``--quick`` or when named in ``--impls``.)

Measurements per row (time, peak extra memory and the agreement: :mod:`.harness`), plus:

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import steerlm_kernels as sk
from steerlm_kernels import registry
from steerlm_kernels.bench.harness import (
    GRAD_TOL,
    IMPL_TITLES,
    VALUE_TOL,
    Row,
    Timer,
    available_backends,
    backend_title,
    check_outputs,
    fill_speedups,
    fmt,
    fmt_err,
    make_batch,
    measure,
    naive_sequence_nll,
    random_fill,
    table_line,
    value_err_cell,
)

PHASES: tuple[str, ...] = ("baseline", "train", "inplace")
PHASE_TITLES: dict[str, str] = {
    "baseline": "baseline: per-sequence NLL, no grad",
    "train": "train: weighted loss forward + backward",
    "inplace": "train, inplace_backward=True",
}
#: Logit element reads + writes the phase must do, in units of one element's size.
ACCESSES_PER_ELEM: dict[str, int] = {"baseline": 1, "train": 3, "inplace": 2}
COMPARATORS: tuple[str, ...] = ("eager", "compile", "liger")


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
    batch = make_batch(n, v, s, device, seed)
    logits = torch.empty(n, v, dtype=dtype, device=device)
    random_fill(logits, torch.Generator(device=device).manual_seed(seed), 2.0)
    return Workload(logits=logits, labels=batch.labels, loss_mask=batch.loss_mask, weight=batch.weight,
                    normalizer=batch.normalizer, labels_ignored=batch.labels_ignored)


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


def _our_impl(backend: str, title: str) -> Impl:
    """Our public functions forced to ``backend``."""
    def seq_nll(w: Workload, x: Tensor) -> Tensor:
        return sk.sequence_nll(x.view(w.b, w.s, w.v), w.labels, w.loss_mask, backend=backend)

    def loss(w: Workload, x: Tensor, inplace: bool = False) -> Tensor:
        return sk.weighted_sequence_loss(
            x.view(w.b, w.s, w.v), w.labels, w.loss_mask, w.weight, w.normalizer,
            inplace_backward=inplace, backend=backend,
        )

    return Impl(backend, title, seq_nll=seq_nll, loss=loss, ours=True,
                inplace=lambda w, x: loss(w, x, inplace=True))


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
    if name in registry.BACKENDS:
        registry.resolve(name, device)  # raises ValueError with the reason
        return _our_impl(name, backend_title(name, device))
    raise ValueError(f"unknown implementation {name!r}; choose from {COMPARATORS + registry.BACKENDS}")



# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


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
    return {"value": out} if phase == "baseline" else {"value": out[0], "grads": out[1:]}



def run_case(
    impl: Impl, phase: str, w: Workload, timer: Timer, repeats: int, warmup: int,
    reference: dict[str, Tensor] | None,
) -> Row:
    """Warm up, check values against ``reference``, measure extra memory, then time one case."""
    row = Row(phase=phase, impl=impl.name, title=impl.title, ours=impl.ours, n=w.n, v=w.v,
              dtype=str(w.logits.dtype).removeprefix("torch."))
    row.bytes_per_elem = ACCESSES_PER_ELEM[phase] * w.logits.element_size()
    fns = phase_fns(impl, phase, w)
    if fns is None:
        row.error = "no such phase"
        return row
    prepare, call = fns

    def check(first: Any) -> None:
        if reference is not None:
            check_outputs(row, first, reference, VALUE_TOL, GRAD_TOL.get(w.logits.dtype, 1e-2))

    return measure(row, prepare, call, w.logits.device, timer, repeats, warmup, check, impl.warmup_extra)




# ------------------------------------------------------------------------------------------------
# Table and ratios
# ------------------------------------------------------------------------------------------------


def markdown_table(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    head = ("| phase | implementation | median ms | vs eager | vs compile | extra MiB | model B/elem "
            "| GB/s | % read BW | % copy BW | value rel err | grad rel err |")

    def cells(r: Row) -> list[str]:
        return [fmt(r.median_ms, ".1f"), fmt(r.vs_eager, ".2f", "×"), fmt(r.vs_compile, ".2f", "×"),
                fmt(r.extra_mib, ".1f"), f"{r.bytes_per_elem:g}", fmt(r.gbps, ".1f"), fmt(r.frac_read, ".0%"),
                fmt(r.frac_copy, ".0%"), value_err_cell(r), fmt_err(r.grad_rel_err)]

    return "\n".join([head, "|" + "---|" * 12, *(table_line([r.phase, r.title], r, cells, 12) for r in rows)])


def fill_ratios(rows: list[Row], w: Workload, bw: dict[str, float]) -> None:
    # the in-place phase is compared with the comparators' train rows (they have no in-place mode)
    fill_speedups(rows, key=lambda r: "train" if r.phase == "inplace" else r.phase)
    nbytes_elem = w.n * w.v
    for r in rows:
        if r.median_ms is None:
            continue
        r.gbps = nbytes_elem * r.bytes_per_elem / (r.median_ms * 1e-3) / 1e9
        if bw.get("read"):
            r.frac_read = r.gbps / bw["read"]
        if bw.get("copy"):
            r.frac_copy = r.gbps / bw["copy"]

