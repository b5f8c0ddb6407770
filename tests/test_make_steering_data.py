"""python/make_steering_data.py: the demonstration's synthetic data (deterministic, every verbosity level present)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "python" / "make_steering_data.py"


def _run(out: Path, seed: int = 0) -> None:
    subprocess.run([sys.executable, str(SCRIPT), "--output", str(out), "--prompts", "60", "--eval-prompts", "5",
                    "--seed", str(seed)], check=True, capture_output=True)


def test_files_lengths_and_determinism(tmp_path) -> None:
    _run(tmp_path / "a")
    _run(tmp_path / "b")
    _run(tmp_path / "c", seed=1)
    names = ("sft.jsonl", "prompts.jsonl", "eval_prompts.jsonl")
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    assert (tmp_path / "a" / "sft.jsonl").read_bytes() != (tmp_path / "c" / "sft.jsonl").read_bytes()
    sft = [json.loads(x) for x in (tmp_path / "a" / "sft.jsonl").read_text().splitlines()]
    prompts = [json.loads(x) for x in (tmp_path / "a" / "prompts.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (tmp_path / "a" / "eval_prompts.jsonl").read_text().splitlines()]
    assert len(sft) == len(prompts) == 60 and len(evals) == 5
    assert [{k: r[k] for k in ("system", "prompt_turns", "label")} for r in sft] == prompts
    words = [len(r["value"].split()) for rec in sft for r in rec["responses"]]
    assert min(words) >= 1 and max(words) <= 40
    levels = {min(4, max(0, round(math.log2(w) - 1))) for w in words}  # the example scorer's level of a length
    assert levels == {0, 1, 2, 3, 4}
    assert all(len(r["responses"]) == 2 for r in evals)


def test_steering_demo_command_is_a_valid_pipeline(tmp_path) -> None:
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("steering_demo", SCRIPT.parent / "steering_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    from steerlm_kernels.steerlm2.workflow import pipeline

    for recipe in ("weighted-sft", "nemo"):
        argv = demo.pipeline_argv(tmp_path, recipe, None)
        ns = pipeline.add_arguments(argparse.ArgumentParser()).parse_args(argv[1:])
        assert ns.recipe == recipe and ns.levels == ns.eval_levels == [0, 1, 2, 3, 4] and ns.iterations == 2
        assert ns.sft_data == str(tmp_path / "data" / "sft.jsonl") and ns.max_new_tokens == 256
