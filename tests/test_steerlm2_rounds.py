"""steerlm2.rounds: pipeline --iterations / --levels: Q' is the latest model, the SFT model stays, a curve per round."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("transformers")

from steerlm_kernels import cli  # noqa: E402
from steerlm_kernels.steerlm2.formats.records import sample_data_path  # noqa: E402
from steerlm_kernels.steerlm2.workflow import rounds  # noqa: E402


def test_expand_prompts_sets_the_attribute_per_level(tmp_path) -> None:
    n = rounds.expand_prompts(sample_data_path(), tmp_path / "p.jsonl", "verbosity", [0, 4], max_prompts=3)
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert n == 6 == len(rows) and all("responses" not in r for r in rows)
    assert [r["label"].split(",")[-1] for r in rows] == ["verbosity:0", "verbosity:4"] * 3
    assert rows[0]["prompt_turns"] == rows[1]["prompt_turns"] != rows[2]["prompt_turns"]
    assert rounds.expand_prompts(sample_data_path(), tmp_path / "q.jsonl", "verbosity", None, 2) == 2


def test_pipeline_rounds_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["pipeline", "--iterations", "2", "--levels", "0", "4", "--max-prompts", "2", "--num-responses", "2",
            "--max-new-tokens", "6", "--steps", "1", "--eval-samples", "1", "--eval-levels", "0", "4",
            "--keep-flagged", "--output", str(out), "--quiet"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    # round 2 samples from and trains round 1's model; the SFT model (here: tiny) scores log P(y|x) in both
    assert f"--model {out / 'round-1' / 'train' / 'final'}" in err
    assert f"--sft-model tiny --steerlm-model {out / 'round-1' / 'train' / 'final'}" in err
    for r in (1, 2):
        samples = [json.loads(x) for x in (out / f"round-{r}" / "samples.jsonl").read_text().splitlines()]
        assert [s["label"].split(",")[-1] for s in samples] == ["verbosity:0", "verbosity:4"] * 2
        assert (out / f"round-{r}" / "steer-eval" / "steer_eval.json").is_file()
    summary = json.loads((out / "rounds.json").read_text())
    assert [s["round"] for s in summary] == [1, 2] and all(len(s["curve"]) == 2 for s in summary)
    assert all(s["comparison"]["diff_of_diffs"]["n"] == 40 for s in summary)  # the bundled 40 eval prompts
    if importlib.util.find_spec("matplotlib") is not None:  # every round's curve in one figure
        assert (out / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flagged_responses_are_dropped_before_scoring(tmp_path) -> None:
    src = tmp_path / "s.jsonl"
    rows = [{"responses": [{"value": "a", "capped": True}, {"value": "b", "capped": False, "exact": True}]},
            {"responses": [{"value": "c", "exact": False}]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rounds.drop_flagged_file(src, tmp_path / "k.jsonl") == (2, 1)
    kept = [json.loads(x) for x in (tmp_path / "k.jsonl").read_text().splitlines()]
    assert kept == [{"responses": [{"value": "b", "capped": False, "exact": True}]}]


def test_weighted_sft_recipe_warm_starts_and_trains_with_sft(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["pipeline", "--sft-data", str(sample_data_path()), "--sft-steps", "2", "--recipe", "weighted-sft",
            "--levels", "0", "4", "--max-prompts", "2", "--num-responses", "2", "--max-new-tokens", "6", "--steps",
            "2", "--eval-samples", "1", "--eval-levels", "0", "4", "--keep-flagged", "--output", str(out), "--quiet",
            "--train-args", "--batch-size 4"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    sft_model = out / "sft" / "final"
    assert f"steerlm-kernels sft --data {sample_data_path()}" in err  # the warm start
    assert f"--sft-model {sft_model} --steerlm-model {sft_model}" in err  # round 1: Q' = the SFT model
    assert f"--weighted-data {out / 'round-1' / 'scored.jsonl'}" in err and "--batch-size 4" in err
    assert (out / "round-1" / "train" / "final").is_dir() and (out / "rounds.json").is_file()
    bad = ["pipeline", "--recipe", "weighted-sft", "--levels", "0", "4", "--output", str(tmp_path / "x")]
    assert cli.main(bad) == 2
    assert "--recipe weighted-sft needs --sft-data" in capsys.readouterr().err
