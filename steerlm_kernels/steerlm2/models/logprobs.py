"""Summed log-probabilities of token spans under a causal LM, with the package's fused kernels.

This is the engine of ``steerlm-kernels score`` (and of its benchmark): for sequences given as
``(ids, start)`` - token ids and the index where the scored span starts, as
:func:`~steerlm_kernels.steerlm2.formats.templates.encode_example` returns them - it computes
``sum_{t >= start} log p(ids[t] | ids[:t])``, the SteerLM 2.0 baseline phase without weights.

Two paths (:func:`choose_path`):

* ``fused`` (Hugging Face causal LMs whose logits are ``lm_head(final hidden states)``, optionally
  soft-capped or scaled as their config declares: :func:`steerlm_kernels.hf.heads.find_head`, the
  detection ``train`` uses too): the model runs with its head's matmul replaced
  (:meth:`~steerlm_kernels.hf.heads.CausalLMHead.intercept`); only the rows that predict a scored
  token are kept (prompt and padding rows never meet the LM head) and go packed through
  :func:`steerlm_kernels.linear_sequence_nll` with the LM-head weight and the logit transform, by
  chunks of rows: no ``[tokens, V]`` tensor is ever formed (the largest is one ``[chunk_rows, V]`` chunk).
* ``logits`` (any other model called as ``model(input_ids=..., attention_mask=...)`` returning
  logits or an object with ``.logits``): the model's logits ``[B, S, V]`` (its own output, in its
  dtype) through :func:`steerlm_kernels.sequence_nll`, which reads them once and holds no float32
  copy.

Sequences are padded on the right within a batch (attention mask 0 on padding);
:func:`plan_batches` groups them by length up to a token budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import steerlm_kernels as sk
from steerlm_kernels.hf.heads import find_head
from steerlm_kernels.steerlm2.models.loss_path import match_dtypes
from steerlm_kernels.steerlm2.models.model_helpers import logits_of

__all__ = ["PATHS", "SpanScorer", "choose_path", "plan_batches", "score_batch", "score_sequences"]

#: ``path`` values: ``auto`` picks ``fused`` where the model allows it (checked on the first batch).
PATHS: tuple[str, ...] = ("auto", "fused", "logits")
#: Bytes of float32 logits per chunk of the fused path on CPU (``[chunk_rows, V]``).
CPU_CHUNK_BYTES = 32 << 20
#: The same on CUDA (chunks of bf16 logits, at least 4096 rows: few GEMM launches).
CUDA_CHUNK_BYTES = 1 << 30


@dataclass
class SpanScorer:
    """A model ready to score spans.

    Attributes:
        model: the causal LM (eval mode; dropout off).
        pad_id: id written into padding positions (never attended to, never scored).
        path: ``"fused"`` or ``"logits"`` (see the module docstring; :func:`choose_path`).
        backend: kernel backend of the sk calls (``"auto"``: cpp on CPU, triton on CUDA).
        chunk_rows: rows per logits chunk of the fused path (None: from the byte budgets above).
    """

    model: nn.Module
    pad_id: int = 0
    path: str = "fused"
    backend: str = "auto"
    chunk_rows: int | None = None


def choose_path(model: nn.Module, path: str = "auto", probe: tuple[Sequence[int], int] | None = None,
                *, pad_id: int = 0, backend: str = "auto") -> tuple[str, str]:
    """Resolve ``path`` for ``model``: ``(path, why)``.

    ``auto`` picks ``fused`` when :func:`steerlm_kernels.hf.heads.find_head` accepts the model (LM head,
    base model, a logit transform it knows and the fused ops can apply) and, when
    ``probe`` is given, the fused result on it agrees with the logits path to 1e-3 relative (a guard
    against architectures that transform the hidden states or logits in ways the config does not
    say); else ``logits``. ``fused`` raises ValueError where it cannot apply.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "logits":
        return "logits", "requested"
    try:
        head = find_head(model)
    except ValueError as exc:
        if path == "fused":
            raise
        return "logits", str(exc)
    if path == "fused" or probe is None:
        return "fused", f"LM head + final hidden states (logit transform: {head.transform.describe()})"
    fused = score_batch(SpanScorer(model, pad_id, "fused", backend), [probe])[0]
    plain = score_batch(SpanScorer(model, pad_id, "logits", backend), [probe])[0]
    if abs(fused - plain) > 1e-3 * max(1.0, abs(plain)):
        return "logits", f"the fused path disagreed with the model's logits on a probe ({fused:.6g} vs {plain:.6g})"
    return "fused", "LM head + final hidden states, checked against the logits on the first sequence"


def _chunk_rows(scorer: SpanScorer, weight: Tensor) -> int:
    if scorer.chunk_rows is not None:
        return max(1, int(scorer.chunk_rows))
    v = weight.shape[0]
    if weight.device.type == "cuda":
        return max(4096, CUDA_CHUNK_BYTES // (v * weight.element_size()))
    return max(16, CPU_CHUNK_BYTES // (v * 4))


def _pack(seqs: Sequence[tuple[Sequence[int], int]], pad_id: int, device: torch.device
          ) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids [B, L-1], attention_mask [B, L-1], labels [B, L-1])``: labels ``-100`` outside
    the scored spans; position ``j`` predicts ``ids[j + 1]``."""
    width = max(len(ids) for ids, _ in seqs) - 1
    b = len(seqs)
    inp = torch.full((b, width), pad_id, dtype=torch.long)
    att = torch.zeros((b, width), dtype=torch.long)
    lab = torch.full((b, width), -100, dtype=torch.long)
    for i, (ids, start) in enumerate(seqs):
        n = len(ids)
        if not 0 < start < n:
            raise ValueError(f"sequence {i}: the scored span must start in 1..{n - 1} (len(ids)={n}), got {start}")
        row = torch.as_tensor(ids, dtype=torch.long)
        inp[i, : n - 1] = row[:-1]
        att[i, : n - 1] = 1
        lab[i, start - 1 : n - 1] = row[start:]
    return inp.to(device), att.to(device), lab.to(device)


@torch.no_grad()
def score_batch(scorer: SpanScorer, seqs: Sequence[tuple[Sequence[int], int]]) -> list[float]:
    """Summed log-probabilities of the scored spans of ``seqs`` (one padded batch).

    Args:
        scorer: the model and how to run it.
        seqs: ``(ids, start)`` per sequence, ``0 < start < len(ids)``; ``ids[start:]`` is scored.

    Returns:
        One float per sequence: ``-sum_{t >= start} nll_t``, computed in float32 (<= 0).
    """
    if not seqs:
        return []
    model = scorer.model
    device = next(model.parameters()).device
    inp, att, lab = _pack(seqs, scorer.pad_id, device)
    if scorer.path == "fused":
        head = find_head(model)  # ValueError saying why the fused path cannot serve the model
        sel = lab != -100
        counts = sel.sum(dim=1)
        cu = torch.zeros(len(seqs) + 1, dtype=torch.long, device=device)
        torch.cumsum(counts, 0, out=cu[1:])

        def fn(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            rows = hidden[sel]  # [T, H]: only the rows that predict a scored token, packed per sequence
            with match_dtypes(rows, weight, bias) as (rows, weight, bias):
                return sk.linear_sequence_nll(rows, weight, lab[sel], bias=bias, cu_seqlens=cu,
                                              chunk_size=_chunk_rows(scorer, weight), backend=scorer.backend,
                                              **head.transform.kwargs())

        with head.intercept(fn) as slot:
            model(input_ids=inp, attention_mask=att)
        nll = slot.value
    elif scorer.path == "logits":
        logits = logits_of(model(input_ids=inp, attention_mask=att))  # the wrapper's reading of an output
        if logits.dim() != 3:
            raise TypeError(f"the model must return logits [B, S, V], got shape {tuple(logits.shape)}")
        nll = sk.sequence_nll(logits, lab, backend=scorer.backend)
    else:
        raise ValueError(f"path must be 'fused' or 'logits', got {scorer.path!r}")
    return [-float(x) for x in nll.double().cpu()]


def plan_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, longest first, each padded batch holding at most
    ``max_tokens`` tokens (``batch size x longest length``); a sequence longer than ``max_tokens``
    is a batch of its own."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]  # the first (longest) sets the padded width
        if cur and (len(cur) + 1) * width > max_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def score_sequences(scorer: SpanScorer, seqs: Sequence[tuple[Sequence[int], int]], max_tokens: int) -> list[float]:
    """:func:`score_batch` over batches of similar lengths (:func:`plan_batches`); results in the
    order of ``seqs``."""
    out = [0.0] * len(seqs)
    for batch in plan_batches([len(ids) for ids, _ in seqs], max_tokens):
        for i, value in zip(batch, score_batch(scorer, [seqs[i] for i in batch])):
            out[i] = value
    return out
