"""Custom ops and autograd of the fused linear cross entropy: token NLL straight from hidden
states, never holding ``[N, V]`` logits.

``logits = hidden @ lm_head_weight.T (+ bias)`` is only ever formed a piece at a time, by one of
two strategies, chosen once per call by :func:`steerlm_kernels.registry.linear_strategy` and
passed to the ops as ``strategy``:

* ``"chunks"`` (every backend, the default): chunks of rows through library GEMMs and the
  backend's cross-entropy kernels, :mod:`steerlm_kernels.ops.linear_chunks`;
* ``"tiles"`` (Triton only): the tile kernels of :mod:`steerlm_kernels.kernels.linear_tiles`
  (their float32 gradient accumulators are rounded here to the inputs' dtypes).

Three ops, registered with ``torch.library`` (opaque to ``torch.compile``):

``linear_ce_forward_op(hidden, lm_head_weight, bias, labels, ...) -> (m[N], lse[N], target[N])``
    float32, as the backend contract's ``ce_forward``: the row max, the log-sum-exp relative to
    it, the target logit; ``nll = lse - (target - m)``; ignored rows give 0 / 0 / 0.
``linear_ce_backward_op(hidden, lm_head_weight, bias, labels, m, lse, coef, ...)``
    ``-> (grad_hidden, grad_lm_head, grad_bias)``:
    gradient of ``sum(coef * nll)``, recomputing the logits (used when the upstream gradient is
    only known in backward: :class:`LinearTokenNLLFunction`).
``linear_ce_fused_op(hidden, lm_head_weight, bias, labels, coef, ...)``
    ``-> (m, lse, target, grad_hidden, grad_lm_head, grad_bias)``:
    forward and gradient at once, for a coefficient known at forward time
    (:class:`LinearGradCarrierFunction`): with chunks, each chunk's logits are computed once, so
    forward + backward costs exactly three matmuls.

Gradients are returned in the dtype of their input; one that is not asked for is an empty ``[0]``
tensor.

**Vocabulary parallelism** (``process_group``; Megatron's layout): ``lm_head_weight`` / ``bias``
are this rank's contiguous shard ``[V/tp, H]`` / ``[V/tp]``, ``hidden`` is replicated. The kernels
are not told about the shard: the caller turns the global labels into shard-local ones
(:func:`shard_labels`: labels outside the shard become a sentinel that matches no column, so the
row still contributes its log-sum-exp but no target logit), the ops yield the local
``(m_r, lse_r, target_r)``, and ONE collective (:func:`steerlm_kernels.distributed.combine_vocab_partials`)
gives the global ``(m, lse, target)``. Backward needs no communication: each rank recomputes its
own logits columns with the global ``(m, lse)``. The gradient w.r.t. ``hidden`` is then this rank's
*partial* contribution ``g_r @ W_r`` (the full one is the sum over the group, as for Megatron's
column-parallel linear, whose ``copy_to_tensor_model_parallel_region`` all-reduces it);
``grad_lm_head`` / ``grad_bias`` are exactly this rank's shard of the full gradients. With a
coefficient known at forward time the fused single pass is impossible under vocabulary
parallelism (the gradient needs the global ``lse``): :class:`LinearGradCarrierFunction` then runs
the forward op, the collective and the recomputing backward op, four matmuls instead of three.

Double backward is not supported: the backwards are ``once_differentiable`` (differentiating
their results raises PyTorch's "trying to differentiate twice" ``RuntimeError``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from steerlm_kernels import registry
from steerlm_kernels.distributed import combine_vocab_partials
from steerlm_kernels.ops.cross_entropy import autograd_needed, nll_from_stats
from steerlm_kernels.ops.linear_chunks import linear_grads, linear_stats, linear_stats_and_grads
from steerlm_kernels.validation import check_label_range

STRATEGIES = ("chunks", "tiles")


def _tile_kernels(strategy: str, backend: str) -> Any:
    """The backend's kernels when ``strategy`` is ``"tiles"`` (Triton only), else None (chunks)."""
    if strategy == "chunks":
        return None
    if strategy != "tiles":
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    kernels = registry.backend_kernels(backend)
    if kernels.linear_tiles_forward is None:
        raise ValueError(f"the tile kernels are Triton kernels; backend {backend!r} runs chunks")
    return kernels


def _rounded(grads: tuple[Tensor, Tensor, Tensor], hidden: Tensor, lm_head_weight: Tensor) -> tuple[Tensor, ...]:
    """The tile kernels' float32 accumulators in the inputs' dtypes."""
    gh, glm, gb = grads
    return gh.to(hidden.dtype), glm.to(lm_head_weight.dtype), gb.to(lm_head_weight.dtype)


def _grad_shapes(hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None, need_h: bool, need_lm: bool,
                 need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    gh = hidden.new_empty(hidden.shape if need_h else (0,))
    glm = lm_head_weight.new_empty(lm_head_weight.shape if need_lm else (0,))
    n_b = lm_head_weight.shape[0] if need_b and bias is not None else 0
    gb = (bias if bias is not None else lm_head_weight).new_empty((n_b,))
    return gh, glm, gb


# --------------------------------------------------------------------------------------------
# torch.library custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("steerlm_kernels::linear_ce_forward", mutates_args=())
def linear_ce_forward_op(
    hidden: Tensor,
    lm_head_weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    ignore_index: int,
    check_labels: bool,
    strategy: str,
    chunk_rows: int,
    backend: str,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(m[N], lse[N], target[N])`` float32 of ``logits = hidden @ lm_head_weight.T + bias`` after the
    logit transform (``softcap`` / ``logit_scale``); labels are checked against ``V`` first when
    ``check_labels``."""
    if check_labels:
        check_label_range(labels, lm_head_weight.shape[0], ignore_index)
    tiles = _tile_kernels(strategy, backend)
    if tiles is not None:
        return tiles.linear_tiles_forward(hidden, lm_head_weight, bias, labels, ignore_index, softcap, logit_scale)
    return linear_stats(hidden, lm_head_weight, bias, labels, ignore_index, chunk_rows, backend, softcap,
                        logit_scale)


@linear_ce_forward_op.register_fake
def _(hidden, lm_head_weight, bias, labels, ignore_index, check_labels, strategy, chunk_rows, backend, softcap=None,
      logit_scale=None):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("steerlm_kernels::linear_ce_backward", mutates_args=())
def linear_ce_backward_op(
    hidden: Tensor,
    lm_head_weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    m: Tensor,
    lse: Tensor,
    coef: Tensor,
    ignore_index: int,
    strategy: str,
    chunk_rows: int,
    backend: str,
    need_h: bool,
    need_lm: bool,
    need_b: bool,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of ``sum(coef * nll)`` w.r.t. ``(hidden, lm_head_weight, bias)``, recomputing the
    (transformed) logits."""
    tiles = _tile_kernels(strategy, backend)
    if tiles is not None:
        grads = tiles.linear_tiles_backward(hidden, lm_head_weight, bias, labels, m, lse, coef, ignore_index,
                                            need_h, need_lm, need_b, softcap, logit_scale)
        return _rounded(grads, hidden, lm_head_weight)
    return linear_grads(hidden, lm_head_weight, bias, labels, m, lse, coef, ignore_index, chunk_rows, backend,
                        (need_h, need_lm, need_b), softcap, logit_scale)


@linear_ce_backward_op.register_fake
def _(hidden, lm_head_weight, bias, labels, m, lse, coef, ignore_index, strategy, chunk_rows, backend, need_h,
      need_lm, need_b, softcap=None, logit_scale=None):
    return _grad_shapes(hidden, lm_head_weight, bias, need_h, need_lm, need_b)


@torch.library.custom_op("steerlm_kernels::linear_ce_fused", mutates_args=())
def linear_ce_fused_op(
    hidden: Tensor,
    lm_head_weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    coef: Tensor,
    ignore_index: int,
    check_labels: bool,
    strategy: str,
    chunk_rows: int,
    backend: str,
    need_h: bool,
    need_lm: bool,
    need_b: bool,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward statistics and the gradient of ``sum(coef * nll)`` in one call (``coef`` known at
    forward time): ``(m, lse, target, grad_hidden, grad_lm_head, grad_bias)``."""
    if check_labels:
        check_label_range(labels, lm_head_weight.shape[0], ignore_index)
    tiles = _tile_kernels(strategy, backend)
    transform = (softcap, logit_scale)
    if tiles is not None:
        m, lse, target = tiles.linear_tiles_forward(hidden, lm_head_weight, bias, labels, ignore_index, *transform)
        grads = tiles.linear_tiles_backward(hidden, lm_head_weight, bias, labels, m, lse, coef, ignore_index,
                                            need_h, need_lm, need_b, *transform)
        return (m, lse, target, *_rounded(grads, hidden, lm_head_weight))
    return linear_stats_and_grads(hidden, lm_head_weight, bias, labels, coef, ignore_index, chunk_rows, backend,
                                  (need_h, need_lm, need_b), *transform)


@linear_ce_fused_op.register_fake
def _(hidden, lm_head_weight, bias, labels, coef, ignore_index, check_labels, strategy, chunk_rows, backend,
      need_h, need_lm, need_b, softcap=None, logit_scale=None):
    n = hidden.shape[0]
    stats = tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(3))
    return (*stats, *_grad_shapes(hidden, lm_head_weight, bias, need_h, need_lm, need_b))


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


def shard_labels(labels: Tensor, vocab_start: int, n_local: int, ignore_index: int) -> Tensor:
    """Global labels ``[N]`` -> labels local to the vocabulary shard ``[vocab_start, vocab_start +
    n_local)``: ``label - vocab_start`` inside the shard, ``ignore_index`` kept, and a negative
    sentinel (``-1``, or ``-2`` when ``ignore_index == -1``) elsewhere, which every backend treats
    as "row active, target not in this shard" (it matches no column)."""
    sentinel = -2 if ignore_index == -1 else -1
    local = labels - vocab_start
    inside = (local >= 0) & (local < n_local)
    out = torch.where(inside, local, torch.full_like(labels, sentinel))
    return torch.where(labels == ignore_index, labels, out)


def _linear_stats(hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                  check_labels: bool, strategy: str, chunk_rows: int, backend: str,
                  process_group: Any, softcap: float | None = None,
                  logit_scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Global ``(m [N], lse [N], target [N])``: the forward op, plus (with ``process_group``) the
    one collective combining every shard's partials (of the transformed logits: the transform is
    elementwise, so the shards' statistics merge as before)."""
    stats = linear_ce_forward_op(hidden, lm_head_weight, bias, labels, ignore_index, check_labels, strategy,
                                 chunk_rows, backend, softcap, logit_scale)
    if process_group is not None:
        stats = combine_vocab_partials(*stats, lm_head_weight.shape[0], process_group)
    return stats


def save_grads_for_one_backward(ctx: Any, grads: tuple[Tensor | None, ...], need: tuple[bool, ...]) -> None:
    """``setup_context`` half of a loss whose gradients are computed in its forward and carried by
    a 0-d output: save them (and which are wanted) for :func:`scaled_saved_grads`, and let autograd
    pass None, not zero-filled tensors, for the non-differentiable outputs (a zero-filled
    ``grad_lm_head`` would be another ``[V, H]`` buffer in the backward)."""
    ctx.save_for_backward(*grads)
    ctx.need = need
    ctx.consumed = False
    ctx.set_materialize_grads(False)


def scaled_saved_grads(ctx: Any, grad_carrier: Tensor | None, name: str) -> list[Tensor | None]:
    """``backward`` half: the saved gradients times the carrier's upstream gradient, scaled IN PLACE
    (no second head-sized ``[V, H]`` buffer). They therefore serve one backward only: a second one
    through the same graph (``retain_graph=True``) raises RuntimeError instead of returning
    already-scaled values."""
    if ctx.consumed:
        raise RuntimeError(f"{name}: a second backward through the same fused loss is not supported (its "
                           "gradients, computed in the forward, were scaled in place by the first backward); "
                           "recompute the loss instead of retain_graph=True")
    ctx.consumed = True
    if grad_carrier is None:
        return [None] * len(ctx.need)
    g = grad_carrier.float()
    return [x.mul_(g) if need else None for x, need in zip(ctx.saved_tensors, ctx.need, strict=True)]


class LinearTokenNLLFunction(torch.autograd.Function):
    """``nll[N]`` float32 of ``logits = hidden @ lm_head_weight.T + bias``, differentiable w.r.t.
    hidden, lm_head_weight and bias. Saves the inputs (no copies) and ``lse [N]``; the backward
    recomputes the logits chunk by chunk (tile by tile with the tile kernels). With
    ``process_group``, ``lm_head_weight`` / ``bias`` are this rank's vocabulary shard, ``labels``
    shard-local (:func:`shard_labels`), the saved ``(m, lse)`` are the global ones, and
    ``grad_hidden`` is this rank's partial (see the module notes).

    Returns ``(nll, m, lse)`` (``m`` / ``lse`` non-differentiable, for ``setup_context``): the
    ``forward`` / ``setup_context`` style lets ``torch.func`` transforms run it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                check_labels: bool, strategy: str, chunk_rows: int, backend: str, process_group: Any,
                softcap: float | None = None, logit_scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        m, lse, target = _linear_stats(hidden, lm_head_weight, bias, labels, ignore_index, check_labels, strategy,
                                       chunk_rows, backend, process_group, softcap, logit_scale)
        return nll_from_stats(m, lse, target, labels, ignore_index), m, lse

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        hidden, lm_head_weight, bias, labels, ignore_index, _, strategy, chunk_rows, backend, _, softcap, scale = inputs
        _, m, lse = output
        ctx.mark_non_differentiable(m, lse)
        ctx.save_for_backward(hidden, lm_head_weight, bias, labels, m, lse)
        ctx.transform = (softcap, scale)
        ctx.ignore_index, ctx.strategy, ctx.chunk_rows, ctx.backend = ignore_index, strategy, chunk_rows, backend

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: Tensor, *_: Any):
        hidden, lm_head_weight, bias, labels, m, lse = ctx.saved_tensors
        need_h, need_lm, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        gh, glm, gb = linear_ce_backward_op(
            hidden, lm_head_weight, bias, labels, m, lse, grad_nll.float().contiguous(), ctx.ignore_index,
            ctx.strategy, ctx.chunk_rows, ctx.backend, need_h, need_lm, need_b, *ctx.transform,
        )
        return (gh if need_h else None, glm if need_lm else None, gb if need_b else None,
                None, None, None, None, None, None, None, None, None)


class LinearGradCarrierFunction(torch.autograd.Function):
    """``(carrier, nll)``: the per-token ``nll [N]`` float32 (not differentiable) and a 0-d float32
    zero ``carrier`` whose gradient w.r.t. hidden / lm_head_weight / bias is that of
    ``sum(coef * nll)``, computed in the forward (``coef`` known then) and scaled by the carrier's
    upstream gradient in the backward.

    The caller builds the loss as ``f(nll, mask, weight, ...) + carrier`` where ``f`` is linear in
    ``nll`` with ``d f / d nll = coef``: the loss then has the right value and the right gradients
    w.r.t. everything, including tensors (weight, normalizer, float mask) that ``f`` sees and that
    may be reduced across context-parallel ranks in between (per-sequence sums), which a
    scalar-valued fused op could not express.

    Without ``process_group``: one fused op (three matmuls with chunks). With it
    (``lm_head_weight`` / ``bias`` this rank's vocabulary shard, ``labels`` shard-local): the
    forward op, one collective for the global ``lse``, then the recomputing gradient op (four
    matmuls; ``grad_hidden`` is this rank's partial). No communication in backward.

    ``forward`` / ``setup_context`` style (``torch.func`` transforms can run it): which gradients
    to compute is passed in (``need_h, need_lm, need_b``: the caller reads ``requires_grad``), and
    the forward returns ``(carrier, nll, grad_hidden, grad_lm_head, grad_bias)``, all but the
    carrier non-differentiable; callers use the first two. The backward scales the gradients in place
    (the last three outputs change) and runs once per forward: a second backward raises RuntimeError.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None, labels: Tensor, coef: Tensor,
                ignore_index: int, check_labels: bool, strategy: str, chunk_rows: int, backend: str,
                process_group: Any, softcap: float | None, logit_scale: float | None, need_h: bool, need_lm: bool,
                need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        need_b = need_b and bias is not None
        coef32 = coef.detach().float().contiguous()
        run = (strategy, chunk_rows, backend, need_h, need_lm, need_b, softcap, logit_scale)
        if process_group is None:
            m, lse, target, gh, glm, gb = linear_ce_fused_op(hidden, lm_head_weight, bias, labels, coef32,
                                                             ignore_index, check_labels, *run)
        else:
            m, lse, target = _linear_stats(hidden, lm_head_weight, bias, labels, ignore_index, check_labels,
                                           strategy, chunk_rows, backend, process_group, softcap, logit_scale)
            gh, glm, gb = linear_ce_backward_op(hidden, lm_head_weight, bias, labels, m, lse, coef32, ignore_index,
                                                *run)
        return lse.new_zeros(()), nll_from_stats(m, lse, target, labels, ignore_index), gh, glm, gb

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, nll, gh, glm, gb = output
        ctx.mark_non_differentiable(nll, gh, glm, gb)
        save_grads_for_one_backward(ctx, (gh, glm, gb), (inputs[-3], inputs[-2], inputs[-1] and inputs[2] is not None))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_carrier: Tensor, *_: Any):
        return (*scaled_saved_grads(ctx, grad_carrier, "LinearGradCarrierFunction"), *([None] * 13))


def grads_needed(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[bool, bool, bool]:
    """``(need_hidden, need_weight, need_bias)``: which gradients a fused loss computes in its forward
    (``requires_grad`` of each, grad mode on; no bias, no bias gradient)."""
    on = torch.is_grad_enabled()
    return (on and hidden.requires_grad, on and weight.requires_grad,
            on and bias is not None and bias.requires_grad)


def linear_token_nll(hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                     check_labels: bool, strategy: str, chunk_rows: int, backend: str,
                     process_group: Any = None, softcap: float | None = None,
                     logit_scale: float | None = None) -> Tensor:
    """Per-token NLL ``[N]`` float32 of validated ``hidden [N, H]``, ``lm_head_weight [V, H]``,
    ``bias [V]`` and ``labels [N]``. Goes through autograd only when a gradient is needed (nothing
    is saved in the baseline phase). With ``process_group``: ``lm_head_weight [V/tp, H]`` /
    ``bias [V/tp]`` are this rank's shard and ``labels`` are shard-local (:func:`shard_labels`);
    one collective per call. ``softcap`` / ``logit_scale``: the logit transform
    ``z' = softcap * tanh(logit_scale * z / softcap)`` (validated; None: none)."""
    args = (ignore_index, check_labels, strategy, chunk_rows, backend, process_group, softcap, logit_scale)
    if autograd_needed(hidden, lm_head_weight, bias):
        return LinearTokenNLLFunction.apply(hidden, lm_head_weight, bias, labels, *args)[0]
    return nll_from_stats(*_linear_stats(hidden, lm_head_weight, bias, labels, *args), labels, ignore_index)


def linear_nll_with_grad(hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None, labels: Tensor, coef: Tensor,
                         ignore_index: int, check_labels: bool, strategy: str, chunk_rows: int, backend: str,
                         process_group: Any = None, softcap: float | None = None,
                         logit_scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """``(nll [N] float32, carrier)`` for a loss linear in ``nll`` with coefficients ``coef [N]``
    known now (see :class:`LinearGradCarrierFunction`). ``carrier`` is None when no gradient
    w.r.t. hidden / lm_head_weight / bias is needed (then only the forward op and, with
    ``process_group``, its collective run). ``softcap`` / ``logit_scale`` as :func:`linear_token_nll`."""
    args = (ignore_index, check_labels, strategy, chunk_rows, backend, process_group, softcap, logit_scale)
    if autograd_needed(hidden, lm_head_weight, bias):
        carrier, nll, *_ = LinearGradCarrierFunction.apply(hidden, lm_head_weight, bias, labels, coef, *args,
                                                           *grads_needed(hidden, lm_head_weight, bias))
        return nll, carrier
    stats = _linear_stats(hidden, lm_head_weight, bias, labels, *args)
    return nll_from_stats(*stats, labels, ignore_index), None
