"""``patch(model)`` / ``unpatch(model)``: a Hugging Face ``*ForCausalLM``'s causal-LM loss without its logits.

After ``patch(model)``, ``model(input_ids, labels=labels)`` in training mode computes the loss with
:func:`steerlm_kernels.linear_cross_entropy` straight from the final hidden states and the LM head weight
(``[N, H]`` and ``[V, H]`` in, never the ``[N, V]`` logits), with the semantics of transformers'
``ForCausalLMLoss``: the labels are shifted inside (position ``t`` predicts ``labels[t + 1]``), ``-100`` is
ignored, the mean is over the non-ignored targets, or ``sum / num_items_in_batch`` when the ``Trainer``
passes ``num_items_in_batch`` (gradient accumulation), ``shift_labels=`` is used as given. The output's
``logits`` is ``None`` then. Without labels, in eval mode and in ``generate``, the model's own forward runs
unchanged.

How: the model's own ``forward`` still runs (its backbone, its MoE auxiliary loss, its output class); for
the duration of one call the LM head returns an empty ``[..., 0]`` tensor after recording its input, the
logit transforms the forward applies to it cost nothing, and ``model.loss_function`` is ours, which reads
the recorded hidden states. The logit transforms (Gemma 2/3 ``final_logit_softcapping``, Cohere
``logit_scale``, Granite ``logits_scaling``) are read from :mod:`steerlm_kernels.hf.heads` and applied by
the fused loss. Models it cannot serve are refused with the reason.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass
from typing import Any

import torch

from steerlm_kernels import linear_cross_entropy
from steerlm_kernels.hf.heads import find_head

__all__ = ["autocast_operands", "default_chunk_rows", "is_patched", "patch", "unpatch"]

#: Attribute of a patched model holding its :class:`_PatchState`.
_STATE = "_steerlm_kernels_patch"


@dataclass
class _PatchState:
    forward: Any  # the forward that ran before the patch (bound method or an earlier instance wrapper)
    own_forward: Any  # the instance attribute ``forward`` before the patch (``None``: the class's)
    wrapper: Any  # our bound forward, to recognise it on unpatch
    labels_index: int | None  # position of ``labels`` among forward's positional parameters
    skip_logits: bool | None
    backend: str
    chunk_size: int | None
    active: bool = True


def default_chunk_rows(weight: torch.Tensor) -> int | None:
    """On CPU ``min(H, 256 MiB / (4 V))`` rows for ``weight [V, H]``: a float32 logits chunk no larger than the
    head's weight gradient nor than the library's default chunk (at least 1). Elsewhere None: the library's
    own default (at least 4096 rows on CUDA, where fewer rows would re-read the ``[V, H]`` head gradient
    once per small chunk)."""
    if weight.device.type != "cpu":
        return None
    vocab, hidden = weight.shape
    return max(1, min(hidden, (256 << 20) // (4 * max(vocab, 1))))


def autocast_operands(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``hidden [.., H]``, ``weight [V, H]``, ``bias [V]`` in the dtype the model's LM head would compute in:
    autocast's dtype (e.g. bfloat16 under the Trainer's ``bf16=True``) when autocast is on for their device
    (differentiable casts, as ``nn.Linear`` under autocast), else ``weight``'s dtype for ``hidden``."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def is_patched(model: torch.nn.Module) -> bool:
    """Whether ``model`` computes its labelled training loss through :func:`patch`."""
    state = getattr(model, _STATE, None)
    return state is not None and state.active


def patch(model: torch.nn.Module, *, skip_logits: bool | None = None, backend: str = "auto",
          chunk_size: int | None = None) -> torch.nn.Module:
    """Route ``model``'s causal-LM loss through :func:`steerlm_kernels.linear_cross_entropy`; returns ``model``.

    Args:
        model: a Hugging Face ``*ForCausalLM`` (``PreTrainedModel``) whose logits are ``lm_head(final hidden)``,
            optionally soft-capped or scaled, and whose forward computes its loss with ``self.loss_function``.
        skip_logits: ``None`` (default) - the fused loss (and ``logits=None``) when labels are given and
            ``model.training``; ``True`` - whenever labels are given (evaluation too); ``False`` - never (the
            model's own forward always; useful only to switch the patch off without ``unpatch``).
        backend: passed to :func:`steerlm_kernels.linear_cross_entropy` (``"auto"``, ``"triton"``, ``"cpp"``,
            ``"torch"``).
        chunk_size: rows of float32 logits per chunk of the fused loss. Default on CPU: ``min(H, 256 MiB /
            (4 V))`` rows (``H`` the hidden size), i.e. a chunk never larger than the LM head's weight gradient
            (``V x H``), which the step holds anyway, nor than the library's 256 MiB default; on other
            devices the library's default.

    Patching a patched model updates its options. Raises ``ValueError`` naming the reason for a model the
    fused loss cannot serve (no ``nn.Linear`` LM head, an unknown logit transform, a forward that does not
    call ``self.loss_function``), ``TypeError`` for a model that is not a ``torch.nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch(model): model must be a Hugging Face *ForCausalLM, got {type(model).__name__}")
    if skip_logits not in (None, True, False):
        raise TypeError(f"patch(skip_logits=): expected None, True or False, got {skip_logits!r}")
    if not isinstance(backend, str):
        raise TypeError(f"patch(backend=): expected a backend name, got {type(backend).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"patch(chunk_size=): expected a positive int or None, got {chunk_size!r}")
    state = getattr(model, _STATE, None)
    if state is not None:
        state.skip_logits, state.backend, state.chunk_size, state.active = skip_logits, backend, chunk_size, True
        return model
    find_head(model)  # FusedPathUnsupported (a ValueError) says why not
    if not callable(getattr(model, "loss_function", None)):
        raise ValueError(f"patch(model): {type(model).__name__} has no loss_function (not a PreTrainedModel)")
    cls_forward = type(model).forward
    params = [p for p in inspect.signature(cls_forward).parameters.values()][1:]  # without self
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if "labels" not in [p.name for p in params] and not any(p.kind == p.VAR_KEYWORD for p in params):
        raise ValueError(f"patch(model): {type(model).__name__}.forward takes no labels")

    @functools.wraps(cls_forward)  # keep the signature: generate() and the Trainer inspect it
    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _forward(self, getattr(self, _STATE), args, kwargs)

    bound = types.MethodType(forward, model)
    state = _PatchState(
        forward=model.forward,
        own_forward=model.__dict__.get("forward"),
        wrapper=bound,
        labels_index=names.index("labels") if "labels" in names else None,
        skip_logits=skip_logits,
        backend=backend,
        chunk_size=chunk_size,
    )
    setattr(model, _STATE, state)
    model.forward = bound
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch`; returns ``model`` (a no-op on a model that is not patched).

    When something wrapped ``model.forward`` after the patch (TRL's fused LM head, an accelerate hook), that
    wrapper is kept and ours becomes a pass-through to the original forward.
    """
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    if model.__dict__.get("forward") is state.wrapper:
        if state.own_forward is None:
            del model.forward
        else:
            model.forward = state.own_forward
        delattr(model, _STATE)
    else:
        state.active = False
    return model


def _labels_of(state: _PatchState, args: tuple, kwargs: dict) -> Any:
    if "labels" in kwargs:
        return kwargs["labels"]
    if state.labels_index is not None and len(args) > state.labels_index:
        return args[state.labels_index]
    return None


def _forward(model: torch.nn.Module, state: _PatchState, args: tuple, kwargs: dict) -> Any:
    fused = state.active and _labels_of(state, args, kwargs) is not None
    fused = fused and (model.training if state.skip_logits is None else state.skip_logits)
    if not fused:
        return state.forward(*args, **kwargs)
    return_dict = kwargs.pop("return_dict", None)
    called: list[bool] = []

    def loss_function(
        logits: Any = None,
        labels: torch.Tensor | None = None,
        vocab_size: int | None = None,
        num_items_in_batch: Any = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if slot.value is None:
            raise RuntimeError(f"patch: {type(model).__name__}.forward computed its loss before calling its LM head")
        called.append(True)
        hidden, weight, bias = slot.value
        hidden, weight, bias = autocast_operands(hidden.to(weight.device), weight, bias)
        target = labels if shift_labels is None else shift_labels
        with torch.autocast(hidden.device.type, enabled=False):  # the operands are in the head's dtype already
            return linear_cross_entropy(
                hidden,
                weight,
                target.to(weight.device),
                bias,
                ignore_index=ignore_index,
                reduction="mean",
                shift=shift_labels is None,
                num_items=num_items_in_batch,
                chunk_size=state.chunk_size or default_chunk_rows(weight),
                backend=state.backend,
                **head.transform.kwargs(),
            )

    own_loss = model.__dict__.get("_loss_function")
    model.loss_function = loss_function
    try:
        # the head records (hidden, weight, bias) and returns [..., 0]: the forward's transforms of it are free
        head = find_head(model)  # looked up per call: FSDP / PEFT may have replaced the head since patch()
        with head.intercept(lambda hidden, weight, bias: (hidden, weight, bias)) as slot:
            out = state.forward(*args, return_dict=True, **kwargs)
    finally:
        if own_loss is None:
            del model._loss_function
        else:
            model._loss_function = own_loss
    if not called:
        raise RuntimeError(f"patch: {type(model).__name__}.forward did not compute its loss with self.loss_function")
    out = type(out)(**{k: v for k, v in out.items() if k != "logits"})
    return out.to_tuple() if return_dict is False else out
