"""What a Hugging Face ``*ForCausalLM`` computes its logits from, for the fused-linear ops.

A causal LM's logits are ``transform(lm_head(h))``: ``h`` the final (normalised) hidden states
``[B, S, H]``, ``lm_head`` its output embedding (weight ``[V, H]``, tied to the input embedding or
not, with or without a bias ``[V]``) and ``transform`` what its config declares after the head:

=================================  =================================  ===================================
config key                         models                             transform
=================================  =================================  ===================================
``final_logit_softcapping = c``    Gemma 2 / 3 (and their kin)        ``z' = c * tanh(z / c)``
``logit_scale = s``                Cohere, Cohere 2                   ``z' = s * z``
``logits_scaling = d``             Granite (+ MoE, hybrid, shared)    ``z' = z / d``
=================================  =================================  ===================================

:func:`find_head` returns a :class:`CausalLMHead`, or raises :class:`FusedPathUnsupported`
(a ``ValueError``) with the reason: no output embedding, no base model, a config key that looks
like a logit transform this module does not know (``output_multiplier``, ``lm_head_multiplier``,
any other ``*logit*`` setting), or a transform the installed fused ops cannot apply.
:func:`fused_support` is the non-raising form ``(head or None, why)``.

:meth:`CausalLMHead.intercept` is how the fused path runs *inside* the model's own forward: for
the duration of a ``with`` block the head module's call runs ``fn(hidden, weight, bias)`` (e.g. a
fused loss) instead of the matmul and returns a zero-width ``[..., 0]`` "logits" tensor (still
connected to ``hidden`` and the weight, so DDP's unused-parameter search sees every parameter).
The head's weight is therefore read while the model's forward runs, which is where FSDP has it
gathered (FSDP's hooks around the model, and around the head if it is wrapped itself, still run),
and whatever the model does to the hidden states before its head is included. Nothing of
``[B, S, V]`` is formed.

Usage::

    from steerlm_kernels.hf.heads import find_head
    head = find_head(model)                     # CausalLMHead; FusedPathUnsupported says why not
    with head.intercept(lambda h, w, b: sk.linear_sequence_nll(h, w, labels, bias=b, **head.transform.kwargs())
                        ) as slot:
        model(input_ids=ids, attention_mask=mask)
    nll = slot.value                            # [B] float32

Imports only torch and the kernel library (to ask whether the fused ops take ``softcap=``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CausalLMHead",
    "FusedPathUnsupported",
    "HeadCall",
    "LogitTransform",
    "find_head",
    "fused_support",
    "kernels_take_transforms",
    "logit_transform",
]


class FusedPathUnsupported(ValueError):
    """The fused-linear path cannot compute this model's log-probabilities (the message says why)."""


@dataclass(frozen=True)
class LogitTransform:
    """``z' = softcap * tanh(logit_scale * z / softcap)`` applied to the logits ``z`` after the LM head.

    ``softcap``: None (no cap) or > 0; ``logit_scale``: None (1) or a positive factor (Granite's
    ``logits_scaling = d`` is ``logit_scale = 1 / d``). Without a cap, ``z' = logit_scale * z``.
    """

    softcap: float | None = None
    logit_scale: float | None = None

    @property
    def identity(self) -> bool:
        """True when the transform changes nothing."""
        return self.softcap is None and self.logit_scale in (None, 1.0)

    def kwargs(self) -> dict[str, float]:
        """The fused ops' keyword arguments (``softcap=``, ``logit_scale=``); only those that are set."""
        out: dict[str, float] = {}
        if self.softcap is not None:
            out["softcap"] = float(self.softcap)
        if self.logit_scale not in (None, 1.0):
            out["logit_scale"] = float(self.logit_scale)
        return out

    def apply(self, logits: Tensor) -> Tensor:
        """The reference in torch (as the model computes it): ``logits [.., V]`` -> same shape and dtype."""
        if self.logit_scale not in (None, 1.0):
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def describe(self) -> str:
        """``"soft-capped at 30"``, ``"scaled by 0.0625"``, ``"none"``..."""
        parts = []
        if self.logit_scale not in (None, 1.0):
            parts.append(f"scaled by {self.logit_scale:g}")
        if self.softcap is not None:
            parts.append(f"soft-capped at {self.softcap:g}")
        return ", ".join(parts) or "none"


#: Config keys with a known meaning after the head: key -> how it maps onto LogitTransform.
KNOWN_KEYS: dict[str, str] = {
    "final_logit_softcapping": "softcap",
    "logit_scale": "logit_scale",
    "logits_scaling": "divide",
}
#: Config keys naming logit settings that act *before* the head (attention, MoE routers) or are flags.
BENIGN_KEYS = frozenset({
    "attn_logit_softcapping", "output_router_logits", "router_logits", "router_z_loss_coef", "logits_to_keep",
    "output_logits", "router_logit_softcapping", "attention_logit_softcapping", "use_qk_norm",
})
#: Fragments of config keys that suggest an unknown post-head transform (refused).
SUSPICIOUS = ("logit", "output_multiplier", "lm_head_multiplier", "head_multiplier")


def _positive(key: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise FusedPathUnsupported(f"config.{key}={value!r} is not a number") from None
    if not (math.isfinite(out) and out > 0):
        raise FusedPathUnsupported(f"config.{key}={value!r} must be a finite positive number")
    return out


def _configs(config: Any) -> list[Any]:
    """The config and its text config (multimodal wrappers keep the LM's settings there)."""
    out = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        with contextlib.suppress(Exception):
            text = get_text()
            if text is not None and text is not config:
                out.append(text)
    return out


def logit_transform(config: Any) -> LogitTransform:
    """The post-head transform a Hugging Face config declares (see the module table).

    Raises:
        FusedPathUnsupported: a non-trivial setting whose key looks like a logit transform but is
            not one of :data:`KNOWN_KEYS`, or an invalid value of a known key.
    """
    softcap: float | None = None
    scale = 1.0
    for cfg in _configs(config):
        items = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg)) if cfg is not None else {}
        for key, value in items.items():
            if isinstance(value, dict) or value is None or value is False:
                continue
            if key in KNOWN_KEYS:
                kind = KNOWN_KEYS[key]
                number = _positive(key, value)
                if kind == "softcap":
                    softcap = number
                elif kind == "logit_scale":
                    scale = number
                else:
                    scale = 1.0 / number
            elif key not in BENIGN_KEYS and any(s in key.lower() for s in SUSPICIOUS):
                if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) == 1.0:
                    continue
                raise FusedPathUnsupported(
                    f"config.{key}={value!r} looks like a transform of the logits that the fused path does not "
                    "know (known: final_logit_softcapping, logit_scale, logits_scaling)"
                )
    return LogitTransform(softcap=softcap, logit_scale=None if scale == 1.0 else scale)


def kernels_take_transforms() -> bool:
    """True when the installed fused ops accept ``softcap=`` and ``logit_scale=``."""
    from steerlm_kernels import api_linear

    params = inspect.signature(api_linear.linear_sequence_nll).parameters
    return "softcap" in params and "logit_scale" in params


@dataclass
class HeadCall:
    """What :meth:`CausalLMHead.intercept` yields: ``value`` is ``fn``'s result once the model has run."""

    value: Any = None
    calls: int = 0


@dataclass
class CausalLMHead:
    """A causal LM seen by the fused path (build it with :func:`find_head`).

    Attributes:
        model: the ``*ForCausalLM``.
        base_model: the transformer without the head (``model.base_model``), whose
            ``last_hidden_state`` the head reads.
        head: the output-embedding module (``model.get_output_embeddings()``, e.g. an ``nn.Linear``).
        transform: the post-head :class:`LogitTransform` of the config.
    """

    model: nn.Module
    base_model: nn.Module
    head: nn.Module
    transform: LogitTransform = field(default_factory=LogitTransform)

    @property
    def weight(self) -> Tensor:
        """The head's current weight ``[V, H]`` (under FSDP: only valid inside the forward)."""
        return self.head.weight

    @property
    def bias(self) -> Tensor | None:
        """The head's bias ``[V]`` or None."""
        bias = getattr(self.head, "bias", None)
        return bias if isinstance(bias, Tensor) else None

    @property
    def tied(self) -> bool:
        """True when the head's weight is the input embedding's (one parameter, one gradient)."""
        get_in = getattr(self.model, "get_input_embeddings", None)
        emb = get_in() if callable(get_in) else None
        return emb is not None and getattr(emb, "weight", None) is self.head.weight

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None) -> Tensor:
        """The base model's final hidden states ``[B, S, H]`` (``last_hidden_state``)."""
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logits(self, hidden: Tensor) -> Tensor:
        """The model's logits from ``hidden [.., H]`` in torch (a reference; forms ``[.., V]``)."""
        return self.transform.apply(nn.functional.linear(hidden, self.weight, self.bias))

    @contextlib.contextmanager
    def intercept(self, fn: Callable[[Tensor, Tensor, Tensor | None], Any]) -> Iterator[HeadCall]:
        """Within the block, a call of the head on ``hidden [.., H]`` runs ``fn(hidden, weight, bias)``
        (the weight and bias as the head holds them at that moment) and returns a zero-width
        ``[.., 0]`` tensor of the matmul's dtype instead of the logits. The yielded
        :class:`HeadCall` holds ``fn``'s result; a model that calls its head more than once in the
        block raises RuntimeError. The head's own ``forward`` is restored on exit.
        """
        head = self.head
        slot = HeadCall()
        if "forward" in vars(head):
            raise RuntimeError(f"{type(head).__name__}.forward is already replaced (nested intercept?)")

        def forward(hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if args or kwargs:
                raise RuntimeError("the LM head was called with extra arguments; the fused path cannot stand in")
            slot.calls += 1
            if slot.calls > 1:
                raise RuntimeError(f"{type(self.model).__name__} called its LM head twice in one forward")
            weight, bias = head.weight, getattr(head, "bias", None)
            slot.value = fn(hidden, weight, bias)
            # zero-width stand-in for the logits: free, but on the graph of hidden and the weight
            return nn.functional.linear(hidden, weight[:0], None if bias is None else bias[:0])

        head.forward = forward
        try:
            yield slot
        finally:
            del head.forward
        if slot.calls == 0 and slot.value is None:
            raise RuntimeError(f"{type(self.model).__name__} did not call its LM head in the intercepted forward")


def find_head(model: nn.Module) -> CausalLMHead:
    """The fused path's view of a Hugging Face causal LM (module notes).

    Raises:
        FusedPathUnsupported: no output embedding with a ``.weight``, no base model, an unknown logit
            transform in the config, or a known one the installed fused ops cannot apply.
    """
    name = type(model).__name__
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if not isinstance(head, nn.Module) or not isinstance(getattr(head, "weight", None), Tensor):
        raise FusedPathUnsupported(f"{name} has no output embedding (LM head) with a .weight")
    if head.weight.dim() != 2:
        raise FusedPathUnsupported(f"{name}'s LM head weight is not [V, H] (shape {tuple(head.weight.shape)})")
    body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module) or body is model:
        raise FusedPathUnsupported(f"{name} exposes no base model (the transformer without its LM head)")
    transform = logit_transform(getattr(model, "config", None))
    if not transform.identity and not kernels_take_transforms():
        raise FusedPathUnsupported(
            f"{name}'s logits are {transform.describe()} after the head, and the installed fused ops take no "
            "softcap= / logit_scale="
        )
    return CausalLMHead(model=model, base_model=body, head=head, transform=transform)


def fused_support(model: nn.Module) -> tuple[CausalLMHead | None, str]:
    """``(find_head(model), why)`` or ``(None, why not)``; never raises for an unsupported model."""
    try:
        head = find_head(model)
    except FusedPathUnsupported as exc:
        return None, str(exc)
    what = "tied" if head.tied else "untied"
    bias = ", with bias" if head.bias is not None else ""
    return head, f"LM head ({what}{bias}) + final hidden states; logit transform: {head.transform.describe()}"
