#!/usr/bin/env python
"""Synthetic data for the steering demonstration: prompts, SFT text of widely varying length, held-out text.

``python python/make_steering_data.py --output DIR [--prompts 400] [--seed 0]`` writes

* ``DIR/sft.jsonl``: SteerLM 2.0 records (no scores) with ``--sft-responses`` responses per prompt,
  sentences of ``n`` pseudo-words, ``n`` log-uniform over 1..40 (so each verbosity level ``k`` of
  the example scorer, about ``2^(k+1)`` words, is as common as any other); the label's verbosity
  is drawn independently of the responses (``steerlm-kernels sft`` redraws it anyway);
* ``DIR/prompts.jsonl``: the same prompts without responses (what ``pipeline`` samples from);
* ``DIR/eval_prompts.jsonl``: ``--eval-prompts`` other prompts for ``steer-eval`` with two
  responses each, the held-out reference text of its NLL: their length agrees with the record's
  verbosity label (level ``v``: ``2^(v+0.5)`` to ``2^(v+1.5)`` words), so a model that steers is not
  penalised for it on this text.

Words: a prompt is about one of the topics of ``make_sample_data.py``; a word is one of the topic's
three with probability 0.3, else a common word. Deterministic for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from make_sample_data import COMMON, PROMPT_TEMPLATES, SYSTEMS, TOPICS

MAX_WORDS = 40


def response(rng: random.Random, topic: str, level: int | None = None) -> str:
    """One sentence of ``n`` words, ending with a full stop: ``n`` log-uniform over 1..MAX_WORDS, or in
    ``[2^(level+0.5), 2^(level+1.5))`` for a verbosity ``level``."""
    if level is None:
        n = max(1, min(MAX_WORDS, round(math.exp(rng.uniform(0.0, math.log(MAX_WORDS + 0.5))))))
    else:
        n = rng.randint(math.ceil(2 ** (level + 0.5)), min(MAX_WORDS, math.ceil(2 ** (level + 1.5)) - 1))
    words = [rng.choice(TOPICS[topic]) if rng.random() < 0.3 else rng.choice(COMMON) for _ in range(n)]
    return " ".join(words) + "."


def prompt(rng: random.Random) -> tuple[dict, str]:
    topic = rng.choice(sorted(TOPICS))
    rec = {"system": rng.choice(SYSTEMS),
           "prompt_turns": [{"from": "User", "value": rng.choice(PROMPT_TEMPLATES).format(t=topic)}],
           "label": f"helpfulness:{rng.randrange(5)},verbosity:{rng.randrange(5)}"}
    return rec, topic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--prompts", type=int, default=400, help="training prompts (default: %(default)s)")
    ap.add_argument("--sft-responses", type=int, default=4, help="SFT responses per prompt (default: %(default)s)")
    ap.add_argument("--eval-prompts", type=int, default=40, help="steer-eval prompts (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ns = ap.parse_args()
    out = Path(ns.output)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(ns.seed)
    with open(out / "sft.jsonl", "w") as sft, open(out / "prompts.jsonl", "w") as prompts:
        for _ in range(ns.prompts):
            rec, topic = prompt(rng)
            prompts.write(json.dumps(rec) + "\n")
            resp = [{"from": "Assistant", "value": response(rng, topic)} for _ in range(ns.sft_responses)]
            sft.write(json.dumps({**rec, "responses": resp}) + "\n")
    with open(out / "eval_prompts.jsonl", "w") as ev:
        for _ in range(ns.eval_prompts):
            rec, topic = prompt(rng)
            level = int(rec["label"].rsplit(":", 1)[1])
            ev.write(json.dumps({**rec, "responses": [{"from": "Assistant", "value": response(rng, topic, level)}
                                                      for _ in range(2)]}) + "\n")
    print(f"wrote {out / 'sft.jsonl'}, {out / 'prompts.jsonl'}, {out / 'eval_prompts.jsonl'}")


if __name__ == "__main__":
    main()
