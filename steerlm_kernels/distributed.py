"""Tensor (vocabulary) and context parallelism: the one data collective per group per call.

Vocabulary parallelism (``process_group``, Megatron's layout): rank ``r`` of ``tp`` ranks holds
columns ``[r * V_local, (r + 1) * V_local)`` of the logits; labels are global and replicated.
Each rank's kernel yields its local ``(m_r, lse_r, target_r)`` (the row max, the log-sum-exp
relative to it, and the target logit, 0 unless the label falls in the shard); ONE
``all_gather`` of ``3N`` floats per rank combines them: ``m = max_r m_r`` over the shards that
hold a finite logit, ``lse = log(sum_r exp((m_r - m) + lse_r))``, ``target = sum_r target_r``.
Nothing is ever added to ``m``, so a large common offset costs no precision, and a shard whose
row is all ``-inf`` (a vocabulary padded to a multiple of ``tp`` and masked) has ``lse_r = -inf``
and weighs nothing. Megatron's vocab-parallel cross entropy needs three all-reduces (max, target
logit, sum of exponentials). The backward needs no communication: each rank's gradient is
``(exp((x - m) - lse) - onehot) * coef`` on its own columns.

Context parallelism (``cp_group``): each rank holds a slice of every sequence; the per-sequence
sums are ONE ``all_reduce`` of ``[B]`` floats. Its backward is the identity (every rank computes
the same loss from the reduced sums, so each local partial receives the same gradient).

Shapes that differ across ranks: a collective over buffers of different sizes cannot report the
mismatch itself (gloo aborts the process, or returns a silently wrong sum on one rank; NCCL hangs
or corrupts), and a rank's size cannot ride inside a buffer whose size depends on it. So before
its data collective each call runs :func:`check_same_sizes`: ONE ``all_reduce(MAX)`` of a fixed
``2k``-element int64 tensor (16 bytes per checked size: the sizes and their negations, giving the
largest and the smallest over the group). Cost: one latency-bound collective of 32 bytes
(``process_group``: rows ``N`` and shard width ``V_local``) or 16 bytes (``cp_group``: sequences
``B``) per call, microseconds on NVLink, ~0.1 ms on gloo over loopback; no extra host sync on
CPU tensors (the result is read where it lands). Every rank sees the same extremes, so every rank
raises the same ``ValueError`` naming the group argument (CPU tensors), or, on CUDA tensors, a
device-side assert with that message (no host sync on the hot path; the mismatched collective
is then never reached by a healthy stream).

Errors raised on one rank only (bad labels, a validation error) happen before any collective; the
other ranks then wait until the process group's timeout (``init_process_group(timeout=...)``),
after which they raise: set a timeout that suits you.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from steerlm_kernels.kernels.reference import merge_stats
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


def check_same_sizes(group: Any, name: str, sizes: dict[str, int], device: torch.device) -> None:
    """Raise ``ValueError`` naming ``name`` on EVERY rank of ``group`` unless every rank passes the
    same ``sizes`` (host ints): one ``all_reduce(MAX)`` of ``2 * len(sizes)`` int64 (see the module
    docstring), always of the same size, so it completes even when the sizes differ."""
    values = list(sizes.values())
    k = len(values)
    extremes = torch.tensor(values + [-x for x in values], dtype=torch.int64)
    if device.type != "cpu":  # a pageable host-to-device copy would wait for the stream: pin, copy async
        extremes = extremes.pin_memory().to(device, non_blocking=True)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    same = (extremes[:k] == -extremes[k:]).all()
    if device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(same):
            hi, lo = extremes[:k].tolist(), (-extremes[k:]).tolist()
            spread = ", ".join(f"{what} from {a} to {b} (this rank: {x})"
                               for what, x, a, b in zip(sizes, values, lo, hi, strict=True) if a != b)
            raise ValueError(f"{name}: every rank of the group must pass the same shapes; got {spread}")
        return
    check_values(same, ValueError, f"{name}: every rank of the group must pass the same shapes ({', '.join(sizes)})")


def _all_gather_single(out: Tensor, mine: Tensor, group: Any) -> None:
    """``all_gather_single`` where torch has it (2.13 deprecates ``all_gather_into_tensor``), else the old name."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


def combine_vocab_partials(
    m: Tensor, lse: Tensor, target: Tensor, n_cols: int, process_group: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """The global ``(m, lse, target)`` ``[N]`` float32 from every rank's partials (one size check,
    then one all_gather of 3N floats; see the module docstring)."""
    world, _ = group_size_rank(process_group)
    n = m.shape[0]
    check_same_sizes(process_group, "process_group", {"rows N": n, "vocabulary shard width": n_cols}, m.device)
    mine = torch.stack([m, lse, target]).reshape(-1)
    everyone = mine.new_empty(world * 3 * n)
    _all_gather_single(everyone, mine, process_group)
    ms, lses, targets = everyone.view(world, 3, n).unbind(1)  # [world, N] each
    m_all, lse_all = merge_stats(ms, lses)
    return m_all, lse_all, targets.sum(dim=0)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ``group`` in the forward; identity in the backward (see the module docstring)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, group: Any) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # forward / setup_context style: torch.func can run it
        pass

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def sum_over_context(seq: Tensor, cp_group: Any) -> Tensor:
    """Per-sequence partial sums of this rank's tokens -> full-sequence sums (one all_reduce)."""
    if cp_group is None:
        return seq
    group_size_rank(cp_group, "cp_group")
    check_same_sizes(cp_group, "cp_group", {"sequences B": seq.shape[0]}, seq.device)
    return _AllReduceSum.apply(seq, cp_group)
