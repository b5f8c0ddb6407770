"""``steerlm-kernels score``: fill ``log(P(y|x))`` and ``log(Q(y|a,x))`` of a SteerLM 2.0 file.

For every response ``y`` of every record (prompt ``x``: ``system`` + ``prompt_turns``; attribute
string ``a``: ``label``)::

    log(P(y|x))    = sum over the scored span of log p_SFT(token | prefix)      prompt WITHOUT the label
    log(Q(y|a,x))  = sum over the scored span of log p_SteerLM(token | prefix)  prompt WITH the label

rendered exactly as ``train`` renders it with the same ``--template``
(:func:`~steerlm_kernels.steerlm2.formats.templates.encode_example`; the scored span is the response plus
the template's end of turn). The sums run through the package's fused baseline path
(:mod:`~steerlm_kernels.steerlm2.models.logprobs`: final hidden states and the LM head through
``sk.linear_sequence_nll``, else the logits through ``sk.sequence_nll``): no ``[tokens, V]``
float32 tensor, responses batched by length up to ``--max-tokens-per-batch`` tokens.

``log(P(a|x,y))`` present in the input is kept; ``--attribute-scorer module:function`` fills the
missing ones: ``function(records) -> log-probabilities``, called on a batch of records (the output
dicts, with the two sums above already filled) and returning, per record, one float per response
(finite, <= 0). See :mod:`~steerlm_kernels.steerlm2.formats.example_scorers` for a template. Records that
end without it are reported (``train`` needs it).

Streaming and resuming: the input is read line by line and the output written line by line (one
line per well-formed input record, in input order), flushed and fsync-ed after every window of
records (a few batches' worth, :data:`WINDOW_BATCHES`). An existing ``--output`` is used only with
``--resume`` (continue an interrupted run: its complete lines are kept, a partial last line is cut,
and the input records they hold are skipped) or ``--overwrite`` (start afresh); without either the
command is refused (exit 2). A kill loses at most the window in flight, never a written line.

What made the output is recorded in ``<output>.provenance.json`` (both models' fingerprints, the
template, seed, precision, device type, path, backend, ``--max-seq-length``, the attribute scorer,
the input's fingerprint) and the digest of each output line's input record in ``<output>.digests``.
``--resume`` refuses another setting, naming it and both values (``--allow-changed SETTING[,...]``
accepts it), and compares every kept line's digest with its input record (an edited earlier
record is refused, never left with stale scores). ``--max-tokens-per-batch`` (batching only) is not
compared. The output is locked (``<output>.lock``) while the command runs; an output that is the
input file (same inode: a link) is refused before anything is opened for writing.

Reported on stderr, by input line, and never fatal: malformed lines (invalid JSON, a record that
is not SteerLM 2.0: skipped, no output line), records that do not fit ``--max-seq-length`` (written
with ``"unscored": "<reason>"`` and without any ``log(P(y|x))`` / ``log(Q(y|a,x))`` the input held:
never truncated, never stale sums; ``train`` skips them, counted), records without
``log(P(a|x,y))``. A record that is scored loses an ``"unscored"`` key of its input.
Failures (unreadable files, bad options, a model that does not load, a failing attribute scorer)
end the command with one line naming the file, line or option, and exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from steerlm_kernels.steerlm2.datatools.command_output import CommandOutput, add_output_arguments
from steerlm_kernels.steerlm2.formats.jsonl_stream import (
    CommandError,
    LineError,
    Progress,
    count_nonblank_lines,
    iter_objects,
    run_command,
)
from steerlm_kernels.steerlm2.formats.provenance import file_fingerprint, model_fingerprint, parse_allow_changed
from steerlm_kernels.steerlm2.formats.records import (
    LOG_P_A,
    LOG_P_Y,
    LOG_Q,
    SteerLM2Record,
    SteerLMDataError,
    parse_record,
)
from steerlm_kernels.steerlm2.formats.templates import TEMPLATES, encode_example
from steerlm_kernels.steerlm2.models.loading import (
    AttributeScorer,
    call_attribute_scorer,
    check_backend,
    check_log_prob,
    check_seed,
    load_attribute_scorer,
    load_models,
    pad_id,
    resolve_device,
    resolve_dtype,
    scorer_identity,
)
from steerlm_kernels.steerlm2.models.logprobs import PATHS, SpanScorer, choose_path, score_sequences

__all__ = ["DEFAULTS", "WINDOW_BATCHES", "ScoreSummary", "Side", "add_arguments", "load_attribute_scorer", "run",
           "score_file"]

DEFAULTS: dict[str, Any] = {
    "template": "nemo",
    "device": "auto",
    "precision": "auto",
    "max_tokens_per_batch": 8192,
    "max_seq_length": 4096,
    "path": "auto",
    "backend": "auto",
}
#: A window of records holds about this many batches' worth of tokens: sorted by length within it,
#: scored, then written (the unit a kill can lose).
WINDOW_BATCHES = 4
#: At most this many line numbers are listed per kind of report in the summary.
LIST_LINES = 20
#: The settings an output's provenance records and a resume compares (``--allow-changed`` names).
SETTINGS = ("sft_model", "steerlm_model", "template", "seed", "precision", "device", "path", "backend",
            "max_seq_length", "attribute_scorer", "data")

@dataclass
class Side:
    """One of the two sums: which model, which tokenizer, with or without the label, which key."""

    name: str  # "sft" / "steerlm" (for messages)
    key: str  # LOG_P_Y / LOG_Q
    with_label: bool
    scorer: SpanScorer
    tokenizer: Any
    path_request: str = "auto"  # resolved on the first batch (the probe of choose_path)


@dataclass
class ScoreSummary:
    """What :func:`score_file` did (also printed on stderr)."""

    written: int = 0  # output lines written by this run
    resumed: int = 0  # records already in the output from an earlier run
    scored_responses: int = 0
    tokens: int = 0
    seconds: float = 0.0
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (line, message)
    unscored: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    missing_attribute: list[int] = field(default_factory=list)  # lines
    paths: dict[str, str] = field(default_factory=dict)  # side name -> "fused" / "logits" (+ why)


@dataclass
class _Item:
    lineno: int
    obj: dict[str, Any]
    record: SteerLM2Record
    seqs: dict[str, list[tuple[list[int], int]]]  # side key -> per response (ids, start)
    reason: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``score`` options to ``parser``; returns it."""
    d = DEFAULTS
    parser.description = "Fill log(P(y|x)) and log(Q(y|a,x)) of a SteerLM 2.0 JSONL file with our fused kernels."
    parser.add_argument("--data", required=True, help="input SteerLM 2.0 JSONL (responses need no scores)")
    parser.add_argument("--output", required=True,
                        help="output JSONL; an existing one needs --resume or --overwrite")
    parser.add_argument("--sft-model", required=True,
                        help="model of log(P(y|x)) (prompt without the label): a Hugging Face directory or tiny/small")
    parser.add_argument("--steerlm-model", required=True,
                        help="model of log(Q(y|a,x)) (prompt with the label); the same path loads one model")
    parser.add_argument("--template", default=d["template"], choices=TEMPLATES,
                        help="prompt template, as for train (default: %(default)s)")
    parser.add_argument("--device", default=d["device"],
                        help="torch device; auto = cuda when available (cpu for the built-in models)")
    parser.add_argument("--precision", default=d["precision"], choices=("auto", "fp32", "bf16", "fp16"),
                        help="model weights' dtype; auto = fp32 on CPU, bf16 on CUDA (default: %(default)s)")
    parser.add_argument("--max-tokens-per-batch", type=int, default=d["max_tokens_per_batch"],
                        help="token budget of one padded batch (default: %(default)s)")
    parser.add_argument("--max-seq-length", type=int, default=d["max_seq_length"],
                        help="longest prompt + response; longer records are left unscored (default: %(default)s)")
    parser.add_argument("--attribute-scorer", default=None, metavar="MODULE:FUNCTION",
                        help="fills missing log(P(a|x,y)): a module (or file.py) and a function of a list of "
                             "records returning one list of log-probabilities per record")
    parser.add_argument("--path", default=d["path"], choices=PATHS,
                        help="fused = hidden states + LM head (no logits), logits = the model's logits; "
                             "auto = fused where the model allows it (default: %(default)s)")
    parser.add_argument("--backend", default=d["backend"], choices=("auto", "triton", "cpp", "torch"),
                        help="kernel backend (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in models' weights (default: 0)")
    add_output_arguments(parser, SETTINGS)
    return parser


# ----------------------------------------------------------------------------------------------
# pieces


def _parse(obj: Any, source: str, lineno: int) -> SteerLM2Record:
    """Validate a record whose responses may lack scores (they are filled here)."""
    if isinstance(obj, dict) and isinstance(obj.get("responses"), list):
        filled = dict(obj)
        filled["responses"] = []
        for i, r in enumerate(obj["responses"]):
            if isinstance(r, dict):
                r = {**r, LOG_P_Y: 0.0, LOG_Q: 0.0}
                if LOG_P_A in r:
                    problem = check_log_prob(r[LOG_P_A])
                    if problem:
                        raise SteerLMDataError(source, lineno, f"responses[{i}].{LOG_P_A}", problem)
                else:
                    r[LOG_P_A] = 0.0
            filled["responses"].append(r)
        obj = filled
    return parse_record(obj, source, lineno)


def _encode(item: _Item, sides: list[Side], template: str, max_seq_length: int) -> None:
    """Fill ``item.seqs`` (or ``item.reason``)."""
    rec = item.record
    for side in sides:
        if side.key in item.seqs:
            continue
        seqs = []
        for i, resp in enumerate(rec.responses):
            try:
                ids, start = encode_example(side.tokenizer, template, rec.system, rec.prompt_turns,
                                            rec.label if side.with_label else None, resp.value,
                                            response_role=rec.response_role)
            except ValueError as exc:
                item.reason = f"response {i}: {exc}"
                return
            if len(ids) > max_seq_length:
                item.reason = (f"response {i} is {len(ids)} tokens with its prompt ({side.name} model's rendering"
                               f"{' with' if side.with_label else ' without'} the label), over --max-seq-length "
                               f"{max_seq_length}")
                return
            seqs.append((ids, start))
        item.seqs[side.key] = seqs


# ----------------------------------------------------------------------------------------------
# the file loop


def _score_window(items: list[_Item], sides: list[Side], max_tokens: int, attribute_scorer: AttributeScorer | None,
                  source: str, summary: ScoreSummary, log: TextIO) -> list[dict[str, Any]]:
    """Score the records of one window; returns their output objects, in input order."""
    todo = [it for it in items if it.reason is None]
    results: dict[str, list[list[float]]] = {}
    for side in sides:
        flat = [s for it in todo for s in it.seqs[side.key]]
        if not flat:
            continue
        if side.path_request == "auto":
            path, why = choose_path(side.scorer.model, "auto", probe=flat[0], pad_id=side.scorer.pad_id,
                                    backend=side.scorer.backend)
            side.scorer.path, side.path_request = path, path
            summary.paths[side.name] = f"{path} ({why})"
            print(f"score: {side.name} model: {path} path ({why})", file=log)
        values = score_sequences(side.scorer, flat, max_tokens)
        bad = next((v for v in values if not math.isfinite(v)), None)
        if bad is not None:
            raise CommandError(f"--{side.name}-model: the model gave a non-finite log-probability ({bad}) "
                               f"in the records of lines {todo[0].lineno}..{todo[-1].lineno}")
        summary.tokens += sum(len(ids) for ids, _ in flat)
        summary.scored_responses += len(flat)
        per_item, k = [], 0
        for it in todo:
            n = len(it.seqs[side.key])
            per_item.append(values[k : k + n])
            k += n
        results[side.key] = per_item
    outs: list[dict[str, Any]] = []
    need_attr: list[tuple[dict[str, Any], _Item]] = []
    j = 0
    for it in items:
        obj = copy.deepcopy(it.obj)
        if it.reason is not None:
            obj["unscored"] = it.reason
            for resp in obj["responses"]:  # no stale sums of an earlier scoring beside the marker
                for side in sides:
                    if isinstance(resp, dict):
                        resp.pop(side.key, None)
        else:
            obj.pop("unscored", None)  # scored now: a marker of an earlier run is stale
            for side in sides:
                for resp, value in zip(obj["responses"], results[side.key][j]):
                    resp[side.key] = min(value, 0.0)  # a sum of log-probabilities (float32 rounding aside)
            j += 1
            if any(LOG_P_A not in r for r in obj["responses"]):
                need_attr.append((obj, it))
        outs.append(obj)
    if need_attr and attribute_scorer is not None:
        call_attribute_scorer(attribute_scorer, [o for o, _ in need_attr], [it.lineno for _, it in need_attr],
                              source)
    summary.missing_attribute += [it.lineno for o, it in need_attr if any(LOG_P_A not in r for r in o["responses"])]
    return outs


def score_file(
    data: str | Path,
    output: str | Path,
    sides: list[Side],
    *,
    template: str = DEFAULTS["template"],
    max_seq_length: int = DEFAULTS["max_seq_length"],
    max_tokens_per_batch: int = DEFAULTS["max_tokens_per_batch"],
    attribute_scorer: AttributeScorer | None = None,
    resume: bool = True,
    overwrite: bool = False,
    settings: Mapping[str, Any] | None = None,
    about: Mapping[str, Any] | None = None,
    allow_changed: Collection[str] = (),
    quiet: bool = False,
    log: TextIO | None = None,
) -> ScoreSummary:
    """Stream ``data`` to ``output``, filling each side's key for every response (module docstring).

    Args:
        sides: the sums to fill (:class:`Side`; ``score`` passes the SFT and SteerLM sides).
        template: one of :data:`~steerlm_kernels.steerlm2.formats.templates.TEMPLATES`.
        max_seq_length: longest prompt + response in tokens (longer: unscored, reported).
        max_tokens_per_batch: token budget of one padded batch.
        attribute_scorer: fills missing ``log(P(a|x,y))`` (see the module docstring).
        resume: continue an existing ``output``; ``overwrite``: replace it; neither: an existing
            non-empty ``output`` is refused (:class:`~steerlm_kernels.steerlm2.datatools.command_output.CommandOutput`).
        settings / about: what the provenance records besides the template, ``max_seq_length``, the
            attribute scorer and the input (the command adds the models, seed, precision, ...);
            ``allow_changed``: settings whose change a resume accepts.
        quiet: no progress line. ``log``: where reports go (default stderr).

    Raises:
        CommandError: one-line failures (files, the attribute scorer, a non-finite model output).
    """
    log = sys.stderr if log is None else log
    source = str(data)
    if template not in TEMPLATES:
        raise CommandError(f"--template must be one of {TEMPLATES}, got {template!r}")
    if max_tokens_per_batch < 1:
        raise CommandError(f"--max-tokens-per-batch must be positive, got {max_tokens_per_batch}")
    if max_seq_length < 2:
        raise CommandError(f"--max-seq-length must be at least 2, got {max_seq_length}")
    try:
        total = count_nonblank_lines(data)
    except OSError as exc:
        raise CommandError(f"--data {data}: cannot read ({exc.strerror or exc})") from None
    scorer_name = getattr(attribute_scorer, "__qualname__", None) if attribute_scorer is not None else None
    recorded = {"template": template, "max_seq_length": max_seq_length, "attribute_scorer": scorer_name,
                "data": file_fingerprint(data), **(settings or {})}
    summary = ScoreSummary()
    t0 = time.perf_counter()
    with CommandOutput(output, command="score", inputs={"--data": data}, settings=recorded,
                       about={"data": str(data), **(about or {})}, resume=resume, overwrite=overwrite,
                       allowed=allow_changed, log=log) as writer:
        to_skip = writer.done
        summary.resumed = writer.done
        if to_skip:
            print(f"score: resuming {output}: {to_skip} records already written", file=log)
        progress = Progress("score", total, quiet=quiet, stream=log)
        window: list[_Item] = []
        window_tokens = 0
        seen = 0  # non-blank input lines handled (progress)

        def flush() -> None:
            nonlocal window, window_tokens
            if window:
                writer.write(_score_window(window, sides, max_tokens_per_batch, attribute_scorer, source,
                                           summary, log), [it.obj for it in window])
                summary.written += len(window)
                window, window_tokens = [], 0
                elapsed = time.perf_counter() - t0
                progress.update(seen, f"{summary.scored_responses} responses, "
                                      f"{summary.tokens / max(elapsed, 1e-9):,.0f} tok/s")

        for lineno, obj in iter_objects(data):
            seen += 1
            if isinstance(obj, LineError):
                summary.malformed.append((lineno, str(obj)))
                print(f"score: skipped {obj}", file=log)
                continue
            try:
                record = _parse(obj, source, lineno)
            except SteerLMDataError as exc:
                summary.malformed.append((lineno, str(exc)))
                print(f"score: skipped {exc}", file=log)
                continue
            if to_skip:  # every kept line is checked against its input record
                writer.check_kept(writer.done - to_skip, obj, source, lineno)
                to_skip -= 1
                continue
            item = _Item(lineno, obj, record, {})
            _encode(item, sides, template, max_seq_length)
            if item.reason is not None:
                summary.unscored.append((lineno, item.reason))
                print(f"score: {source}, line {lineno}: left unscored: {item.reason}", file=log)
            else:
                window_tokens += sum(len(ids) for seqs in item.seqs.values() for ids, _ in seqs)
            window.append(item)
            if window_tokens >= WINDOW_BATCHES * max_tokens_per_batch * len(sides):
                flush()
        flush()
        if to_skip:
            raise CommandError(f"--output {output}: holds {writer.done} records, more than the "
                               f"{writer.done - to_skip} well-formed records of {source} (--overwrite starts afresh)")
        progress.close()
    summary.seconds = time.perf_counter() - t0
    _report(summary, source, output, log)
    return summary


def _lines(lines: list[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:LIST_LINES])
    return shown + (f", ... ({len(lines)} in all)" if len(lines) > LIST_LINES else "")


def _report(s: ScoreSummary, source: str, output: str | Path, log: TextIO) -> None:
    rate = s.tokens / s.seconds if s.seconds > 0 else 0.0
    print(f"score: wrote {s.written} records to {output} ({s.resumed} from an earlier run), {s.scored_responses} "
          f"sums over {s.tokens:,} tokens in {s.seconds:.1f}s ({rate:,.0f} tokens/s)", file=log)
    if s.malformed:
        print(f"score: {len(s.malformed)} malformed lines of {source} skipped (lines "
              f"{_lines([n for n, _ in s.malformed])})", file=log)
    if s.unscored:
        print(f"score: {len(s.unscored)} records left unscored, with \"unscored\": reason (lines "
              f"{_lines([n for n, _ in s.unscored])})", file=log)
    if s.missing_attribute:
        print(f"score: {len(s.missing_attribute)} records have responses without {LOG_P_A} (lines "
              f"{_lines(s.missing_attribute)}); give --attribute-scorer MODULE:FUNCTION", file=log)


# ----------------------------------------------------------------------------------------------
# the command


def run(ns: argparse.Namespace) -> int:
    """Run ``score`` from parsed options; returns the exit status."""

    def body() -> None:
        from steerlm_kernels.steerlm2.models.hf_models import TINY_MODELS

        check_seed(ns.seed)
        allowed = parse_allow_changed(ns.allow_changed, SETTINGS)
        if ns.resume and ns.overwrite:
            raise CommandError("--resume and --overwrite exclude each other")
        if ns.attribute_scorer is not None:
            scorer_fn = load_attribute_scorer(ns.attribute_scorer)
        else:
            scorer_fn = None
        if not Path(ns.data).is_file():
            raise CommandError(f"--data {ns.data}: no such file")
        CommandOutput.precheck(ns.output, {"--data": ns.data}, resume=ns.resume, overwrite=ns.overwrite)
        device = resolve_device(ns.device, [ns.sft_model, ns.steerlm_model])
        check_backend(ns.backend, device)
        dtype = resolve_dtype(ns.precision, device)
        settings = {"sft_model": model_fingerprint(ns.sft_model, TINY_MODELS),
                    "steerlm_model": model_fingerprint(ns.steerlm_model, TINY_MODELS), "seed": ns.seed,
                    "precision": str(dtype).removeprefix("torch."), "device": device.type, "path": ns.path,
                    "backend": ns.backend,
                    "attribute_scorer": scorer_identity(ns.attribute_scorer) if ns.attribute_scorer else None}
        about = {"sft_model": str(ns.sft_model), "steerlm_model": str(ns.steerlm_model),
                 "attribute_scorer": ns.attribute_scorer}
        models = load_models({"sft-model": ns.sft_model, "steerlm-model": ns.steerlm_model}, device, dtype,
                                  ns.seed)
        sides = []
        for option, name, key, with_label in (("sft-model", "sft", LOG_P_Y, False),
                                              ("steerlm-model", "steerlm", LOG_Q, True)):
            model, tok = models[option]
            try:
                path, _ = choose_path(model, ns.path) if ns.path != "auto" else ("auto", "")
            except ValueError as exc:
                raise CommandError(f"--path {ns.path}: --{option}: {exc}") from None
            sides.append(Side(name, key, with_label, SpanScorer(model, pad_id(tok), path, ns.backend), tok, path))
        print(f"score: {ns.data} -> {ns.output}, template {ns.template}, {device}, {dtype}", file=sys.stderr)
        score_file(ns.data, ns.output, sides, template=ns.template, max_seq_length=ns.max_seq_length,
                   max_tokens_per_batch=ns.max_tokens_per_batch, attribute_scorer=scorer_fn, resume=ns.resume,
                   overwrite=ns.overwrite, settings=settings, about=about, allow_changed=allowed, quiet=ns.quiet)

    return run_command("score", body)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m steerlm_kernels.steerlm2.datatools.score [options]``."""
    return run(add_arguments(argparse.ArgumentParser(prog="steerlm-kernels score")).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
