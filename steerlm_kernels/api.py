"""Public API: validate, dispatch, document. No math lives here beyond O(N) glue.

All heavy work (anything that touches ``[N, V]`` logits) happens in the custom ops of
:mod:`steerlm_kernels.ops`; the per-token masking, the per-sequence sums and the
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
  when their logits are NaN. Hence, for a float mask that requires grad, ``d loss / d loss_mask``
  is 0 at those tokens (their NLL is never computed), not their NLL.
* Results are float32. All accumulation is float32; reductions are deterministic (no atomics).
* ``backend``: ``"auto"`` (default), ``"triton"``, ``"cpp"`` or ``"torch"``; see
  :func:`steerlm_kernels.backends`. ``$STEERLM_KERNELS_BACKEND`` overrides ``"auto"``.
* The NLL is formed relative to each row's max (``lse - (target - m)``, never ``m + lse``): a
  large common offset of the logits costs no precision (``token_nll`` of seven logits equal to
  ``1e8`` is ``log 7``).
* ``softcap`` / ``logit_scale`` (every loss): the logits are transformed to
  ``softcap * tanh(logit_scale * z / softcap)`` (either part optional) inside the kernels before
  the softmax; see :func:`token_nll`.
* ``torch.func``: ``grad``, ``vjp``, ``jacrev`` and ``vmap`` (of ``grad`` too) work on every loss of
  both families (``vmap`` runs the kernels once per example: PyTorch's batching fallback, which
  warns). Forward mode (``jvp``, ``torch.autograd.forward_ad``) is not supported: it raises
  PyTorch's ``NotImplementedError`` ("You must implement the jvp function ..."), never a
  silently zero tangent. Under a transform ``inplace_backward`` is ignored (out-of-place backward).
* Double backward is not supported: differentiating a gradient of these losses raises PyTorch's
  "trying to differentiate twice a function that was marked with @once_differentiable"
  ``RuntimeError`` (a first-order ``backward(create_graph=True)`` works).
* With ``process_group`` / ``cp_group``, every rank must pass the same shapes (rows ``N``, shard
  width, sequences ``B``): otherwise every rank raises ``ValueError`` naming the group argument
  (one extra 16-32 byte collective per call checks it; :mod:`steerlm_kernels.distributed`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from steerlm_kernels import registry
from steerlm_kernels import validation as v
from steerlm_kernels.distributed import check_groups, sum_over_context
from steerlm_kernels.ops.cross_entropy import token_nll_2d
from steerlm_kernels.ops.group import SegmentSoftmaxFunction, steerlm2_weights_by_sizes_op
from steerlm_kernels.ops.segment import segment_sum

__all__ = [
    "SteerLM2Weights",
    "segment_softmax",
    "sequence_nll",
    "steerlm2_weights",
    "token_nll",
    "weighted_sequence_loss",
]


def _flat_inputs(logits: Any, labels: Any, ignore_index: Any, backend: Any) -> tuple[Tensor, Tensor, Tensor, str]:
    """Validate, and return ``(logits2d [N, V], labels [orig shape], labels1d [N], backend name)``."""
    logits = v.check_logits(logits)
    labels = v.check_labels(labels, logits)
    v.check_int("ignore_index", ignore_index)
    name = registry.resolve(backend, logits.device)
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
    process_group: Any,
    softcap: Any = None,
    logit_scale: Any = None,
) -> tuple[Tensor, Tensor, str]:
    """``(mask * nll) [N]`` float32, the original labels, and the resolved backend."""
    transform = v.check_logit_transform(softcap, logit_scale)
    logits2d, labels, labels1d, name = _flat_inputs(logits, labels, ignore_index, backend)
    mask = v.check_loss_mask(loss_mask, labels)
    if mask is None:
        nll = token_nll_2d(logits2d, labels1d, ignore_index, check_labels, inplace_backward, name, process_group,
                           *transform)
        return nll, labels, name
    mask1d = mask.reshape(-1)
    labels1d = labels1d.masked_fill(mask1d == 0, ignore_index)
    nll = token_nll_2d(logits2d, labels1d, ignore_index, check_labels, inplace_backward, name, process_group,
                       *transform)
    return nll * mask1d.to(torch.float32), labels, name


def token_nll(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    process_group: Any = None,
    check_labels: bool = True,
    inplace_backward: bool = False,
    softcap: float | None = None,
    logit_scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Per-token negative log-likelihood ``-log softmax(z')[label]`` of the logits ``z``, or of their
    transform ``z' = softcap * tanh(logit_scale * z / softcap)`` when asked for.

    Args:
        logits: ``[B, S, V]`` or ``[N, V]``, float32 / bfloat16 / float16.
        labels: int64 / int32 of shape ``logits.shape[:-1]``.
        ignore_index: label value that contributes 0.
        process_group: tensor-parallel group over which the vocabulary is split: ``logits`` is
            then this rank's contiguous shard ``[..., V/tp]`` (Megatron's layout) and ``labels``
            are global. One collective of ``3N`` floats per call (after a 32-byte shape
            check); the backward needs none.
        check_labels: raise ``IndexError`` for labels outside ``[0, V)``.
        inplace_backward: write the gradient into ``logits``' storage (do not reuse the logits).
            Logits whose rows may overlap in memory (an expanded view, a row stride below ``V``)
            get the out-of-place backward instead: decided from sizes and strides, no data read.
        softcap: None, or ``c > 0``: the logits are soft-capped to ``c * tanh(z / c)`` before the
            softmax (Gemma 2 / 3's ``final_logit_softcapping``), inside the kernels (no transformed
            copy of the logits is made; the backward applies ``dz'/dz``).
        logit_scale: None, or ``s > 0``: the logits are multiplied by ``s`` before the softmax
            (Cohere's ``logit_scale``; Granite's ``1 / logits_scaling``). With both, the scale
            comes first: ``z' = c * tanh(s * z / c)``, ``dz'/dz = s * (1 - tanh^2)``. Non-finite
            or non-positive values raise ``ValueError`` naming the argument.
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``.

    Returns:
        float32 tensor of the labels' shape; 0 at ignored positions. Differentiable w.r.t.
        ``logits``.
    """
    check_groups(process_group)
    nll, labels, _ = _masked_token_nll(
        logits, labels, None, ignore_index, check_labels, inplace_backward, backend, process_group, softcap,
        logit_scale,
    )
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
    softcap: float | None = None,
    logit_scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Per-sequence masked NLL ``sum_t loss_mask[b, t] * nll[b, t]`` (``softcap`` / ``logit_scale``
    transform the logits first, as :func:`token_nll`).

    Dense input: ``logits [B, S, V]`` (or ``[B*S, V]``), ``labels``/``loss_mask [B, S]`` -> ``[B]``.
    Packed input: ``logits [T, V]``, ``labels``/``loss_mask [T]``, ``cu_seqlens [B + 1]`` (int32 /
    int64, from 0 to T) -> ``[B]``. All-masked sequences give exactly 0.

    Parallelism: ``process_group`` as :func:`token_nll` (``logits`` is this rank's vocabulary
    shard). ``cp_group``: the context-parallel group over which every sequence is split; each
    rank passes its own tokens (dense ``[B, S/cp]``, or packed with its local ``cu_seqlens``) and
    gets the full-sequence sums (one all-reduce of ``[B]`` floats; identity in the backward).

    When no gradient is needed (``torch.no_grad()`` or logits without ``requires_grad``: the
    SteerLM baseline phase) nothing is stored for backward: the logits are read once and only
    O(N) float32 temporaries exist.

    Returns:
        float32 ``[B]``, differentiable w.r.t. ``logits`` (and ``loss_mask`` if it is a float
        tensor that requires grad).
    """
    check_groups(process_group, cp_group)
    cu = v.check_sequences(labels, cu_seqlens)
    nll, labels, name = _masked_token_nll(
        logits, labels, loss_mask, ignore_index, check_labels, inplace_backward, backend, process_group, softcap,
        logit_scale,
    )
    seq = segment_sum(nll, cu, name) if cu is not None else nll.view(labels.shape).sum(dim=-1)
    return sum_over_context(seq, cp_group)


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
    softcap: float | None = None,
    logit_scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """SteerLM 2.0 micro-batch loss ``sum_b weight[b] * seq_nll[b] / normalizer[b]`` (``softcap`` /
    ``logit_scale`` transform the logits first, as :func:`token_nll`).

    Args:
        logits, labels, loss_mask, cu_seqlens: as :func:`sequence_nll` (``B`` sequences).
        weight: ``[B]`` floating tensor (SteerLM's ``ws - baseline``; normally detached).
        normalizer: ``[B]`` tensor or a float (NeMo's ``avg_num_valid_tokens_in_ub``). It may be 0
            (or anything) only where ``weight`` is 0; such sequences contribute exactly 0.
        inplace_backward: the backward writes the logits' gradient into their own storage, so no
            second ``[N, V]`` buffer is allocated; the caller must not reuse the logits. Logits
            whose rows may overlap in memory (expanded / overlapping views) fall back to the
            out-of-place backward (a gradient written over shared memory cannot be right).
        normalizer: finite and positive wherever ``weight`` is non-zero, whether a float or a
            tensor (0, negative, NaN or inf there raise ``ValueError``).

    Returns:
        0-d float32 tensor. The backward is one fused pass over the logits.
    """
    # Validate the O(B) arguments before any kernel runs.
    v.check_logit_transform(softcap, logit_scale)
    labels_t = v.check_tensor("labels", labels)
    weight = v.check_weight(weight, v.count_sequences(labels_t, cu_seqlens), labels_t.device)
    normalizer = v.check_normalizer(normalizer, weight)
    seq = sequence_nll(
        logits, labels, loss_mask, ignore_index=ignore_index, cu_seqlens=cu_seqlens,
        process_group=process_group, cp_group=cp_group, check_labels=check_labels,
        inplace_backward=inplace_backward, softcap=softcap, logit_scale=logit_scale, backend=backend,
    )
    if seq.shape != weight.shape:
        raise ValueError(f"weight must have one entry per sequence {tuple(seq.shape)}, got {tuple(weight.shape)}")
    safe_normalizer = torch.where(weight == 0, 1.0, normalizer)
    return (weight.float() / safe_normalizer * seq).sum()


# ------------------------------------------------------------------------------------------------
# group ops (SteerLM 2.0 baseline phase)
# ------------------------------------------------------------------------------------------------


class SteerLM2Weights(NamedTuple):
    """Result of :func:`steerlm2_weights` (all float32)."""

    weight: Tensor  #: [B] ws - baseline: the per-response weight of the training phase
    baseline: Tensor  #: [B] softmax within each group of -seq_nll - log_q
    distance: Tensor  #: 0-d: mean over groups of KL(ws || baseline) with NeMo's 1e-8 epsilons


def segment_softmax(x: Tensor, group_sizes: int | Tensor, *, backend: str = "auto") -> Tensor:
    """Softmax within consecutive groups of ``x``.

    Args:
        x: 1-D floating tensor ``[B]``.
        group_sizes: an int (every group that size; must divide ``B``) or a 1-D integer tensor of
            positive sizes summing to ``B``.

    Returns:
        float32 ``[B]``; differentiable w.r.t. ``x`` (also under ``torch.func.grad`` / ``vmap``).
        Traces with ``torch.compile(fullgraph=True)`` for both forms (see :func:`steerlm2_weights`).
    """
    x = v.check_vector("x", x)
    sizes = _group_sizes(group_sizes, x.shape[0], "group_sizes")
    return SegmentSoftmaxFunction.apply(x, sizes, "group_sizes", False, registry.resolve(backend, x.device))[0]


def _group_sizes(sizes: Any, total: int, name: str) -> Tensor:
    """The group structure as a tensor for the ``*_by_sizes`` ops: an int is checked here (it must
    divide ``total``) and becomes a CPU tensor of equal sizes; a tensor is passed as given and
    checked inside the op (its values are read there, on the host: no data-dependent branch in
    a ``torch.compile`` trace)."""
    if isinstance(sizes, int):  # bool included: group_offsets refuses it
        v.group_offsets(sizes, total, torch.device("cpu"), name)
        return torch.full((total // sizes,), sizes, dtype=torch.int64)
    return v.check_tensor(name, sizes)


def steerlm2_weights(
    seq_nll: Tensor, log_q: Tensor, ws: Tensor, num_responses: int | Tensor, *, backend: str = "auto"
) -> SteerLM2Weights:
    """SteerLM 2.0 baseline phase, fused: ``baseline = softmax_group(-seq_nll - log_q)``,
    ``weight = ws - baseline``, ``distance = mean_g sum_{i in g} (ws_i + 1e-8) log((ws_i + 1e-8) /
    (baseline_i + 1e-8))``.

    Args:
        seq_nll: ``[B]`` per-response NLL (from :func:`sequence_nll`).
        log_q: ``[B]`` ``log Q'(y|a,x)`` of each response under the sampling model.
        ws: ``[B]`` target importance weights, normalised per group by the data pipeline.
        num_responses: the group structure, as an int (all groups that size), a 1-D tensor of
            group sizes summing to ``B``, or NeMo's per-item ``batch["num_responses"]`` (``[B]``,
            each item holding its group's size; groups consecutive). Groups may differ in size.
            A tensor is read on the host inside the op (one small copy; a sync for CUDA sizes):
            the group structure shapes the launch. Under ``torch.compile(fullgraph=True)`` a
            tensor traces without a graph break (the op is opaque; its output shapes are the
            inputs'), and a bad structure raises the same ``ValueError`` at run time.

    Returns:
        :class:`SteerLM2Weights` ``(weight [B], baseline [B], distance 0-d)``, float32, not
        differentiable (SteerLM treats the weights as constants). With ``B = 0`` (no groups) the
        weights are empty and ``distance`` is 0 (not the NaN of an empty mean).
    """
    seq_nll = v.check_vector("seq_nll", seq_nll)
    b = seq_nll.shape[0]
    log_q = v.check_vector("log_q", log_q, b, seq_nll.device)
    ws = v.check_vector("ws", ws, b, seq_nll.device)
    sizes = _group_sizes(num_responses, b, "num_responses")
    with torch.no_grad():
        weight, baseline, distance = steerlm2_weights_by_sizes_op(
            seq_nll.detach(), log_q.detach(), ws.detach(), sizes, "num_responses", True,
            registry.resolve(backend, seq_nll.device),
        )
    return SteerLM2Weights(weight, baseline, distance)
