"""The ``cpp`` backend: thin wrappers of the compiled extension ``steerlm_kernels._C``.

Importing this module fails with ``ImportError`` when the extension is not built; the dispatcher
(:mod:`steerlm_kernels.registry`) reports that as "cpp: extension not built".

The kernels live in ``csrc/cpu_kernels.cpp`` (OpenMP over rows or groups, ATen
``Vectorized<float>`` SIMD with an inlined exp, float32 accumulation, results independent of the
thread count). They validate
their inputs themselves (``RuntimeError`` on a contract violation); the public API has already
raised the user-facing ``ValueError``/``TypeError`` before these are reached. The C++ functions
release the GIL while they run.
"""

from __future__ import annotations

from torch import Tensor

from steerlm_kernels import _C  # ImportError when not built

#: SIMD flavour the extension was compiled for: "avx512", "avx2" or "default".
SIMD: str = getattr(_C, "simd", "unknown")


def ce_forward(logits: Tensor, labels: Tensor, vocab_start: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(lse[N], target[N])`` float32 of CPU ``logits [N, V]`` (unit column stride, any row
    stride); ignored rows are not read and get 0/0. See :mod:`steerlm_kernels.registry`."""
    lse, target = _C.ce_forward(logits, labels, int(vocab_start), int(ignore_index))
    return lse, target


def ce_backward(
    logits: Tensor, labels: Tensor, lse: Tensor, coef: Tensor, vocab_start: int, ignore_index: int, out: Tensor
) -> None:
    """``out = (exp(logits - lse) - onehot) * coef`` row by row, rounded once to ``out.dtype``;
    rows with ``coef == 0`` or an ignored label are zeroed without reading ``logits``. ``out``
    may be ``logits`` itself (in place)."""
    _C.ce_backward(logits, labels, lse, coef, int(vocab_start), int(ignore_index), out)


def segment_sum(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """``y[b] = sum(x[cu_seqlens[b]:cu_seqlens[b+1]])`` float32, bounds clamped to ``[0, len(x)]``,
    summed in index order (deterministic)."""
    return _C.segment_sum(x, cu_seqlens)


def group_softmax(x: Tensor, cu_groups: Tensor, max_group: int) -> Tensor:
    """Softmax within each group ``x[cu_groups[g]:cu_groups[g+1]]``, float32 ``[B]`` (``max_group``
    is not needed: any group size runs). See :mod:`steerlm_kernels.ops.group`."""
    return _C.group_softmax(x, cu_groups)


def steerlm2_weights(
    seq_nll: Tensor, log_q: Tensor, ws: Tensor, cu_groups: Tensor, max_group: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weight [B], baseline [B], kl [G])`` float32: ``baseline = group_softmax(-seq_nll - log_q)``,
    ``weight = ws - baseline``, ``kl[g] = sum (ws + 1e-8) log((ws + 1e-8) / (baseline + 1e-8))``
    over group ``g``. See :mod:`steerlm_kernels.ops.group`."""
    weight, baseline, kl = _C.steerlm2_weights(seq_nll, log_q, ws, cu_groups)
    return weight, baseline, kl
