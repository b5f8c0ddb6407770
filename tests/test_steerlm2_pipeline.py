"""steerlm2.pipeline: ``steerlm-kernels pipeline`` runs sample -> score -> train end to end (small sizes)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from steerlm_kernels import cli  # noqa: E402
from steerlm_kernels.steerlm2.formats.records import LOG_P_A, LOG_P_Y, LOG_Q, read_jsonl, sample_data_path  # noqa: E402
from steerlm_kernels.steerlm2.workflow import pipeline  # noqa: E402


def test_pipeline_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["pipeline", "--max-prompts", "3", "--num-responses", "2", "--max-new-tokens", "6", "--steps", "2",
            "--output", str(out), "--quiet"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    for step in ("sample", "score", "train"):
        assert f"pipeline: steerlm-kernels {step} " in err  # each step's command is shown, to rerun by hand
    assert "--template nemo --groups-per-step 3" in err  # train: the 3 groups each step; a fresh run
    prompts = [json.loads(x) for x in sample_data_path().read_text().splitlines()[:3]]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt_turns"] for s in samples] == [p["prompt_turns"] for p in prompts]
    assert all(len(s["responses"]) == 2 and LOG_Q not in s["responses"][0] for s in samples)
    scored = [json.loads(x) for x in (out / "scored.jsonl").read_text().splitlines()]
    assert all(k in r for s in scored for r in s["responses"] for k in (LOG_P_A, LOG_P_Y, LOG_Q))
    records = read_jsonl(out / "scored.jsonl")  # training data
    assert [len(r.responses) for r in records] == [2, 2, 2]
    assert (out / "train").is_dir() and any((out / "train").iterdir())


def test_pipeline_commands_are_the_documented_three(tmp_path) -> None:
    import argparse

    ns = pipeline.add_arguments(argparse.ArgumentParser()).parse_args(["--output", str(tmp_path)])
    cmds = pipeline.commands(ns, tmp_path)
    assert cmds["sample"][:2] == ["--prompts", str(sample_data_path())]
    assert cmds["score"][cmds["score"].index("--attribute-scorer") + 1] == pipeline.EXAMPLE_SCORER
    assert cmds["score"][cmds["score"].index("--data") + 1] == str(tmp_path / "samples.jsonl")
