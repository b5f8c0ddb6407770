"""Float64 ground truth, written from SPEC's formulas and independent of the package."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def transform(logits: Tensor, softcap: float | None = None, logit_scale: float | None = None) -> Tensor:
    """SPEC's logit transforms in float64: ``logit_scale`` multiplies, then ``softcap`` caps to
    ``c * tanh(z / c)``; differentiable (autograd gives ``s * (1 - tanh^2)``)."""
    x = logits.double()
    if logit_scale is not None:
        x = x * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x


def token_nll(logits: Tensor, labels: Tensor, ignore_index: int = -100, softcap: float | None = None,
              logit_scale: float | None = None) -> Tensor:
    """``-log softmax(z')[label]`` in float64 of the (transformed, :func:`transform`) logits; 0 where
    ``labels == ignore_index``."""
    x = transform(logits, softcap, logit_scale)
    logp = x - torch.logsumexp(x, dim=-1, keepdim=True)
    ignored = labels == ignore_index
    picked = logp.gather(-1, labels.masked_fill(ignored, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(ignored, torch.zeros_like(picked), -picked)


def sequence_nll(logits: Tensor, labels: Tensor, loss_mask: Tensor | None = None, ignore_index: int = -100,
                 cu_seqlens: Tensor | None = None, softcap: float | None = None,
                 logit_scale: float | None = None) -> Tensor:
    """``sum_t mask * nll`` per sequence, float64. Masked tokens contribute exactly 0."""
    nll = token_nll(logits, labels, ignore_index, softcap, logit_scale)
    if loss_mask is not None:
        m = loss_mask.double()
        nll = torch.where(m == 0, torch.zeros_like(nll), nll * m)
    if cu_seqlens is None:
        return nll.sum(-1)
    cu = cu_seqlens.tolist()
    return torch.stack([nll[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])


def weighted_sequence_loss(logits: Tensor, labels: Tensor, loss_mask: Tensor | None, weight: Tensor,
                           normalizer: Tensor | float, ignore_index: int = -100,
                           cu_seqlens: Tensor | None = None, softcap: float | None = None,
                           logit_scale: float | None = None) -> Tensor:
    seq = sequence_nll(logits, labels, loss_mask, ignore_index, cu_seqlens, softcap, logit_scale)
    w = weight.double()
    n = torch.as_tensor(normalizer, dtype=torch.float64).expand_as(w)
    terms = torch.where(w == 0, torch.zeros_like(seq), w * seq / torch.where(w == 0, torch.ones_like(n), n))
    return terms.sum()


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """Tolerances for values computed from ``dtype`` logits (accumulated in float32)."""
    return {"rtol": 1e-5, "atol": 1e-5}


def grad_tolerances(dtype: torch.dtype, logits: torch.Tensor | None = None, coef_max: float = 1.0) -> dict[str, float]:
    """Gradients are rounded once to the logits' dtype (the interpreter truncates bf16: 1 ulp).

    float32 with ``logits`` given: any float32 implementation forms ``exp(x - lse)`` from a float32
    log-sum-exp, whose rounding (half an ulp of |lse|) is an ABSOLUTE error of every softmax value;
    where the label's probability is near 1, ``p - 1`` is tiny and that error exceeds rtol. Allow
    ``2**-23 * (max|x| + log V) * coef_max`` absolute (``coef_max`` bounds |d loss / d nll| per
    token), which is what the float64 reference cannot see; measured errors sit 3-6x below it."""
    if dtype == torch.float32:
        atol = 1e-7
        if logits is not None and logits.numel():
            m = float(logits.detach().abs().max()) + math.log(max(logits.shape[-1], 1))
            atol = max(atol, 2.0**-23 * m * coef_max)
        return {"rtol": 1e-5, "atol": atol}
    if dtype == torch.float16:
        return {"rtol": 2e-3, "atol": 1e-6}
    return {"rtol": 1.6e-2, "atol": 1e-5}
