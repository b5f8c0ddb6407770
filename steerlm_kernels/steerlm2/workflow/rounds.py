"""``pipeline`` in rounds: a warm start, several attribute values per prompt, iterations, steer-eval per round.

Used by ``steerlm-kernels pipeline`` when ``--iterations`` > 1, ``--levels`` or ``--sft-data`` is given
(without them the pipeline is the single sample -> score -> train pass). In ``--output``::

    sft/                 steerlm-kernels sft --data SFT_DATA (with --sft-data): the SFT model P(y|x), also Q' of round 1
    round-<r>/prompts.jsonl   every prompt once per --levels value (label's ATTRIBUTE set to it)
    round-<r>/samples.jsonl   steerlm-kernels sample --model Q'   (seed --seed + r - 1)
    round-<r>/kept.jsonl      the samples without the responses cut at the token cap or not exact
                              (generation.drop_flagged; --keep-flagged keeps them)
    round-<r>/scored.jsonl    steerlm-kernels score --sft-model SFT --steerlm-model Q'
    round-<r>/train/          steerlm-kernels train --model Q' (its final/ is Q' of round r + 1); with
                              --recipe weighted-sft: steerlm-kernels sft --model Q' --weighted-data scored
                              --data SFT_DATA (importance-weighted SFT + anchor: not NeMo's objective)
    round-<r>/steer-eval/     steerlm-kernels steer-eval --model round-<r>/train/final --reference SFT
    rounds.json               per round: the steer-eval summary (effect, p, slope, monotone, NLL, capped)
    rounds.png                every round's curve beside the SFT model's (with matplotlib)

The SFT model stays fixed (``log P(y|x)`` of every round); ``Q'`` is the latest model. Each step is
the command a user would run, with the pipeline's ``--resume`` / ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from steerlm_kernels.steerlm2.datatools.generation import drop_flagged
from steerlm_kernels.steerlm2.formats.jsonl_stream import iter_objects
from steerlm_kernels.steerlm2.formats.records import sample_data_path

__all__ = ["add_round_arguments", "drop_flagged_file", "expand_prompts", "plot_rounds", "run_rounds", "wanted"]


def add_round_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the rounds' options to ``pipeline``'s parser; returns it."""
    a = parser.add_argument
    a("--iterations", type=int, default=1, help="sample -> score -> train rounds; Q' = the latest model (default: 1)")
    a("--levels", type=int, nargs="+", default=None,
      help="sample every prompt once per level of --attribute (default: the prompts' own labels)")
    a("--attribute", default="verbosity", help="the attribute of --levels and of steer-eval (default: %(default)s)")
    a("--sft-data", default=None, help="warm start: steerlm-kernels sft on this SteerLM 2.0 JSONL before round 1")
    a("--sft-steps", type=int, default=1000, help="steps of the warm start (default: %(default)s)")
    a("--eval-prompts", default=None, help="steer-eval's prompts (default: --prompts); responses = held-out text")
    a("--eval-samples", type=int, default=4, help="steer-eval's samples per prompt and level (default: %(default)s)")
    a("--eval-levels", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="steer-eval's levels (default: 0..4)")
    a("--no-eval", action="store_true", help="no steer-eval after the rounds")
    a("--keep-flagged", action="store_true", help="score the responses cut at the token cap / not exact too")
    a("--recipe", default="nemo", choices=("nemo", "weighted-sft"),
      help="nemo: steerlm-kernels train (NeMo's SteerLM 2.0 objective, the default); weighted-sft: sft on the scored "
           "responses drawn by their importance weights, mixed with --sft-data (needs it)")
    a("--train-args", default="", help="extra train (or sft) options, e.g. \"--lr 1e-3 --lr-schedule constant\"")
    return parser


def wanted(ns: argparse.Namespace) -> bool:
    """Whether the pipeline runs in rounds (any of the rounds' options given)."""
    return getattr(ns, "iterations", 1) != 1 or bool(getattr(ns, "levels", None)) or bool(getattr(ns, "sft_data", None))


def expand_prompts(src: str | Path, dst: Path, attribute: str, levels: list[int] | None,
                   max_prompts: int | None = None) -> int:
    """Write the prompts of ``src`` (the first ``max_prompts``), each once per level with its label's
    ``attribute`` set to it (``levels`` None: as they are), to ``dst``; returns the number written."""
    from steerlm_kernels.steerlm2.evaluation.steer_eval import label_with

    rows = []
    for _, obj in iter_objects(src):
        if not isinstance(obj, dict):
            continue
        if max_prompts is not None and len(rows) >= max_prompts * max(1, len(levels or [0])):
            break
        base = {k: v for k, v in obj.items() if k not in ("responses", "unscored")}
        if levels is None:
            rows.append(base)
        else:
            rows.extend({**base, "label": label_with(base.get("label"), attribute, lv)} for lv in levels)
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def drop_flagged_file(samples: Path, kept: Path) -> tuple[int, int]:
    """``kept`` = ``samples`` without flagged responses (records left empty dropped); ``(dropped, kept)``."""
    dropped = n_kept = 0
    lines = []
    for _, obj in iter_objects(samples):
        if not isinstance(obj, dict):
            continue
        obj, n = drop_flagged(obj)
        dropped += n
        if obj.get("responses"):
            n_kept += len(obj["responses"])
            lines.append(json.dumps(obj) + "\n")
    kept.write_text("".join(lines))
    return dropped, n_kept


def _call(name: str, argv: list[str]) -> int:
    import importlib

    from steerlm_kernels.steerlm2 import COMMANDS

    module = importlib.import_module(COMMANDS[name])
    print(f"pipeline: steerlm-kernels {name} {shlex.join(argv)}", file=sys.stderr)
    return module.run(module.add_arguments(argparse.ArgumentParser(prog=f"steerlm-kernels {name}")).parse_args(argv))


def _has_responses(path: str | Path) -> bool:
    for _, obj in iter_objects(path):
        return isinstance(obj, dict) and bool(obj.get("responses"))
    return False


def plot_rounds(summary: list[dict[str, Any]], reference: list[float] | None, levels: list[float], attribute: str,
                path: Path) -> bool:
    """Every round's steer-eval curve (and the reference's) in one figure at ``path``; False without matplotlib."""
    from steerlm_kernels.steerlm2.evaluation.steer_eval import plot_curves

    series = [] if reference is None else [
        {"label": "SFT model (reference)", "x": levels, "y": reference, "style": {"color": "grey", "linestyle": "--"}}]
    series += [{"label": f"round {row['round']}", "x": levels, "y": row["curve"]} for row in summary]
    return plot_curves(series, attribute, "measured (mean over prompts)", "steer-eval after each round", path) is None


def run_rounds(ns: argparse.Namespace, out: Path, train_argv: Callable[[argparse.Namespace, Path, Path], Any]) -> int:
    """Run the rounds (module docstring) in ``out``; ``train_argv(ns, scored, dir)`` builds train's argv
    (the pipeline's). Returns the first non-zero exit status, else 0."""
    if ns.iterations < 1 or ns.sft_steps < 1 or ns.eval_samples < 1:
        print("steerlm-kernels pipeline: error: --iterations, --sft-steps and --eval-samples must be positive",
              file=sys.stderr)
        return 2
    if ns.recipe == "weighted-sft" and not ns.sft_data:
        print("steerlm-kernels pipeline: error: --recipe weighted-sft needs --sft-data (its anchor)", file=sys.stderr)
        return 2
    flags = ["--resume"] if ns.resume else ["--overwrite"] if ns.overwrite else []
    quiet = ["--quiet"] if ns.quiet else []
    prompts = ns.prompts or str(sample_data_path())
    eval_prompts = ns.eval_prompts or prompts
    sft_model = ns.model
    if ns.sft_data:
        sft_model = str(out / "sft" / "final")
        if not (ns.resume and Path(sft_model).is_dir()):
            status = _call("sft", ["--data", ns.sft_data, "--model", ns.model, "--output", str(out / "sft"),
                                   "--steps", str(ns.sft_steps), "--template", ns.template, "--seed", str(ns.seed)]
                           + (["--heldout", eval_prompts] if _has_responses(eval_prompts) else []))
            if status:
                return status
    q_model, summary = sft_model, []
    for r in range(1, ns.iterations + 1):
        rd = out / f"round-{r}"
        rd.mkdir(parents=True, exist_ok=True)
        n = expand_prompts(prompts, rd / "prompts.jsonl", ns.attribute, ns.levels, ns.max_prompts)
        print(f"pipeline: round {r}/{ns.iterations}: Q' = {q_model}, SFT = {sft_model}, {n} prompts", file=sys.stderr)
        status = _call("sample", ["--prompts", str(rd / "prompts.jsonl"), "--model", q_model, "--num-responses",
                                  str(ns.num_responses), "--output", str(rd / "samples.jsonl"), "--template",
                                  ns.template, "--max-new-tokens", str(ns.max_new_tokens), "--seed",
                                  str(ns.seed + r - 1), *flags, *quiet])
        if status:
            return status
        data = rd / "samples.jsonl"
        if not ns.keep_flagged:
            dropped, kept = drop_flagged_file(data, rd / "kept.jsonl")
            print(f"pipeline: round {r}: {dropped} responses capped or not exact dropped, {kept} kept", file=sys.stderr)
            data = rd / "kept.jsonl"
        status = _call("score", ["--data", str(data), "--output", str(rd / "scored.jsonl"), "--sft-model", sft_model,
                                 "--steerlm-model", q_model, "--template", ns.template, "--attribute-scorer",
                                 ns.attribute_scorer, "--seed", str(ns.seed), *flags, *quiet])
        if status:
            return status
        heldout = ["--heldout", eval_prompts] if _has_responses(eval_prompts) else []
        if ns.recipe == "weighted-sft":
            argv = ["--model", q_model, "--data", ns.sft_data, "--weighted-data", str(rd / "scored.jsonl"), "--output",
                    str(rd / "train"), "--steps", str(ns.steps), "--template", ns.template, "--seed", str(ns.seed + r)]
        else:
            argv, _ = train_argv(argparse.Namespace(**{**vars(ns), "model": q_model}), rd / "scored.jsonl",
                                 rd / "train")
        status = _call("sft" if ns.recipe == "weighted-sft" else "train", argv + heldout + shlex.split(ns.train_args))
        if status:
            return status
        q_model = str(rd / "train" / "final")
        if not ns.no_eval:
            status = _call("steer-eval", ["--model", q_model, "--reference", sft_model, "--prompts", eval_prompts,
                                          "--attribute", ns.attribute, "--levels", *map(str, ns.eval_levels),
                                          "--samples", str(ns.eval_samples), "--template", ns.template,
                                          "--max-new-tokens", str(ns.max_new_tokens), "--seed", str(ns.seed),
                                          "--output", str(rd / "steer-eval"), "--overwrite"])
            if status:
                return status
            rep = json.loads((rd / "steer-eval" / "steer_eval.json").read_text())
            summary.append({"round": r, "model": q_model, **{k: rep["model"][k] for k in (
                "effect", "slope", "monotone", "heldout_nll", "capped_share")},
                "comparison": rep.get("comparison"), "curve": [c["mean"] for c in rep["model"]["curve"]]})
            (out / "rounds.json").write_text(json.dumps(summary, indent=1) + "\n")
            plot_rounds(summary, [c["mean"] for c in rep["reference"]["curve"]] if "reference" in rep else None,
                        [float(x) for x in ns.eval_levels], ns.attribute, out / "rounds.png")
    print(f"pipeline: {ns.iterations} rounds done: {q_model}" + (f"; {out / 'rounds.json'}" if summary else ""))
    return 0
