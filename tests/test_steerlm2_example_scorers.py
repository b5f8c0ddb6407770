"""steerlm2.example_scorers: the verbosity-vs-length toy attribute scorer."""

from __future__ import annotations

import math

import pytest

from steerlm_kernels.steerlm2.formats.example_scorers import LEVELS, parse_label, verbosity_length, verbosity_log_prob


def test_parse_label() -> None:
    assert parse_label("helpfulness:4, verbosity:2") == {"helpfulness": "4", "verbosity": "2"}
    assert parse_label(None) == {} and parse_label("junk") == {}


def test_verbosity_log_probs_are_a_distribution_over_levels() -> None:
    for text in ("hi", "one two three four", " ".join(["w"] * 40)):
        probs = [math.exp(verbosity_log_prob(k, text)) for k in LEVELS]
        assert sum(probs) == pytest.approx(1.0, abs=1e-12)
        assert all(verbosity_log_prob(k, text) <= 0 for k in LEVELS)
    # 2 words is level 0, 32 words level 4: each is the most likely level for its length
    assert max(LEVELS, key=lambda k: verbosity_log_prob(k, "a b")) == 0
    assert max(LEVELS, key=lambda k: verbosity_log_prob(k, " ".join(["w"] * 32))) == 4


def test_verbosity_length_contract() -> None:
    recs = [{"label": "helpfulness:3,verbosity:0", "responses": [{"value": "short"}, {"value": "a " * 30}]},
            {"label": "helpfulness:3", "responses": [{"value": "x"}]},
            {"label": "verbosity:9", "responses": [{"value": "x"}, {"value": "y"}]}]
    out = verbosity_length(recs)
    assert [len(r) for r in out] == [2, 1, 2]
    assert out[0][0] > out[0][1]  # the short response fits "verbosity:0" better
    assert out[1] == [0.0] and out[2] == [0.0, 0.0]  # nothing to judge: log 1
