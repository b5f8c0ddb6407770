"""steerlm2.sft: the warm start trains on labels drawn independently of the responses."""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter

import pytest

pytest.importorskip("transformers")

from steerlm_kernels import cli  # noqa: E402
from steerlm_kernels.steerlm2.formats.jsonl_stream import CommandError  # noqa: E402
from steerlm_kernels.steerlm2.formats.records import sample_data_path  # noqa: E402
from steerlm_kernels.steerlm2.models.hf_models import load_model_and_tokenizer  # noqa: E402
from steerlm_kernels.steerlm2.training import sft  # noqa: E402


def test_random_label_ignores_the_response_and_keeps_other_attributes() -> None:
    rng = random.Random(0)
    labels = [sft.random_label("helpfulness:3,verbosity:1", rng, randomise=["verbosity"], levels=[0, 1, 2, 3, 4],
                               unlabelled_fraction=0.3) for _ in range(5000)]
    none = sum(lab is None for lab in labels) / len(labels)
    assert abs(none - 0.3) < 0.03
    counts = Counter(lab for lab in labels if lab is not None)
    assert set(counts) == {f"helpfulness:3,verbosity:{k}" for k in range(5)}
    assert max(counts.values()) / min(counts.values()) < 1.2  # uniform over the levels
    assert sft.random_label(None, rng, randomise=["verbosity"], levels=[2], unlabelled_fraction=0) == "verbosity:2"


def test_read_pairs_names_bad_input(tmp_path) -> None:
    pairs = sft.read_pairs(sample_data_path())
    assert len(pairs) > 40 and all(p["response"] for p in pairs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"system": "", "prompt_turns": [], "responses": [{"value": ""}]}) + "\n")
    with pytest.raises(CommandError, match="line 1: responses\\[0\\] needs a non-empty value"):
        sft.read_pairs(bad)
    with pytest.raises(CommandError, match="--data .*: no such file"):
        sft.read_pairs(tmp_path / "missing.jsonl")


def test_sft_lowers_the_loss_and_writes_a_model(tmp_path, capsys) -> None:
    out = tmp_path / "sft"
    argv = ["sft", "--data", str(sample_data_path()), "--output", str(out), "--steps", "30", "--batch-size", "8",
            "--heldout", str(sample_data_path()), "--eval-every", "30", "--warmup-steps", "2"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] < summary["first_loss"] - 1.0  # random bytes (5.6 nats) -> text
    assert summary["heldout_nll_final"] < summary["heldout_nll_start"] - 1.0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31)) and "heldout_nll" in rows[-1]
    model, tok = load_model_and_tokenizer(str(out / "final"))
    assert sum(p.numel() for p in model.parameters()) > 0 and tok.eos_token_id == 258
    assert cli.main([*argv[:-6], "--steps", "0"]) == 2
    assert "--steps must be positive" in capsys.readouterr().err


def test_sft_parser_defaults() -> None:
    ns = sft.add_arguments(argparse.ArgumentParser()).parse_args(["--data", "d", "--output", "o"])
    assert ns.model == "tiny" and ns.unlabelled_fraction == 0.3 and ns.randomise == "verbosity"


def test_weighted_data_reads_the_importance_weights_and_trains(tmp_path, capsys) -> None:
    scored = tmp_path / "scored.jsonl"
    resp = [{"from": "Assistant", "value": v, "log(P(a|x,y))": a, "log(P(y|x))": -5.0, "log(Q(y|a,x))": -5.0}
            for v, a in (("short.", -0.1), ("a much longer answer here.", -6.0))]
    scored.write_text(json.dumps({"system": "", "prompt_turns": [{"from": "User", "value": "q?"}],
                                  "label": "verbosity:0", "responses": resp}) + "\n")
    (rec, ws), = sft.read_groups(scored)
    assert rec["label"] == "verbosity:0" and rec["responses"] == ["short.", "a much longer answer here."]
    assert sum(ws) == pytest.approx(1.0) and ws[0] == pytest.approx(1 / (1 + math.exp(-5.9)), rel=1e-6)
    out = tmp_path / "w"
    argv = ["sft", "--data", str(sample_data_path()), "--weighted-data", str(scored), "--output", str(out),
            "--steps", "3", "--batch-size", "4"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["settings"]["weighted_data"] == str(scored)
    assert cli.main([*argv, "--weighted-fraction", "2"]) == 2
    assert "--weighted-fraction must be in [0, 1]" in capsys.readouterr().err
