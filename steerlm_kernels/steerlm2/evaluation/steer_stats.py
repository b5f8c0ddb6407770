"""Paired statistics of a steering evaluation (``steer-eval``): curves, slope, effect, comparison.

Input: ``values [P, L]`` float64, the mean measured attribute of prompt ``p``'s responses when level
``levels[l]`` was requested (every prompt sampled at every level with the same random streams, so
the levels are paired within a prompt). Every quantity is a mean over prompts of a per-prompt
number, and carries

- a 95 % bootstrap confidence interval (prompts resampled with replacement, :data:`BOOTSTRAP`
  resamples, percentile interval), and
- a two-sided p-value of "mean = 0" from a paired sign-flip randomisation test (each prompt's
  number negated with probability 1/2, :data:`FLIPS` times; ``p = (1 + #|mean*| >= |mean|) / (1 +
  FLIPS)``, so the smallest reportable p is about ``1 / FLIPS``). No normality is assumed.

The per-prompt numbers: ``effect`` = value at the highest level - value at the lowest; ``slope`` =
least-squares slope of the values against the levels; against a reference model on the same
prompts and seeds, ``diff_of_diffs`` = effect - reference effect (and the same for the slope).
All random draws come from a ``torch.Generator`` seeded by ``seed``: a report is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["BOOTSTRAP", "FLIPS", "analyse", "compare", "paired", "per_prompt_slopes"]

#: Bootstrap resamples of the confidence intervals.
BOOTSTRAP = 4000
#: Sign flips of the randomisation test.
FLIPS = 20000
#: Coverage of the confidence intervals.
LEVEL = 0.95


def _as_matrix(values: Any, name: str) -> Tensor:
    x = torch.as_tensor(values, dtype=torch.float64)
    if x.dim() != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"{name} must be [prompts >= 2, levels >= 2], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite")
    return x


def paired(x: Any, *, seed: int = 0, bootstrap: int = BOOTSTRAP, flips: int = FLIPS) -> dict[str, float]:
    """``{"mean", "ci_low", "ci_high", "p", "n"}`` of per-prompt numbers ``x [P]`` (module docstring)."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    if x.numel() < 2 or not torch.isfinite(x).all():
        raise ValueError(f"x must hold at least 2 finite numbers, got {x.numel()}")
    g = torch.Generator().manual_seed(seed)
    n = x.numel()
    mean = float(x.mean())
    idx = torch.randint(0, n, (bootstrap, n), generator=g)
    boot = x[idx].mean(dim=1).sort().values
    lo = float(boot[int(math.floor((1 - LEVEL) / 2 * (bootstrap - 1)))])
    hi = float(boot[int(math.ceil((1 + LEVEL) / 2 * (bootstrap - 1)))])
    signs = torch.randint(0, 2, (flips, n), generator=g, dtype=torch.float64) * 2 - 1
    null = (signs * x).mean(dim=1).abs()
    tol = 1e-12 * max(1.0, abs(mean))
    p = (1 + int((null >= abs(mean) - tol).sum())) / (1 + flips)
    if float(x.abs().max()) == 0.0:
        p = 1.0
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "p": p, "n": n}


def per_prompt_slopes(values: Any, levels: Sequence[float]) -> Tensor:
    """Least-squares slope of each row of ``values [P, L]`` against ``levels [L]``: ``[P]`` float64."""
    v = _as_matrix(values, "values")
    x = torch.as_tensor(list(levels), dtype=torch.float64)
    if x.numel() != v.shape[1]:
        raise ValueError(f"levels must have {v.shape[1]} entries (values' columns), got {x.numel()}")
    xc = x - x.mean()
    if float((xc * xc).sum()) == 0:
        raise ValueError("levels must not all be equal")
    return (v - v.mean(dim=1, keepdim=True)) @ xc / (xc * xc).sum()


def analyse(values: Any, levels: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """The curve and its summaries for one model.

    Returns ``{"levels", "curve": [paired(values[:, l]) per level], "effect": paired(high - low),
    "slope": paired(per-prompt slopes), "monotone": bool}``; ``monotone``: the curve's means rise
    strictly from each requested level to the next (levels in increasing order).
    """
    v = _as_matrix(values, "values")
    lv = [float(x) for x in levels]
    if sorted(lv) != lv or len(set(lv)) != len(lv):
        raise ValueError(f"levels must be strictly increasing, got {list(levels)}")
    curve = [paired(v[:, k], seed=seed + k) for k in range(v.shape[1])]
    means = [c["mean"] for c in curve]
    return {
        "levels": lv,
        "curve": curve,
        "effect": paired(v[:, -1] - v[:, 0], seed=seed + 101),
        "slope": paired(per_prompt_slopes(v, lv), seed=seed + 102),
        "monotone": all(b > a for a, b in zip(means, means[1:])),
    }


def compare(values: Any, reference: Any, levels: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """Model against reference, paired by prompt: ``{"diff_of_diffs": paired(effect - reference effect),
    "slope_difference": paired(slope - reference slope), "effect_ratio": model effect / reference
    effect (None when the reference effect is <= 0)}``."""
    v, r = _as_matrix(values, "values"), _as_matrix(reference, "reference")
    if v.shape != r.shape:
        raise ValueError(f"values and reference must have the same shape, got {tuple(v.shape)} and {tuple(r.shape)}")
    effect, ref_effect = v[:, -1] - v[:, 0], r[:, -1] - r[:, 0]
    ref_mean = float(ref_effect.mean())
    return {
        "diff_of_diffs": paired(effect - ref_effect, seed=seed + 201),
        "slope_difference": paired(per_prompt_slopes(v, levels) - per_prompt_slopes(r, levels), seed=seed + 202),
        "effect_ratio": float(effect.mean()) / ref_mean if ref_mean > 0 else None,
    }
