"""The building blocks of :class:`~steerlm_kernels.steerlm2.models.model.GPTSteerLMModel`.

What the wrapper reads and feeds: the keys of a SteerLM 2.0 batch, its ``cfg`` (mapping or
attribute object), the logits or hidden states in a model's output, the LM-head source of the
fused-linear path, the micro-batch split, and NeMo's normaliser ``avg_num_valid_tokens_in_ub``
(public, so that custom trainers use the wrapper's normaliser).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from steerlm_kernels import validation as v

__all__ = [
    "BATCH_KEYS",
    "LOG_Q_KEY",
    "HeadSource",
    "avg_num_valid_tokens_in_ub",
    "cfg_get",
    "cfg_positive_int",
    "eval_mode",
    "head_getter",
    "hidden_of",
    "logits_of",
    "split_batch",
]

#: Keys of a SteerLM 2.0 batch (NeMo's ``SteerLM2Dataset.collate_fn``), with shapes:
#: ``tokens [B, S]`` int64, ``labels [B, S]`` int64, ``loss_mask [B, S]`` (bool / int / float),
#: ``attention_mask`` (whatever the model takes, e.g. ``[B, S]``; may be absent or None),
#: ``position_ids [B, S]`` int64 (may be absent or None), ``ws [B]`` float,
#: ``"log(Q(y|a,x))" [B]`` float, ``num_responses [B]`` int64 (each item holds its group's size).
BATCH_KEYS: tuple[str, ...] = (
    "tokens",
    "labels",
    "loss_mask",
    "attention_mask",
    "position_ids",
    "ws",
    "log(Q(y|a,x))",
    "num_responses",
)
LOG_Q_KEY = "log(Q(y|a,x))"
_MISSING = object()


def cfg_get(cfg: Any, key: str, default: Any = _MISSING) -> Any:
    """Read the dotted ``key`` (e.g. ``"steerlm2.micro_batch_size"``) from a mapping (dict,
    OmegaConf ``DictConfig``) or attribute object (``SimpleNamespace``, dataclass), nested in any mix.

    Raises:
        KeyError: when a component is missing and no ``default`` is given.
    """
    node = cfg
    for part in key.split("."):
        if isinstance(node, Mapping):
            found = node.get(part, _MISSING)
        else:
            found = getattr(node, part, _MISSING)
        if found is _MISSING or found is None:
            if default is _MISSING:
                raise KeyError(f"cfg has no {key!r} (missing {part!r})")
            return default
        node = found
    return node


def cfg_positive_int(cfg: Any, key: str) -> int:
    """``cfg_get(cfg, key)`` as a positive int (``TypeError`` / ``ValueError`` naming ``cfg.<key>`` otherwise)."""
    value = cfg_get(cfg, key)
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        raise TypeError(f"cfg.{key} must be a positive integer, got {value!r}") from None
    if isinstance(value, bool) or as_int != value or as_int <= 0:
        raise ValueError(f"cfg.{key} must be a positive integer, got {value!r}")
    return as_int


def logits_of(output: Any) -> Tensor:
    """The logits from a model output: a tensor, an object with ``.logits``, or a tuple (first)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"the model returned {type(output).__name__}; expected logits [B, S, V], an object with .logits, "
        "or a tuple whose first element is the logits"
    )


def hidden_of(output: Any) -> Tensor:
    """The final hidden states from a model output (fused-linear path): a tensor ``[B, S, H]``; an
    object with ``.last_hidden_state`` (a Hugging Face base model, e.g. ``LlamaModel``); an object
    with ``.hidden_states`` holding a tensor or a tuple/list of per-layer tensors (the last one is
    taken: it must be the final, normalised hidden state, as Hugging Face's is); or a tuple whose
    first element is the tensor."""
    if isinstance(output, Tensor):
        return output
    last = getattr(output, "last_hidden_state", None)
    if isinstance(last, Tensor):
        return last
    states = getattr(output, "hidden_states", None)
    if isinstance(states, Tensor):
        return states
    if isinstance(states, (tuple, list)) and states and isinstance(states[-1], Tensor):
        return states[-1]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"the model returned {type(output).__name__}; with lm_head_weight= it must return hidden states "
        "[B, S, H], an object with .last_hidden_state or .hidden_states, or a tuple whose first element is them"
    )


HeadSource = Any  # Tensor | Callable[[], Tensor] | nn.Module with .weight


def head_getter(weight: HeadSource, bias: HeadSource, name: str = "lm_head_weight") -> Callable[[], tuple]:
    """A zero-argument function returning the current ``(weight, bias)`` of the LM head."""
    if isinstance(weight, nn.Module):
        module = weight
        if not isinstance(getattr(module, "weight", None), Tensor):
            raise TypeError(f"{name}: the module {type(module).__name__} has no .weight tensor")
        if bias is None:
            bias = lambda: getattr(module, "bias", None)  # noqa: E731
        weight = lambda: module.weight  # noqa: E731

    def as_fn(x: HeadSource, what: str) -> Callable[[], Tensor | None]:
        if x is None or isinstance(x, Tensor):
            return lambda: x
        if callable(x):
            return x
        raise TypeError(f"{what} must be a tensor, a callable returning one, or an nn.Module with .weight; "
                        f"got {type(x).__name__}")

    get_w, get_b = as_fn(weight, name), as_fn(bias, "lm_head_bias")

    def current() -> tuple[Tensor, Tensor | None]:
        w = get_w()
        if not isinstance(w, Tensor):
            raise TypeError(f"{name} returned {type(w).__name__}, expected a [V, H] tensor")
        return w, get_b()

    return current


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run the block with ``model`` (and every submodule) in ``eval()`` mode (dropout off), then
    restore each module's own ``training`` flag (a model with some frozen submodules in eval keeps
    them so). Anything that is not an ``nn.Module`` is left alone."""
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def split_batch(batch: Mapping[str, Any], size: int) -> list[dict[str, Any]]:
    """Cut the per-item tensors of ``batch`` (dim 0) into consecutive chunks of ``size`` items."""
    n = batch["tokens"].shape[0]
    chunks = []
    for start in range(0, n, size):
        chunk = {}
        for key, value in batch.items():
            if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == n:
                chunk[key] = value[start:start + size]
            else:
                chunk[key] = value  # e.g. a shared [1, S, S] attention mask, or None
        chunks.append(chunk)
    return chunks


def avg_num_valid_tokens_in_ub(loss_mask: Tensor, num_responses: Tensor | int, num_microbatches: int = 1,
                               cp_group: Any = None) -> Tensor:
    """NeMo's normalizer ``[B]`` float32: per item, the mean number of loss-masked tokens
    (``loss_mask.sum(-1)``) over its group, divided by ``num_microbatches / num_groups``.

    ``num_responses``: any of :func:`steerlm_kernels.steerlm2_weights`' three forms (NeMo's per-item
    form included). With ``cp_group`` the token counts of the rank's sequence slices are summed over
    the group (one all-reduce of ``[B]`` floats), so the normalizer equals the single-process one.
    Groups whose responses are all fully masked get 1 (their NLL, hence their loss, is 0).
    Public so that custom trainers (``python/`` examples) use the same normalizer as the wrapper.
    """
    b = loss_mask.shape[0]
    cu, _ = v.group_offsets(num_responses, b, loss_mask.device, "num_responses", per_item=True)
    sizes = cu.diff()
    group_id = torch.repeat_interleave(torch.arange(sizes.numel(), device=loss_mask.device), sizes)
    tokens = loss_mask.float().sum(dim=-1)
    if cp_group is not None:
        torch.distributed.all_reduce(tokens, group=cp_group)
    mean_tokens = torch.zeros(sizes.numel(), device=loss_mask.device).index_add_(0, group_id, tokens) / sizes
    mean_tokens = torch.where(mean_tokens == 0, torch.ones_like(mean_tokens), mean_tokens)
    return mean_tokens[group_id] * (sizes.numel() / num_microbatches)
