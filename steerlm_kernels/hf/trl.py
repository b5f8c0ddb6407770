"""TRL's per-token log-probabilities through :func:`steerlm_kernels.linear_token_logprobs`.

TRL 1.16's trainers (``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``, ``RLOOTrainer``, ``KTOTrainer``)
never form the logits themselves: their constructors call ``trl.trainer.utils.add_fused_lm_head(model,
temperature=, cast_lm_head_to_fp32=, outputs=)``, which wraps ``model.forward`` so that
``model(..., labels=labels, fused_lm_head=True)`` returns a ``FusedCausalLMOutput`` (per-token
``log_probs`` of the next-token labels, ``entropy``, ... ``[B, S - 1]``, 0 where the label is ``-100``;
``loss = -sum(log_probs) / (count or num_items_in_batch)``) computed by TRL's chunked kernel. Every
per-token log-probability of those trainers (the policy's, the reference model's, GRPO's old policy's)
comes from that call.

This module supplies the same contract computed by the kernel library:

* :func:`add_fused_lm_head` - TRL's signature and output, with ``log_probs`` and ``entropy`` from
  :func:`steerlm_kernels.linear_token_logprobs` (differentiable through both; never ``[N, V]``;
  identical bit for bit in a no-grad scoring pass and a training pass). The metric-only fields TRL
  can ask for (``is_top1``, ``mean_logits``, ``log_sum_sq_probs``: no gradient) take one more
  chunked no-grad pass over the head (SFT asks for ``is_top1``, DPO for ``mean_logits`` and
  ``is_top1``; GRPO for none).
* :func:`use_steerlm_kernels` - a context manager: TRL trainers constructed inside it install ours
  instead of TRL's.
* :class:`SFTTrainer`, :class:`DPOTrainer`, :class:`GRPOTrainer` - TRL's trainers constructed that way
  (same arguments); ``from steerlm_kernels.hf.trl import DPOTrainer`` is the one-line switch.

Served models: those :func:`steerlm_kernels.hf.heads.find_head` accepts (logits = ``lm_head(final
hidden)``, optionally soft-capped or scaled, with or without a head bias; a ``logit_scale`` is folded into
the hidden states, ``linear_token_logprobs`` taking none). Not served:
vision-language wrappers, sequence/context parallelism (TRL's ``shift_labels`` path is honoured but
the ranks' sums are TRL's business), DeepSpeed ZeRO-3 is untested.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

try:
    import trl
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as exc:  # pragma: no cover - exercised only without TRL
    raise ImportError(f"steerlm_kernels.hf.trl needs TRL >= 1.16 (pip install 'trl>=1.16'): {exc}") from exc

from steerlm_kernels import linear_token_logprobs
from steerlm_kernels.hf.heads import LogitTransform, find_head
from steerlm_kernels.hf.patch import autocast_operands

__all__ = [
    "DPOTrainer",
    "GRPOTrainer",
    "METRIC_FIELDS",
    "SFTTrainer",
    "TRAINER_MODULES",
    "add_fused_lm_head",
    "token_metrics",
    "use_steerlm_kernels",
]

#: TRL's trainer modules that import ``add_fused_lm_head`` (swapped by :func:`use_steerlm_kernels`).
TRAINER_MODULES = ("sft_trainer", "dpo_trainer", "grpo_trainer", "rloo_trainer", "kto_trainer")
#: The no-gradient per-token fields of ``FusedCausalLMOutput`` computed by :func:`token_metrics`.
METRIC_FIELDS = ("log_sum_sq_probs", "mean_logits", "is_top1")
_FIELDS = ("log_probs", "entropy", *METRIC_FIELDS)
#: float32 logits per chunk of :func:`token_metrics` (64 MiB).
_METRIC_CHUNK_ELEMS = 1 << 24


def token_metrics(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, transform: LogitTransform,
                  temperature: float, fields: tuple[str, ...]) -> dict[str, Tensor]:
    """TRL's metric-only per-token fields of ``z = transform(hidden @ weight.T + bias) / temperature``.

    Args:
        hidden: ``[N, H]``; weight: ``[V, H]``; bias: ``[V]`` or None; labels: ``[N]`` int64 in ``[0, V)``.
        fields: among :data:`METRIC_FIELDS`.

    The logits are computed in ``hidden``'s dtype (as the model's head), then float32.
    Returns ``{field: [N]}``: ``is_top1`` bool (the label is the first arg-max, as TRL's kernel),
    ``mean_logits`` float32 (mean of ``z`` over ``V``), ``log_sum_sq_probs`` float32 (``log sum_v p_v^2``).
    No gradient; rows are processed in chunks of at most 64 MiB of float32 logits.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    out = {f: torch.empty(n, device=hidden.device, dtype=torch.bool if f == "is_top1" else torch.float32)
           for f in fields}
    rows = max(1, _METRIC_CHUNK_ELEMS // max(vocab, 1))
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, n, rows):
            z = torch.nn.functional.linear(hidden[start:start + rows], weight, bias).float()  # the head's dtype
            z = transform.apply(z) / temperature
            if "is_top1" in out:
                out["is_top1"][start:start + rows] = z.argmax(-1) == labels[start:start + rows]
            if "mean_logits" in out:
                out["mean_logits"][start:start + rows] = z.mean(-1)
            if "log_sum_sq_probs" in out:
                out["log_sum_sq_probs"][start:start + rows] = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
    return out


def _per_token(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, transform: LogitTransform,
               temperature: float, fields: tuple[str, ...], fp32: bool) -> dict[str, Tensor | None]:
    """The requested fields for the valid rows ``hidden [n, H]`` / ``labels [n]``."""
    if fp32:  # TRL's cast_lm_head_to_fp32: float32 outside autocast
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    else:  # as the model's head (and TRL's kernel) would: autocast's dtype when autocast is on
        hidden, weight, bias = autocast_operands(hidden, weight, bias)
    h, w, b = hidden, weight, bias
    if transform.logit_scale is not None:  # s * (h W^T + b) = (s h) W^T + s b
        h = h * transform.logit_scale
        b = None if b is None else b * transform.logit_scale
    want_entropy = "entropy" in fields
    with torch.autocast(h.device.type, enabled=False):  # the operands are in the head's dtype already
        res = linear_token_logprobs(h, w, labels, bias=b, temperature=temperature, softcap=transform.softcap,
                                    return_entropy=want_entropy)
    log_probs, entropy = res if want_entropy else (res, None)
    out: dict[str, Tensor | None] = {"log_probs": log_probs, "entropy": entropy}
    metrics = tuple(f for f in METRIC_FIELDS if f in fields)
    out.update(dict.fromkeys(METRIC_FIELDS))
    if metrics:
        out.update(token_metrics(hidden, weight, bias, labels, transform, temperature, metrics))
    return out


def add_fused_lm_head(
    model: torch.nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
) -> None:
    """TRL's ``add_fused_lm_head`` (same arguments and output) computed with the kernel library.

    After it, ``model(..., labels=labels [B, S], fused_lm_head=True)`` runs the model's own forward with
    the LM head intercepted (:meth:`steerlm_kernels.hf.heads.CausalLMHead.intercept`: no ``[B, S, V]``)
    and returns TRL's ``FusedCausalLMOutput``: per-token fields ``[B, S - 1]`` (``[B, S]`` with
    ``shift_labels=``), float32, 0 where the label is ``-100``; ``log_probs`` / ``entropy``
    differentiable; ``loss = -sum(log_probs) / (count or num_items_in_batch)`` (+ the MoE auxiliary loss
    weighted by ``router_aux_loss_coef`` when router logits are requested). Without ``fused_lm_head``
    the forward is the original (generation unchanged).

    Raises ``ValueError`` for a model whose log-probabilities the fused path cannot compute (the reason),
    or for ``temperature <= 0`` / an unknown output name.
    """
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    unknown = [f for f in outputs if f not in _FIELDS]
    if unknown:
        raise ValueError(f"outputs: unknown field(s) {unknown}; known: {list(_FIELDS)}")
    find_head(model)  # refuse now, with the reason
    fields = tuple(outputs)
    original_forward = model.forward

    @functools.wraps(type(model).forward)  # keep the signature: generate() validates its kwargs against it
    def forward(self: torch.nn.Module, *args: Any, fused_lm_head: bool = False, labels: Tensor | None = None,
                shift_labels: Tensor | None = None, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head:
            for key, value in (("labels", labels), ("shift_labels", shift_labels),
                               ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[key] = value
            return original_forward(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels= (or shift_labels=)")
        return _fused_forward(self, original_forward, args, kwargs, labels, shift_labels, num_items_in_batch,
                              float(temperature), cast_lm_head_to_fp32, fields)

    model.forward = types.MethodType(forward, model)


def _fused_forward(model: torch.nn.Module, original_forward: Any, args: tuple, kwargs: dict, labels: Tensor | None,
                   shift_labels: Tensor | None, num_items: Any, temperature: float, fp32: bool,
                   fields: tuple[str, ...]) -> FusedCausalLMOutput:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kwargs["use_cache"] = False
    if getattr(config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    head = find_head(model)  # per call: FSDP / PEFT may have replaced the head
    with head.intercept(lambda hidden, weight, bias: (hidden, weight, bias)) as slot:
        out = original_forward(*args, **kwargs)
    hidden, weight, bias = slot.value
    if isinstance(weight, DTensor):  # FSDP2: the full head, as TRL does
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    if shift_labels is None:
        hidden, target = hidden[:, :-1], labels[:, 1:]
    else:
        target = shift_labels
    hidden, target = hidden.to(weight.device), target.to(weight.device)
    mask = target != -100
    per_token = _per_token(hidden[mask], weight, bias, target[mask], head.transform, temperature, fields, fp32)
    # masked_scatter keeps an all-ignored micro-batch connected to the graph (a differentiable zero)
    full = {k: None if (x is None or k not in fields) else x.new_zeros(mask.shape).masked_scatter(mask, x)
            for k, x in per_token.items()}
    log_probs = full["log_probs"]
    count = mask.sum().clamp(min=1) if num_items is None else num_items
    loss = -log_probs.sum() / count
    aux_loss = getattr(out, "aux_loss", None) if kwargs.get("output_router_logits") else None
    if aux_loss is not None:
        loss = loss + getattr(config, "router_aux_loss_coef", 0.0) * aux_loss
    return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=aux_loss, **full)


@contextlib.contextmanager
def use_steerlm_kernels() -> Iterator[None]:
    """Within the block, TRL trainers being constructed install :func:`add_fused_lm_head` (ours) on their
    model and reference model instead of TRL's; trainers constructed before or after are unaffected
    (the models they patched keep the head they got)."""
    modules = [importlib.import_module(f"trl.trainer.{name}") for name in TRAINER_MODULES]
    saved = [m.add_fused_lm_head for m in modules]
    for m in modules:
        m.add_fused_lm_head = add_fused_lm_head
    try:
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.add_fused_lm_head = fn


class SFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` whose loss and metrics come from :func:`add_fused_lm_head` (ours)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with use_steerlm_kernels():
            super().__init__(*args, **kwargs)


class DPOTrainer(trl.DPOTrainer):
    """``trl.DPOTrainer`` whose policy and reference log-probabilities come from :func:`add_fused_lm_head`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with use_steerlm_kernels():
            super().__init__(*args, **kwargs)


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` whose policy, old-policy and reference log-probabilities (and entropies) come from
    :func:`add_fused_lm_head`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with use_steerlm_kernels():
            super().__init__(*args, **kwargs)
