"""steerlm2.steer_eval / steer_stats: the steering report finds steering where it is and none where it is not."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("transformers")

from steerlm_kernels import cli  # noqa: E402
from steerlm_kernels.steerlm2.evaluation import steer_eval as SE  # noqa: E402
from steerlm_kernels.steerlm2.evaluation import steer_stats as ST  # noqa: E402
from steerlm_kernels.steerlm2.formats.example_scorers import verbosity_words  # noqa: E402
from steerlm_kernels.steerlm2.models.hf_models import build_byte_tokenizer  # noqa: E402
from tests.lm_stubs import LengthLM  # noqa: E402

LEVELS = [0, 1, 2, 3, 4]


def write_prompts(path, n: int, responses: bool = True):
    rows = []
    for k in range(n):
        row = {"system": "s", "prompt_turns": [{"from": "User", "value": f"question {k}?"}],
               "label": f"helpfulness:{k % 5},verbosity:2"}
        if responses:
            row["responses"] = [{"from": "Assistant", "value": "w w w"}]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------
# statistics


def test_paired_ci_and_sign_flip_p() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 1.5, 2.5, 2.0, 1.0, 3.0, 2.0, 2.0])
    s = ST.paired(x)
    assert s["mean"] == pytest.approx(2.0) and s["n"] == 10
    assert s["ci_low"] < 2.0 < s["ci_high"] and s["ci_high"] - s["ci_low"] < 1.5
    assert s["p"] == pytest.approx(2 / 2**10, abs=3e-3)  # only all-plus / all-minus flips reach |mean|
    symmetric = ST.paired(torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5]))
    assert symmetric["mean"] == 0 and symmetric["p"] == pytest.approx(1.0)
    assert ST.paired(torch.zeros(5))["p"] == 1.0
    with pytest.raises(ValueError, match="finite"):
        ST.paired(torch.tensor([1.0, float("nan")]))


def test_slopes_effect_and_comparison() -> None:
    levels = [0.0, 1.0, 2.0, 4.0]
    values = torch.tensor([[1.0 + 3 * lv + k for lv in levels] for k in range(6)])
    assert torch.allclose(ST.per_prompt_slopes(values, levels), torch.full((6,), 3.0, dtype=torch.float64))
    a = ST.analyse(values, levels)
    assert a["monotone"] and a["effect"]["mean"] == pytest.approx(12.0) and a["slope"]["mean"] == pytest.approx(3.0)
    assert [c["mean"] for c in a["curve"]] == pytest.approx([3.5 + 3 * lv for lv in levels])
    ref = values[:, :1].expand(-1, 4) + torch.tensor([0.0, 0.5, 0.0, 1.0])  # effect 1
    c = ST.compare(values, ref, levels)
    assert c["diff_of_diffs"]["mean"] == pytest.approx(11.0) and c["effect_ratio"] == pytest.approx(12.0)
    assert ST.compare(values, values.flip(1), levels)["effect_ratio"] is None  # reference effect < 0
    assert not ST.analyse(values.flip(1), levels)["monotone"]
    with pytest.raises(ValueError, match="strictly increasing"):
        ST.analyse(values, [0, 2, 1, 4])
    with pytest.raises(ValueError, match="same shape"):
        ST.compare(values, values[:, :3], levels)


def test_label_with_keeps_other_attributes() -> None:
    assert SE.label_with("helpfulness:3,verbosity:1", "verbosity", 4) == "helpfulness:3,verbosity:4"
    assert SE.label_with(None, "verbosity", 0) == "verbosity:0"
    assert SE.label_with("helpfulness:3", "verbosity", 2.5) == "helpfulness:3,verbosity:2.5"


# ----------------------------------------------------------------------------------------------
# the evaluation on models whose steering is known


def _ns(tmp_path, prompts, **kw):
    argv = ["--model", "following", "--reference", "ignoring", "--prompts", str(prompts), "--samples", "4",
            "--max-new-tokens", "80", "--output", str(tmp_path / "out")]
    ns = SE.add_arguments(argparse.ArgumentParser()).parse_args(argv)
    vars(ns).update(kw)
    return ns


def test_a_model_that_follows_the_label_shows_its_slope_and_one_that_ignores_it_none(tmp_path) -> None:
    tok = build_byte_tokenizer()
    follow, ignore = LengthLM(tok, follow=True, per_level=2), LengthLM(tok, follow=False)
    prompts = write_prompts(tmp_path / "p.jsonl", 12)
    rep, samples = SE.evaluate(_ns(tmp_path, prompts), {"model": (follow, tok), "reference": (ignore, tok)})
    m, r, c = rep["model"], rep["reference"], rep["comparison"]
    # the follower writes 2 + 2k words (+ ~1 random extra) at level k: slope 2 per level
    assert m["slope"]["ci_low"] < 2.0 < m["slope"]["ci_high"] and m["slope"]["p"] < 0.01
    assert m["effect"]["mean"] == pytest.approx(8.0, abs=1.0) and m["effect"]["p"] < 0.01 and m["monotone"]
    assert all(abs(x["mean"] - (3 + 2 * k)) < 1.0 for k, x in zip(LEVELS, m["curve"]))
    # the other ignores it: no slope, no significance (shared seeds: the same responses at every level)
    assert r["slope"]["ci_low"] <= 0.0 <= r["slope"]["ci_high"] and r["slope"]["p"] > 0.05
    assert r["effect"]["mean"] == 0.0 and r["effect"]["p"] == 1.0 and not r["monotone"]
    assert c["diff_of_diffs"]["mean"] == pytest.approx(m["effect"]["mean"] - r["effect"]["mean"])
    assert c["diff_of_diffs"]["p"] < 0.01
    assert m["capped_share"] == 0 and m["heldout_nll"] == pytest.approx(r["heldout_nll"])
    assert len(samples) == 2 * 12 * 5 and all(len(s["responses"]) == 4 for s in samples)
    # the same prompt at every level shares its seeds: the ignoring model's responses are identical
    ign = [s for s in samples if s["model"] == "reference" and s["line"] == 1]
    assert len({tuple(tuple(x["token_ids"]) for x in s["responses"]) for s in ign}) == 1
    assert {s["label"] for s in ign} == {f"helpfulness:0,verbosity:{k}" for k in LEVELS}


def test_capped_share_is_reported(tmp_path) -> None:
    tok = build_byte_tokenizer()
    follow = LengthLM(tok, follow=True, per_level=2)
    prompts = write_prompts(tmp_path / "p.jsonl", 4, responses=False)
    ns = _ns(tmp_path, prompts, max_new_tokens=8, reference=None)
    rep, _ = SE.evaluate(ns, {"model": (follow, tok)})
    assert 0 < rep["model"]["capped_share"] <= 1 and rep["model"]["heldout_nll"] is None  # no responses: no NLL
    by_level = rep["model"]["capped_by_level"]
    assert by_level[2:] == [1.0, 1.0, 1.0] and by_level[0] < 1  # 6+ words (11+ tokens) cannot end within 8
    assert rep["model"]["capped_share"] == pytest.approx(sum(by_level) / 5)
    assert "reference" not in rep and "comparison" not in rep


def test_cli_writes_the_report_and_refuses_to_overwrite(tmp_path, capsys) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "rep"
    argv = ["steer-eval", "--model", "tiny", "--prompts", str(prompts), "--levels", "0", "4", "--samples", "2",
            "--max-new-tokens", "4", "--output", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "| requested verbosity |" in text and "held-out NLL" in text
    rep = json.loads((out / "steer_eval.json").read_text())
    assert rep["settings"]["levels"] == [0, 4] and len(rep["model"]["values"]) == 3
    assert rep["model"]["capped_share"] == 1.0  # a random tiny model does not stop in 4 tokens
    assert (out / "steer_eval.md").read_text().startswith("steer-eval: tiny")
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3 * 2
    assert cli.main(argv) == 2
    assert "already holds a report" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite", "--levels", "4", "0"]) == 2
    assert "--levels must be at least 2 strictly increasing" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite", "--scorer", "nowhere_module:f"]) == 2
    assert "--scorer 'nowhere_module:f': import failed" in capsys.readouterr().err


def test_example_verbosity_measure() -> None:
    recs = [{"responses": [{"value": "a b  c"}, {"value": ""}]}, {"responses": [{"value": "one"}]}]
    assert verbosity_words(recs) == [[3.0, 0.0], [1.0]]
