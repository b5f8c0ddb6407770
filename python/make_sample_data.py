#!/usr/bin/env python
"""Generate the bundled SteerLM 2.0 sample, ``steerlm_kernels/steerlm2/formats/sample_data/sample_steerlm2.jsonl``.

Deterministic (seeded): ``python python/make_sample_data.py`` rewrites the bundled file byte for
byte; ``--check`` only verifies that it is up to date. The file has 40 prompts with 4-8 responses
each, in the JSONL format read by :mod:`steerlm_kernels.steerlm2.formats.records`.

The generative story (every log-probability in the file is exact under it)
-------------------------------------------------------------------------
A prompt ``x`` asks about one of 20 topics; each topic owns three *topic words*. The attribute
label is ``a = "helpfulness:h,verbosity:v"`` with ``h, v`` drawn uniformly from ``0..4``.
A response ``y`` is a sentence of ``n`` (2..8) lower-case words joined by single spaces and ended
by ``"."``. Words are 2-6 bytes and contain no space, so the word sequence is recovered uniquely
from the text: each distribution below over word sequences is a distribution over byte strings
(responses are 6-56 bytes).

* ``Q'(y|a,x)`` - the earlier policy that sampled the responses (and ignores ``a``): the length
  ``n`` from ``Q_LEN`` (peaked at 4 words), then ``n`` words i.i.d., a topic word with probability
  ``Q_TOPIC = 0.25`` (uniform among the topic's three), else a common word (uniform among
  ``COMMON``). ``log Q' = log Q_LEN[n] + sum_i log q(w_i)``. The responses in the file really
  are samples of ``Q'`` (with replacement; duplicates are kept), so ``ws`` is a proper
  self-normalised importance-sampling estimate.
* ``P(y|x)`` - the base model: the same form with a uniform length over 2..8 and a topic word
  with probability ``P_TOPIC = 0.4``.
* ``P(a|x,y)`` - the attribute model: from the response it predicts helpfulness
  ``h~ = min(4, 1.5 * #topic words)`` and verbosity ``v~ = 4 (n - 2) / 6``, and
  ``P(h|y) = softmax_k(-(k - h~)^2 / TAU)`` over ``k = 0..4`` (likewise for ``v``);
  ``log P(a|x,y) = log P(h|y) + log P(v|y)``.

Hence ``ws = softmax_group(log P(a|x,y) + log P(y|x) - log Q'(y|a,x))`` concentrates on the
responses whose length and topic-word count agree with the requested attributes. These are simple
functions of the bytes and of the label written in the prompt, so a tiny byte-level LM trained
with the SteerLM 2.0 estimator can learn them and its ``distance`` (KL from ``ws`` to the model's
baseline) falls. Prompts are rendered by
:func:`steerlm_kernels.steerlm2.formats.tokenization.render_prompt`; with the byte tokenizer every sequence
(bos + prompt + response + eos) is at most 160 tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

SEED = 20240607
NUM_PROMPTS = 40
MIN_RESPONSES, MAX_RESPONSES = 4, 8
MAX_SEQUENCE_BYTES = 160

TOPICS: dict[str, tuple[str, str, str]] = {
    "tea": ("leaf", "brew", "cup"),
    "rain": ("wet", "cloud", "drop"),
    "cats": ("purr", "paw", "fur"),
    "dogs": ("bark", "wag", "leash"),
    "bread": ("yeast", "crust", "oven"),
    "chess": ("pawn", "king", "rook"),
    "the sea": ("wave", "salt", "tide"),
    "bikes": ("pedal", "wheel", "gear"),
    "snow": ("cold", "flake", "sled"),
    "music": ("tune", "drum", "song"),
    "trees": ("bark", "root", "twig"),
    "coffee": ("bean", "roast", "mug"),
    "the moon": ("lunar", "crater", "orbit"),
    "bees": ("honey", "hive", "buzz"),
    "maps": ("north", "scale", "route"),
    "clocks": ("tick", "hour", "hand"),
    "kites": ("wind", "string", "fly"),
    "soup": ("broth", "bowl", "spoon"),
    "books": ("page", "plot", "ink"),
    "gardens": ("seed", "soil", "bloom"),
}
COMMON: tuple[str, ...] = (
    "it", "is", "very", "good", "and", "so", "nice", "a", "the", "we",
    "like", "fun", "bit", "often", "some", "big", "small", "all", "yes", "kind",
)  # fmt: skip
PROMPT_TEMPLATES = ("Tell me about {t}.", "What is {t}?", "Say a fact on {t}.", "Why do we like {t}?")
SYSTEMS = ("", "Be brief.", "Be kind.")
EARLIER_TURN = (("User", "Hi."), ("Assistant", "Hello."))  # prepended to some prompts (multi-turn)
ATTR_LEVELS = range(5)

LEN_VALUES = tuple(range(2, 9))
Q_LEN = (0.08, 0.17, 0.25, 0.2, 0.14, 0.1, 0.06)  # Q'(n), n = 2..8
P_LEN = tuple(1.0 / len(LEN_VALUES) for _ in LEN_VALUES)  # P(n), uniform
Q_TOPIC = 0.25
P_TOPIC = 0.4
TAU = 1.0


def _check_vocabulary() -> None:
    words = [w for ws in TOPICS.values() for w in ws]
    assert not set(words) & set(COMMON), "topic and common words must be disjoint"
    for w in (*words, *COMMON):
        assert " " not in w and 1 <= len(w) <= 6, w
    assert abs(sum(Q_LEN) - 1) < 1e-12 and len(Q_LEN) == len(LEN_VALUES)


def word_log_prob(word: str, topic: str, p_topic: float) -> float:
    """log-probability of one word: topic word w.p. ``p_topic`` (uniform among 3), else common."""
    if word in TOPICS[topic]:
        return math.log(p_topic / len(TOPICS[topic]))
    if word in COMMON:
        return math.log((1.0 - p_topic) / len(COMMON))
    return -math.inf


def sequence_log_prob(words: list[str], topic: str, len_probs: tuple[float, ...], p_topic: float) -> float:
    """log-probability of a response (its word sequence) under a length table and a topic weight."""
    return math.log(len_probs[LEN_VALUES.index(len(words))]) + sum(word_log_prob(w, topic, p_topic) for w in words)


def _log_softmax_at(scores: list[float], index: int) -> float:
    m = max(scores)
    return scores[index] - m - math.log(sum(math.exp(s - m) for s in scores))


def attribute_log_prob(words: list[str], topic: str, helpfulness: int, verbosity: int) -> float:
    """``log P(a|x,y)`` of the attribute model described in the module docstring."""
    n_topic = sum(w in TOPICS[topic] for w in words)
    h_pred = min(4.0, 1.5 * n_topic)
    v_pred = 4.0 * (len(words) - 2) / 6.0
    h_scores = [-((k - h_pred) ** 2) / TAU for k in ATTR_LEVELS]
    v_scores = [-((k - v_pred) ** 2) / TAU for k in ATTR_LEVELS]
    return _log_softmax_at(h_scores, helpfulness) + _log_softmax_at(v_scores, verbosity)


def sample_response(rng: random.Random, topic: str) -> list[str]:
    """One draw of ``Q'(y|a,x)``: a length, then i.i.d. words."""
    n = rng.choices(LEN_VALUES, weights=Q_LEN)[0]
    return [rng.choice(TOPICS[topic]) if rng.random() < Q_TOPIC else rng.choice(COMMON) for _ in range(n)]


def _rendered_length(record: dict) -> int:
    # mirrors steerlm_kernels.steerlm2.formats.tokenization.render_prompt (kept independent so that the script
    # runs without the package)
    text = f"System: {record['system']}\n" if record["system"] else ""
    text += "".join(f"{t['from']}: {t['value']}\n" for t in record["prompt_turns"])
    text += f"Assistant [{record['label']}]: "
    return len(text.encode())


def make_records(seed: int = SEED, num_prompts: int = NUM_PROMPTS) -> list[dict]:
    """The sample's records (deterministic in ``seed``)."""
    _check_vocabulary()
    rng = random.Random(seed)
    topics = list(TOPICS)
    records = []
    for i in range(num_prompts):
        topic = topics[i % len(topics)]
        question = rng.choice(PROMPT_TEMPLATES).format(t=topic)
        system = rng.choice(SYSTEMS)
        turns = [{"from": "User", "value": question}]
        if i % 5 == 4:  # a few multi-turn prompts, kept short
            system = ""
            turns = [{"from": r, "value": v} for r, v in EARLIER_TURN] + turns
        h, v = rng.choice(ATTR_LEVELS), rng.choice(ATTR_LEVELS)
        label = f"helpfulness:{h},verbosity:{v}"
        responses = []
        for _ in range(rng.randint(MIN_RESPONSES, MAX_RESPONSES)):
            words = sample_response(rng, topic)
            responses.append(
                {
                    "from": "Assistant",
                    "value": " ".join(words) + ".",
                    "log(P(a|x,y))": round(attribute_log_prob(words, topic, h, v), 6),
                    "log(P(y|x))": round(sequence_log_prob(words, topic, P_LEN, P_TOPIC), 6),
                    "log(Q(y|a,x))": round(sequence_log_prob(words, topic, Q_LEN, Q_TOPIC), 6),
                }
            )
        record = {"system": system, "prompt_turns": turns, "label": label, "responses": responses}
        longest = max(len(r["value"].encode()) for r in responses)
        # bos + prompt + response + eos
        assert 1 + _rendered_length(record) + longest + 1 <= MAX_SEQUENCE_BYTES, record
        records.append(record)
    return records


def render_jsonl(records: list[dict]) -> str:
    """One compact JSON object per line."""
    return "".join(json.dumps(r, ensure_ascii=False, separators=(", ", ": ")) + "\n" for r in records)


def default_output() -> Path:
    """The bundled file's location in this checkout."""
    package = Path(__file__).resolve().parents[1] / "steerlm_kernels"
    return package / "steerlm2" / "sample_data" / "sample_steerlm2.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=default_output(), help="where to write (default: bundled)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--num-prompts", type=int, default=NUM_PROMPTS)
    parser.add_argument("--check", action="store_true", help="only verify that --output is up to date")
    args = parser.parse_args(argv)
    text = render_jsonl(make_records(args.seed, args.num_prompts))
    if args.check:
        ok = args.output.exists() and args.output.read_text(encoding="utf-8") == text
        print(f"{args.output}: {'up to date' if ok else 'OUT OF DATE (run without --check)'}")
        return 0 if ok else 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({args.num_prompts} prompts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
