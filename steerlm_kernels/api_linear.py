"""Fused linear losses: per-sequence NLL and the SteerLM 2.0 weighted loss from hidden states.

``linear_sequence_nll(hidden, W, labels, ...)`` equals ``sequence_nll(hidden @ W.T + bias, labels,
...)`` and ``linear_weighted_sequence_loss`` equals ``weighted_sequence_loss(hidden @ W.T + bias,
...)``, but the ``[N, V]`` logits are never held: every backend works on chunks of rows (a library
GEMM for the chunk's logits, the backend's cross-entropy kernels on it in place, two GEMMs for the
gradients), and the Triton backend can instead keep logits tiles on chip
(``STEERLM_KERNELS_LINEAR=tiles``, see :func:`steerlm_kernels.registry.linear_strategy`). The math
lives in :mod:`steerlm_kernels.ops.linear_cross_entropy`; this module validates, dispatches and
documents.

Conventions (beyond those of :mod:`steerlm_kernels.api`):

* ``hidden``: ``[B, S, H]`` or ``[N, H]`` (packed, with ``cu_seqlens``); float32, bfloat16 or
  float16. ``lm_head_weight``: ``[V, H]`` and ``bias``: ``[V]``, of ``hidden``'s dtype and device.
  Inputs are never modified. Inputs whose last dimension is not unit-stride are copied once.
* Precision: logits are accumulated in float32. A bfloat16 / float16 input gives logits chunks of
  its dtype (a GEMM with float32 accumulation, as ``hidden @ W.T`` itself); on CPU float16 is
  computed in float32 (a float32 copy of the weight is made: CPU float16 GEMMs are very slow). The
  Triton tile kernels keep the logits in float32. The statistics (log-sum-exp, target) and the
  per-element gradient are float32; ``grad_weight`` is accumulated in float32 across chunks.
* Gradients flow to ``hidden``, ``lm_head_weight`` and ``bias`` (whichever require grad), and to
  float ``loss_mask`` / ``weight`` / ``normalizer`` tensors that require grad.
* ``softcap`` / ``logit_scale``: as in :mod:`steerlm_kernels.api`, applied to each chunk's (or
  tile's) logits inside the backend's kernels, forward and backward; nothing extra is held.
* Determinism: values and gradients are deterministic on every backend with chunks (as
  deterministic as the GEMMs). The Triton tile kernels accumulate the gradients with float32
  atomic adds (run-to-run differences at float32 rounding level).
* ``chunk_size``: rows per logits chunk (default: ``2**26 // V`` rows, i.e. 256 MiB of float32,
  and at least 4096 rows on CUDA, where each further chunk costs a float32 pass over
  ``grad_weight``); the peak extra memory is ``O(N + chunk_size * V)`` plus the gradients.
  Ignored by the Triton tile kernels (their working set is a few tiles per program).

Parallelism (``torch.distributed`` groups; gloo on CPU, NCCL on GPU; Megatron-core's
``parallel_state`` groups work as they are):

* ``process_group`` (tensor / vocabulary parallelism, Megatron's layout): ``lm_head_weight`` is
  this rank's contiguous shard ``[V/tp, H]`` (rank ``r`` holds rows ``[r V/tp, (r+1) V/tp)``),
  ``bias`` its ``[V/tp]`` shard, ``hidden`` and ``labels`` are replicated (labels global, in
  ``[0, V)``). Each rank computes its local ``(m, lse, target)`` per token; ONE all-gather of
  ``3N`` floats per call combines them (after a 32-byte shape check, see
  :mod:`steerlm_kernels.distributed`). No collective in backward.
  **The gradient w.r.t. ``hidden`` is this rank's partial contribution** ``g_r @ W_r``: the full
  gradient is its sum over the group. Reduce it as for Megatron's column-parallel linear (whose
  input passes through ``copy_to_tensor_model_parallel_region``, an all-reduce in backward), or
  sum the gradients of replicated parameters yourself. ``lm_head_weight`` / ``bias`` get exactly
  their shard of the full gradient.
* ``cp_group`` (context parallelism): each rank passes its own tokens of every sequence (dense
  ``[B, S/cp, H]``, or packed with its local ``cu_seqlens``); the per-sequence sums are ONE
  all-reduce of ``[B]`` floats (identity in backward), so every rank gets the full-sequence
  results and the gradients of its own tokens (sum parameter gradients over the group, as
  Megatron's gradient all-reduce over data x context parallel ranks does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from steerlm_kernels import registry
from steerlm_kernels import validation as v
from steerlm_kernels.distributed import check_groups, sum_over_context, vocab_shard
from steerlm_kernels.ops.linear_cross_entropy import linear_nll_with_grad, linear_token_nll, shard_labels
from steerlm_kernels.ops.segment import segment_sum

__all__ = ["linear_sequence_nll", "linear_weighted_sequence_loss"]


def _local_labels(labels1d: Tensor, n_local: int, ignore_index: int, check_labels: bool,
                  process_group: Any) -> tuple[Tensor, bool]:
    """``(labels for the kernels, check_labels for the kernels)``. Under vocabulary parallelism
    the global labels are range-checked here against the full ``V = tp * V/tp`` (before any
    collective, so a bad label fails fast on its rank) and made shard-local."""
    if process_group is None:
        return labels1d, check_labels
    vocab_start, vocab_size = vocab_shard(n_local, process_group)
    if check_labels:
        v.check_label_range(labels1d, vocab_size, ignore_index)
    return shard_labels(labels1d, vocab_start, n_local, ignore_index), False


def _prepare(
    hidden: Any, lm_head_weight: Any, bias: Any, labels: Any, loss_mask: Any, ignore_index: Any, cu_seqlens: Any,
    chunk_size: Any, backend: Any,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor, Tensor | None, Tensor | None, tuple[str, int, str]]:
    """Validate everything before any kernel; return ``(hidden2d [N, H], lm_head_weight, bias,
    labels (orig shape), labels1d [N] with masked tokens set to ignore_index, mask1d [N] float32 or
    None, cu_seqlens or None, (strategy, chunk_rows, backend))``."""
    hidden = v.check_hidden(hidden)
    lm_head_weight, bias = v.check_lm_head(lm_head_weight, bias, hidden)
    labels = v.check_labels(labels, hidden, "hidden")
    v.check_int("ignore_index", ignore_index)
    chunk_rows = v.check_chunk_size(chunk_size)
    cu = v.check_sequences(labels, cu_seqlens)
    mask = v.check_loss_mask(loss_mask, labels)
    name = registry.resolve(backend, hidden.device)
    strategy = registry.linear_strategy(name)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden2d.stride(1) != 1:
        hidden2d = hidden2d.contiguous()
    if lm_head_weight.stride(1) != 1:
        lm_head_weight = lm_head_weight.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    labels1d = labels.reshape(-1).contiguous()
    mask1d = None
    if mask is not None:
        mask1d = mask.reshape(-1)
        labels1d = labels1d.masked_fill(mask1d == 0, ignore_index)
        mask1d = mask1d.to(torch.float32)
    return hidden2d, lm_head_weight, bias, labels, labels1d, mask1d, cu, (strategy, chunk_rows, name)


def linear_sequence_nll(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    loss_mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    cu_seqlens: Tensor | None = None,
    process_group: Any = None,
    cp_group: Any = None,
    check_labels: bool = True,
    chunk_size: int | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Per-sequence masked NLL of ``logits = hidden @ lm_head_weight.T + bias``, fused.

    Args:
        hidden: ``[B, S, H]`` (dense) or ``[T, H]`` (packed, with ``cu_seqlens``); float32 /
            bfloat16 / float16.
        lm_head_weight: ``[V, H]``, ``hidden``'s dtype and device.
        labels: int64 / int32, ``hidden.shape[:-1]``; ``ignore_index`` contributes 0.
        loss_mask: bool / int / float of the labels' shape, multiplying each token's NLL (tokens
            with mask 0 are skipped entirely).
        bias: optional ``[V]`` added to the logits.
        cu_seqlens: packed input: ``[B + 1]`` int32 / int64 offsets from 0 to ``T``.
        process_group: tensor-parallel group over which the vocabulary is split:
            ``lm_head_weight`` / ``bias`` are then this rank's shard ``[V/tp, H]`` / ``[V/tp]``
            (see the module notes; ``grad_hidden`` is this rank's partial contribution).
        cp_group: context-parallel group over which every sequence is split (``hidden`` /
            ``labels`` / ``loss_mask`` hold this rank's tokens); the result is the full-sequence sum.
        check_labels: raise ``IndexError`` for labels outside ``[0, V)``.
        chunk_size: rows per logits chunk (default: 256 MiB of float32, at least 4096 rows on CUDA).
        softcap: None, or ``c > 0``: the logits are soft-capped to ``c * tanh(z / c)`` before the
            softmax (Gemma 2 / 3's ``final_logit_softcapping``), inside the fused kernels.
        logit_scale: None, or ``s > 0``: the logits are multiplied by ``s`` (Cohere's
            ``logit_scale``; Granite's ``1 / logits_scaling``). Both: ``c * tanh(s * z / c)``
            (scale first). See :func:`steerlm_kernels.token_nll`.
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``.

    Returns:
        float32 ``[B]``, ``sum_t loss_mask * nll``; all-masked sequences give exactly 0.
        Differentiable w.r.t. ``hidden``, ``lm_head_weight`` and ``bias``: the backward recomputes
        the logits (the upstream gradient is only known then), so forward + backward costs four
        matmuls' worth of work. When no gradient is needed nothing is saved.
    """
    check_groups(process_group, cp_group)
    transform = v.check_logit_transform(softcap, logit_scale)
    hidden2d, lm_head_weight, bias, labels, labels1d, mask1d, cu, run = _prepare(
        hidden, lm_head_weight, bias, labels, loss_mask, ignore_index, cu_seqlens, chunk_size, backend
    )
    strategy, chunk_rows, name = run
    labels_k, check_k = _local_labels(labels1d, lm_head_weight.shape[0], ignore_index, check_labels, process_group)
    nll = linear_token_nll(hidden2d, lm_head_weight, bias, labels_k, ignore_index, check_k, strategy, chunk_rows,
                           name, process_group, *transform)
    if mask1d is not None:
        nll = nll * mask1d
    seq = segment_sum(nll, cu, name) if cu is not None else nll.view(labels.shape).sum(dim=-1)
    return sum_over_context(seq, cp_group)


def linear_weighted_sequence_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    loss_mask: Tensor | None,
    weight: Tensor,
    normalizer: Tensor | float,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    cu_seqlens: Tensor | None = None,
    process_group: Any = None,
    cp_group: Any = None,
    check_labels: bool = True,
    chunk_size: int | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """SteerLM 2.0 micro-batch loss ``sum_b weight[b] * seq_nll[b] / normalizer[b]`` of
    ``logits = hidden @ lm_head_weight.T + bias``, fused.

    Args:
        hidden, lm_head_weight, labels, loss_mask, bias, cu_seqlens, chunk_size, softcap, logit_scale: as
            :func:`linear_sequence_nll` (``B`` sequences).
        weight: ``[B]`` floating tensor (SteerLM's ``ws - baseline``; normally detached).
        normalizer: ``[B]`` tensor or a float; 0 only where ``weight`` is 0.
        process_group, cp_group: as :func:`linear_sequence_nll` (``weight`` / ``normalizer`` are
            per sequence, identical on every rank of both groups).

    Returns:
        0-d float32 tensor (with ``cp_group``: the full-sequence loss, the same on every rank).
        The per-token gradient coefficient ``weight / normalizer * mask`` is known in the
        forward, so the gradient w.r.t. ``hidden`` / ``lm_head_weight`` / ``bias`` is computed
        there, from the same logits chunk as the loss (three matmuls in all on CPU), held until
        backward (one ``hidden``-sized and one ``lm_head_weight``-sized buffer) and scaled there
        by the upstream scalar gradient. With ``process_group`` the gradient needs the global
        log-sum-exp, known only after the collective: the logits chunks are computed twice (a
        statistics pass, the collective, a gradient pass), i.e. four matmuls instead of three;
        still no collective in backward, and ``grad_hidden`` is this rank's partial (module notes).
    """
    check_groups(process_group, cp_group)
    transform = v.check_logit_transform(softcap, logit_scale)
    labels_t = v.check_tensor("labels", labels)
    weight = v.check_weight(weight, v.count_sequences(labels_t, cu_seqlens), labels_t.device)
    normalizer = v.check_normalizer(normalizer, weight)
    hidden2d, lm_head_weight, bias, labels, labels1d, mask1d, cu, run = _prepare(
        hidden, lm_head_weight, bias, labels, loss_mask, ignore_index, cu_seqlens, chunk_size, backend
    )
    n_seq = weight.shape[0]
    if cu is None and labels.shape[:-1] != (n_seq,):
        raise ValueError(
            f"weight must have one entry per sequence {tuple(labels.shape[:-1])}, got {tuple(weight.shape)}"
        )
    per_seq = weight.float() / torch.where(weight == 0, 1.0, normalizer)  # [B]
    if cu is None:
        coef = per_seq[:, None].expand(labels.shape).reshape(-1)
    else:
        positions = torch.arange(labels1d.shape[0], device=labels1d.device)
        seq_of_token = torch.searchsorted(cu[1:].to(torch.int64), positions, right=True)
        coef = per_seq[seq_of_token] if n_seq > 0 else per_seq.new_zeros(0)
    if mask1d is not None:
        coef = coef * mask1d
    coef = torch.where(labels1d == ignore_index, 0.0, coef)
    # loss = sum_b per_seq[b] * seq[b] with seq the (context-reduced) per-sequence sums of the
    # non-differentiable token NLLs, plus a zero-valued carrier of the hidden / lm_head_weight /
    # bias gradients computed in the forward. weight, normalizer and a float loss_mask get their
    # exact gradients through the O(N) glue (d loss / d weight[b] = full seq[b] / normalizer[b]).
    strategy, chunk_rows, name = run
    labels_k, check_k = _local_labels(labels1d, lm_head_weight.shape[0], ignore_index, check_labels, process_group)
    nll, carrier = linear_nll_with_grad(hidden2d, lm_head_weight, bias, labels_k, coef, ignore_index, check_k,
                                        strategy, chunk_rows, name, process_group, *transform)
    if mask1d is not None:
        nll = nll * mask1d
    seq = segment_sum(nll, cu, name) if cu is not None else nll.view(labels.shape).sum(dim=-1)
    loss = (per_seq * sum_over_context(seq, cp_group)).sum()
    return loss if carrier is None else loss + carrier
