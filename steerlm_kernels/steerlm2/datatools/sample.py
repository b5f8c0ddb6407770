"""``steerlm-kernels sample``: draw n responses per prompt (batched; :mod:`.generation`).

Input: JSONL records with ``system``, ``prompt_turns`` and ``label`` (a SteerLM 2.0 file works:
its ``responses`` are ignored, except that their ``from`` names the responding role). The prompt
is rendered with ``--template`` exactly as ``train`` and ``score`` render it
(:func:`~steerlm_kernels.steerlm2.formats.templates.encode_prompt`, with the label: the responses are drawn
from ``Q'(y|a,x)``), and the model continues it until the template's end of turn (the EOS
token; for ``nemo`` also the turn token ``<extra_id_1>``) or ``--max-new-tokens``.
``--batch-prompts`` prompts are decoded together, left-padded, every response with its own random
stream: the output is the same as one prompt at a time (:mod:`~steerlm_kernels.steerlm2.datatools.generation`).

Output: one SteerLM 2.0 record per well-formed input record, in order - the input's keys, with
``responses`` replaced by ``[{"from": role, "value": text, "token_ids": [...], "capped": bool,
"exact": bool}, ...]`` (no scores: next come the attribute scorer and ``steerlm-kernels score``):
``token_ids`` are the sampled ids of ``value``, ``capped`` marks a response cut at
``--max-new-tokens``, ``exact`` says that ``value`` re-tokenises to ``token_ids`` (false, e.g., for
invalid UTF-8 from a byte-level model); ``pipeline`` drops the capped and inexact ones before ``score``.
The end-of-turn text is not part of ``value``
(``nemo``: the ``\\n`` before ``<extra_id_1>`` is removed), so rendering ``value`` with the same
template gives back the sampled scored span. A draw that decodes to an empty text is drawn again
(up to :data:`MAX_DRAWS` times). ``--temperature 0`` is greedy decoding: the one continuation,
``n`` times.

Reproducible and resumable: the random streams of a record come from ``--seed`` and the record's
line number, so a record's responses do not depend on what was sampled before it: a rerun
with ``--resume`` on the same ``--output`` keeps its complete lines, skips their records, and gives
the same file as an uninterrupted run (``jsonl_stream`` has the details). An existing output without
``--resume`` or ``--overwrite`` is refused. The output's provenance (``<output>.provenance.json``:
the model's fingerprint, ``--num-responses``, ``--temperature``, ``--top-p``, ``--max-new-tokens``,
template, seed, precision, device type, the prompts' fingerprint) is compared on resume and a
difference refused, naming it (``--allow-changed`` accepts it); every kept line is checked against
its input record (``<output>.digests``). The output is locked while the command runs, and an output
that is the input file (same inode) is refused before anything is written
(:mod:`~steerlm_kernels.steerlm2.datatools.command_output`). Malformed input lines are named and skipped.
Failures end with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from steerlm_kernels.steerlm2.datatools.command_output import CommandOutput, add_output_arguments
from steerlm_kernels.steerlm2.datatools.generation import MAX_DRAWS, Draw, draw_fields, parse_prompt, sample_prompts
from steerlm_kernels.steerlm2.formats.jsonl_stream import (
    CommandError,
    LineError,
    Progress,
    count_nonblank_lines,
    iter_objects,
    run_command,
)
from steerlm_kernels.steerlm2.formats.provenance import file_fingerprint, model_fingerprint, parse_allow_changed
from steerlm_kernels.steerlm2.formats.records import SteerLM2Record, SteerLMDataError
from steerlm_kernels.steerlm2.formats.templates import TEMPLATES, encode_prompt
from steerlm_kernels.steerlm2.models.loading import check_seed, load_models, resolve_device, resolve_dtype

__all__ = ["DEFAULTS", "MAX_DRAWS", "SampleSummary", "add_arguments", "record_seed", "run", "sample_batch",
           "sample_file", "sample_record"]

DEFAULTS: dict[str, Any] = {
    "num_responses": 4,
    "template": "nemo",
    "temperature": 1.0,
    "top_p": 1.0,
    "max_new_tokens": 128,
    "seed": 0,
    "device": "auto",
    "precision": "auto",
    "batch_prompts": 16,
}
#: The settings an output's provenance records and a resume compares (``--allow-changed`` names).
SETTINGS = ("model", "num_responses", "template", "temperature", "top_p", "max_new_tokens", "seed", "precision",
            "device", "prompts")


class SampleSummary:
    """What :func:`sample_file` did: ``written`` / ``resumed`` records, ``malformed`` ``(line, message)``,
    ``responses``, ``new_tokens``, ``capped`` (responses cut at the token cap), ``seconds``."""

    def __init__(self) -> None:
        self.written = 0
        self.resumed = 0
        self.responses = 0
        self.new_tokens = 0
        self.capped = 0
        self.seconds = 0.0
        self.malformed: list[tuple[int, str]] = []


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``sample`` options to ``parser``; returns it."""
    d = DEFAULTS
    parser.description = ("Sample n responses per prompt (batched, the model's KV cache, one random stream per "
                          "response) into SteerLM 2.0 records.")
    parser.add_argument("--prompts", required=True, help="JSONL of records with system, prompt_turns, label")
    parser.add_argument("--model", required=True, help="a Hugging Face model directory, or tiny/small (built in)")
    parser.add_argument("--num-responses", type=int, required=True, help="responses per prompt")
    parser.add_argument("--output", required=True, help="output JSONL; an existing one needs --resume or --overwrite")
    parser.add_argument("--template", default=d["template"], choices=TEMPLATES,
                        help="prompt template, as for train and score (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=d["temperature"],
                        help="sampling temperature; 0 = greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=d["top_p"], help="nucleus sampling (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"],
                        help="longest response in tokens (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d["seed"],
                        help="seed of the draws (per record, with its line number) and of built-in models")
    parser.add_argument("--device", default=d["device"],
                        help="torch device; auto = cuda when available (cpu for the built-in models)")
    parser.add_argument("--precision", default=d["precision"], choices=("auto", "fp32", "bf16", "fp16"),
                        help="model weights' dtype; auto = fp32 on CPU, bf16 on CUDA (default: %(default)s)")
    parser.add_argument("--batch-prompts", type=int, default=d["batch_prompts"],
                        help="prompts sampled together (left padding; same output as one at a time; default: "
                             "%(default)s)")
    add_output_arguments(parser, SETTINGS)
    return parser


def record_seed(seed: int, lineno: int) -> int:
    """The random seed of the record on input line ``lineno`` (independent of the other records)."""
    return (seed * 1_000_003 + lineno * 7_919) % (2**63 - 1)


_parse_prompt = parse_prompt  # the prompt-record check lives in generation (steer-eval uses it too)


@torch.no_grad()
def sample_batch(model: Any, tokenizer: Any, records: Sequence[SteerLM2Record], seeds: Sequence[int], *,
                 template: str, num_responses: int, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 128) -> list[list[Draw]]:
    """``num_responses`` :class:`~steerlm_kernels.steerlm2.datatools.generation.Draw` per record, the records
    sampled together (:func:`~steerlm_kernels.steerlm2.datatools.generation.sample_prompts`, left padding):
    record ``j``'s draws depend on ``seeds[j]`` only, as if it were sampled alone. ValueError names the
    record's index when its draws stay empty."""
    prompts = [encode_prompt(tokenizer, template, r.system, r.prompt_turns, r.label, response_role=r.response_role)
               for r in records]
    return sample_prompts(model, tokenizer, prompts, seeds, template=template, num_responses=num_responses,
                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)


def sample_record(model: Any, tokenizer: Any, record: SteerLM2Record, *, template: str, num_responses: int,
                  seed: int, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128
                  ) -> tuple[list[str], int]:
    """``(num_responses texts, generated tokens)`` for one record (:func:`sample_batch` of one)."""
    draws = sample_batch(model, tokenizer, [record], [seed], template=template, num_responses=num_responses,
                         temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)[0]
    return [d.text for d in draws], sum(d.new_tokens for d in draws)


def sample_file(prompts: str | Path, output: str | Path, model: Any, tokenizer: Any, *, num_responses: int,
                template: str = "nemo", temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128,
                seed: int = 0, resume: bool = True, quiet: bool = False, log: Any = None,
                batch_prompts: int = DEFAULTS["batch_prompts"], overwrite: bool = False,
                settings: Mapping[str, Any] | None = None, about: Mapping[str, Any] | None = None,
                allow_changed: Collection[str] = ()) -> SampleSummary:
    """Stream ``prompts`` to ``output`` (module docstring); raises ``CommandError`` on failures.

    ``resume``: continue an existing output; ``overwrite``: replace it; neither: an existing non-empty
    output is refused. ``settings`` / ``about``: recorded in its provenance besides the sampling
    options and the prompts' fingerprint (the command adds the model, precision, device);
    ``allow_changed``: settings whose change a resume accepts."""
    log = sys.stderr if log is None else log
    source = str(prompts)
    if num_responses < 1:
        raise CommandError(f"--num-responses must be positive, got {num_responses}")
    if max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if batch_prompts < 1:
        raise CommandError(f"--batch-prompts must be positive, got {batch_prompts}")
    if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1:
        raise CommandError(f"--temperature must be >= 0 and --top-p in (0, 1], got {temperature}, {top_p}")
    if template not in TEMPLATES:
        raise CommandError(f"--template must be one of {TEMPLATES}, got {template!r}")
    try:
        total = count_nonblank_lines(prompts)
    except OSError as exc:
        raise CommandError(f"--prompts {prompts}: cannot read ({exc.strerror or exc})") from None
    summary = SampleSummary()
    t0 = time.perf_counter()
    recorded = {"num_responses": num_responses, "template": template, "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "seed": seed, "prompts": file_fingerprint(prompts),
                **(settings or {})}
    with CommandOutput(output, command="sample", inputs={"--prompts": prompts}, settings=recorded,
                       about={"prompts": str(prompts), **(about or {})}, resume=resume, overwrite=overwrite,
                       allowed=allow_changed, log=log) as writer:
        to_skip = summary.resumed = writer.done
        if to_skip:
            print(f"sample: resuming {output}: {to_skip} records already written", file=log)
        progress = Progress("sample", total, quiet=quiet, stream=log)
        seen = 0
        pending: list[tuple[int, dict[str, Any], SteerLM2Record]] = []

        def flush() -> None:
            if not pending:
                return
            try:
                batch = sample_batch(model, tokenizer, [r for _, _, r in pending],
                                     [record_seed(seed, n) for n, _, _ in pending], template=template,
                                     num_responses=num_responses, temperature=temperature, top_p=top_p,
                                     max_new_tokens=max_new_tokens)
            except ValueError as exc:
                where = str(exc).partition(": ")
                index = where[0].removeprefix("prompt ")
                line = pending[int(index)][0] if index.isdigit() and int(index) < len(pending) else pending[0][0]
                raise CommandError(f"{source}, line {line}: {where[2] or exc}") from None
            for (_, obj, record), draws in zip(pending, batch):
                out = {k: copy.deepcopy(v) for k, v in obj.items() if k not in ("responses", "unscored")}
                out["responses"] = [{"from": record.response_role, **draw_fields(d)} for d in draws]
                writer.write([out], [obj])
                summary.written += 1
                summary.responses += len(draws)
                summary.new_tokens += sum(d.new_tokens for d in draws)
                summary.capped += sum(d.capped for d in draws)
            pending.clear()
            elapsed = time.perf_counter() - t0
            progress.update(seen, f"{summary.responses} responses, {summary.new_tokens / max(elapsed, 1e-9):,.0f} "
                                  "new tok/s")

        for lineno, obj in iter_objects(prompts):
            seen += 1
            try:
                if isinstance(obj, LineError):
                    raise obj
                record = _parse_prompt(obj, source, lineno)
            except (LineError, SteerLMDataError) as exc:
                summary.malformed.append((lineno, str(exc)))
                print(f"sample: skipped {exc}", file=log)
                continue
            if to_skip:  # every kept line is checked against its input record
                writer.check_kept(writer.done - to_skip, obj, source, lineno)
                to_skip -= 1
                continue
            pending.append((lineno, obj, record))
            if len(pending) >= batch_prompts:
                flush()
        flush()
        progress.close()
    summary.seconds = time.perf_counter() - t0
    print(f"sample: wrote {summary.written} records ({summary.responses} responses, {summary.new_tokens:,} new "
          f"tokens) to {output} in {summary.seconds:.1f}s ({summary.resumed} from an earlier run)", file=log)
    if summary.capped:
        print(f"sample: {summary.capped} of {summary.responses} responses hit --max-new-tokens {max_new_tokens} "
              "(\"capped\": true; pipeline drops them before score)", file=log)
    if summary.malformed:
        print(f"sample: {len(summary.malformed)} malformed lines of {source} skipped (lines "
              f"{', '.join(str(n) for n, _ in summary.malformed[:20])})", file=log)
    return summary


def run(ns: argparse.Namespace) -> int:
    """Run ``sample`` from parsed options; returns the exit status."""

    def body() -> None:
        from steerlm_kernels.steerlm2.models.hf_models import TINY_MODELS

        check_seed(ns.seed)
        allowed = parse_allow_changed(ns.allow_changed, SETTINGS)
        if not Path(ns.prompts).is_file():
            raise CommandError(f"--prompts {ns.prompts}: no such file")
        CommandOutput.precheck(ns.output, {"--prompts": ns.prompts}, resume=ns.resume, overwrite=ns.overwrite)
        device = resolve_device(ns.device, [ns.model])
        dtype = resolve_dtype(ns.precision, device)
        settings = {"model": model_fingerprint(ns.model, TINY_MODELS), "precision": str(dtype).removeprefix("torch."),
                    "device": device.type}
        model, tok = load_models({"model": ns.model}, device, dtype, ns.seed)["model"]
        print(f"sample: {ns.prompts} -> {ns.output}, {ns.num_responses} responses per prompt, template "
              f"{ns.template}, {device}, {dtype}", file=sys.stderr)
        sample_file(ns.prompts, ns.output, model, tok, num_responses=ns.num_responses, template=ns.template,
                    temperature=ns.temperature, top_p=ns.top_p, max_new_tokens=ns.max_new_tokens, seed=ns.seed,
                    resume=ns.resume, overwrite=ns.overwrite, settings=settings, about={"model": str(ns.model)},
                    allow_changed=allowed, quiet=ns.quiet, batch_prompts=ns.batch_prompts)

    return run_command("sample", body)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m steerlm_kernels.steerlm2.datatools.sample [options]``."""
    return run(add_arguments(argparse.ArgumentParser(prog="steerlm-kernels sample")).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
