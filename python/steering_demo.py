#!/usr/bin/env python
"""The steering demonstration on the built-in tiny model, CPU: ``python python/steering_demo.py --output runs/steer``.

One command for the whole story (each step is printed as the ``steerlm-kernels`` command it runs):

1. ``make_steering_data.py``: 400 synthetic prompts, SFT text of 1-40 pseudo-words, 24 evaluation
   prompts whose two reference responses agree with their verbosity label;
2. ``pipeline --sft-data``: the warm start (``sft``, 300 steps from the random tiny Llama: labels
   independent of the responses, so no steering), then one round: 48 prompts x verbosity {0, 4}
   x 8 responses sampled from it, scored (``P(y|x)`` = ``Q'`` = the SFT model, the example
   verbosity scorer), trained, and ``steer-eval`` against the SFT model at levels 0-4;
3. ``--recipe`` ``weighted-sft`` (default here: importance-weighted SFT on the round's samples with
   the randomised-label SFT anchor, 3:1, 400 steps, lr 3e-3) or ``nemo`` (NeMo's SteerLM 2.0 objective,
   ``train``; ``--train-args`` passes its options).

The report is ``OUT/round-1/steer-eval/steer_eval.md`` (and ``.json``, ``.png``); the README's
"Does it steer?" section gives the measured curve, fluency and time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

WEIGHTED_ARGS = "--weighted-fraction 0.75 --lr 3e-3 --warmup-steps 10"
NEMO_ARGS = "--lr 1e-3 --lr-schedule constant --warmup-steps 5 --save-every 1000 --eval-every 12"


def pipeline_argv(out: Path, recipe: str, train_args: str | None) -> list[str]:
    """The ``steerlm-kernels pipeline`` options of the demonstration."""
    data = out / "data"
    steps = "400" if recipe == "weighted-sft" else "36"
    args = train_args if train_args is not None else (WEIGHTED_ARGS if recipe == "weighted-sft" else NEMO_ARGS)
    return ["pipeline", "--model", "tiny", "--sft-data", str(data / "sft.jsonl"), "--sft-steps", "300",
            "--prompts", str(data / "prompts.jsonl"), "--max-prompts", "48", "--levels", "0", "4",
            "--num-responses", "8", "--max-new-tokens", "256", "--recipe", recipe, "--steps", steps,
            "--train-args", args, "--eval-prompts", str(data / "eval_prompts.jsonl"), "--eval-levels", "0", "1", "2",
            "3", "4", "--eval-samples", "4", "--output", str(out / "run"), "--overwrite", "--quiet"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="runs/steer", help="directory of the data and the run")
    ap.add_argument("--recipe", default="weighted-sft", choices=("weighted-sft", "nemo"))
    ap.add_argument("--train-args", default=None, help="override the recipe's train / sft options")
    ns = ap.parse_args(argv)
    out = Path(ns.output)
    subprocess.run([sys.executable, str(HERE / "make_steering_data.py"), "--output", str(out / "data"),
                    "--prompts", "400", "--eval-prompts", "24"], check=True)
    from steerlm_kernels import cli

    return cli.main(pipeline_argv(out, ns.recipe, ns.train_args))


if __name__ == "__main__":
    sys.exit(main())
