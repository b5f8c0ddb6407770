"""Example attribute scorers for ``steerlm-kernels score --attribute-scorer MODULE:FUNCTION``.

An attribute scorer gives ``log(P(a|x,y))``: how likely the attribute string ``a`` (the record's
``label``, e.g. ``"helpfulness:4,verbosity:2"``) is for the prompt ``x`` and a response ``y``. Its
contract, which :func:`verbosity_length` follows and a real attribute model (e.g. a HelpSteer2
regression model turned into per-attribute categorical probabilities) would follow too::

    def my_scorer(records: list[dict]) -> list[list[float]]:
        # records: SteerLM 2.0 records as dicts ("system", "prompt_turns", "label", "responses"
        #          with "value"; log(P(y|x)) and log(Q(y|a,x)) already filled by score)
        # returns: per record, one log-probability per response (finite, <= 0)

``score`` calls it on batches of records (a window at a time) for the responses that lack
``log(P(a|x,y))``; values already present in the input are kept.

:func:`verbosity_length` is a toy that needs no model: it reads the requested ``verbosity`` level
``k`` (0-4, HelpSteer's scale) from the label and scores the response's length in words ``w``
under a categorical over the levels centred on ``c(w) = log2(w) - 1`` (level ``k`` ~ ``2^(k+1)``
words), ``P(k | y) = softmax_k(-(k - c(w))^2 / (2 sigma^2))``. Labels without a verbosity
attribute say nothing it can judge: ``log 1 = 0``.

Measures for ``steerlm-kernels steer-eval --scorer MODULE:FUNCTION`` have another contract: the
attribute's value as a number, ``function(records) -> per record, one finite float per response``
(records as above; their responses also carry ``token_ids``, ``capped`` and ``exact`` from
sampling). :func:`verbosity_words` is the verbosity measure matching the length model above: the
response's length in words (level ``k`` ~ ``2^(k+1)`` words).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["LEVELS", "SIGMA", "parse_label", "verbosity_length", "verbosity_log_prob", "verbosity_words"]

#: HelpSteer's attribute levels.
LEVELS: tuple[int, ...] = (0, 1, 2, 3, 4)
#: Width of the length model, in levels.
SIGMA = 0.75


def parse_label(label: str | None) -> dict[str, str]:
    """``"helpfulness:4,verbosity:2"`` -> ``{"helpfulness": "4", "verbosity": "2"}`` (empty for None)."""
    out: dict[str, str] = {}
    for part in (label or "").split(","):
        name, sep, value = part.partition(":")
        if sep and name.strip():
            out[name.strip()] = value.strip()
    return out


def verbosity_log_prob(level: int, text: str) -> float:
    """``log P(verbosity = level | response text)`` under the length model above (<= 0)."""
    words = max(len(text.split()), 1)
    centre = math.log2(words) - 1.0
    logits = [-((k - centre) ** 2) / (2 * SIGMA**2) for k in LEVELS]
    top = max(logits)
    lse = top + math.log(sum(math.exp(x - top) for x in logits))
    return min(logits[LEVELS.index(level)] - lse, 0.0)


def verbosity_length(records: list[dict[str, Any]]) -> list[list[float]]:
    """``log(P(a|x,y))`` of each response from its length and the label's ``verbosity`` (see above)."""
    out = []
    for record in records:
        value = parse_label(record.get("label")).get("verbosity")
        try:
            level = int(value) if value is not None else None
        except ValueError:
            level = None
        if level not in LEVELS:
            out.append([0.0 for _ in record["responses"]])
            continue
        out.append([verbosity_log_prob(level, r["value"]) for r in record["responses"]])
    return out


def verbosity_words(records: list[dict[str, Any]]) -> list[list[float]]:
    """``steer-eval``'s verbosity measure: each response's length in words (whitespace-separated)."""
    return [[float(len(r["value"].split())) for r in record["responses"]] for record in records]
