"""``steerlm-kernels steer-eval``: does the model follow the attribute it is asked for?

::

    steerlm-kernels steer-eval --model PATH [--reference PATH] --prompts F --attribute verbosity \\
        --levels 0 1 2 3 4 --samples 8 \\
        --scorer steerlm_kernels.steerlm2.formats.example_scorers:verbosity_words --output DIR

For every prompt of ``--prompts`` and every requested level, the record's label is rewritten with
``ATTRIBUTE:LEVEL`` (its other attributes kept, e.g. ``helpfulness:3,verbosity:4``) and
``--samples`` responses are drawn (batched, :mod:`~steerlm_kernels.steerlm2.datatools.generation`). The
random streams depend on ``--seed`` and the prompt's line only, so every level of a prompt - and
the reference model - uses the same streams (common random numbers: the comparisons are paired).
``--scorer MODULE:FUNCTION`` measures the attribute of each response (one number per response; see
:mod:`~steerlm_kernels.steerlm2.formats.example_scorers`); a prompt's value at a level is the mean over its
samples. :mod:`~steerlm_kernels.steerlm2.evaluation.steer_stats` turns the ``[prompts, levels]`` table into

- the curve (mean over prompts per level, 95 % bootstrap CI over prompts),
- the effect ``high - low`` and the per-prompt least-squares slope, each with its CI and a paired
  sign-flip p-value, and whether the curve is monotone,
- with ``--reference``: the same for the reference model and the difference of differences
  (model effect - reference effect, paired by prompt) with the ratio of the effects,
- fluency: the held-out NLL (nats per token) of reference text - the responses of ``--heldout``
  (default: the prompts file when its records have responses), each under its record's own label -
  and the share of responses cut at ``--max-new-tokens`` (``capped``).

Output (``--output``, default ``runs/steer-eval-<time>``): ``steer_eval.json`` (strict JSON: the
settings, the per-prompt table and everything above), ``steer_eval.md`` (the table printed on
stdout), ``steer_eval.png`` (the curves with their CIs; needs matplotlib) and ``samples.jsonl``
(every response with its measure). An output directory that already holds a report is refused
unless ``--overwrite``. Failures: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from steerlm_kernels.steerlm2.datatools.generation import parse_prompt, sample_prompts
from steerlm_kernels.steerlm2.datatools.sample import record_seed
from steerlm_kernels.steerlm2.evaluation.steer_stats import analyse, compare
from steerlm_kernels.steerlm2.formats.example_scorers import parse_label
from steerlm_kernels.steerlm2.formats.jsonl_stream import CommandError, LineError, iter_objects, run_command
from steerlm_kernels.steerlm2.formats.records import SteerLMDataError, parse_record
from steerlm_kernels.steerlm2.formats.templates import TEMPLATES, encode_example, encode_prompt
from steerlm_kernels.steerlm2.models.loading import (
    load_attribute_scorer,
    load_models,
    pad_id,
    resolve_device,
    resolve_dtype,
)
from steerlm_kernels.steerlm2.models.logprobs import SpanScorer, choose_path, score_sequences

__all__ = ["DEFAULTS", "DEFAULT_SCORER", "add_arguments", "evaluate_model", "heldout_nll", "label_with",
           "plot_curves", "read_prompts", "report", "run", "write_report"]

#: ``--scorer`` default: the example verbosity measure (words per response).
DEFAULT_SCORER = "steerlm_kernels.steerlm2.formats.example_scorers:verbosity_words"
DEFAULTS: dict[str, Any] = {
    "attribute": "verbosity", "levels": [0, 1, 2, 3, 4], "samples": 8, "template": "nemo", "max_new_tokens": 256,
    "temperature": 1.0, "top_p": 1.0, "seed": 0, "device": "auto", "precision": "auto", "max_prompts": None,
}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``steer-eval`` options to ``parser``; returns it."""
    d = DEFAULTS
    parser.description = ("Measure steering: sample every prompt at every requested attribute level with shared "
                          "seeds, measure the attribute, report the curve, slope, effect and fluency.")
    a = parser.add_argument
    a("--model", required=True, help="the model evaluated: a Hugging Face directory or a built-in name")
    a("--reference", default=None, help="a reference model (e.g. the SFT model) on the same prompts and seeds")
    a("--prompts", required=True, help="JSONL of records with system, prompt_turns, label (responses optional)")
    a("--attribute", default=d["attribute"], help="the label's attribute to vary (default: %(default)s)")
    a("--levels", type=float, nargs="+", default=d["levels"], help="requested levels (default: 0 1 2 3 4)")
    a("--samples", type=int, default=d["samples"], help="responses per prompt and level (default: %(default)s)")
    a("--scorer", default=DEFAULT_SCORER, metavar="MODULE:FUNCTION",
      help="measure of the attribute, one number per response (default: %(default)s)")
    a("--heldout", default=None, help="SteerLM 2.0 JSONL whose responses are the held-out text of the NLL "
                                      "(default: --prompts when its records have responses; 'none': skip)")
    a("--max-prompts", type=int, default=d["max_prompts"], help="only the first N prompts")
    a("--template", default=d["template"], choices=TEMPLATES, help="prompt template (default: %(default)s)")
    a("--max-new-tokens", type=int, default=d["max_new_tokens"], help="token cap (default: %(default)s)")
    a("--temperature", type=float, default=d["temperature"], help="sampling temperature (default: %(default)s)")
    a("--top-p", type=float, default=d["top_p"], help="nucleus sampling (default: %(default)s)")
    a("--seed", type=int, default=d["seed"], help="seed of the draws and of the statistics (default: %(default)s)")
    a("--device", default=d["device"], help="torch device (auto: cpu for built-in models, else cuda when present)")
    a("--precision", default=d["precision"], choices=("auto", "fp32", "bf16", "fp16"), help="weights' dtype")
    a("--output", default=None, help="report directory (default: runs/steer-eval-<time>)")
    a("--overwrite", action="store_true", help="replace a report already in --output")
    a("--quiet", action="store_true", help="no table on stdout")
    return parser


def _level_text(level: float) -> str:
    return str(int(level)) if float(level).is_integer() else repr(float(level))


def label_with(label: str | None, attribute: str, level: float) -> str:
    """``label`` with ``attribute`` set to ``level`` (other attributes kept, in order; appended when absent)."""
    parts = parse_label(label)
    parts[attribute] = _level_text(level)
    return ",".join(f"{k}:{v}" for k, v in parts.items())


def read_prompts(path: str | Path, max_prompts: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``[(line, record dict)]`` of the well-formed prompt records of ``path`` (CommandError naming a bad line)."""
    out = []
    try:
        for lineno, obj in iter_objects(path):
            if isinstance(obj, LineError):
                raise CommandError(str(obj))
            try:
                parse_prompt(obj, str(path), lineno)
            except SteerLMDataError as exc:
                raise CommandError(str(exc)) from None
            out.append((lineno, obj))
            if max_prompts is not None and len(out) >= max_prompts:
                break
    except OSError as exc:
        raise CommandError(f"--prompts {path}: cannot read ({exc.strerror or exc})") from None
    if len(out) < 2:
        raise CommandError(f"--prompts {path}: needs at least 2 prompts (the statistics pair over prompts), got "
                           f"{len(out)}")
    return out


def evaluate_model(model: Any, tokenizer: Any, prompts: Sequence[tuple[int, dict[str, Any]]], scorer: Any, *,
                   attribute: str, levels: Sequence[float], samples: int, template: str, max_new_tokens: int,
                   temperature: float, top_p: float, seed: int) -> dict[str, Any]:
    """Sample and measure: ``{"values": [P][L] mean measure, "capped": [P][L] share, "records": [...]}``.

    ``records`` holds one dict per (prompt, level): the prompt with the rewritten label and its
    responses (``value``, ``token_ids``, ``capped``, ``exact``, ``measure``).
    """
    recs, ids, seeds = [], [], []
    for lineno, obj in prompts:
        rec = parse_prompt(obj, "--prompts", lineno)
        for level in levels:
            label = label_with(rec.label, attribute, level)
            recs.append({"system": rec.system, "prompt_turns": [{"from": f, "value": v} for f, v in rec.prompt_turns],
                         "label": label, "line": lineno, "level": level})
            ids.append(encode_prompt(tokenizer, template, rec.system, rec.prompt_turns, label,
                                     response_role=rec.response_role))
            seeds.append(record_seed(seed, lineno))  # the same streams at every level (paired)
    try:
        draws = sample_prompts(model, tokenizer, ids, seeds, template=template, num_responses=samples,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               allow_empty=True)  # an empty response is a measurement (0 words), not a redraw
    except ValueError as exc:
        raise CommandError(f"sampling: {exc}") from None
    role = parse_prompt(prompts[0][1], "--prompts", prompts[0][0]).response_role
    for rec, ds in zip(recs, draws):
        rec["responses"] = [{"from": role, "value": d.text, "token_ids": list(d.token_ids), "capped": d.capped,
                             "exact": d.exact} for d in ds]
    try:
        measures = [list(m) for m in scorer([{k: v for k, v in r.items() if k not in ("line", "level")}
                                             for r in recs])]
    except Exception as exc:  # noqa: BLE001 - user code: one line
        raise CommandError(f"--scorer raised {type(exc).__name__}: {exc}") from None
    if len(measures) != len(recs) or any(len(m) != samples for m in measures):
        raise CommandError(f"--scorer must return {len(recs)} lists of {samples} numbers (one per response)")
    n_levels = len(levels)
    values = torch.zeros(len(prompts), n_levels, dtype=torch.float64)
    capped = torch.zeros(len(prompts), n_levels, dtype=torch.float64)
    for k, (rec, ms) in enumerate(zip(recs, measures)):
        try:
            ms = [float(x) for x in ms]
        except (TypeError, ValueError):
            raise CommandError(f"--scorer returned a non-number for prompt line {rec['line']}: {ms!r}") from None
        if not all(torch.isfinite(torch.tensor(ms))):
            raise CommandError(f"--scorer returned a non-finite number for prompt line {rec['line']}: {ms}")
        for r, m in zip(rec["responses"], ms):
            r["measure"] = m
        values[k // n_levels, k % n_levels] = sum(ms) / len(ms)
        capped[k // n_levels, k % n_levels] = sum(r["capped"] for r in rec["responses"]) / samples
    return {"values": values.tolist(), "capped": capped.tolist(), "records": recs}


def heldout_nll(model: Any, tokenizer: Any, path: str | Path, template: str, *, max_tokens: int = 8192) -> float:
    """Mean NLL (nats per scored token) of the responses of the SteerLM 2.0 file ``path`` (each under its
    record's own label, as :func:`~steerlm_kernels.steerlm2.formats.templates.encode_example` renders it)."""
    seqs: list[tuple[list[int], int]] = []
    for lineno, obj in iter_objects(path):
        if isinstance(obj, LineError):
            raise CommandError(f"--heldout: {obj}")
        if isinstance(obj, dict) and isinstance(obj.get("responses"), list):
            obj = {**obj, "responses": [{"log(P(a|x,y))": 0.0, "log(P(y|x))": 0.0, "log(Q(y|a,x))": 0.0, **r}
                                        if isinstance(r, dict) else r for r in obj["responses"]]}
        try:
            rec = parse_record(obj, str(path), lineno)
        except SteerLMDataError as exc:
            raise CommandError(f"--heldout: {exc}") from None
        for resp in rec.responses:
            seqs.append(encode_example(tokenizer, template, rec.system, rec.prompt_turns, rec.label, resp.value,
                                       response_role=rec.response_role))
    if not seqs:
        raise CommandError(f"--heldout {path}: no responses")
    path_name, _ = choose_path(model, "auto", pad_id=pad_id(tokenizer))
    logps = score_sequences(SpanScorer(model, pad_id(tokenizer), path_name), seqs, max_tokens)
    return -sum(logps) / sum(len(ids) - start for ids, start in seqs)


def _has_responses(path: str | Path) -> bool:
    for _, obj in iter_objects(path):
        return isinstance(obj, dict) and isinstance(obj.get("responses"), list) and bool(obj["responses"])
    return False


def report(settings: dict[str, Any], model_eval: dict[str, Any], ref_eval: dict[str, Any] | None,
           nll: dict[str, float | None]) -> dict[str, Any]:
    """The report (what ``steer_eval.json`` holds) from the evaluations of the model and the reference."""
    levels, seed = settings["levels"], settings["seed"]
    out: dict[str, Any] = {"settings": settings, "model": analyse(model_eval["values"], levels, seed=seed)}
    out["model"]["capped_share"] = _mean(model_eval["capped"])
    out["model"]["capped_by_level"] = [sum(col) / len(col) for col in zip(*model_eval["capped"])]
    out["model"]["heldout_nll"] = nll.get("model")
    out["model"]["values"] = model_eval["values"]
    if ref_eval is not None:
        out["reference"] = analyse(ref_eval["values"], levels, seed=seed)
        out["reference"]["capped_share"] = _mean(ref_eval["capped"])
        out["reference"]["capped_by_level"] = [sum(col) / len(col) for col in zip(*ref_eval["capped"])]
        out["reference"]["heldout_nll"] = nll.get("reference")
        out["reference"]["values"] = ref_eval["values"]
        out["comparison"] = compare(model_eval["values"], ref_eval["values"], levels, seed=seed)
        m, r = nll.get("model"), nll.get("reference")
        out["comparison"]["nll_change"] = (m - r) / r if m is not None and r else None
    return out


def _mean(rows: list[list[float]]) -> float:
    flat = [x for row in rows for x in row]
    return sum(flat) / len(flat)


def _ci(s: dict[str, float]) -> str:
    return f"{s['mean']:.2f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}]"


def format_table(rep: dict[str, Any]) -> str:
    """The markdown table and summary lines of a report."""
    st = rep["settings"]
    has_ref = "reference" in rep
    head = f"| requested {st['attribute']} | model mean [95% CI] |" + (" reference mean [95% CI] |" if has_ref else "")
    lines = [f"steer-eval: {st['model']} on {st['prompts']} ({st['n_prompts']} prompts x {len(st['levels'])} "
             f"levels x {st['samples']} samples, measure {st['scorer']})", "", head,
             "|---|---|" + ("---|" if has_ref else "")]
    for k, level in enumerate(st["levels"]):
        row = f"| {_level_text(level)} | {_ci(rep['model']['curve'][k])} |"
        lines.append(row + (f" {_ci(rep['reference']['curve'][k])} |" if has_ref else ""))
    lines.append("")
    for name in ("model", "reference") if has_ref else ("model",):
        r = rep[name]
        nll = "n/a" if r["heldout_nll"] is None else f"{r['heldout_nll']:.4f}"
        lines.append(f"{name}: high - low {_ci(r['effect'])} (p = {r['effect']['p']:.2g}); slope {_ci(r['slope'])} "
                     f"per level (p = {r['slope']['p']:.2g}); monotone: {'yes' if r['monotone'] else 'no'}; "
                     f"held-out NLL {nll} nats/token; capped {100 * r['capped_share']:.1f} %")
    if has_ref:
        c = rep["comparison"]
        ratio = "n/a (reference effect <= 0)" if c["effect_ratio"] is None else f"{c['effect_ratio']:.2f}x"
        change = "n/a" if c["nll_change"] is None else f"{100 * c['nll_change']:+.1f} %"
        lines.append(f"model - reference: difference of differences {_ci(c['diff_of_diffs'])} (p = "
                     f"{c['diff_of_diffs']['p']:.2g}); effect ratio {ratio}; held-out NLL change {change}")
    return "\n".join(lines) + "\n"


def plot_curves(series: list[dict[str, Any]], attribute: str, ylabel: str, title: str, path: Path) -> str | None:
    """One figure at ``path``: each of ``series`` (``{"label", "x", "y"}``, optional ``"yerr"`` as
    ``[below, above]`` and line ``"style"`` keywords) against the requested ``attribute``; the reason when
    there is no plot (matplotlib missing), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'steerlm-kernels[plot]')"
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s in series:
        ax.errorbar(s["x"], s["y"], yerr=s.get("yerr"), marker="o", capsize=3, label=s["label"], **s.get("style", {}))
    ax.set_xlabel(f"requested {attribute}")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _plot(rep: dict[str, Any], path: Path) -> str | None:
    """``steer_eval.png``: the model's and the reference's curves with their CIs; the reason when there is no plot."""
    levels = rep["settings"]["levels"]
    series = []
    for name, shift in (("model", -0.04), ("reference", 0.04)):
        if name in rep:
            c = rep[name]["curve"]
            means = [x["mean"] for x in c]
            err = [[m - x["ci_low"] for m, x in zip(means, c)], [x["ci_high"] - m for m, x in zip(means, c)]]
            where = Path(str(rep["settings"][name]))  # "round-2/train/final", not "final" twice
            short = "/".join(where.parts[-3:]) if where.name in ("final", "model") else where.name
            series.append({"label": f"{name} ({short})", "x": [lv + shift for lv in levels], "y": means, "yerr": err})
    return plot_curves(series, rep["settings"]["attribute"], "measured (mean over prompts, 95% CI)", "steer-eval", path)


def write_report(rep: dict[str, Any], records: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write ``steer_eval.json``, ``steer_eval.md``, ``samples.jsonl`` and ``steer_eval.png`` into ``out``."""
    from steerlm_kernels.steerlm2.training.metrics import strict

    out.mkdir(parents=True, exist_ok=True)
    (out / "steer_eval.json").write_text(json.dumps(strict(rep), indent=1, allow_nan=False) + "\n")
    (out / "steer_eval.md").write_text(format_table(rep))
    with open(out / "samples.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(strict(r), ensure_ascii=False) + "\n")
    paths = [out / "steer_eval.json", out / "steer_eval.md", out / "samples.jsonl"]
    why = _plot(rep, out / "steer_eval.png")
    if why is None:
        paths.append(out / "steer_eval.png")
    else:
        print(f"steer-eval: no plot: {why}", file=sys.stderr)
    return paths


def _check(ns: argparse.Namespace) -> None:
    if ns.samples < 1:
        raise CommandError(f"--samples must be positive, got {ns.samples}")
    if len(ns.levels) < 2 or sorted(ns.levels) != list(ns.levels) or len(set(ns.levels)) != len(ns.levels):
        raise CommandError(f"--levels must be at least 2 strictly increasing numbers, got {ns.levels}")
    if ns.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be positive, got {ns.max_new_tokens}")
    if ns.temperature < 0 or not 0 < ns.top_p <= 1:
        raise CommandError(f"--temperature must be >= 0 and --top-p in (0, 1], got {ns.temperature}, {ns.top_p}")
    if ns.max_prompts is not None and ns.max_prompts < 2:
        raise CommandError(f"--max-prompts must be at least 2, got {ns.max_prompts}")
    if not ns.attribute or any(c in ns.attribute for c in ",:"):
        raise CommandError(f"--attribute must be a name without ',' or ':', got {ns.attribute!r}")
    if not Path(ns.prompts).is_file():
        raise CommandError(f"--prompts {ns.prompts}: no such file")
    if ns.heldout not in (None, "none") and not Path(ns.heldout).is_file():
        raise CommandError(f"--heldout {ns.heldout}: no such file")


def evaluate(ns: argparse.Namespace, models: dict[str, tuple[Any, Any]] | None = None,
             log: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the evaluation of parsed options; ``models``: already loaded ``{"model": (model, tok),
    "reference": ...}`` (else loaded from ``--model`` / ``--reference``). Returns ``(report, samples)``."""
    log = sys.stderr if log is None else log
    _check(ns)
    try:
        scorer = load_attribute_scorer(ns.scorer)
    except CommandError as exc:
        raise CommandError(str(exc).replace("--attribute-scorer", "--scorer", 1)) from None
    prompts = read_prompts(ns.prompts, ns.max_prompts)
    if models is None:
        specs = {"model": ns.model} | ({"reference": ns.reference} if ns.reference else {})
        device = resolve_device(ns.device, list(specs.values()))
        models = load_models(specs, device, resolve_dtype(ns.precision, device), ns.seed)
    heldout = ns.heldout if ns.heldout is not None else (ns.prompts if _has_responses(ns.prompts) else "none")
    kw = {"attribute": ns.attribute, "levels": list(ns.levels), "samples": ns.samples, "template": ns.template,
          "max_new_tokens": ns.max_new_tokens, "temperature": ns.temperature, "top_p": ns.top_p, "seed": ns.seed}
    evals, nll, samples = {}, {}, []
    for name, (model, tok) in models.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            evals[name] = evaluate_model(model, tok, prompts, scorer, **kw)
            nll[name] = None if heldout == "none" else heldout_nll(model, tok, heldout, ns.template)
        samples += [{"model": name, **r} for r in evals[name]["records"]]
        print(f"steer-eval: {name}: {len(prompts) * len(ns.levels) * ns.samples} responses in "
              f"{time.perf_counter() - t0:.1f}s", file=log)
    settings = {"model": str(ns.model), "reference": None if ns.reference is None else str(ns.reference),
                "prompts": str(ns.prompts), "heldout": heldout, "scorer": ns.scorer, "n_prompts": len(prompts),
                "prompt_lines": [n for n, _ in prompts], **kw}
    return report(settings, evals["model"], evals.get("reference"), nll), samples


def run(ns: argparse.Namespace) -> int:
    """Run ``steer-eval`` from parsed options; returns the exit status."""

    def body() -> None:
        out = Path(ns.output) if ns.output else Path("runs") / time.strftime("steer-eval-%Y%m%d-%H%M%S")
        if (out / "steer_eval.json").exists() and not ns.overwrite:
            raise CommandError(f"--output {out}: already holds a report (--overwrite replaces it)")
        rep, samples = evaluate(ns)
        paths = write_report(rep, samples, out)
        if not ns.quiet:
            print(format_table(rep))
        print(f"steer-eval: wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)

    return run_command("steer-eval", body)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m steerlm_kernels.steerlm2.evaluation.steer_eval [options]``."""
    return run(add_arguments(argparse.ArgumentParser(prog="steerlm-kernels steer-eval")).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
