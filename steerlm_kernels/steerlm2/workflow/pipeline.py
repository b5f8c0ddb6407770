"""``steerlm-kernels pipeline``: sample -> score -> train, end to end, on the embedded default.

With no arguments: the prompts of the bundled sample file, the built-in tiny model, on CPU, in a
few minutes. It runs the three commands a user runs on real models, with the same options, in
``--output`` (default ``runs/pipeline-<timestamp>``)::

    steerlm-kernels sample --prompts PROMPTS --model tiny --num-responses 4 --output DIR/samples.jsonl
    steerlm-kernels score  --data DIR/samples.jsonl --output DIR/scored.jsonl \\
        --sft-model tiny --steerlm-model tiny \\
        --attribute-scorer steerlm_kernels.steerlm2.formats.example_scorers:verbosity_length
    steerlm-kernels train  --data DIR/scored.jsonl --model tiny --output DIR/train

(the same ``--template`` and ``--seed`` for all three). The attribute scorer is the toy of
:mod:`~steerlm_kernels.steerlm2.formats.example_scorers` (response length against the requested
verbosity), the template for a real attribute model.

An ``--output`` that holds an earlier pipeline is refused without ``--resume`` or ``--overwrite``.
``--resume`` continues where a killed run stopped: ``sample`` / ``score`` get ``--resume``, ``train``
``--resume auto``, each checking its own output's provenance; the pipeline's own settings
(``DIR/pipeline.json``: prompts' fingerprint, ``--max-prompts``, model, responses, tokens, template,
scorer, seed) are compared first, so a rerun with another ``--max-prompts`` is refused at once,
naming it, instead of shifting the training data under a resumed checkpoint. ``--overwrite`` passes
``--overwrite`` to the three steps. ``DIR/.lock`` holds the directory while the pipeline runs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerlm_kernels.steerlm2.datatools import sample, score
from steerlm_kernels.steerlm2.formats.jsonl_stream import count_nonblank_lines
from steerlm_kernels.steerlm2.formats.records import sample_data_path
from steerlm_kernels.steerlm2.formats.templates import TEMPLATES
from steerlm_kernels.steerlm2.workflow.rounds import add_round_arguments, run_rounds, wanted

__all__ = ["DEFAULTS", "EXAMPLE_SCORER", "add_arguments", "commands", "run"]

#: Prompt groups per training step (fewer when the file has fewer).
GROUPS_PER_STEP = 8
#: The ``--attribute-scorer`` of the pipeline's score step.
EXAMPLE_SCORER = "steerlm_kernels.steerlm2.formats.example_scorers:verbosity_length"

#: The pipeline's recorded settings (``pipeline.json``), compared on ``--resume``.
SETTINGS = ("prompts", "max_prompts", "model", "num_responses", "max_new_tokens", "template", "attribute_scorer",
            "seed")

DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "num_responses": 4,
    "max_new_tokens": 48,
    "template": "nemo",
    "steps": 60,
    "seed": 0,
}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``pipeline`` options to ``parser``; returns it."""
    d = DEFAULTS
    parser.description = ("sample -> score -> train on the embedded default (bundled prompts, built-in tiny model, "
                          "CPU, a few minutes)")
    parser.add_argument("--prompts", default=None, help="prompts JSONL (default: the bundled sample's 40 prompts)")
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--model", default=d["model"],
                        help="model of all three steps: sampling (Q'), both scores, training (default: %(default)s)")
    parser.add_argument("--num-responses", type=int, default=d["num_responses"],
                        help="responses per prompt (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"],
                        help="longest sampled response (default: %(default)s)")
    parser.add_argument("--template", default=d["template"], choices=TEMPLATES,
                        help="prompt template of all three steps (default: %(default)s)")
    parser.add_argument("--attribute-scorer", default=EXAMPLE_SCORER, metavar="MODULE:FUNCTION",
                        help="log(P(a|x,y)) of the score step (default: the example %(default)s)")
    parser.add_argument("--steps", type=int, default=d["steps"], help="training steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d["seed"], help="seed of every step (default: %(default)s)")
    parser.add_argument("--output", default=None, help="directory of the three outputs (default: runs/pipeline-<time>)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines from sample and score")
    parser.add_argument("--resume", action="store_true", help="continue an earlier pipeline in --output (checked)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier pipeline in --output")
    parser.add_argument("--allow-changed", default=None, metavar="SETTING[,SETTING]",
                        help="with --resume: accept these changes of the pipeline's recorded settings (the steps "
                             "still check their own): " + ", ".join(SETTINGS))
    return add_round_arguments(parser)  # --iterations, --levels, --sft-data, steer-eval per round (rounds)


def _train_argv(ns: argparse.Namespace, scored: Path, out: Path) -> tuple[list[str], Any]:
    """``train``'s argv and its module."""
    from steerlm_kernels.steerlm2.training import train

    groups = count_nonblank_lines(scored)  # a small prompt file: every step takes all its groups
    argv = ["--data", str(scored), "--model", ns.model, "--output", str(out), "--steps", str(ns.steps),
            "--seed", str(ns.seed), "--template", ns.template, *_flags(ns, "--resume", "auto"),
            "--groups-per-step", str(max(1, min(GROUPS_PER_STEP, groups)))]
    return argv, train


def _flags(ns: argparse.Namespace, *resume: str) -> list[str]:
    """What the steps get of ``--resume`` / ``--overwrite`` (``resume``: the step's spelling)."""
    return list(resume) if getattr(ns, "resume", False) else ["--overwrite"] if getattr(ns, "overwrite", False) else []


def commands(ns: argparse.Namespace, out: Path) -> dict[str, list[str]]:
    """The argv of each step (``sample``, ``score``; ``train`` is built when it runs)."""
    prompts = str(out / "prompts.jsonl") if ns.max_prompts is not None else str(ns.prompts or sample_data_path())
    quiet = ["--quiet"] if ns.quiet else []
    return {
        "sample": ["--prompts", prompts, "--model", ns.model, "--num-responses", str(ns.num_responses),
                   "--output", str(out / "samples.jsonl"), "--template", ns.template,
                   "--max-new-tokens", str(ns.max_new_tokens), "--seed", str(ns.seed), *_flags(ns, "--resume"),
                   *quiet],
        "score": ["--data", str(out / "samples.jsonl"), "--output", str(out / "scored.jsonl"),
                  "--sft-model", ns.model, "--steerlm-model", ns.model, "--template", ns.template,
                  "--attribute-scorer", ns.attribute_scorer, "--seed", str(ns.seed), *_flags(ns, "--resume"),
                  *quiet],
    }


def _first_prompts(src: str | Path, dst: Path, n: int) -> None:
    """The first ``n`` non-blank lines of ``src`` into ``dst`` (bytes as they are)."""
    if n < 1:
        raise ValueError(f"--max-prompts must be positive, got {n}")
    kept = []
    with open(src, "rb") as f:
        for raw in f:
            if raw.strip():
                kept.append(raw if raw.endswith(b"\n") else raw + b"\n")
                if len(kept) == n:
                    break
    dst.write_bytes(b"".join(kept))


#: What a pipeline writes in its directory (an earlier pipeline holds one of them).
PIPELINE_FILES = ("pipeline.json", "prompts.jsonl", "samples.jsonl", "scored.jsonl", "train")


def _claim(ns: argparse.Namespace, out: Path, stack: contextlib.ExitStack) -> None:
    """Lock ``out``, refuse an earlier pipeline without --resume / --overwrite, compare / record the
    pipeline's settings, write the prompts of --max-prompts. OutputError / ValueError / OSError."""
    from steerlm_kernels.steerlm2.formats.outputs import OutputLock, refuse_existing
    from steerlm_kernels.steerlm2.formats.provenance import (
        compare_settings,
        file_fingerprint,
        model_fingerprint,
        parse_allow_changed,
        read_provenance,
        write_provenance,
    )
    from steerlm_kernels.steerlm2.models.hf_models import TINY_MODELS

    allowed = parse_allow_changed(getattr(ns, "allow_changed", None), SETTINGS)
    if not 0 <= ns.seed <= 2**32 - 1:
        raise ValueError(f"--seed must be an integer in [0, {2**32 - 1}], got {ns.seed}")
    if ns.max_prompts is not None and ns.max_prompts < 1:
        raise ValueError(f"--max-prompts must be positive, got {ns.max_prompts}")
    out.mkdir(parents=True, exist_ok=True)
    stack.enter_context(OutputLock(out / ".lock", f"--output {out}"))
    refuse_existing(f"--output {out}", [n for n in PIPELINE_FILES if (out / n).exists()], resume=ns.resume,
                    overwrite=ns.overwrite)
    prompts = ns.prompts or sample_data_path()
    settings = {"prompts": file_fingerprint(prompts), "max_prompts": ns.max_prompts,
                "model": model_fingerprint(ns.model, TINY_MODELS), "num_responses": ns.num_responses,
                "max_new_tokens": ns.max_new_tokens, "template": ns.template, "attribute_scorer": ns.attribute_scorer,
                "seed": ns.seed}
    about = {"prompts": str(prompts), "model": ns.model}
    recorded = read_provenance(out / "pipeline.json") if ns.resume else None
    if recorded is not None:
        for line in compare_settings(recorded["settings"], settings, where=f"--output {out}", allowed=allowed,
                                     about=(recorded["about"], about)):
            print(f"pipeline: {line}", file=sys.stderr)
    write_provenance(out / "pipeline.json", "pipeline", settings, about)
    if ns.max_prompts is not None:
        _first_prompts(prompts, out / "prompts.jsonl", ns.max_prompts)


def run(ns: argparse.Namespace) -> int:
    """Run the three steps; returns the first non-zero exit status, else 0."""
    with contextlib.ExitStack() as stack:
        return _run(ns, stack)


def _run(ns: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    out = Path(ns.output) if ns.output else Path("runs") / time.strftime("pipeline-%Y%m%d-%H%M%S")
    try:
        _claim(ns, out, stack)
    except (OSError, ValueError) as exc:
        print(f"steerlm-kernels pipeline: error: {exc}", file=sys.stderr)
        return 2
    if wanted(ns):  # warm start / several levels / iterations: rounds.py
        return run_rounds(ns, out, _train_argv)
    argvs = commands(ns, out)
    t0 = time.perf_counter()
    for name, module in (("sample", sample), ("score", score)):
        print(f"pipeline: steerlm-kernels {name} {' '.join(argvs[name])}", file=sys.stderr)
        parser = module.add_arguments(argparse.ArgumentParser(prog=f"steerlm-kernels {name}"))
        status = module.run(parser.parse_args(argvs[name]))
        if status:
            return status
    train_argv, train = _train_argv(ns, out / "scored.jsonl", out / "train")
    print(f"pipeline: steerlm-kernels train {' '.join(train_argv)}", file=sys.stderr)
    status = train.run(train.add_arguments(argparse.ArgumentParser(prog="steerlm-kernels train")).parse_args(
        train_argv))
    if status:
        return status
    print(f"pipeline: done in {time.perf_counter() - t0:.0f}s: {out / 'samples.jsonl'}, {out / 'scored.jsonl'}, "
          f"{out / 'train'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m steerlm_kernels.steerlm2.workflow.pipeline [options]``."""
    return run(add_arguments(argparse.ArgumentParser(prog="steerlm-kernels pipeline")).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
