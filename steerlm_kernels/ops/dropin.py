"""Autograd of the drop-in cross entropies: per-token ``(nll, lse, zsum)`` with one backward.

The drop-in losses of :mod:`steerlm_kernels.api_dropin` (label smoothing, z-loss, per-token
weights, reductions) are all O(N) functions of three per-token statistics of the (transformed)
logits ``z'``:

* ``nll = lse - z'_y`` (the token's negative log-likelihood),
* ``lse = log sum_j exp(z'_j)`` (absolute: ``m + lse_rel``),
* ``zsum = sum_j z'_j`` over the FULL vocabulary (label smoothing's uniform term; under tensor
  parallelism the shards' partial sums are added, never one shard's alone).

:class:`CEStatsFunction` (logits in) and :class:`LinearCEStatsFunction` (hidden states + head;
the backward recomputes the logits chunk by chunk) return the three from the existing forward
ops, and take an upstream gradient for each. :class:`LinearCEFusedFunction` serves losses whose
coefficients are known in the forward (``sum`` / ``mean`` without z-loss): it computes the head's
gradient from the forward's own logits chunks (three matmuls per chunk instead of four) and hands
it to autograd through a zero-valued carrier.

Since ``d lse / dz = p`` and ``d nll / dz = p - onehot``, the logits gradient is

    g_nll (p - onehot) + g_lse p + g_sum 1 = (g_nll + g_lse) (p - onehot) + g_lse onehot + g_sum 1,

i.e. the existing backward kernel with ``coef = g_nll + g_lse``, plus a sparse correction at the
label column and a uniform term (times ``dz'/dz`` under a logit transform). For the fused linear
head (``z = h W^T + b``) the uniform term is rank one (``zsum = h . sum_j W_j + sum_j b_j``: a
matrix-vector product, and a rank-one correction of each gradient) and the label correction is a
gather / ``index_add`` on rows of ``W``: no new kernel, never ``[N, V]``.

``softcap`` with ``zsum``: ``sum_j c tanh(s z_j / c)`` is not rank one. :class:`CEStatsFunction`
(logits in) computes it over the logits rows; :class:`LinearCEStatsFunction` refuses it (the
caller raises one clear error before getting here).

Under vocabulary parallelism (``process_group``) the rank's partial ``(m, lse, target, zsum)``
are combined by ONE ``all_gather`` of ``4N`` floats (after the 32-byte shape check of
:func:`steerlm_kernels.distributed.check_same_sizes`); without ``zsum`` the existing ``3N``
combine is used. Backward: no communication; ``grad_hidden`` is the rank's partial.

Ignored rows (label ``ignore_index``) give ``nll = lse = zsum = 0`` and no gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from steerlm_kernels.distributed import check_same_sizes, combine_vocab_partials, group_size_rank, vocab_shard
from steerlm_kernels.kernels.reference import merge_stats
from steerlm_kernels.ops.cross_entropy import ce_backward_op, ce_forward_op, nll_from_stats
from steerlm_kernels.ops.linear_cross_entropy import (
    linear_ce_backward_op,
    linear_ce_forward_op,
    linear_ce_fused_op,
    save_grads_for_one_backward,
    scaled_saved_grads,
)

Transform = tuple[float | None, float | None]  # (softcap, logit_scale)


def _transform_kwargs(transform: Transform) -> dict[str, float]:
    """Keyword arguments of the ops for a logit transform (none when there is none)."""
    softcap, scale = transform
    out = {}
    if softcap is not None:
        out["softcap"] = softcap
    if scale is not None:
        out["logit_scale"] = scale
    return out


def transformed(x: Tensor, transform: Transform) -> Tensor:
    """``z' = c tanh(s x / c)`` (or ``s x``, or ``x``) of float32 ``x``."""
    softcap, scale = transform
    if scale is not None:
        x = x * scale
    if softcap is not None:
        x = torch.tanh(x / softcap) * softcap
    return x


def label_slope(target: Tensor, transform: Transform) -> Tensor | float:
    """``dz'/dz`` at the label column from the transformed target logit ``z'_y``:
    ``s (1 - (z'_y / c)^2)`` with a softcap, ``s`` with a scale only, else 1."""
    softcap, scale = transform
    s = 1.0 if scale is None else float(scale)
    if softcap is None:
        return s
    return (1.0 - (target / softcap) ** 2) * s


def combine_with_sum(m: Tensor, lse: Tensor, target: Tensor, zsum: Tensor, n_cols: int,
                     process_group: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Global ``(m, lse, target, zsum)`` ``[N]`` from every rank's partials: one shape check, then
    ONE all_gather of ``4N`` floats."""
    world, _ = group_size_rank(process_group)
    n = m.shape[0]
    check_same_sizes(process_group, "process_group", {"rows N": n, "vocabulary shard width": n_cols}, m.device)
    mine = torch.stack([m, lse, target, zsum]).reshape(-1)
    everyone = mine.new_empty(world * 4 * n)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(everyone, mine, group=process_group)
    ms, lses, targets, sums = everyone.view(world, 4, n).unbind(1)
    m_all, lse_all = merge_stats(ms, lses)
    return m_all, lse_all, targets.sum(dim=0), sums.sum(dim=0)


def _combine(stats: tuple[Tensor, Tensor, Tensor], zsum: Tensor | None, n_cols: int,
             process_group: Any) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    m, lse, target = stats
    if process_group is None:
        return m, lse, target, zsum
    if zsum is None:
        return (*combine_vocab_partials(m, lse, target, n_cols, process_group), None)
    return combine_with_sum(m, lse, target, zsum, n_cols, process_group)


def _outputs(m: Tensor, lse: Tensor, target: Tensor, zsum: Tensor | None, labels: Tensor,
             ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    ignored = labels == ignore_index
    nll = nll_from_stats(m, lse, target, labels, ignore_index)
    lse_abs = torch.where(ignored, 0.0, m + lse)
    zsum = torch.zeros_like(lse) if zsum is None else torch.where(ignored, 0.0, zsum)
    return nll, lse_abs, zsum


def _in_shard(labels: Tensor, start: int, n_cols: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(local column clamped into range [N] int64, label falls in this shard [N] bool)``."""
    local = labels.long() - start
    inside = (local >= 0) & (local < n_cols) & (labels != ignore_index)
    return torch.where(inside, local, 0), inside


# --------------------------------------------------------------------------------------------
# logits in
# --------------------------------------------------------------------------------------------


def _row_sums(logits: Tensor, transform: Transform) -> Tensor:
    """``sum_j z'_j`` ``[N]`` float32 of ``logits [N, V]``, a block of rows at a time (no ``[N, V]``
    float32 temporary)."""
    if transform == (None, None):
        return logits.sum(dim=1, dtype=torch.float32)
    if transform[0] is None:
        return logits.sum(dim=1, dtype=torch.float32) * float(transform[1])
    n, v = logits.shape
    step = max(1, (1 << 24) // max(v, 1))
    return torch.cat([transformed(logits[a:a + step].float(), transform).sum(dim=1) for a in range(0, n, step)]
                     ) if n else logits.new_zeros(0, dtype=torch.float32)


class CEStatsFunction(torch.autograd.Function):
    """``(nll, lse, zsum, m, lse_rel, target)`` ``[N]`` float32 of ``logits [N, V]`` (a vocabulary shard
    with ``process_group``), differentiable once w.r.t. ``logits``; ``zsum`` is zeros unless ``want_sum``.
    Callers use the first three; the last three (the global statistics) are non-differentiable and
    returned only so that ``setup_context`` can save them: the ``forward`` / ``setup_context`` style lets
    ``torch.func`` transforms (``grad``, ``vjp``, ``vmap``) run it. See the module notes."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, labels: Tensor, ignore_index: int, check_labels: bool, backend: str,
                process_group: Any, want_lse: bool, want_sum: bool, transform: Transform) -> tuple[Tensor, ...]:
        n_cols = logits.shape[1]
        vocab_start, vocab_size = vocab_shard(n_cols, process_group)
        stats = ce_forward_op(logits, labels, vocab_start, vocab_size, ignore_index, check_labels, backend,
                              **_transform_kwargs(transform))
        zsum = _row_sums(logits, transform) if want_sum else None
        m, lse, target, zsum = _combine(stats, zsum, n_cols, process_group)
        return (*_outputs(m, lse, target, zsum, labels, ignore_index), m, lse, target)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        logits, labels, ignore_index, _, backend, process_group, want_lse, want_sum, transform = inputs
        *_, m, lse, target = output
        ctx.mark_non_differentiable(m, lse, target)
        ctx.save_for_backward(logits, labels, m, lse, target)
        vocab_start = vocab_shard(logits.shape[1], process_group)[0]
        ctx.run = (vocab_start, ignore_index, backend, transform, want_lse, want_sum)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_nll: Tensor, g_lse: Tensor, g_sum: Tensor, *_: Any):
        logits, labels, m, lse, target = ctx.saved_tensors
        vocab_start, ignore_index, backend, transform, want_lse, want_sum = ctx.run
        coef = (g_nll.float() + g_lse.float()).contiguous() if want_lse else g_nll.float().contiguous()
        grad = ce_backward_op(logits, labels, m, lse, coef, vocab_start, ignore_index, backend,
                              **_transform_kwargs(transform))
        if want_lse:  # + g_lse * dz'/dz at the label column (read in float32, written once)
            local, inside = _in_shard(labels, vocab_start, logits.shape[1], ignore_index)
            corr = torch.where(inside, g_lse.float() * label_slope(target, transform), 0.0).unsqueeze(1)
            col = local.unsqueeze(1)
            grad.scatter_(1, col, (grad.gather(1, col).float() + corr).to(grad.dtype))
        if want_sum:
            g = torch.where(labels == ignore_index, 0.0, g_sum.float())
            if transform[0] is None:  # uniform: g_sum * s on every column
                grad.add_(g.mul(1.0 if transform[1] is None else float(transform[1])).unsqueeze(1))
            else:  # g_sum * dz'/dz, element by element, a block of rows at a time
                n, v = logits.shape
                step = max(1, (1 << 24) // max(v, 1))
                for a in range(0, n, step):
                    x = logits[a:a + step].float()
                    t = torch.tanh(x * (float(transform[1] or 1.0) / transform[0]))
                    slope = (1.0 - t * t) * float(transform[1] or 1.0)
                    add = torch.where(g[a:a + step, None] != 0, g[a:a + step, None] * slope, 0.0)  # ignored: unread
                    grad[a:a + step] = (grad[a:a + step].float() + add).to(grad.dtype)
        return grad, None, None, None, None, None, None, None, None




# --------------------------------------------------------------------------------------------
# fused linear head
# --------------------------------------------------------------------------------------------


def _row_sums_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None, transform: Transform) -> Tensor:
    """``zsum = s * (hidden . sum_j W_j + sum_j b_j)`` ``[N]`` float32 (no softcap): a matvec."""
    zsum = torch.mv(hidden.float(), weight.sum(dim=0, dtype=torch.float32))
    if bias is not None:
        zsum = zsum + bias.sum(dtype=torch.float32)
    return zsum * float(transform[1]) if transform[1] is not None else zsum


def _add_corrections(grads: tuple[Tensor, Tensor, Tensor], need: tuple[bool, bool, bool], hidden: Tensor,
                     weight: Tensor, bias: Tensor | None, labels: Tensor, target: Tensor, g_lse: Tensor | None,
                     g_sum: Tensor | None, ignore_index: int, transform: Transform) -> tuple[Tensor, Tensor, Tensor]:
    """Add the label-column term ``g_lse * dz'/dz_y * onehot`` (a gather / ``index_add`` on rows of
    ``W``) and the uniform term ``g_sum * s * 1`` (rank one) to the kernels' gradients of the head;
    each gradient is summed in float32 and rounded once more to its dtype."""
    gh, gw, gb = grads
    need_h, need_w, need_b = need
    local, inside = _in_shard(labels, 0, weight.shape[0], ignore_index)
    corr = None
    if g_lse is not None:
        corr = torch.where(inside, g_lse.float() * label_slope(target, transform), 0.0)  # [N]
    g = None
    if g_sum is not None:
        g = torch.where(labels == ignore_index, 0.0, g_sum.float())
        if transform[1] is not None:
            g = g * float(transform[1])
    if need_h:
        extra = 0.0
        if corr is not None:
            extra = corr.unsqueeze(1) * weight.index_select(0, local).float()
        if g is not None:
            extra = extra + g.unsqueeze(1) * weight.sum(dim=0, dtype=torch.float32)
        gh = (gh.float() + extra).to(hidden.dtype)
    if need_w:
        gw32 = gw.float()
        h32 = torch.where((labels != ignore_index).unsqueeze(1), hidden.float(), 0.0)  # ignored rows never read
        if corr is not None:
            gw32 = gw32.index_add_(0, local, corr.unsqueeze(1) * h32)
        if g is not None:
            gw32 += (g @ h32).unsqueeze(0)
        gw = gw32.to(weight.dtype)
    if need_b:
        gb32 = gb.float()
        if corr is not None:
            gb32 = gb32.index_add_(0, local, corr)
        if g is not None:
            gb32 += g.sum()
        gb = gb32.to(weight.dtype)
    return gh, gw, gb


class LinearCEStatsFunction(torch.autograd.Function):
    """``(nll, lse, zsum, m, lse_rel, target)`` ``[N]`` float32 of ``z = hidden @ weight.T + bias``,
    differentiable once w.r.t. ``hidden [N, H]``, ``weight [V, H]`` and ``bias [V]``, never holding
    ``[N, V]``; the backward recomputes the logits (forward + backward: four matmuls per chunk).
    Callers use the first three; the last three are non-differentiable, returned for ``setup_context``
    (``torch.func`` transforms can run it). With ``process_group``: ``weight`` / ``bias`` are this
    rank's vocabulary shard, ``labels`` are shard-local
    (:func:`steerlm_kernels.ops.linear_cross_entropy.shard_labels`) and ``grad_hidden`` is this rank's
    partial. ``want_sum`` with a softcap is not supported."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                check_labels: bool, strategy: str, chunk_rows: int, backend: str, process_group: Any,
                want_lse: bool, want_sum: bool, transform: Transform) -> tuple[Tensor, ...]:
        if want_sum and transform[0] is not None:
            raise ValueError("label_smoothing with softcap is not supported by the fused linear loss")
        stats = linear_ce_forward_op(hidden, weight, bias, labels, ignore_index, check_labels, strategy, chunk_rows,
                                     backend, **_transform_kwargs(transform))
        zsum = _row_sums_linear(hidden, weight, bias, transform) if want_sum else None
        m, lse, target, zsum = _combine(stats, zsum, weight.shape[0], process_group)
        return (*_outputs(m, lse, target, zsum, labels, ignore_index), m, lse, target)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        hidden, weight, bias, labels, ignore_index, _, strategy, chunk_rows, backend, _, want_lse, want_sum, \
            transform = inputs
        *_, m, lse, target = output
        ctx.mark_non_differentiable(m, lse, target)
        ctx.save_for_backward(hidden, weight, bias, labels, m, lse, target)
        ctx.run = (ignore_index, strategy, chunk_rows, backend, transform, want_lse, want_sum)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_nll: Tensor, g_lse: Tensor, g_sum: Tensor, *_: Any):
        hidden, weight, bias, labels, m, lse, target = ctx.saved_tensors
        ignore_index, strategy, chunk_rows, backend, transform, want_lse, want_sum = ctx.run
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need = (need_h, need_w, need_b and bias is not None)
        coef = (g_nll.float() + g_lse.float()).contiguous() if want_lse else g_nll.float().contiguous()
        grads = linear_ce_backward_op(hidden, weight, bias, labels, m, lse, coef, ignore_index, strategy,
                                      chunk_rows, backend, *need, **_transform_kwargs(transform))
        if want_lse or want_sum:
            grads = _add_corrections(grads, need, hidden, weight, bias, labels, target, g_lse if want_lse else None,
                                     g_sum if want_sum else None, ignore_index, transform)
        return (*(g if n else None for g, n in zip(grads, need, strict=True)), *[None] * 10)




class LinearCEFusedFunction(torch.autograd.Function):
    """``(carrier, nll, lse, zsum, grad_hidden, grad_weight, grad_bias)`` for a loss whose per-token
    coefficients are known in the forward (``reduction="sum"`` / ``"mean"`` without z-loss, no vocabulary
    parallelism); callers use the first four. ``nll``, ``lse``, ``zsum`` ``[N]`` float32 are not
    differentiable, and the 0-d zero ``carrier`` carries the gradient of ``sum(c_nll * nll + c_lse * lse +
    c_sum * zsum)`` w.r.t. ``hidden``, ``weight`` and ``bias``, computed in the forward from the same
    logits chunks (three matmuls per chunk instead of four) plus the label-column / rank-one terms, and
    scaled in the backward by the carrier's upstream gradient. ``coef`` is ``c_nll + c_lse`` (the
    kernels'), ``c_lse`` / ``c_sum`` may be None. Which gradients to compute is passed in (``need_h,
    need_w, need_b``: :func:`~steerlm_kernels.ops.linear_cross_entropy.grads_needed`). Holds one
    ``hidden``-sized and one ``weight``-sized gradient until the backward (as every fused-linear loss
    that computes its gradient in the forward); ``forward`` / ``setup_context`` style (``torch.func``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, coef: Tensor,
                c_lse: Tensor | None, c_sum: Tensor | None, ignore_index: int, check_labels: bool, strategy: str,
                chunk_rows: int, backend: str, transform: Transform, need_h: bool, need_w: bool,
                need_b: bool) -> tuple[Tensor, ...]:
        need = (need_h, need_w, need_b and bias is not None)
        *stats, gh, gw, gb = linear_ce_fused_op(hidden, weight, bias, labels, coef.detach().float().contiguous(),
                                                ignore_index, check_labels, strategy, chunk_rows, backend, *need,
                                                **_transform_kwargs(transform))
        m, lse, target = stats
        zsum = None if c_sum is None else _row_sums_linear(hidden, weight, bias, transform)
        grads = _add_corrections((gh, gw, gb), need, hidden, weight, bias, labels, target,
                                 None if c_lse is None else c_lse.detach(), None if c_sum is None else c_sum.detach(),
                                 ignore_index, transform)
        return (lse.new_zeros(()), *_outputs(m, lse, target, zsum, labels, ignore_index), *grads)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, *outs = output
        ctx.mark_non_differentiable(*outs)
        need = (inputs[-3], inputs[-2], inputs[-1] and inputs[2] is not None)
        save_grads_for_one_backward(ctx, tuple(outs[3:]), need)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_carrier: Tensor, *unused: Tensor):
        return (*scaled_saved_grads(ctx, grad_carrier, "linear_cross_entropy"), *[None] * 13)


