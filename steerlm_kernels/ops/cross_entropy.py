"""Custom ops and autograd of the token cross entropy straight from the logits.

Three ``torch.library`` custom ops, opaque to ``torch.compile``, run the backend's two passes over
the ``[N, V]`` logits (:func:`steerlm_kernels.registry.backend_kernels`; the Triton kernels are in
:mod:`steerlm_kernels.kernels.cross_entropy`):

* ``ce_forward_op`` (``steerlm_kernels::ce_forward``): ``(m[N], lse[N], target[N])`` float32 (the
  row max, the log-sum-exp relative to it, the target logit; ``nll = lse - (target - m)``), after
  the label range check (kept here, inside the op, so that every caller gets it);
* ``ce_backward_op`` (``::ce_backward``): ``(exp((x - m) - lse) - onehot) * coef`` in a new buffer;
* ``ce_backward_inplace_op`` (``::ce_backward_``): the same, written over the logits.

:class:`TokenNLLFunction` wires them into autograd; the per-token coefficient ``coef``
(upstream gradient x mask x weight / normalizer) comes from the O(N) PyTorch glue of
:mod:`steerlm_kernels.api`. With ``process_group`` (vocabulary parallelism) the rank's partial
``(m, lse, target)`` are combined by one collective (:mod:`steerlm_kernels.distributed`); the
backward needs none.

**Logit transforms** (``softcap`` / ``logit_scale``, validated by the API): every op takes them as
two trailing optional floats and hands them to the backend as the contract's ``softcap, scale``
(``z' = softcap * tanh(logit_scale * z / softcap)``, scale first): the statistics are those of
the transformed logits and the backward applies ``dz'/dz``; None for both runs the plain kernels.

``inplace_backward`` is honoured only where the logits' rows are disjoint in memory: a view whose
rows may overlap (expanded, stride 0, or any row stride below ``V``; decided from sizes and
strides alone, nothing is read) falls back to the out-of-place backward, since a gradient written
over memory that several rows share cannot be right. Double backward is not supported: the
backward is marked ``once_differentiable`` (differentiating its result raises PyTorch's
"trying to differentiate twice" ``RuntimeError``; a first-order ``create_graph=True`` works).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from steerlm_kernels import registry
from steerlm_kernels.distributed import combine_vocab_partials, vocab_shard
from steerlm_kernels.validation import check_label_range, rows_may_overlap

# --------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile), dispatching on the backend name
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("steerlm_kernels::ce_forward", mutates_args=())
def ce_forward_op(
    logits: Tensor,
    labels: Tensor,
    vocab_start: int,
    vocab_size: int,
    ignore_index: int,
    check_labels: bool,
    backend: str,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(m[N], lse[N], target[N])`` float32 of the (transformed) ``logits [N, V_shard]`` (see the
    registry's contract); checks labels against the full ``vocab_size`` first when ``check_labels``."""
    if check_labels:
        check_label_range(labels, vocab_size, ignore_index)
    return registry.backend_kernels(backend).ce_forward(logits, labels, vocab_start, ignore_index, softcap,
                                                        logit_scale)


@ce_forward_op.register_fake
def _(logits, labels, vocab_start, vocab_size, ignore_index, check_labels, backend, softcap=None, logit_scale=None):
    n = logits.shape[0]
    return tuple(logits.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("steerlm_kernels::ce_backward", mutates_args=())
def ce_backward_op(
    logits: Tensor, labels: Tensor, m: Tensor, lse: Tensor, coef: Tensor, vocab_start: int, ignore_index: int,
    backend: str, softcap: float | None = None, logit_scale: float | None = None,
) -> Tensor:
    """Gradient of ``sum(coef * nll)`` w.r.t. ``logits`` (through the transform), in a new contiguous tensor."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    registry.backend_kernels(backend).ce_backward(logits, labels, m, lse, coef, vocab_start, ignore_index, out,
                                                  softcap, logit_scale)
    return out


@ce_backward_op.register_fake
def _(logits, labels, m, lse, coef, vocab_start, ignore_index, backend, softcap=None, logit_scale=None):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("steerlm_kernels::ce_backward_", mutates_args=("logits",))
def ce_backward_inplace_op(
    logits: Tensor, labels: Tensor, m: Tensor, lse: Tensor, coef: Tensor, vocab_start: int, ignore_index: int,
    backend: str, softcap: float | None = None, logit_scale: float | None = None,
) -> None:
    """In-place form of :func:`ce_backward_op`: overwrites ``logits`` (whose rows must not
    overlap in memory) with the gradient."""
    registry.backend_kernels(backend).ce_backward(logits, labels, m, lse, coef, vocab_start, ignore_index, logits,
                                                  softcap, logit_scale)


@ce_backward_inplace_op.register_fake
def _(logits, labels, m, lse, coef, vocab_start, ignore_index, backend, softcap=None, logit_scale=None):
    return None


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


class TokenNLLFunction(torch.autograd.Function):
    """``(nll[N], m[N], lse[N])`` of ``logits [N, V]`` (``nll = lse - (target - m)``, 0 where
    ignored; ``m`` / ``lse`` non-differentiable, returned so that ``setup_context`` can save them),
    differentiable once w.r.t. the logits.

    Written in the ``forward`` / ``setup_context`` style, so that ``torch.func`` transforms
    (``grad``, ``vjp``; ``vmap`` through a generated rule) can run it.

    With ``process_group`` the logits are this rank's vocabulary shard and the partials are
    combined by one collective (:mod:`steerlm_kernels.distributed`); the backward needs none.
    Saves ``logits`` (no copy), ``labels`` and ``m``, ``lse`` ([N] float32 each) for the one-pass
    backward. With ``inplace_backward`` the gradient is written into the logits' storage, which
    the caller must not read afterwards, unless the logits' rows may overlap in memory
    (:func:`steerlm_kernels.validation.rows_may_overlap`) or a ``torch.func`` transform is active
    (its wrapped tensors cannot be written behind its back): then the backward is out of place.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        logits: Tensor,
        labels: Tensor,
        ignore_index: int,
        check_labels: bool,
        inplace_backward: bool,
        backend: str,
        process_group: Any,
        softcap: float | None = None,
        logit_scale: float | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        nll, m, lse, _ = _token_nll_forward(logits, labels, ignore_index, check_labels, backend, process_group,
                                            softcap, logit_scale)
        return nll, m, lse

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        logits, labels, ignore_index, _, inplace_backward, backend, process_group, softcap, logit_scale = inputs
        _, m, lse = output
        ctx.mark_non_differentiable(m, lse)
        ctx.save_for_backward(logits, labels, m, lse)
        ctx.vocab_start = vocab_shard(logits.shape[1], process_group)[0]
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward and not rows_may_overlap(logits) and not _func_wrapped(logits)
        ctx.backend = backend
        ctx.transform = (softcap, logit_scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: Tensor, *_: Any):
        logits, labels, m, lse = ctx.saved_tensors
        coef = grad_nll.float().contiguous()
        args = (labels, m, lse, coef, ctx.vocab_start, ctx.ignore_index, ctx.backend, *ctx.transform)
        if ctx.inplace_backward:
            ce_backward_inplace_op(logits, *args)
            grad = logits
        else:
            grad = ce_backward_op(logits, *args)
        return grad, None, None, None, None, None, None, None, None


def _func_wrapped(x: Tensor) -> bool:
    """Is ``x`` a ``torch.func`` transform's wrapped tensor? (Never while torch.compile traces:
    dynamo cannot call the check, and compiles no functorch transform of these ops.)"""
    return not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(x)


def autograd_needed(*tensors: Tensor | None) -> bool:
    """Must the op go through its ``autograd.Function``? Yes when any tensor requires grad (grad
    mode on; ``torch.func.grad`` / ``vjp`` wrap their inputs so), or carries a forward-mode tangent
    (``torch.func.jvp``, ``torch.autograd.forward_ad``): the Functions have no ``jvp``, so forward
    mode then fails with PyTorch's clear error instead of a silently missing (zero) tangent. The
    forward-mode check is skipped while ``torch.compile`` traces (dynamo has no forward AD)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    if torch.compiler.is_compiling():
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def nll_from_stats(m: Tensor, lse: Tensor, target: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """``nll = lse - (target - m)``, 0 where ``labels == ignore_index``: both terms are relative to
    the row max, so no precision is lost to a large common offset of the logits."""
    return torch.where(labels == ignore_index, 0.0, lse - (target - m))


def _token_nll_forward(
    logits: Tensor, labels: Tensor, ignore_index: int, check_labels: bool, backend: str, process_group: Any,
    softcap: float | None = None, logit_scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(nll [N], m [N], lse [N], vocab_start)``: the forward op, plus the vocabulary-parallel combine
    (the transform is elementwise, so each shard's statistics of its transformed logits merge as before)."""
    n_cols = logits.shape[1]
    vocab_start, vocab_size = vocab_shard(n_cols, process_group)
    m, lse, target = ce_forward_op(
        logits, labels, vocab_start, vocab_size, ignore_index, check_labels, backend, softcap, logit_scale
    )
    if process_group is not None:
        m, lse, target = combine_vocab_partials(m, lse, target, n_cols, process_group)
    return nll_from_stats(m, lse, target, labels, ignore_index), m, lse, vocab_start


def token_nll_2d(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int,
    check_labels: bool,
    inplace_backward: bool,
    backend: str,
    process_group: Any = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> Tensor:
    """Per-token NLL ``[N]`` float32 of validated ``logits [N, V]`` (or a vocabulary shard of
    them, with ``process_group``) and ``labels [N]``, after the logit transform
    ``z' = softcap * tanh(logit_scale * z / softcap)`` (either part optional; both None: none;
    validated numbers, see :func:`steerlm_kernels.validation.check_logit_transform`).

    Goes through autograd only when a gradient is needed; otherwise (baseline phase) it calls
    the forward op directly and keeps nothing alive.
    """
    if autograd_needed(logits):
        return TokenNLLFunction.apply(
            logits, labels, ignore_index, check_labels, inplace_backward, backend, process_group, softcap,
            logit_scale,
        )[0]
    return _token_nll_forward(logits, labels, ignore_index, check_labels, backend, process_group, softcap,
                              logit_scale)[0]
