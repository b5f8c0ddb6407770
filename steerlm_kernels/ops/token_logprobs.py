"""Per-token log-probabilities and entropies straight from hidden states and the LM head.

For row ``i`` of ``hidden [N, H]``: ``z = hidden_i @ weight.T (+ bias)`` (the LM head's own GEMM, in
the inputs' dtype, then float32), ``z' = softcap * tanh(logit_scale * z / softcap)`` (either part
optional), ``u = z' / temperature``, and

    logprob_i = u_y - logsumexp(u),      entropy_i = logsumexp(u) - sum_j softmax(u)_j u_j.

The logits exist only a chunk of rows at a time (``[chunk, V]`` float32, never ``[N, V]``), as
in :mod:`steerlm_kernels.ops.linear_chunks`; the math is plain PyTorch on the chunk (every device,
no backend choice). Two ``torch.library`` custom ops (opaque to ``torch.compile``):

* ``token_logprobs_stats_op`` -> ``(m, lse, target, mean)`` ``[N]`` float32 of ``u``: row max,
  log-sum-exp relative to it, the label's ``u`` (absolute; 0 when the label is not a column of
  this shard), and ``E[u] - m`` under the row's softmax;
* ``token_logprobs_backward_op`` -> ``(grad_hidden, grad_weight, grad_bias)`` of
  ``sum(g_lp * logprob + g_h * entropy)``, recomputing each chunk's logits from the global stats:
  ``d/du = g_lp (onehot - p) - g_h p (u - E[u])``, times ``du/dz = logit_scale (1 - (z' /
  softcap)^2) / temperature``.

:class:`TokenLogprobsFunction` wires them together. The forward is the same code whether or not a
gradient is wanted (``torch.no_grad()`` scoring pass or training pass): the log-probabilities are
bit-identical between the two.

Vocabulary parallelism (``process_group``): ``weight`` / ``bias`` are this rank's contiguous shard,
``labels`` shard-local (:func:`steerlm_kernels.ops.linear_cross_entropy.shard_labels`); the partial
``(m, lse, target, mean)`` are combined with ONE ``all_gather`` of ``4N`` floats; the backward
needs no communication and ``grad_hidden`` is this rank's partial (sum it over the group).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from steerlm_kernels.distributed import check_same_sizes, group_size_rank
from steerlm_kernels.kernels.reference import merge_stats
from steerlm_kernels.ops.linear_chunks import default_chunk_rows, even_bounds


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """GEMM dtype: the inputs' (as the model's LM head), float32 for float16 on CPU (slow there)."""
    return torch.float32 if hidden.dtype == torch.float16 and hidden.device.type == "cpu" else hidden.dtype


def _chunk_u(h_c: Tensor, w: Tensor, b: Tensor | None, inv_temp: float, softcap: float | None,
             scale: float | None) -> tuple[Tensor, Tensor | float]:
    """``(u [rows, V] float32, du/dz)`` of one chunk: ``z = h W^T + b``, ``z' = softcap * tanh(scale *
    z / softcap)`` (either optional), ``u = z' * inv_temp``; ``du/dz`` a tensor with a softcap,
    else a number."""
    z = (torch.mm(h_c, w.t()) if b is None else torch.addmm(b, h_c, w.t())).float()
    s = 1.0 if scale is None else scale
    if softcap is None:
        return (z * (s * inv_temp) if s * inv_temp != 1.0 else z), s * inv_temp
    t = torch.tanh(z * (s / softcap))
    slope = (1.0 - t * t) * (s * inv_temp)
    return t.mul_(softcap * inv_temp), slope


def _row_chunks(active: Tensor, n_vocab: int, chunk_rows: int) -> Iterator[Tensor | slice]:
    """Row selections of at most ``chunk_rows`` rows (default: 256 MiB of float32 logits) covering
    the ``active`` rows. On CPU only those rows are gathered (ignored tokens cost no matmul); on
    other devices plain slices over every row (no host sync), the caller masking the rest."""
    n = active.shape[0]
    step = chunk_rows if chunk_rows > 0 else default_chunk_rows(n_vocab, active.device)
    if active.device.type == "cpu":
        idx = active.nonzero().squeeze(1)
        if idx.numel() != n:
            for a, e in (even_bounds(idx.numel(), max(1, min(step, idx.numel()))) if idx.numel() else []):
                yield idx[a:e]
            return
    for a, e in (even_bounds(n, max(1, min(step, n))) if n else []):
        yield slice(a, e)


def _take(x: Tensor, sel: Tensor | slice) -> Tensor:
    return x.index_select(0, sel) if isinstance(sel, Tensor) else x[sel]


def _put(dst: Tensor, sel: Tensor | slice, src: Tensor) -> None:
    if isinstance(sel, Tensor):
        dst.index_copy_(0, sel, src.to(dst.dtype))
    else:
        dst[sel] = src


@torch.library.custom_op("steerlm_kernels::token_logprobs_stats", mutates_args=())
def token_logprobs_stats_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                            inv_temp: float, softcap: float | None, logit_scale: float | None,
                            chunk_rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(m, lse, target, mean)`` ``[N]`` float32 of ``u`` (see the module docstring); rows whose
    label is ``ignore_index`` give 0 (on CPU they are not computed)."""
    n, n_vocab = hidden.shape[0], weight.shape[0]
    cd = _compute_dtype(hidden)
    w = weight.to(cd)
    b = None if bias is None else bias.to(cd)
    out = [torch.zeros(n, dtype=torch.float32, device=hidden.device) for _ in range(4)]
    for sel in _row_chunks(labels != ignore_index, n_vocab, chunk_rows):
        u, _ = _chunk_u(_take(hidden, sel).to(cd), w, b, inv_temp, softcap, logit_scale)
        m = u.max(dim=1).values
        u.sub_(m.unsqueeze(1))  # u - m, in place
        y = _take(labels, sel).long()
        inside = (y >= 0) & (y < n_vocab)
        target = torch.where(inside, u.gather(1, y.clamp(0, n_vocab - 1).unsqueeze(1)).squeeze(1) + m, 0.0)
        p = u.exp()
        s = p.sum(dim=1)
        mean = (p * u).sum(dim=1) / s
        for dst, src in zip(out, (m, s.log(), target, mean), strict=True):
            _put(dst, sel, src)
    return tuple(out)  # type: ignore[return-value]


@token_logprobs_stats_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, inv_temp, softcap, logit_scale, chunk_rows):
    return tuple(hidden.new_empty(hidden.shape[0], dtype=torch.float32) for _ in range(4))


@torch.library.custom_op("steerlm_kernels::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, m: Tensor,
                               lse: Tensor, mean: Tensor, g_lp: Tensor, g_h: Tensor, inv_temp: float,
                               softcap: float | None, logit_scale: float | None,
                               chunk_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of ``sum(g_lp * logprob + g_h * entropy)`` w.r.t. ``(hidden, weight, bias)`` from the
    global stats ``(m, lse, mean)``; the logits are recomputed chunk by chunk, for the rows with a
    non-zero upstream gradient only (the others' values are never read). ``grad_bias`` is ``[0]``
    without a bias."""
    n_vocab = weight.shape[0]
    cd = _compute_dtype(hidden)
    w = weight.to(cd)
    b = None if bias is None else bias.to(cd)
    gh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    gb = torch.zeros(n_vocab if bias is not None else 0, dtype=torch.float32, device=weight.device)
    busy = (g_lp != 0) | (g_h != 0)
    for sel in _row_chunks(busy, n_vocab, chunk_rows):
        h_c = _take(hidden, sel).to(cd)
        g_lp_c, g_h_c = _take(g_lp, sel).unsqueeze(1), _take(g_h, sel).unsqueeze(1)
        u, slope = _chunk_u(h_c, w, b, inv_temp, softcap, logit_scale)
        u.sub_(_take(m, sel).unsqueeze(1))  # u - m
        p = (u - _take(lse, sel).unsqueeze(1)).exp_()
        # d/du = g_lp (onehot - p) - g_h p ((u - m) - mean)
        g = u.sub_(_take(mean, sel).unsqueeze(1)).mul_(p).mul_(-g_h_c)
        g.sub_(p.mul_(g_lp_c))
        y = _take(labels, sel).long()
        inside = ((y >= 0) & (y < n_vocab)).unsqueeze(1)
        g.scatter_add_(1, y.clamp(0, n_vocab - 1).unsqueeze(1), torch.where(inside, g_lp_c, 0.0))
        if isinstance(slope, Tensor) or slope != 1.0:
            g.mul_(slope)
        idle = ~_take(busy, sel).unsqueeze(1)  # (slices) rows without gradient: their values unread
        g_cd = g.masked_fill_(idle, 0.0).to(cd)
        _put(gh, sel, torch.mm(g_cd, w))
        gw += torch.mm(g_cd.t(), h_c.masked_fill(idle, 0.0)).float()
        if bias is not None:
            gb += g.sum(dim=0)
    return gh, gw.to(weight.dtype), gb.to(weight.dtype)


@token_logprobs_backward_op.register_fake
def _(hidden, weight, bias, labels, m, lse, mean, g_lp, g_h, inv_temp, softcap, logit_scale, chunk_rows):
    return torch.empty_like(hidden), torch.empty_like(weight), weight.new_empty(
        weight.shape[0] if bias is not None else 0)


def combine_logprob_partials(m: Tensor, lse: Tensor, target: Tensor, mean: Tensor, n_cols: int,
                             process_group: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Global ``(m, lse, target, mean)`` from every rank's partials: one shape check, ONE all_gather
    of ``4N`` floats. ``mean`` (relative to the row max) is the softmax-weighted average of the
    shards' means, each moved from its own max to the global one."""
    world, _ = group_size_rank(process_group)
    n = m.shape[0]
    check_same_sizes(process_group, "process_group", {"rows N": n, "vocabulary shard width": n_cols}, m.device)
    mine = torch.stack([m, lse, target, mean]).reshape(-1)
    everyone = mine.new_empty(world * 4 * n)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(everyone, mine, group=process_group)
    ms, lses, targets, means = everyone.view(world, 4, n).unbind(1)
    m_all, lse_all = merge_stats(ms, lses)
    share = torch.exp((ms - m_all) + lses - lse_all)  # each shard's softmax mass
    mean_all = (share * (means + (ms - m_all))).sum(dim=0)
    return m_all, lse_all, targets.sum(dim=0), mean_all


class TokenLogprobsFunction(torch.autograd.Function):
    """``(logprob [N], entropy [N], m, lse, mean)`` float32 (0 where ``labels == ignore_index``),
    differentiable once w.r.t. ``hidden [N, H]``, ``weight [V, H]`` and ``bias [V]``; callers use the
    first two, the global stats are non-differentiable and returned for ``setup_context`` (``torch.func``
    transforms can run it). Saves the inputs (no copies) and three ``[N]`` float32 stats; the backward
    recomputes the logits chunk by chunk."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                temperature: float, softcap: float | None, logit_scale: float | None, chunk_rows: int,
                process_group: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        inv_temp = 1.0 / temperature
        m, lse, target, mean = token_logprobs_stats_op(hidden, weight, bias, labels, ignore_index, inv_temp, softcap,
                                                       logit_scale, chunk_rows)
        if process_group is not None:
            m, lse, target, mean = combine_logprob_partials(m, lse, target, mean, weight.shape[0], process_group)
        ignored = labels == ignore_index
        logprob = torch.where(ignored, 0.0, (target - m) - lse)
        entropy = torch.where(ignored, 0.0, lse - mean)
        return logprob, entropy, m, lse, mean

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        hidden, weight, bias, labels, ignore_index, temperature, softcap, logit_scale, chunk_rows, _ = inputs
        _, _, m, lse, mean = output
        ctx.mark_non_differentiable(m, lse, mean)
        ctx.save_for_backward(hidden, weight, bias, labels, m, lse, mean)
        ctx.run = (ignore_index, 1.0 / temperature, softcap, logit_scale, chunk_rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp: Tensor, g_h: Tensor, *_: Any):
        hidden, weight, bias, labels, m, lse, mean = ctx.saved_tensors
        ignore_index, inv_temp, softcap, logit_scale, chunk_rows = ctx.run
        ignored = labels == ignore_index
        g_lp = torch.where(ignored, 0.0, g_lp.float()).contiguous()
        g_h = torch.where(ignored, 0.0, g_h.float()).contiguous()
        gh, gw, gb = token_logprobs_backward_op(hidden, weight, bias, labels, m, lse, mean, g_lp, g_h, inv_temp,
                                                softcap, logit_scale, chunk_rows)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        return (gh if need_h else None, gw if need_w else None, gb if need_b and bias is not None else None,
                None, None, None, None, None, None, None)
