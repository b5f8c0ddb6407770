"""Public API: validate, dispatch, document. No math lives here beyond O(N) glue.

All heavy work (anything that touches ``[N, V]`` logits) happens in the custom ops of
:mod:`steerlm_kernels.ops.cross_entropy`; the per-token masking, the per-sequence sums and the
weighting are small PyTorch ops on ``[N]``/``[B]`` tensors whose autograd produces the per-token
coefficient that the one-pass backward kernel consumes.

Conventions shared by every function:

* ``logits``: ``[B, S, V]`` or flattened ``[N, V]``; float32, bfloat16 or float16. Any layout
  whose last dimension has unit stride and whose leading dimensions flatten into one strided
  dimension is used in place; other layouts are copied once (``reshape``) before the kernel.
* ``labels``: int64 or int32, shape ``logits.shape[:-1]`` (with 2-D logits, any shape of ``N``
  elements). Labels equal to ``ignore_index`` contribute 0 and never index the vocabulary. Other
  labels outside ``[0, V)`` raise ``IndexError`` (on CUDA a device-side assert, without a host
  sync); ``check_labels=False`` skips the check in a hot loop (out-of-range labels then give
  undefined values, but nothing is ever read or written out of bounds).
* ``loss_mask``: bool, integer or float of the labels' shape; it multiplies each token's NLL.
  Tokens whose mask is exactly 0 are treated as ignored: their logits are never read (so prompt
  tokens cost no bandwidth), their labels are not checked, and they contribute exactly 0 even
  when their logits are NaN.
* Results are float32. All accumulation is float32; reductions are deterministic (no atomics).
* ``backend``: ``"auto"`` (default), ``"triton"``, ``"cpp"`` or ``"torch"``; see
  :func:`steerlm_kernels.backends`. ``$STEERLM_KERNELS_BACKEND`` overrides ``"auto"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from steerlm_kernels import _dispatch
from steerlm_kernels import _validate as v
from steerlm_kernels.ops.cross_entropy import token_nll_2d
from steerlm_kernels.ops.segment import segment_sum

__all__ = ["token_nll", "sequence_nll", "weighted_sequence_loss"]


def _no_groups(process_group: Any, cp_group: Any = None) -> None:
    # Tensor / context parallelism is delivered by the distributed issue; refuse loudly meanwhile.
    if process_group is not None:
        raise NotImplementedError("process_group (vocabulary parallelism) is not supported yet")
    if cp_group is not None:
        raise NotImplementedError("cp_group (context parallelism) is not supported yet")


def _flat_inputs(logits: Any, labels: Any, ignore_index: Any, backend: Any) -> tuple[Tensor, Tensor, Tensor, str]:
    """Validate, and return ``(logits2d [N, V], labels [orig shape], labels1d [N], backend name)``."""
    logits = v.check_logits(logits)
    labels = v.check_labels(labels, logits)
    v.check_int("ignore_index", ignore_index)
    name = _dispatch.resolve(backend, logits.device)
    logits2d = logits.reshape(-1, logits.shape[-1])
    if logits2d.stride(1) != 1:
        logits2d = logits2d.contiguous()
    return logits2d, labels, labels.reshape(-1).contiguous(), name


def _masked_token_nll(
    logits: Any,
    labels: Any,
    loss_mask: Any,
    ignore_index: int,
    check_labels: bool,
    inplace_backward: bool,
    backend: str,
) -> tuple[Tensor, Tensor, str]:
    """``(mask * nll) [N]`` float32, the original labels, and the resolved backend."""
    logits2d, labels, labels1d, name = _flat_inputs(logits, labels, ignore_index, backend)
    mask = v.check_loss_mask(loss_mask, labels)
    if mask is None:
        nll = token_nll_2d(logits2d, labels1d, ignore_index, check_labels, inplace_backward, name)
        return nll, labels, name
    mask1d = mask.reshape(-1)
    labels1d = labels1d.masked_fill(mask1d == 0, ignore_index)
    nll = token_nll_2d(logits2d, labels1d, ignore_index, check_labels, inplace_backward, name)
    return nll * mask1d.to(torch.float32), labels, name


def token_nll(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    process_group: Any = None,
    check_labels: bool = True,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Per-token negative log-likelihood ``-log softmax(logits)[label]``.

    Args:
        logits: ``[B, S, V]`` or ``[N, V]``, float32 / bfloat16 / float16.
        labels: int64 / int32 of shape ``logits.shape[:-1]``.
        ignore_index: label value that contributes 0.
        process_group: vocabulary-parallel group (not supported yet).
        check_labels: raise ``IndexError`` for labels outside ``[0, V)``.
        inplace_backward: write the gradient into ``logits``' storage (do not reuse the logits).
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``.

    Returns:
        float32 tensor of the labels' shape; 0 at ignored positions. Differentiable w.r.t.
        ``logits``.
    """
    _no_groups(process_group)
    nll, labels, _ = _masked_token_nll(logits, labels, None, ignore_index, check_labels, inplace_backward, backend)
    return nll.view(labels.shape)


def sequence_nll(
    logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor | None = None,
    *,
    ignore_index: int = -100,
    cu_seqlens: Tensor | None = None,
    process_group: Any = None,
    cp_group: Any = None,
    check_labels: bool = True,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Per-sequence masked NLL ``sum_t loss_mask[b, t] * nll[b, t]``.

    Dense input: ``logits [B, S, V]`` (or ``[B*S, V]``), ``labels``/``loss_mask [B, S]`` -> ``[B]``.
    Packed input: ``logits [T, V]``, ``labels``/``loss_mask [T]``, ``cu_seqlens [B + 1]`` (int32 /
    int64, from 0 to T) -> ``[B]``. All-masked sequences give exactly 0.

    When no gradient is needed (``torch.no_grad()`` or logits without ``requires_grad``: the
    SteerLM baseline phase) nothing is stored for backward: the logits are read once and only
    O(N) float32 temporaries exist.

    Returns:
        float32 ``[B]``, differentiable w.r.t. ``logits`` (and ``loss_mask`` if it is a float
        tensor that requires grad).
    """
    _no_groups(process_group, cp_group)
    cu = _check_sequences(labels, cu_seqlens)
    nll, labels, name = _masked_token_nll(
        logits, labels, loss_mask, ignore_index, check_labels, inplace_backward, backend
    )
    if cu is not None:
        return segment_sum(nll, cu, name)
    return nll.view(labels.shape).sum(dim=-1)


def _check_sequences(labels: Any, cu_seqlens: Any) -> Tensor | None:
    """Sequence structure: dense ``[B, S]`` labels, or packed ``[T]`` labels with ``cu_seqlens``."""
    labels = v.check_tensor("labels", labels)
    if cu_seqlens is not None:
        if labels.dim() != 1:
            raise ValueError(f"with cu_seqlens, labels must be 1-D [T] (packed), got shape {tuple(labels.shape)}")
        return v.check_cu_seqlens(cu_seqlens, labels.shape[0], labels.device)
    if labels.dim() < 2:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} hold no sequence dimension: pass [B, S] labels "
            "or packed [T] labels with cu_seqlens"
        )
    return None


def weighted_sequence_loss(
    logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor | None,
    weight: Tensor,
    normalizer: Tensor | float,
    *,
    ignore_index: int = -100,
    cu_seqlens: Tensor | None = None,
    process_group: Any = None,
    cp_group: Any = None,
    check_labels: bool = True,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> Tensor:
    """SteerLM 2.0 micro-batch loss ``sum_b weight[b] * seq_nll[b] / normalizer[b]``.

    Args:
        logits, labels, loss_mask, cu_seqlens: as :func:`sequence_nll` (``B`` sequences).
        weight: ``[B]`` floating tensor (SteerLM's ``ws - baseline``; normally detached).
        normalizer: ``[B]`` tensor or a float (NeMo's ``avg_num_valid_tokens_in_ub``). It may be 0
            only where ``weight`` is 0; such sequences contribute exactly 0.
        inplace_backward: the backward writes the logits' gradient into their own storage, so no
            second ``[N, V]`` buffer is allocated; the caller must not reuse the logits.

    Returns:
        0-d float32 tensor. The backward is one fused pass over the logits.
    """
    # Validate the O(B) arguments before any kernel runs.
    labels_t = v.check_tensor("labels", labels)
    n_seq = v.check_tensor("cu_seqlens", cu_seqlens).shape[0] - 1 if cu_seqlens is not None else (
        labels_t.shape[0] if labels_t.dim() >= 1 else 0
    )
    weight = v.check_weight(weight, n_seq, labels_t.device)
    normalizer = v.check_normalizer(normalizer, weight)
    seq = sequence_nll(
        logits, labels, loss_mask, ignore_index=ignore_index, cu_seqlens=cu_seqlens,
        process_group=process_group, cp_group=cp_group, check_labels=check_labels,
        inplace_backward=inplace_backward, backend=backend,
    )
    if seq.shape != weight.shape:
        raise ValueError(f"weight must have one entry per sequence {tuple(seq.shape)}, got {tuple(weight.shape)}")
    safe_normalizer = torch.where(weight == 0, 1.0, normalizer)
    return (weight.float() / safe_normalizer * seq).sum()
