"""The ``torch`` backend: plain PyTorch, chunked over rows.

It implements the backend contract of :mod:`steerlm_kernels.registry` on any device. Rows are
processed in chunks of at most ``CHUNK_ELEMENTS`` logits, so it never holds an ``[N, V]`` float32
temporary (its peak extra memory is a few chunk-sized float32 buffers plus O(N)). It is the
ground truth the fast backends are tested against (itself tested against float64 math).
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


def ce_forward(logits: Tensor, labels: Tensor, vocab_start: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per-row log-sum-exp and target logit; see the backend contract."""
    n_rows, n_cols = logits.shape
    lse = torch.zeros(n_rows, dtype=torch.float32, device=logits.device)
    target = torch.zeros(n_rows, dtype=torch.float32, device=logits.device)
    for rows in _row_chunks(n_rows, n_cols):
        x = logits[rows].float()
        active = labels[rows] != ignore_index
        local, in_shard = _local_target(labels[rows], vocab_start, n_cols, ignore_index)
        # max-shifted by hand rather than torch.logsumexp: a +inf logit must give NaN, as
        # F.cross_entropy (and the Triton and C++ kernels) do, not +inf.
        m = x.amax(dim=1, keepdim=True)
        row_lse = m.squeeze(1) + torch.exp(x - m).sum(dim=1).log()
        lse[rows] = torch.where(active, row_lse, 0.0)
        picked = x.gather(1, local.unsqueeze(1)).squeeze(1)
        target[rows] = torch.where(in_shard, picked, 0.0)
    return lse, target


def ce_backward(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    coef: Tensor,
    vocab_start: int,
    ignore_index: int,
    out: Tensor,
) -> None:
    """``out = (softmax(logits) - onehot) * coef`` row by row; ``out`` may alias ``logits``."""
    n_rows, n_cols = logits.shape
    for rows in _row_chunks(n_rows, n_cols):
        c = torch.where(labels[rows] == ignore_index, 0.0, coef[rows].float())
        local, in_shard = _local_target(labels[rows], vocab_start, n_cols, ignore_index)
        g = torch.exp(logits[rows].float() - lse[rows].unsqueeze(1))  # a new buffer: never aliases logits
        g.scatter_add_(1, local.unsqueeze(1), -in_shard.float().unsqueeze(1))
        g.mul_(c.unsqueeze(1))
        g.masked_fill_((c == 0).unsqueeze(1), 0.0)
        out[rows].copy_(g)


def segment_sum(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """``y[b] = x[cu_seqlens[b]:cu_seqlens[b+1]].sum()`` (float32, deterministic)."""
    return torch.segment_reduce(x.float(), "sum", offsets=cu_seqlens.long(), axis=0, unsafe=True)
