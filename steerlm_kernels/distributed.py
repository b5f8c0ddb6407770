"""Tensor (vocabulary) and context parallelism: the one collective per group per call.

Vocabulary parallelism (``process_group``, Megatron's layout): rank ``r`` of ``tp`` ranks holds
columns ``[r * V_local, (r + 1) * V_local)`` of the logits; labels are global and replicated.
Each rank's kernel yields its local ``(lse_r, target_r)`` (``target_r`` is 0 unless the label falls
in the shard); ONE ``all_gather`` of ``[2N + 1]`` floats per rank (the partials plus the shard
width, to detect inconsistent shards) combines them: ``lse = logsumexp_r(lse_r)``,
``target = sum_r(target_r)``. Megatron's vocab-parallel cross entropy needs three all-reduces
(max, target logit, sum of exponentials). The backward needs no communication: each rank's
gradient is ``(exp(x - lse) - onehot) * coef`` on its own columns.

Context parallelism (``cp_group``): each rank holds a slice of every sequence; the per-sequence
sums are ONE ``all_reduce`` of ``[B]`` floats. Its backward is the identity (every rank computes
the same loss from the reduced sums, so each local partial receives the same gradient).

Errors: inconsistent shard widths raise ``ValueError`` (a device-side assert on CUDA). A rank
that fails before the collective leaves the others waiting until the process group's timeout
(``init_process_group(timeout=...)``), after which they raise: set a timeout that suits you.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from steerlm_kernels.validation import check_values


def group_size_rank(group: Any, name: str = "process_group") -> tuple[int, int]:
    """``(world size, rank)`` of ``group``; raises a clear error when torch.distributed is off."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{name} was given but torch.distributed is not initialised")
    return dist.get_world_size(group), dist.get_rank(group)


def check_groups(process_group: Any, cp_group: Any = None) -> None:
    """Groups are usable (torch.distributed initialised): checked before any kernel runs."""
    if process_group is not None:
        group_size_rank(process_group, "process_group")
    if cp_group is not None:
        group_size_rank(cp_group, "cp_group")


def vocab_shard(n_cols: int, process_group: Any) -> tuple[int, int]:
    """``(vocab_start, vocab_size)`` of this rank's contiguous shard of ``n_cols`` columns."""
    if process_group is None:
        return 0, n_cols
    world, rank = group_size_rank(process_group)
    return rank * n_cols, world * n_cols


def _all_gather_single(out: Tensor, mine: Tensor, group: Any) -> None:
    """``all_gather_single`` where torch has it (2.13 deprecates ``all_gather_into_tensor``), else the old name."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


def combine_vocab_partials(lse: Tensor, target: Tensor, n_cols: int, process_group: Any) -> tuple[Tensor, Tensor]:
    """The global ``(lse, target)`` from every rank's partials: one all_gather of 2N+1 floats."""
    world, _ = group_size_rank(process_group)
    n = lse.shape[0]
    mine = torch.cat([lse, target, lse.new_full((1,), float(n_cols))])
    everyone = mine.new_empty(world * (2 * n + 1))
    _all_gather_single(everyone, mine, process_group)
    everyone = everyone.view(world, 2 * n + 1)
    check_values(
        (everyone[:, -1] == float(n_cols)).all(),
        ValueError,
        f"process_group: every rank must hold a vocabulary shard of the same width (this rank: {n_cols})",
    )
    return torch.logsumexp(everyone[:, :n], dim=0), everyone[:, n:2 * n].sum(dim=0)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ``group`` in the forward; identity in the backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def sum_over_context(seq: Tensor, cp_group: Any) -> Tensor:
    """Per-sequence partial sums of this rank's tokens -> full-sequence sums (one all_reduce)."""
    if cp_group is None:
        return seq
    group_size_rank(cp_group, "cp_group")
    return _AllReduceSum.apply(seq, cp_group)
