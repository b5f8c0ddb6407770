#!/usr/bin/env python
"""The steering demonstration on the built-in tiny model, CPU: ``python python/steering_demo.py --output runs/steer``.

One command for the whole story (each step is printed as the ``steerlm-kernels`` command it runs):

1. ``make_steering_data.py``: 400 synthetic prompts, SFT text of 1-40 pseudo-words, 40 evaluation
   prompts whose two reference responses agree with their verbosity label;
2. ``pipeline --sft-data``: the warm start (``sft``, 1000 steps from the random tiny Llama, to the
   plateau of its held-out NLL: labels independent of the responses, so no steering), then
   ``--iterations`` rounds (default 2): 200 prompts x verbosity 0-4 x 8 responses sampled from ``Q'``
   (the latest model), scored (``P(y|x)`` = the SFT model, the example verbosity scorer), trained,
   and ``steer-eval`` against the SFT model at levels 0-4 (40 prompts x 8 samples);
3. ``--recipe`` ``weighted-sft`` (default here: importance-weighted SFT on the round's samples with an
   unlabelled SFT anchor, 3:1, 500 steps, lr 3e-3) or ``nemo`` (NeMo's SteerLM 2.0 objective,
   ``train``, 200 steps at lr 5e-4; ``--train-args`` passes its options).

The report of round ``r`` is ``OUT/run/round-<r>/steer-eval/steer_eval.md`` (and ``.json``, ``.png``); the README's
"Does it steer?" section gives the measured curve, fluency and time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

WEIGHTED_ARGS = "--weighted-fraction 0.75 --unlabelled-fraction 1.0 --lr 3e-3 --warmup-steps 10 --eval-every 100"
NEMO_ARGS = "--lr 5e-4 --lr-schedule constant --warmup-steps 10 --save-every 100 --eval-every 50"


def pipeline_argv(out: Path, recipe: str, train_args: str | None, iterations: int = 2, seed: int = 0) -> list[str]:
    """The ``steerlm-kernels pipeline`` options of the demonstration."""
    data = out / "data"
    steps = "500" if recipe == "weighted-sft" else "200"
    args = train_args if train_args is not None else (WEIGHTED_ARGS if recipe == "weighted-sft" else NEMO_ARGS)
    return ["pipeline", "--model", "tiny", "--sft-data", str(data / "sft.jsonl"), "--sft-steps", "1000",
            "--prompts", str(data / "prompts.jsonl"), "--max-prompts", "200", "--levels", "0", "1", "2", "3", "4",
            "--num-responses", "8", "--max-new-tokens", "256", "--recipe", recipe, "--steps", steps,
            "--iterations", str(iterations), "--train-args", args, "--eval-prompts", str(data / "eval_prompts.jsonl"),
            "--eval-levels", "0", "1", "2", "3", "4", "--eval-samples", "8", "--seed", str(seed),
            "--output", str(out / "run"), "--overwrite", "--quiet"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="runs/steer", help="directory of the data and the run")
    ap.add_argument("--recipe", default="weighted-sft", choices=("weighted-sft", "nemo"))
    ap.add_argument("--train-args", default=None, help="override the recipe's train / sft options")
    ap.add_argument("--iterations", type=int, default=2, help="sample -> score -> train rounds (default: 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data, the models and the draws (default: 0)")
    ns = ap.parse_args(argv)
    out = Path(ns.output)
    subprocess.run([sys.executable, str(HERE / "make_steering_data.py"), "--output", str(out / "data"),
                    "--prompts", "400", "--eval-prompts", "40", "--seed", str(ns.seed)], check=True)
    from steerlm_kernels import cli

    return cli.main(pipeline_argv(out, ns.recipe, ns.train_args, ns.iterations, ns.seed))


if __name__ == "__main__":
    sys.exit(main())
