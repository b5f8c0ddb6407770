"""Drop-in losses for existing trainers: ``linear_cross_entropy``, ``cross_entropy`` and
``linear_token_logprobs``.

Argument names follow ``torch.nn.functional.linear_cross_entropy`` / ``cross_entropy`` where they
exist (``hidden, weight, target, bias``; ``ignore_index``; ``reduction``; ``label_smoothing``), Apple
Cut Cross-Entropy's ``shift`` and Hugging Face's ``num_items_in_batch`` (``num_items``).

Per-token loss (``z`` the token's logits row, ``z' = softcap * tanh(logit_scale * z / softcap)``,
either part optional; ``lse = log sum_j exp(z'_j)`` over the full vocabulary ``V``; ``y`` the label):

    l = (1 - label_smoothing) * (lse - z'_y) + label_smoothing * (lse - mean_j z'_j) + z_loss * lse^2,

multiplied by ``weight_per_token`` when given, and 0 where ``target == ignore_index``. Reductions:
``"none"`` (the target's shape), ``"sum"``, ``"mean"`` = sum / (number of non-ignored tokens, or
``num_items``); a mean over no token is 0, not NaN. See README "Drop-in losses" for the details.

The heavy work is in :mod:`steerlm_kernels.ops.dropin` (the existing forward / backward kernels plus
O(N) / rank-one corrections) and :mod:`steerlm_kernels.ops.token_logprobs`; this module validates,
shifts, composes the per-token loss and reduces.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from steerlm_kernels import registry
from steerlm_kernels import validation as v
from steerlm_kernels.distributed import check_groups, vocab_shard
from steerlm_kernels.ops.dropin import CEStatsFunction, LinearCEFusedFunction, LinearCEStatsFunction
from steerlm_kernels.ops.linear_cross_entropy import grads_needed, shard_labels
from steerlm_kernels.ops.token_logprobs import TokenLogprobsFunction

__all__ = ["cross_entropy", "linear_cross_entropy", "linear_token_logprobs"]

REDUCTIONS = ("none", "sum", "mean")


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


def _check_target(target: Any, rows_of: Tensor, rows_name: str) -> Tensor:
    target = v.check_tensor("target", target)
    if target.dtype not in v.LABEL_DTYPES:
        raise TypeError(f"target must be int64 or int32, got {target.dtype}")
    if target.device != rows_of.device:
        raise ValueError(f"target is on {target.device} but {rows_name} is on {rows_of.device}")
    if target.shape != rows_of.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(rows_of.shape[:-1])} ({rows_name}.shape[:-1]), "
                         f"got {tuple(target.shape)}")
    return target


def _check_head(weight: Any, bias: Any, hidden: Tensor) -> tuple[Tensor, Tensor | None]:
    weight = v.check_tensor("weight", weight)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with V >= 1 and H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got shape {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if bias is None:
        return weight, None
    bias = v.check_tensor("bias", bias)
    if bias.dtype != hidden.dtype:
        raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}] (one per row of weight), got {tuple(bias.shape)}")
    if bias.device != hidden.device:
        raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    return weight, bias.contiguous()


def _check_float(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
        bound = f"{'(' if low_open else '['}{low}, {high}{']' if math.isfinite(high) else ')'}"
        raise ValueError(f"{name} must be a finite number in {bound}, got {value}")
    return value


def check_transform(softcap: Any, logit_scale: Any) -> tuple[float | None, float | None]:
    """``(softcap, logit_scale)``: each None or a finite positive float."""
    cap = None if softcap is None else _check_float("softcap", softcap, 0.0, low_open=True)
    scale = None if logit_scale is None else _check_float("logit_scale", logit_scale, 0.0, low_open=True)
    return cap, scale


class _Options:
    """The validated loss options shared by both cross entropies."""

    def __init__(self, ignore_index: Any, reduction: Any, label_smoothing: Any, softcap: Any, logit_scale: Any,
                 z_loss: Any, shift: Any, num_items: Any, return_lse: Any) -> None:
        self.ignore_index = v.check_int("ignore_index", ignore_index)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.label_smoothing = _check_float("label_smoothing", label_smoothing, 0.0, 1.0)
        self.transform = check_transform(softcap, logit_scale)
        self.z_loss = _check_float("z_loss", z_loss, 0.0)
        for name, flag in (("shift", shift), ("return_lse", return_lse)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        self.shift, self.return_lse = shift, return_lse
        self.num_items = _check_num_items(num_items, reduction)

    @property
    def want_lse(self) -> bool:
        return self.return_lse or self.z_loss > 0 or self.label_smoothing > 0

    @property
    def want_sum(self) -> bool:
        return self.label_smoothing > 0


def _check_num_items(num_items: Any, reduction: str) -> int | float | Tensor | None:
    if num_items is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items divides the summed loss of reduction='mean'; got reduction={reduction!r}")
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1 or num_items.dtype.is_complex or num_items.dtype == torch.bool:
            raise ValueError(f"num_items must be a number or a one-element real tensor, got shape "
                             f"{tuple(num_items.shape)} {num_items.dtype}")
        return num_items.reshape(())
    return _check_float("num_items", num_items, 0.0)


def _check_weight_per_token(weight_per_token: Any, target: Tensor) -> Tensor | None:
    if weight_per_token is None:
        return None
    w = v.check_tensor("weight_per_token", weight_per_token)
    if not w.dtype.is_floating_point:
        raise TypeError(f"weight_per_token must be a floating-point tensor, got {w.dtype}")
    if w.shape != target.shape:
        raise ValueError(f"weight_per_token must have the target's shape {tuple(target.shape)}, got {tuple(w.shape)}")
    if w.device != target.device:
        raise ValueError(f"weight_per_token is on {w.device} but target is on {target.device}")
    return w


# ------------------------------------------------------------------------------------------------
# shared glue
# ------------------------------------------------------------------------------------------------


def _shifted(x: Tensor, fill: float | int) -> Tensor:
    """``x[..., 1:]`` followed by ``fill`` (same shape as ``x``): position ``t`` holds ``x[..., t+1]``.
    Used instead of slicing the hidden states / logits, whose flattening would copy them."""
    return torch.cat([x[..., 1:], torch.full_like(x[..., :1], fill)], dim=-1)


def _flat_labels(target: Tensor, weight_per_token: Tensor | None,
                 opts: _Options) -> tuple[Tensor, Tensor | None]:
    """``(labels [N], weights [N] or None)`` in row order, shifted when ``opts.shift``."""
    if opts.shift:
        target = _shifted(target, opts.ignore_index)
        if weight_per_token is not None:
            weight_per_token = _shifted(weight_per_token, 0)
    w = None if weight_per_token is None else weight_per_token.reshape(-1)
    return target.reshape(-1).contiguous(), w


def _finish(nll: Tensor, lse: Tensor, zsum: Tensor, labels: Tensor, weights: Tensor | None, n_vocab: int,
            shape: torch.Size, opts: _Options) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token loss from ``(nll, lse, zsum)`` ``[N]``, then the reduction (and the lse)."""
    valid = labels != opts.ignore_index
    loss = nll
    if opts.label_smoothing > 0:
        eps = opts.label_smoothing
        loss = (1.0 - eps) * nll + eps * (lse - zsum / n_vocab)
    if opts.z_loss > 0:
        loss = loss + opts.z_loss * lse * lse
    if weights is not None:  # read only at non-ignored tokens (a NaN weight there stays out)
        loss = loss * torch.where(valid, weights.float(), 0.0)
    loss = torch.where(valid, loss, 0.0)
    if opts.reduction == "none":
        out = _unshift(loss.view(shape), opts)
    elif opts.reduction == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / _denominator(valid, opts)
    if opts.return_lse:
        return out, _unshift(lse.view(shape), opts)
    return out


def _denominator(valid: Tensor, opts: _Options) -> Tensor | float:
    """``mean``'s divisor: ``num_items``, or the count of non-ignored tokens (a device tensor: no
    host sync); 0 becomes 1 (a mean over nothing is 0, not NaN)."""
    den = valid.sum() if opts.num_items is None else opts.num_items
    if isinstance(den, Tensor):
        return torch.where(den == 0, 1, den).to(torch.float32)
    return den if den != 0 else 1.0


def _fused_coefficients(labels: Tensor, weights: Tensor | None, n_vocab: int,
                        opts: _Options) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(c_nll + c_lse, c_lse, c_sum)`` ``[N]`` float32: ``d loss / d (nll, lse, zsum)`` of a
    ``sum`` / ``mean`` loss without z-loss, known before any logit is computed."""
    valid = labels != opts.ignore_index
    scale = 1.0 / (_denominator(valid, opts) if opts.reduction == "mean" else 1.0)
    w = torch.ones_like(labels, dtype=torch.float32) if weights is None else weights.detach().float()
    w = torch.where(valid, w * scale, 0.0)
    eps = opts.label_smoothing
    if eps == 0:
        return w, None, None
    return w, w * eps, w * (-eps / n_vocab)


def _unshift(x: Tensor, opts: _Options) -> Tensor:
    """Drop the last position (it predicts nothing) of a per-token result when shifting."""
    return x[..., :-1] if opts.shift else x


# ------------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------------


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
    z_loss: float = 0.0,
    weight_per_token: Tensor | None = None,
    shift: bool = False,
    num_items: int | float | Tensor | None = None,
    process_group: Any = None,
    return_lse: bool = False,
    check_labels: bool = True,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross entropy of ``logits = hidden @ weight.T + bias`` without ever holding ``[N, V]`` logits.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 (e.g. the final hidden states ``[B, S, H]``).
        weight: ``[V, H]`` (the LM head), ``hidden``'s dtype and device. bias: optional ``[V]``.
        target: int64 / int32 of shape ``hidden.shape[:-1]``; ``ignore_index`` contributes 0.
        reduction: ``"none"`` (float32 of the target's shape, 0 where ignored), ``"sum"`` or
            ``"mean"`` (the sum divided by the number of non-ignored tokens, or by ``num_items``;
            0 when there is nothing to divide: never NaN).
        label_smoothing: PyTorch's: ``(1 - eps) * nll + eps * (lse - mean_j z'_j)``, the mean over
            the FULL vocabulary (also under tensor parallelism). Not supported with ``softcap``
            (``ValueError``; :func:`cross_entropy` supports it).
        softcap, logit_scale: ``z' = softcap * tanh(logit_scale * z / softcap)`` (either optional).
        z_loss: adds ``z_loss * lse^2`` per token (PaLM).
        weight_per_token: float tensor of the target's shape multiplying each token's loss
            (differentiable); ``mean`` stays ``sum(w * l) / count`` (count of non-ignored tokens, or
            ``num_items``), not a weighted average.
        shift: Cut Cross-Entropy's causal shift: ``hidden[..., t, :]`` predicts ``target[..., t + 1]``
            (and ``weight_per_token[..., t + 1]`` weighs it); the last position predicts nothing.
            ``reduction="none"`` (and the lse) then have shape ``target.shape[:-1] + (S - 1,)``.
        num_items: ``reduction="mean"`` only: divide by this instead of the count (Hugging Face's
            ``num_items_in_batch`` for gradient accumulation); int, float or one-element tensor
            (read on the device: no host sync). 0 divides by 1.
        process_group: vocabulary parallelism: ``weight`` / ``bias`` are this rank's contiguous
            shard ``[V/tp, H]`` / ``[V/tp]``, ``target`` global; ONE data collective per call
            (``3N`` floats, ``4N`` with label smoothing); ``hidden``'s gradient is this rank's
            partial (sum it over the group, as Megatron's column-parallel linear does).
        return_lse: also return the per-token ``lse`` (float32, shape as ``reduction="none"``, 0 at
            ignored tokens, differentiable).
        check_labels: raise ``IndexError`` for a target outside ``[0, V)`` (not ``ignore_index``).
        chunk_size: rows per logits chunk (default: 256 MiB of float32 logits).
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``.

    Returns:
        the loss (float32), or ``(loss, lse)`` with ``return_lse``. Differentiable once w.r.t.
        ``hidden``, ``weight``, ``bias`` and ``weight_per_token``.
    """
    check_groups(process_group)
    hidden = v.check_hidden(hidden)
    weight, bias = _check_head(weight, bias, hidden)
    target = _check_target(target, hidden, "hidden")
    opts = _Options(ignore_index, reduction, label_smoothing, softcap, logit_scale, z_loss, shift, num_items,
                    return_lse)
    if opts.label_smoothing > 0 and opts.transform[0] is not None:
        raise ValueError("label_smoothing with softcap is not supported by linear_cross_entropy (the uniform "
                         "term is not rank one); use cross_entropy on the logits")
    w_tok = _check_weight_per_token(weight_per_token, target)
    chunk_rows = v.check_chunk_size(chunk_size)
    name = registry.resolve(backend, hidden.device)
    strategy = registry.linear_strategy(name)
    labels, w_flat = _flat_labels(target, w_tok, opts)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden2d.stride(1) != 1:
        hidden2d = hidden2d.contiguous()
    n_local = weight.shape[0]
    labels_k, check_k = labels, check_labels
    vocab_start, n_vocab = vocab_shard(n_local, process_group)
    if process_group is not None:
        if check_labels:
            v.check_label_range(labels, n_vocab, opts.ignore_index)
        labels_k, check_k = shard_labels(labels, vocab_start, n_local, opts.ignore_index), False
    need = grads_needed(hidden, weight, bias)
    if any(need) and opts.reduction != "none" and opts.z_loss == 0 and not opts.return_lse and process_group is None:
        # the per-token coefficients are known now: gradients from the forward's logits chunks
        coef, c_lse, c_sum = _fused_coefficients(labels, w_flat, n_vocab, opts)
        carrier, nll, lse, zsum = LinearCEFusedFunction.apply(
            hidden2d, weight, bias, labels_k, coef, c_lse, c_sum, opts.ignore_index, check_k, strategy, chunk_rows,
            name, opts.transform, *need,
        )[:4]
        return _finish(nll, lse, zsum, labels, w_flat, n_vocab, target.shape, opts) + carrier
    nll, lse, zsum = LinearCEStatsFunction.apply(
        hidden2d, weight, bias, labels_k, opts.ignore_index, check_k, strategy, chunk_rows, name, process_group,
        opts.want_lse, opts.want_sum, opts.transform,
    )[:3]
    return _finish(nll, lse, zsum, labels, w_flat, n_vocab, target.shape, opts)


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
    z_loss: float = 0.0,
    weight_per_token: Tensor | None = None,
    shift: bool = False,
    num_items: int | float | Tensor | None = None,
    process_group: Any = None,
    return_lse: bool = False,
    check_labels: bool = True,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross entropy of ``logits [..., V]`` (float32 / bfloat16 / float16) and ``target [...]``, with
    the options of :func:`linear_cross_entropy` (label smoothing works with ``softcap`` here).

    The logits are never copied or modified (a layout whose leading dimensions do not flatten is
    copied once). ``process_group``: ``logits`` is this rank's vocabulary shard ``[..., V/tp]``.
    Returns the loss (float32), or ``(loss, lse)``; differentiable once w.r.t. ``logits`` and
    ``weight_per_token``.
    """
    check_groups(process_group)
    logits = v.check_rows_input("logits", logits, "V")
    target = _check_target(target, logits, "logits")
    opts = _Options(ignore_index, reduction, label_smoothing, softcap, logit_scale, z_loss, shift, num_items,
                    return_lse)
    w_tok = _check_weight_per_token(weight_per_token, target)
    name = registry.resolve(backend, logits.device)
    labels, w_flat = _flat_labels(target, w_tok, opts)
    logits2d = logits.reshape(-1, logits.shape[-1])
    if logits2d.stride(1) != 1:
        logits2d = logits2d.contiguous()
    n_vocab = vocab_shard(logits.shape[-1], process_group)[1]
    nll, lse, zsum = CEStatsFunction.apply(logits2d, labels, opts.ignore_index, check_labels, name, process_group,
                                           opts.want_lse, opts.want_sum, opts.transform)[:3]
    return _finish(nll, lse, zsum, labels, w_flat, n_vocab, target.shape, opts)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
    return_entropy: bool = False,
    cu_seqlens: Tensor | None = None,
    ignore_index: int = -100,
    process_group: Any = None,
    check_labels: bool = True,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token ``log softmax(z' / temperature)[label]`` (and the entropy of that distribution) of
    ``z = hidden @ weight.T + bias``, ``z' = softcap * tanh(logit_scale * z / softcap)`` (either part
    optional: the model's logit scale / soft cap, applied before the temperature, as a Hugging Face
    model followed by TRL's division), never holding ``[N, V]`` (chunks of rows).

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16; weight: ``[V, H]`` (the LM head);
            bias: optional ``[V]``; all one dtype and device. The logits chunk is computed in
            that dtype, as the model's LM head would (float16 on CPU: float32), then float32.
        labels: int64 / int32 of shape ``hidden.shape[:-1]`` (the already shifted next tokens);
            ``ignore_index`` gives log-probability 0 and entropy 0.
        temperature: positive float dividing the (scaled, capped) logits.
        softcap, logit_scale: the model's logit transform (Gemma 2/3, Cohere, Granite), or None.
        return_entropy: also return the per-token entropy ``lse - sum_j p_j u_j`` (nats).
        cu_seqlens: packed sequences: ``hidden [T, H]``, ``labels [T]``, ``cu_seqlens [B + 1]``
            (int32 / int64, 0 to ``T``, non-decreasing). Checked, and nothing else: a token's
            log-probability depends only on its own row, so packing changes no value (the result
            is ``[T]``, equal to the per-sequence results concatenated); pass the labels already
            shifted within each sequence (the last token of a sequence predicts nothing: give it
            ``ignore_index``).
        process_group: vocabulary parallelism: ``weight`` / ``bias`` are this rank's contiguous
            shard, ``labels`` global; ONE all_gather of ``4N`` floats; ``hidden``'s gradient is this
            rank's partial (sum it over the group).
        check_labels: raise ``IndexError`` for labels outside ``[0, V)`` (not ``ignore_index``).
        chunk_size: rows per logits chunk (default: 256 MiB of float32 logits).

    Returns:
        float32 log-probabilities of the labels' shape (``<= 0``), or ``(logprobs, entropy)``.
        Differentiable once through both w.r.t. ``hidden``, ``weight`` and ``bias``. The forward
        is the same code with and without autograd: a ``torch.no_grad()`` scoring pass and a
        training pass give bit-identical log-probabilities (CPU; the same kernels on a GPU).
    """
    check_groups(process_group)
    hidden = v.check_hidden(hidden)
    weight, bias = _check_head(weight, bias, hidden)
    if isinstance(labels, Tensor) and labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden.shape[:-1]), "
                         f"got {tuple(labels.shape)}")
    labels = v.check_labels(labels, hidden, "hidden")
    ignore_index = v.check_int("ignore_index", ignore_index)
    temp = _check_float("temperature", temperature, 0.0, low_open=True)
    cap, scale = check_transform(softcap, logit_scale)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    if cu_seqlens is not None:
        if hidden.dim() != 2:
            raise ValueError(f"with cu_seqlens, hidden must be packed [T, H], got shape {tuple(hidden.shape)}")
        v.check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device)
    chunk_rows = v.check_chunk_size(chunk_size)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden2d.stride(1) != 1:
        hidden2d = hidden2d.contiguous()
    labels1d = labels.reshape(-1).contiguous()
    n_local = weight.shape[0]
    vocab_start, n_vocab = vocab_shard(n_local, process_group)
    if check_labels:
        v.check_label_range(labels1d, n_vocab, ignore_index)
    labels_k = labels1d
    if process_group is not None:
        labels_k = shard_labels(labels1d, vocab_start, n_local, ignore_index)
    logprob, entropy = TokenLogprobsFunction.apply(hidden2d, weight, bias, labels_k, ignore_index, temp, cap, scale,
                                                   chunk_rows, process_group)[:2]
    logprob = logprob.view(labels.shape)
    return (logprob, entropy.view(labels.shape)) if return_entropy else logprob
