"""Which loss path a SteerLM 2.0 model trains on, and the fused path's plumbing for Hugging Face models.

* :func:`resolve_loss_path` - ``auto`` / ``fused`` / ``logits`` -> ``(path, why, head)``: the
  Hugging Face detection of :func:`steerlm_kernels.hf.heads.find_head` (LM head, base model, logit
  transform), plus, for ``auto``, a probe: the fused NLL of a short synthetic sequence must agree
  with the model's own logits (a guard against architectures that do something after the head
  that their config does not say).
* :func:`head_call` - one forward of the model with a fused loss computed in place of its head
  (:meth:`~steerlm_kernels.hf.heads.CausalLMHead.intercept`).
* :func:`match_dtypes` - the hidden states and the head in one dtype, as the model's own head
  would see them (autocast's dtype under autocast, else the weight's), autocast off inside.

Used by :class:`~steerlm_kernels.steerlm2.models.model.GPTSteerLMModel` (``from_hf``), the Trainer and
``score``'s path choice (:mod:`~steerlm_kernels.steerlm2.models.logprobs`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from steerlm_kernels.api import sequence_nll
from steerlm_kernels.api_linear import linear_sequence_nll
from steerlm_kernels.hf.heads import CausalLMHead, fused_support
from steerlm_kernels.steerlm2.models.model_helpers import eval_mode, logits_of

__all__ = ["CPU_CHUNK_BYTES", "LOSS_PATHS", "chunk_rows", "head_call", "match_dtypes", "probe_fused",
           "resolve_loss_path"]

#: ``--loss-path`` values.
LOSS_PATHS: tuple[str, ...] = ("auto", "fused", "logits")
#: Tokens of the probe sequence.
PROBE_TOKENS = 16


#: Bytes of float32 logits per chunk of the fused path on CPU at most (:func:`chunk_rows`).
CPU_CHUNK_BYTES = 64 << 20


def chunk_rows(weight: Tensor, chunk_size: int | None = None) -> int | None:
    """Rows per logits chunk of the fused losses for an LM head ``weight [V, H]`` (both phases):
    ``chunk_size`` when given; on CPU ``min(H, CPU_CHUNK_BYTES / 4V)`` rows (at least 16); else None
    (the library's default: 256 MiB, at least 4096 rows on CUDA).

    Byte model of the CPU choice: each chunk's ``grad_W`` GEMM reads and writes the whole float32
    ``[V, H]`` head gradient (``8 V H`` bytes per chunk) while the chunk's logits are ``4 c V`` bytes,
    so more rows (up to ``H``) move that gradient less often (32 MiB chunks, 64 rows at V = 128,256,
    H = 256, moved it twice as often as 130 rows); the peak, ``~4 V H`` (that gradient) + ``4 c V``
    (one chunk) beyond the activations, stays within 0.35x of eager's ``16 n V`` at ``n = 512`` rows
    (the 256-row chunk of :func:`~steerlm_kernels.hf.patch.default_chunk_rows`, 125 MiB, did not)."""
    if chunk_size is not None:
        return chunk_size
    if weight.device.type != "cpu":
        return None
    vocab, hidden = weight.shape
    return max(16, min(hidden, CPU_CHUNK_BYTES // (4 * max(1, vocab))))


@contextlib.contextmanager
def match_dtypes(hidden: Tensor, weight: Tensor, bias: Tensor | None
                 ) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """``(hidden, weight, bias)`` in one dtype: under autocast on their device, autocast's dtype (what
    the model's ``nn.Linear`` head would compute in), else the weight's; autocast is off in the block."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    hidden = hidden.to(weight.dtype)
    with torch.autocast(kind, enabled=False):
        yield hidden, weight, bias


def head_call(head: CausalLMHead, model: Callable, mb: Mapping[str, Any],
              fn: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> Tensor:
    """Call ``model`` (the Hugging Face model, or its DDP / FSDP wrapper) on the micro-batch ``mb``
    (``tokens``, ``attention_mask``, ``position_ids``) with ``fn(hidden, weight, bias)`` computed in
    place of ``head``'s matmul; returns ``fn``'s result."""
    with head.intercept(fn) as slot:
        model(input_ids=mb["tokens"], attention_mask=mb.get("attention_mask"), position_ids=mb.get("position_ids"))
    return slot.value


def probe_fused(head: CausalLMHead, backend: str = "auto") -> tuple[float, float]:
    """``(fused, logits)`` NLL sums of one synthetic sequence (``PROBE_TOKENS`` ids spread over the
    vocabulary) under ``head.model`` in eval mode, without gradient."""
    model = head.model
    vocab = head.weight.shape[0]
    device = head.weight.device
    ids = (torch.arange(PROBE_TOKENS + 1, device=device) * 7919 + 3) % vocab
    mb = {"tokens": ids[None, :-1], "attention_mask": torch.ones_like(ids[None, :-1])}
    labels = ids[None, 1:]
    with torch.no_grad(), eval_mode(model):
        def fn(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            with match_dtypes(h, w, b) as (h, w, b):
                return linear_sequence_nll(h, w, labels, bias=b, backend=backend, **head.transform.kwargs())

        fused = head_call(head, model, mb, fn)
        logits = logits_of(model(input_ids=mb["tokens"], attention_mask=mb["attention_mask"]))
        plain = sequence_nll(logits, labels, backend=backend)
    return float(fused[0]), float(plain[0])


def resolve_loss_path(model: nn.Module, requested: str = "auto", *, probe: bool = True, backend: str = "auto"
                      ) -> tuple[str, str, CausalLMHead | None]:
    """``(path, why, head)`` for training ``model``: ``path`` is ``"fused"`` (``head`` set) or
    ``"logits"`` (``head`` None); ``why`` is one line for the start line / summary.

    ``requested``: ``"logits"`` always gives the logits path; ``"fused"`` raises ValueError with the
    reason where the detection refuses the model (no probe); ``"auto"`` takes the fused path where
    the detection accepts the model and (with ``probe``) the probe agrees to 1e-3 relative in
    float32 (2e-2 in half precision), else the logits path with the reason.
    """
    if requested not in LOSS_PATHS:
        raise ValueError(f"loss_path must be one of {LOSS_PATHS}, got {requested!r}")
    if requested == "logits":
        return "logits", "requested (--loss-path logits)", None
    head, why = fused_support(model)
    if head is None:
        if requested == "fused":
            raise ValueError(f"loss_path 'fused' cannot serve this model: {why}")
        return "logits", f"the fused path cannot serve this model: {why}", None
    if requested == "fused":
        return "fused", f"requested: {why}", head
    if probe and head.weight.device.type != "meta":
        try:
            fused, plain = probe_fused(head, backend)
        except (NotImplementedError, RuntimeError, ValueError, TypeError) as exc:
            return "logits", f"the fused path failed on a probe: {type(exc).__name__}: {exc}", None
        tol = 1e-3 if head.weight.dtype == torch.float32 else 2e-2
        if not abs(fused - plain) <= tol * max(1.0, abs(plain)):
            return ("logits", f"the fused path disagreed with the model's logits on a probe ({fused:.6g} vs "
                    f"{plain:.6g}): an unknown transform after the head?", None)
        why += "; checked on a probe"
    return "fused", why, head
