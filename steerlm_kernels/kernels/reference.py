"""The ``torch`` backend: plain PyTorch, the one torch reference of every op family.

It implements the whole backend contract of :mod:`steerlm_kernels.registry` on any device: the
cross-entropy primitives (``ce_forward`` / ``ce_backward``, processed in chunks of at most
``CHUNK_ELEMENTS`` logits, so it never holds an ``[N, V]`` float32 temporary), the segment sum
and the group ops. It is a reference, not a fast path; the tests check it, like every backend,
against float64 math.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

#: Logits per chunk: 4M elements = 16 MiB per float32 temporary.
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(n_rows: int, n_cols: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _local_target(labels: Tensor, vocab_start: int, n_cols: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Column of each row's label inside this shard (clamped) and whether it is really there."""
    labels = labels.long()
    local = labels - vocab_start
    in_shard = (labels != ignore_index) & (local >= 0) & (local < n_cols)
    return local.clamp(0, n_cols - 1), in_shard


def transform_factors(softcap: float | None, scale: float | None) -> tuple[float, float]:
    """``(pre, cap)`` of the logit transform ``z' = cap * tanh(pre * z)`` (with ``softcap``) or
    ``z' = pre * z`` (without; ``cap = 0``): ``pre = scale / softcap`` or ``scale`` (1 when None).
    Every backend takes these two numbers (``pre`` rounded once to float32)."""
    s = 1.0 if scale is None else float(scale)
    if softcap is None:
        return s, 0.0
    return s / float(softcap), float(softcap)


def transform_logits(x: Tensor, softcap: float | None, scale: float | None) -> tuple[Tensor, Tensor | None]:
    """``(z', dz'/dz)`` of float32 logits ``x``: ``z' = c * tanh(s * x / c)`` with ``softcap = c``
    (scale first, then cap), ``s * x`` without; the slope is ``s * (1 - tanh^2)`` (None when no
    transform; ``s`` alone for a scale only: returned as a 0-d tensor). New tensors, never ``x``
    itself when a transform applies."""
    if softcap is None and scale is None:
        return x, None
    pre, cap = transform_factors(softcap, scale)
    pre32 = torch.tensor(pre, dtype=torch.float32, device=x.device)
    if softcap is None:
        return x * pre32, torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    t = torch.tanh(x * pre32)
    slope = (1.0 - t * t).mul_(1.0 if scale is None else float(scale))
    return t.mul_(cap), slope


def ce_forward(logits: Tensor, labels: Tensor, vocab_start: int, ignore_index: int, softcap: float | None = None,
               scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(m, lse, target)`` of the (transformed, see :func:`transform_logits`) logits: the
    row max (0 for a row of ``-inf`` only), the log-sum-exp relative to it and the target logit;
    see the backend contract."""
    n_rows, n_cols = logits.shape
    m = torch.zeros(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.zeros(n_rows, dtype=torch.float32, device=logits.device)
    target = torch.zeros(n_rows, dtype=torch.float32, device=logits.device)
    for rows in _row_chunks(n_rows, n_cols):
        x = transform_logits(logits[rows].float(), softcap, scale)[0]
        active = labels[rows] != ignore_index
        local, in_shard = _local_target(labels[rows], vocab_start, n_cols, ignore_index)
        # max-shifted by hand rather than torch.logsumexp: a +inf logit must give NaN, as
        # F.cross_entropy (and the Triton and C++ kernels) do, not +inf; and the shift is kept
        # apart from the log-sum-exp (m + log s would round log s away when |m| is large).
        row_max = x.amax(dim=1)
        row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
        m[rows] = torch.where(active, row_max, 0.0)
        row_lse = torch.exp(x - row_max.unsqueeze(1)).sum(dim=1).log()
        lse[rows] = torch.where(active, row_lse, 0.0)
        picked = x.gather(1, local.unsqueeze(1)).squeeze(1)
        target[rows] = torch.where(in_shard, picked, 0.0)
    return m, lse, target


def ce_backward(
    logits: Tensor,
    labels: Tensor,
    m: Tensor,
    lse: Tensor,
    coef: Tensor,
    vocab_start: int,
    ignore_index: int,
    out: Tensor,
    softcap: float | None = None,
    scale: float | None = None,
) -> None:
    """``out = (exp((z' - m) - lse) - onehot) * coef * dz'/dz`` row by row, ``z'`` the transformed
    logits (:func:`transform_logits`); ``out`` may alias ``logits``."""
    n_rows, n_cols = logits.shape
    for rows in _row_chunks(n_rows, n_cols):
        c = torch.where(labels[rows] == ignore_index, 0.0, coef[rows].float())
        local, in_shard = _local_target(labels[rows], vocab_start, n_cols, ignore_index)
        z, slope = transform_logits(logits[rows].float(), softcap, scale)
        g = z - m[rows].unsqueeze(1)  # a new buffer: never aliases logits
        g.sub_(lse[rows].unsqueeze(1)).exp_()
        g.scatter_add_(1, local.unsqueeze(1), -in_shard.float().unsqueeze(1))
        g.mul_(c.unsqueeze(1))
        if slope is not None:
            g.mul_(slope)
        g.masked_fill_((c == 0).unsqueeze(1), 0.0)
        out[rows].copy_(g)


def merge_stats(ms: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Merge the statistics of ``K`` pieces of the same rows (vocabulary shards or splits):
    ``ms``, ``lses`` ``[K, N]`` float32, each piece's ``(m, log(sum(exp(x - m))))`` -> the rows'
    ``(m [N], lse [N])`` over all pieces, still relative to the max (see the backend contract).

    Pieces whose row holds no finite logit (``lse = -inf``: a shard of a padded vocabulary masked
    with ``-inf``) weigh nothing; when no piece holds one, ``m = 0`` and ``lse = -inf``. NaN in
    any piece gives NaN."""
    neg_inf = float("-inf")
    holds = lses != neg_inf  # NaN counts as holding something: it must propagate
    m = torch.where(holds, ms, neg_inf).amax(dim=0)
    m = torch.where(m == neg_inf, 0.0, m)
    terms = torch.where(holds, (ms - m) + lses, neg_inf)
    return m, torch.exp(terms).sum(dim=0).log()


def segment_sum(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """``y[b] = x[cu_seqlens[b]:cu_seqlens[b+1]].sum()`` (float32, deterministic)."""
    return torch.segment_reduce(x.float(), "sum", offsets=cu_seqlens.long(), axis=0, unsafe=True)


# ------------------------------------------------------------------------------------------------
# group ops (SteerLM 2.0): softmax within consecutive groups, baseline / weight / KL
# ------------------------------------------------------------------------------------------------

#: NeMo's epsilon in the KL of the baseline phase.
EPS = 1e-8


def segment_ids(cu_groups: Tensor, n: int) -> Tensor:
    """``[n]`` int64: the group of each item (groups are non-empty and cover ``[0, n)``)."""
    lengths = cu_groups.diff()
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_groups.device), lengths,
                                   output_size=n)


def group_softmax(x: Tensor, cu_groups: Tensor, max_group: int) -> Tensor:
    """Softmax within each group ``x[cu_groups[g]:cu_groups[g+1]]``, float32 ``[B]``."""
    lengths = cu_groups.diff()
    xf = x.float()
    seg = segment_ids(cu_groups, x.shape[0])
    m = torch.segment_reduce(xf, "max", lengths=lengths, unsafe=True)
    e = torch.exp(xf - m[seg])
    return e / torch.segment_reduce(e, "sum", lengths=lengths, unsafe=True)[seg]


def steerlm2_weights(
    seq_nll: Tensor, log_q: Tensor, ws: Tensor, cu_groups: Tensor, max_group: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weight [B], baseline [B], kl [G])`` float32: ``baseline = group_softmax(-seq_nll - log_q)``,
    ``weight = ws - baseline``, ``kl[g] = sum (ws + EPS) log((ws + EPS) / (baseline + EPS))``."""
    baseline = group_softmax(-seq_nll.float() - log_q.float(), cu_groups, max_group)
    ws = ws.float()
    p = ws + EPS
    kl = torch.segment_reduce(p * torch.log(p / (baseline + EPS)), "sum", lengths=cu_groups.diff(), unsafe=True)
    return ws - baseline, baseline, kl
