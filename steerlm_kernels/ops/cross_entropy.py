"""Custom ops and autograd of the token cross entropy straight from the logits.

Three ``torch.library`` custom ops, opaque to ``torch.compile``, run the backend's two passes over
the ``[N, V]`` logits (:func:`steerlm_kernels.registry.backend_kernels`; the Triton kernels are in
:mod:`steerlm_kernels.kernels.cross_entropy`):

* ``ce_forward_op`` (``steerlm_kernels::ce_forward``): ``(lse[N], target[N])`` float32, after the
  label range check (kept here, inside the op, so that every caller gets it);
* ``ce_backward_op`` (``::ce_backward``): ``(exp(x - lse) - onehot) * coef`` in a new buffer;
* ``ce_backward_inplace_op`` (``::ce_backward_``): the same, written over the logits.

:class:`TokenNLLFunction` wires them into autograd; the per-token coefficient ``coef``
(upstream gradient x mask x weight / normalizer) comes from the O(N) PyTorch glue of
:mod:`steerlm_kernels.api`. With ``process_group`` (vocabulary parallelism) the rank's partial
``(lse, target)`` are combined by one collective (:mod:`steerlm_kernels.distributed`); the
backward needs none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from steerlm_kernels import registry
from steerlm_kernels.distributed import combine_vocab_partials, vocab_shard
from steerlm_kernels.validation import check_label_range

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
) -> tuple[Tensor, Tensor]:
    """``(lse[N], target[N])`` float32 of ``logits [N, V_shard]``; checks labels against the
    full ``vocab_size`` first when ``check_labels``."""
    if check_labels:
        check_label_range(labels, vocab_size, ignore_index)
    return registry.backend_kernels(backend).ce_forward(logits, labels, vocab_start, ignore_index)


@ce_forward_op.register_fake
def _(logits, labels, vocab_start, vocab_size, ignore_index, check_labels, backend):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("steerlm_kernels::ce_backward", mutates_args=())
def ce_backward_op(
    logits: Tensor, labels: Tensor, lse: Tensor, coef: Tensor, vocab_start: int, ignore_index: int, backend: str
) -> Tensor:
    """Gradient of ``sum(coef * nll)`` w.r.t. ``logits``, in a new contiguous tensor."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    registry.backend_kernels(backend).ce_backward(logits, labels, lse, coef, vocab_start, ignore_index, out)
    return out


@ce_backward_op.register_fake
def _(logits, labels, lse, coef, vocab_start, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("steerlm_kernels::ce_backward_", mutates_args=("logits",))
def ce_backward_inplace_op(
    logits: Tensor, labels: Tensor, lse: Tensor, coef: Tensor, vocab_start: int, ignore_index: int, backend: str
) -> None:
    """In-place form of :func:`ce_backward_op`: overwrites ``logits`` with the gradient."""
    registry.backend_kernels(backend).ce_backward(logits, labels, lse, coef, vocab_start, ignore_index, logits)


@ce_backward_inplace_op.register_fake
def _(logits, labels, lse, coef, vocab_start, ignore_index, backend):
    return None


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


class TokenNLLFunction(torch.autograd.Function):
    """``nll[N] = lse - target`` (0 where ignored) of ``logits [N, V]``, differentiable.

    With ``process_group`` the logits are this rank's vocabulary shard and the partials are
    combined by one collective (:mod:`steerlm_kernels.distributed`); the backward needs none.
    Saves ``logits`` (no copy), ``labels`` and ``lse`` ([N] float32) for the one-pass backward.
    With ``inplace_backward`` the gradient is written into the logits' storage, which the caller
    must not read afterwards.
    """

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        labels: Tensor,
        ignore_index: int,
        check_labels: bool,
        inplace_backward: bool,
        backend: str,
        process_group: Any,
    ) -> Tensor:
        nll, lse, vocab_start = _token_nll_forward(logits, labels, ignore_index, check_labels, backend, process_group)
        ctx.save_for_backward(logits, labels, lse)
        ctx.vocab_start = vocab_start
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        ctx.backend = backend
        return nll

    @staticmethod
    def backward(ctx, grad_nll: Tensor):
        logits, labels, lse = ctx.saved_tensors
        coef = grad_nll.float().contiguous()
        args = (labels, lse, coef, ctx.vocab_start, ctx.ignore_index, ctx.backend)
        if ctx.inplace_backward:
            ce_backward_inplace_op(logits, *args)
            grad = logits
        else:
            grad = ce_backward_op(logits, *args)
        return grad, None, None, None, None, None, None


def _token_nll_forward(
    logits: Tensor, labels: Tensor, ignore_index: int, check_labels: bool, backend: str, process_group: Any
) -> tuple[Tensor, Tensor, int]:
    """``(nll [N], lse [N], vocab_start)``: the forward op, plus the vocabulary-parallel combine."""
    n_cols = logits.shape[1]
    vocab_start, vocab_size = vocab_shard(n_cols, process_group)
    lse, target = ce_forward_op(
        logits, labels, vocab_start, vocab_size, ignore_index, check_labels, backend
    )
    if process_group is not None:
        lse, target = combine_vocab_partials(lse, target, n_cols, process_group)
    return torch.where(labels == ignore_index, 0.0, lse - target), lse, vocab_start


def token_nll_2d(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int,
    check_labels: bool,
    inplace_backward: bool,
    backend: str,
    process_group: Any = None,
) -> Tensor:
    """Per-token NLL ``[N]`` float32 of validated ``logits [N, V]`` (or a vocabulary shard of
    them, with ``process_group``) and ``labels [N]``.

    Goes through autograd only when a gradient is needed; otherwise (baseline phase) it calls
    the forward op directly and keeps nothing alive.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        return TokenNLLFunction.apply(
            logits, labels, ignore_index, check_labels, inplace_backward, backend, process_group
        )
    return _token_nll_forward(logits, labels, ignore_index, check_labels, backend, process_group)[0]
