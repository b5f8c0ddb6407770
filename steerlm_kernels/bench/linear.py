"""Benchmark section "linear": the fused linear losses (hidden states in, no ``[N, V]`` logits).

One workload per shape ``(N, V, H)``: hidden ``[B, S, H]`` and LM head ``[V, H]`` in the benchmark
dtype (random, scaled so the logits have unit variance), and the labels / loss mask / SteerLM weights
of :func:`.harness.make_batch`.

Phases:

``baseline``  ``linear_sequence_nll`` under ``torch.no_grad()``: one ``N×V×H`` matmul of work.
``train``     ``linear_weighted_sequence_loss`` forward + backward w.r.t. hidden and LM head
              (``torch.autograd.grad``, both gradients returned and counted): three matmuls
              (logits, ``dL/dh = G·W``, ``dL/dW = Gᵀ·h``).

Implementations: ``matmuls`` (the floor: the phase's bare matmuls into preallocated buffers, the
matmul rate of this run is measured from it), ``eager`` (``F.linear`` + ``F.cross_entropy`` on float32
logits), ``compile`` (``torch.compile`` of eager), ``lce`` (``torch.nn.functional.linear_cross_entropy``,
chunked: ``LinearCrossEntropyOptions()``), the peers ``liger`` / ``cce`` (CUDA only, through
:mod:`.peers`), and our backends (chunks: the library GEMMs + the backend's CE
kernels), plus ``triton-tiles`` on CUDA (our Triton tile kernels, ``$STEERLM_KERNELS_LINEAR=tiles``:
the alternative to chunks that holds no logits chunk; timed so that the default can follow the
measurement).

Per row: model FLOPs (``2·N·V·H`` per matmul the phase needs: 1 or 3), achieved TFLOP/s, its
fraction of the matmul rate measured in the same run, and the time over the floor's time (SPEC's
target: within 1.2×).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import steerlm_kernels as sk
from steerlm_kernels import registry
from steerlm_kernels.bench import peers
from steerlm_kernels.bench.harness import (
    GRAD_TOL,
    VALUE_TOL,
    Row,
    Timer,
    available_backends,
    backend_title,
    check_outputs,
    fill_speedups,
    make_batch,
    measure,
    naive_sequence_nll,
    random_fill,
)

PHASES: tuple[str, ...] = ("baseline", "train")
MATMULS: dict[str, int] = {"baseline": 1, "train": 3}
TITLES: dict[str, str] = {
    "matmuls": "bare matmuls (floor)",
    "eager": "eager F.linear + F.cross_entropy",
    "compile": "torch.compile of eager",
    "lce": "F.linear_cross_entropy (chunked)",
    "liger": "Liger fused linear CE",
    "cce": "Cut Cross-Entropy",
    "triton-tiles": "sk backend=triton, tile kernels",
}
PEERS: tuple[str, ...] = ("liger", "cce")
COMPARATORS: tuple[str, ...] = ("matmuls", "eager", "compile", "lce", *PEERS)
#: Our implementations beyond the backends' defaults.
VARIANTS: tuple[str, ...] = ("triton-tiles",)


@dataclass
class LinearWorkload:
    """Hidden states, LM head and the batch of one fused-linear shape."""

    hidden: Tensor  # [B, S, H]
    weight: Tensor  # [V, H]
    labels: Tensor  # [B, S] int64
    labels_ignored: Tensor  # [B, S], masked positions -100
    loss_mask: Tensor  # [B, S] float32
    seq_weight: Tensor  # [B] float32
    normalizer: Tensor  # [B] float32

    @property
    def n(self) -> int:
        return self.labels.numel()

    @property
    def v(self) -> int:
        return self.weight.shape[0]

    @property
    def h(self) -> int:
        return self.weight.shape[1]

    @property
    def flops_per_matmul(self) -> float:
        return 2.0 * self.n * self.v * self.h


def make_linear_workload(
    n: int, v: int, h: int, s: int, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> LinearWorkload:
    """Random ``hidden [n/s, s, h]`` and ``weight [v, h]`` (unit-variance logits) plus the batch."""
    batch = make_batch(n, v, s, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    hidden = random_fill(torch.empty(n, h, dtype=dtype, device=device), gen, 1.0).view(n // s, s, h)
    weight = random_fill(torch.empty(v, h, dtype=dtype, device=device), gen, h**-0.5)
    return LinearWorkload(hidden, weight, batch.labels, batch.labels_ignored, batch.loss_mask, batch.weight,
                          batch.normalizer)


def _per_sequence(tok: Tensor, w: LinearWorkload) -> Tensor:
    return (tok.float().view(w.labels.shape) * w.loss_mask).sum(-1)


def _weighted(seq: Tensor, w: LinearWorkload) -> Tensor:
    return (w.seq_weight * seq / w.normalizer).sum()


def eager_sequence_nll(hidden: Tensor, weight: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """The naive user code: full logits, then the logits-in section's naive per-sequence NLL."""
    return naive_sequence_nll(F.linear(hidden, weight), labels, loss_mask)


@dataclass
class LinearImpl:
    """``seq_nll(w, hidden, weight) -> [B]`` of one implementation (differentiable unless floor)."""

    name: str
    title: str
    seq_nll: Callable[[LinearWorkload, Tensor, Tensor], Tensor] | None
    loss: Callable[[LinearWorkload, Tensor, Tensor], Tensor] | None
    ours: bool = False
    warmup_extra: int = 0


@contextlib.contextmanager
def _linear_strategy(value: str) -> Iterator[None]:
    """``$STEERLM_KERNELS_LINEAR`` set to ``value`` for the duration (read once per call, in the
    forward; the backward follows the forward's choice)."""
    old = os.environ.get(registry.LINEAR_ENV_VAR)
    os.environ[registry.LINEAR_ENV_VAR] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[registry.LINEAR_ENV_VAR]
        else:
            os.environ[registry.LINEAR_ENV_VAR] = old


def _ours(backend: str, device: torch.device, strategy: str = "chunks") -> LinearImpl:
    def seq_nll(w: LinearWorkload, h: Tensor, W: Tensor) -> Tensor:
        with _linear_strategy(strategy):
            return sk.linear_sequence_nll(h, W, w.labels, w.loss_mask, backend=backend)

    def loss(w: LinearWorkload, h: Tensor, W: Tensor) -> Tensor:
        with _linear_strategy(strategy):
            return sk.linear_weighted_sequence_loss(h, W, w.labels, w.loss_mask, w.seq_weight, w.normalizer,
                                                    backend=backend)

    if strategy == "tiles":
        return LinearImpl("triton-tiles", TITLES["triton-tiles"], seq_nll, loss, ours=True)
    return LinearImpl(backend, backend_title(backend, device), seq_nll, loss, ours=True)


def _from_seq(name: str, seq_nll: Callable[[LinearWorkload, Tensor, Tensor], Tensor], extra: int = 0) -> LinearImpl:
    return LinearImpl(name, TITLES[name], seq_nll, lambda w, h, W: _weighted(seq_nll(w, h, W), w),
                      warmup_extra=extra)


def build_linear_impl(name: str, device: torch.device) -> LinearImpl:
    """Implementation ``name`` of the linear section (raises ValueError when it cannot run here)."""
    if name == "matmuls":
        return LinearImpl("matmuls", TITLES["matmuls"], None, None)
    if name == "eager":
        return _from_seq("eager", lambda w, h, W: eager_sequence_nll(h, W, w.labels, w.loss_mask))
    if name == "compile":
        fn = torch.compile(eager_sequence_nll)
        return _from_seq("compile", lambda w, h, W: fn(h, W, w.labels, w.loss_mask), extra=1)
    if name == "lce":
        if not hasattr(F, "linear_cross_entropy"):
            raise ValueError("torch.nn.functional.linear_cross_entropy needs a newer torch")
        options = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None

        def lce(w: LinearWorkload, h: Tensor, W: Tensor) -> Tensor:
            kw = {"options": options} if options is not None else {}
            tok = F.linear_cross_entropy(h.view(-1, w.h), W, w.labels_ignored.view(-1), reduction="none",
                                         ignore_index=-100, **kw)
            return _per_sequence(tok, w)

        return _from_seq("lce", lce)
    if name in PEERS:
        if device.type != "cuda":
            raise ValueError(f"{TITLES[name]} needs CUDA for timing (its CPU agreement check: the peers section)")
        why = peers.available().get(name, "unknown peer")
        if why:
            raise ValueError(why)
        adapter = peers.linear_token_nll_adapter(name)
        return _from_seq(name, lambda w, h, W: _per_sequence(
            adapter(h.view(-1, w.h), W, w.labels_ignored.view(-1)), w))
    if name in registry.BACKENDS:
        registry.resolve(name, device)
        return _ours(name, device)
    if name == "triton-tiles":
        registry.resolve("triton", device)
        return _ours("triton", device, strategy="tiles")
    raise ValueError(f"unknown linear implementation {name!r}")


def default_linear_impls(device: torch.device) -> list[str]:
    """Every implementation worth timing on ``device`` (the Triton interpreter is not)."""
    names = ["matmuls", "eager", "compile", "lce"]
    if device.type == "cuda":
        names += list(PEERS)
    names += [b for b, why in available_backends(device).items()
              if not why and (b != "triton" or device.type == "cuda")]
    if "triton" in names:
        names.append("triton-tiles")
    return names


def _floor_fns(w: LinearWorkload, phase: str) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """The phase's bare matmuls in the input dtype into preallocated outputs."""
    h2 = w.hidden.view(-1, w.h)
    logits = torch.empty(w.n, w.v, dtype=w.hidden.dtype, device=w.hidden.device)
    if phase == "baseline":
        return lambda: None, lambda _: torch.mm(h2, w.weight.T, out=logits)
    g = torch.empty_like(logits).normal_()
    gh, gw = torch.empty_like(h2), torch.empty_like(w.weight)

    def call(_: Any) -> Any:
        torch.mm(h2, w.weight.T, out=logits)
        torch.mm(g, w.weight, out=gh)
        return torch.mm(g.T, h2, out=gw)

    return lambda: None, call


def phase_fns(impl: LinearImpl, phase: str, w: LinearWorkload) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    if impl.seq_nll is None:
        return _floor_fns(w, phase)
    if phase == "baseline":
        def call_nograd(_: Any) -> Tensor:
            with torch.no_grad():
                return impl.seq_nll(w, w.hidden, w.weight)  # type: ignore[misc]

        return lambda: None, call_nograd

    def prepare() -> tuple[Tensor, Tensor]:
        return w.hidden.detach().requires_grad_(True), w.weight.detach().requires_grad_(True)

    def call_train(leaves: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        h, W = leaves
        loss = impl.loss(w, h, W)  # type: ignore[misc]
        gh, gw = torch.autograd.grad(loss, (h, W))
        return loss.detach(), gh, gw

    return prepare, call_train


def linear_reference(w: LinearWorkload, phase: str) -> dict[str, Tensor] | None:
    """Eager outputs of ``phase`` (our chunked torch backend when eager runs out of memory)."""
    for name in ("eager", "torch"):
        try:
            impl = build_linear_impl(name, w.hidden.device)
            prepare, call = phase_fns(impl, phase, w)
            out = call(prepare())
            return {"value": out} if phase == "baseline" else {"value": out[0], "grads": out[1:]}
        except (torch.OutOfMemoryError, RuntimeError):
            if w.hidden.device.type == "cuda":
                torch.cuda.empty_cache()
    return None


def run_linear_case(
    impl: LinearImpl, phase: str, w: LinearWorkload, timer: Timer, repeats: int, warmup: int,
    reference: dict[str, Tensor] | None,
) -> Row:
    """One (phase, implementation) case of the linear section at ``w``'s shape."""
    row = Row(phase=phase, impl=impl.name, title=impl.title, ours=impl.ours, section="linear", n=w.n, v=w.v,
              h=w.h, dtype=str(w.hidden.dtype).removeprefix("torch."))
    row.flops = MATMULS[phase] * w.flops_per_matmul
    prepare, call = phase_fns(impl, phase, w)

    def check(first: Any) -> None:
        if reference is None or impl.seq_nll is None:
            return
        tol = GRAD_TOL.get(w.hidden.dtype, 1e-2)
        # The logits are rounded to the input dtype by every implementation that forms them in it:
        # values agree to the dtype's precision, not to VALUE_TOL, for bf16 / fp16 inputs.
        check_outputs(row, first, reference, VALUE_TOL if w.hidden.dtype == torch.float32 else tol, tol)

    return measure(row, prepare, call, w.hidden.device, timer, repeats, warmup, check, impl.warmup_extra)


def fill_linear_ratios(rows: list[Row]) -> None:
    """TFLOP/s, fraction of the measured matmul rate and time over the floor, per shape and phase."""
    def key(r: Row) -> tuple[int, int, int, str, str]:
        return (r.n, r.v, r.h, r.dtype, r.phase)

    lin = [r for r in rows if r.section == "linear"]
    fill_speedups(lin, key, (("eager", "vs_eager"), ("compile", "vs_compile"), ("lce", "vs_lce")))
    by = {(key(r), r.impl): r for r in lin}
    for r in lin:
        if r.median_ms is None or r.flops is None:
            continue
        r.tflops = r.flops / (r.median_ms * 1e-3) / 1e12
        floor = by.get((key(r), "matmuls"))
        if floor is not None and floor.median_ms:
            rate = floor.flops / (floor.median_ms * 1e-3) / 1e12  # type: ignore[operator]
            r.frac_matmul = r.tflops / rate
            r.vs_floor = r.median_ms / floor.median_ms
