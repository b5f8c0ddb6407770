"""``steerlm-kernels sft``: the warm start - supervised fine-tuning whose labels say nothing about the responses.

SteerLM 2.0 needs a model that writes text (``P(y|x)``, the SFT model) and a first ``Q'(y|a,x)``
that reads the attribute string. ``sft`` trains one model to be both, with **no steering**: every
(prompt, response) pair of ``--data`` is rendered with ``--template`` under a label drawn
independently of the response - with probability ``--unlabelled-fraction`` no label (``P(y|x)``'s
rendering), else the record's label with each attribute of ``--randomise`` (default
``verbosity``) replaced by a level drawn uniformly from ``--levels``. The model thus learns the
label's format and the text, and - the label carrying no information about the response - starts
with ``Q'(y|a,x) = P(y|x)`` for every ``a``: whatever steering ``steer-eval`` finds later was
learned by SteerLM 2.0.

The loss is the mean token NLL over the scored spans (response + end of turn), plain AdamW with a
linear warm-up and cosine decay, batches of ``--batch-size`` pairs. ``--output DIR`` receives
``final/`` (a Hugging Face model directory with its tokenizer, usable as ``--model`` anywhere),
``metrics.jsonl`` (``step``, ``loss``, ``lr``; ``heldout_nll`` every ``--eval-every`` steps with
``--heldout``) and ``summary.json``. Failures: one line, exit status 2.

``--weighted-data SCORED`` (an alternative recipe, *not* NeMo's SteerLM 2.0 objective): importance-
weighted SFT on a scored SteerLM 2.0 file. ``--weighted-fraction`` of every batch are responses of
its groups drawn with probability ``ws`` (the group-normalised importance weights of the file:
samples of the target ``P(y|a,x)``), rendered under their record's **own** label; the rest are
pairs of ``--data`` as above (an SFT anchor that keeps the model fluent). No negative weights, so
no probability is pushed off the sampled text.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from steerlm_kernels.steerlm2.formats.example_scorers import parse_label
from steerlm_kernels.steerlm2.formats.jsonl_stream import CommandError, LineError, iter_objects, run_command
from steerlm_kernels.steerlm2.formats.templates import TEMPLATES, encode_example

__all__ = ["DEFAULTS", "add_arguments", "random_label", "read_pairs", "run", "train_sft"]

DEFAULTS: dict[str, Any] = {
    "model": "tiny", "template": "nemo", "steps": 1000, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20,
    "weight_decay": 0.0, "unlabelled_fraction": 0.3, "randomise": "verbosity", "levels": [0, 1, 2, 3, 4],
    "seed": 0, "eval_every": 100, "max_seq_length": 1024,
}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``sft`` options to ``parser``; returns it."""
    d = DEFAULTS
    parser.description = ("Warm start for SteerLM 2.0: fine-tune on responses under labels drawn independently of "
                          "them (the model writes text and starts with no steering).")
    a = parser.add_argument
    a("--data", required=True, help="SteerLM 2.0 JSONL (records with responses; scores not needed)")
    a("--model", default=d["model"], help="start model: a Hugging Face directory or a built-in name (default: tiny)")
    a("--output", required=True, help="output directory (final/, metrics.jsonl, summary.json)")
    a("--template", default=d["template"], choices=TEMPLATES, help="prompt template (default: %(default)s)")
    a("--steps", type=int, default=d["steps"], help="optimizer steps (default: %(default)s)")
    a("--batch-size", type=int, default=d["batch_size"], help="(prompt, response) pairs per step")
    a("--lr", type=float, default=d["lr"], help="peak learning rate (default: %(default)s)")
    a("--warmup-steps", type=int, default=d["warmup_steps"], help="linear warm-up, then cosine to 10 %%")
    a("--weight-decay", type=float, default=d["weight_decay"], help="AdamW weight decay (default: %(default)s)")
    a("--unlabelled-fraction", type=float, default=d["unlabelled_fraction"],
      help="share of pairs rendered without a label (default: %(default)s)")
    a("--randomise", default=d["randomise"], help="comma-separated attributes whose level is drawn at random")
    a("--levels", type=int, nargs="+", default=d["levels"], help="levels drawn for --randomise (default: 0..4)")
    a("--heldout", default=None, help="SteerLM 2.0 JSONL whose responses' NLL is reported every --eval-every steps")
    a("--weighted-data", default=None, help="scored SteerLM 2.0 JSONL: importance-weighted SFT on it (see above)")
    a("--weighted-fraction", type=float, default=0.5, help="share of each batch from --weighted-data")
    a("--eval-every", type=int, default=d["eval_every"], help="steps between held-out NLLs (default: %(default)s)")
    a("--max-seq-length", type=int, default=d["max_seq_length"], help="longer pairs are skipped (counted)")
    a("--seed", type=int, default=d["seed"], help="seed of the model init, labels and order (default: %(default)s)")
    return parser


def random_label(label: str | None, rng: random.Random, *, randomise: Sequence[str], levels: Sequence[int],
                 unlabelled_fraction: float) -> str | None:
    """A label independent of the response: None with probability ``unlabelled_fraction``, else ``label``
    with every attribute of ``randomise`` set to a uniformly drawn level (added when absent)."""
    if rng.random() < unlabelled_fraction:
        return None
    parts = parse_label(label)
    for name in randomise:
        parts[name] = str(rng.choice(list(levels)))
    return ",".join(f"{k}:{v}" for k, v in parts.items())


def read_pairs(path: str | Path, option: str = "--data") -> list[dict[str, Any]]:
    """``[{"system", "prompt_turns", "label", "role", "response"}]`` of every response of ``path``."""
    pairs = []
    if not Path(path).is_file():
        raise CommandError(f"{option} {path}: no such file")
    try:
        for lineno, obj in iter_objects(path):
            if isinstance(obj, LineError):
                raise CommandError(f"{option}: {obj}")
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt_turns"), list) \
                    or not isinstance(obj.get("responses"), list):
                raise CommandError(f"{option} {path}, line {lineno}: needs prompt_turns and responses")
            turns = [(t.get("from"), t.get("value")) for t in obj["prompt_turns"] if isinstance(t, dict)]
            for i, r in enumerate(obj["responses"]):
                if not isinstance(r, dict) or not isinstance(r.get("value"), str) or not r["value"]:
                    raise CommandError(f"{option} {path}, line {lineno}: responses[{i}] needs a non-empty value")
                pairs.append({"system": obj.get("system") or "", "prompt_turns": turns, "label": obj.get("label"),
                              "role": r.get("from", "Assistant"), "response": r["value"]})
    except OSError as exc:
        raise CommandError(f"{option} {path}: cannot read ({exc.strerror or exc})") from None
    if not pairs:
        raise CommandError(f"{option} {path}: no responses")
    return pairs


def read_groups(path: str | Path) -> list[tuple[dict[str, Any], list[float]]]:
    """``[(record dict, ws)]`` of a scored SteerLM 2.0 file (``ws``: its importance weights)."""
    from steerlm_kernels.steerlm2.formats.records import SteerLMDataError, importance_weights, read_jsonl

    if not Path(path).is_file():
        raise CommandError(f"--weighted-data {path}: no such file")
    try:
        records = read_jsonl(path)
    except (SteerLMDataError, ValueError, OSError) as exc:
        raise CommandError(f"--weighted-data: {exc}") from None
    return [({"system": r.system, "prompt_turns": list(r.prompt_turns), "label": r.label, "role": r.response_role,
              "responses": [x.value for x in r.responses]},
             importance_weights([x.log_p_a for x in r.responses], [x.log_p_y for x in r.responses],
                                [x.log_q for x in r.responses]).tolist()) for r in records]


def _batch(seqs: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, labels)`` right-padded; labels -100 outside the scored spans."""
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, (s, start) in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
        labels[r, start:len(s)] = torch.tensor(s[start:])
    return ids, mask, labels


def _token_nll(model: Any, seqs: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, int]:
    """Summed NLL of the scored tokens of ``seqs`` and their number."""
    import steerlm_kernels as sk

    ids, mask, labels = _batch(seqs, pad)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    nll = sk.token_nll(logits.float(), labels[:, 1:])
    n = int((labels[:, 1:] != -100).sum())
    return nll.sum(), n


def heldout_nll(model: Any, tokenizer: Any, pairs: list[dict[str, Any]], template: str, pad: int) -> float:
    """Mean NLL (nats per scored token) of ``pairs`` under their own labels."""
    seqs = [encode_example(tokenizer, template, p["system"], p["prompt_turns"], p["label"], p["response"],
                           response_role=p["role"]) for p in pairs]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for k in range(0, len(seqs), 64):
            s, n = _token_nll(model, seqs[k:k + 64], pad)
            total, count = total + float(s), count + n
    model.train(was_training)
    return total / max(count, 1)


def train_sft(ns: argparse.Namespace, log: Any = None) -> dict[str, Any]:
    """Run the fine-tuning of parsed options; returns the summary (also written to ``summary.json``)."""
    from steerlm_kernels.steerlm2.models.hf_models import load_model_and_tokenizer
    from steerlm_kernels.steerlm2.models.loading import pad_id
    from steerlm_kernels.steerlm2.training.metrics import check_output_dir

    log = sys.stderr if log is None else log
    for name in ("steps", "batch_size", "eval_every", "max_seq_length"):
        if getattr(ns, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be positive, got {getattr(ns, name)}")
    if not (math.isfinite(ns.lr) and ns.lr > 0) or ns.warmup_steps < 0 or not 0 <= ns.unlabelled_fraction <= 1:
        raise CommandError("--lr must be > 0, --warmup-steps >= 0 and --unlabelled-fraction in [0, 1]")
    if not 0 <= getattr(ns, "weighted_fraction", 0.5) <= 1:
        raise CommandError(f"--weighted-fraction must be in [0, 1], got {ns.weighted_fraction}")
    try:
        out = check_output_dir(ns.output)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    pairs = read_pairs(ns.data)
    groups = read_groups(ns.weighted_data) if getattr(ns, "weighted_data", None) else []
    n_weighted = round(ns.batch_size * ns.weighted_fraction) if groups else 0
    held = read_pairs(ns.heldout, "--heldout") if ns.heldout else None
    try:
        model, tok = load_model_and_tokenizer(ns.model, seed=ns.seed)
    except (ValueError, ImportError, OSError) as exc:
        raise CommandError(f"--model: {exc}") from None
    pad = pad_id(tok)
    rng = random.Random(ns.seed)
    randomise = [a.strip() for a in ns.randomise.split(",") if a.strip()]
    opt = torch.optim.AdamW(model.parameters(), lr=ns.lr, weight_decay=ns.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(ns.warmup_steps, 1)) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / ns.steps)))))
    model.train()
    order: list[int] = []
    skipped, t0, rows = 0, time.perf_counter(), []
    metrics = open(out / "metrics.jsonl", "w")
    first_nll = heldout_nll(model, tok, held, ns.template, pad) if held else None
    for step in range(1, ns.steps + 1):
        seqs = []
        for _ in range(n_weighted):  # a response of a random group, drawn by its importance weight
            rec, ws = groups[rng.randrange(len(groups))]
            value = rec["responses"][rng.choices(range(len(ws)), weights=ws)[0]]
            ids, start = encode_example(tok, ns.template, rec["system"], rec["prompt_turns"], rec["label"], value,
                                        response_role=rec["role"])
            if len(ids) <= ns.max_seq_length:
                seqs.append((ids, start))
        while len(seqs) < ns.batch_size:
            if not order:
                order = list(range(len(pairs)))
                rng.shuffle(order)
            p = pairs[order.pop()]
            label = random_label(p["label"], rng, randomise=randomise, levels=ns.levels,
                                 unlabelled_fraction=ns.unlabelled_fraction)
            ids, start = encode_example(tok, ns.template, p["system"], p["prompt_turns"], label, p["response"],
                                        response_role=p["role"])
            if len(ids) > ns.max_seq_length:
                skipped += 1
                if skipped > 10 * len(pairs):
                    raise CommandError(f"--max-seq-length {ns.max_seq_length}: every pair is longer")
                continue
            seqs.append((ids, start))
        total, n = _token_nll(model, seqs, pad)
        loss = total / max(n, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        row: dict[str, Any] = {"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0]}
        if held and (step % ns.eval_every == 0 or step == ns.steps):
            row["heldout_nll"] = heldout_nll(model, tok, held, ns.template, pad)
        if not math.isfinite(row["loss"]):
            raise CommandError(f"step {step}: non-finite loss (lower --lr)")
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        rows.append(row)
        if step % 20 == 0 or step == ns.steps or "heldout_nll" in row:
            extra = f"  held-out NLL {row['heldout_nll']:.4f}" if "heldout_nll" in row else ""
            print(f"sft: step {step}/{ns.steps} loss {row['loss']:.4f}{extra}  "
                  f"{time.perf_counter() - t0:.0f}s", file=log, flush=True)
    metrics.close()
    model.eval()
    model.save_pretrained(out / "final")
    tok.save_pretrained(out / "final")
    summary = {"steps": ns.steps, "seconds": time.perf_counter() - t0, "pairs": len(pairs), "skipped": skipped,
               "first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"], "heldout_nll_start": first_nll,
               "heldout_nll_final": rows[-1].get("heldout_nll"),
               "settings": {k: v for k, v in vars(ns).items() if k != "func"}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"sft: done in {summary['seconds']:.0f}s: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; "
          f"wrote {out / 'final'}", file=log)
    return summary


def run(ns: argparse.Namespace) -> int:
    """Run ``sft`` from parsed options; returns the exit status."""
    return run_command("sft", lambda: train_sft(ns))


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m steerlm_kernels.steerlm2.training.sft [options]``."""
    return run(add_arguments(argparse.ArgumentParser(prog="steerlm-kernels sft")).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
