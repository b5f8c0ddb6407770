"""steerlm2.generation: batched sampling equals one prompt at a time; token ids, capped and exact flags."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from steerlm_kernels.steerlm2.datatools import generation as G  # noqa: E402
from steerlm_kernels.steerlm2.datatools import sample as SM  # noqa: E402
from steerlm_kernels.steerlm2.formats.templates import encode_example, encode_prompt  # noqa: E402
from steerlm_kernels.steerlm2.models.hf_models import build_byte_tokenizer, build_tiny  # noqa: E402
from tests.lm_stubs import EOS, ScriptedLM  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(0)


def _prompts(tok, n: int = 5) -> list[list[int]]:
    return [encode_prompt(tok, "nemo", "sys" * (k % 3), [("User", "question " * (k + 1))], f"verbosity:{k % 5}")
            for k in range(n)]


def enc(tok, s: str) -> list[int]:
    return tok.encode(s, add_special_tokens=False)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_batched_equals_one_prompt_at_a_time(tiny, temperature, top_p) -> None:
    model, tok = tiny
    prompts = _prompts(tok)  # different lengths: left padding matters
    assert len({len(p) for p in prompts}) == len(prompts)
    seeds = [11, 12, 13, 14, 15]
    kw = {"template": "nemo", "num_responses": 3, "max_new_tokens": 12, "temperature": temperature, "top_p": top_p}
    together = G.sample_prompts(model, tok, prompts, seeds, **kw)
    alone = [G.sample_prompts(model, tok, [p], [s], **kw)[0] for p, s in zip(prompts, seeds)]
    chunked = G.sample_prompts(model, tok, prompts, seeds, max_rows=2, **kw)
    assert together == alone == chunked
    assert all(len(d) == 3 for d in together)
    if temperature == 0:
        assert all(len(set(d)) == 1 for d in together)  # greedy: one continuation, repeated
    else:
        assert len({d.token_ids for draws in together for d in draws}) > 5  # random draws differ


def test_rows_depend_on_their_seed_only(tiny) -> None:
    model, tok = tiny
    p = _prompts(tok, 2)
    kw = {"stops": [EOS], "pad_id": 256, "max_new_tokens": 8}
    a = G.generate_rows(model, [p[0], p[1]], [1, 2], **kw)
    b = G.generate_rows(model, [p[1], p[0]], [2, 1], **kw)
    c = G.generate_rows(model, [p[0]], [3], **kw)
    assert a == [b[1], b[0]] and a[0] != c[0]
    assert all(len(r) == 8 for r in a)  # a random tiny model rarely stops in 8 tokens


def test_top_p_keeps_the_nucleus(tiny) -> None:
    model, tok = tiny
    p = _prompts(tok, 3)
    greedy = G.generate_rows(model, p, [0, 1, 2], stops=[], pad_id=256, max_new_tokens=6, temperature=0)
    narrow = G.generate_rows(model, p, [0, 1, 2], stops=[], pad_id=256, max_new_tokens=6, top_p=1e-9)
    assert narrow == greedy  # the nucleus of any mass < the top token's is the top token


def test_capped_marks_responses_cut_at_the_cap() -> None:
    tok = build_byte_tokenizer()
    turn = tok.convert_tokens_to_ids("<extra_id_1>")
    scripts = [enc(tok, "abcd"), enc(tok, "abc") + [EOS], enc(tok, "ab\n") + [turn]]
    model = ScriptedLM(scripts, after=ord("z"))
    draws = G.sample_prompts(model, tok, [enc(tok, "q")], [0], template="nemo", num_responses=3, max_new_tokens=4)[0]
    assert [d.text for d in draws] == ["abcd", "abc", "ab"]
    assert [d.capped for d in draws] == [True, False, False]  # "abc"+EOS ends on the 4th token: not cut
    assert [d.new_tokens for d in draws] == [4, 4, 4]
    assert draws[2].token_ids == tuple(enc(tok, "ab"))  # nemo's end-of-turn "\n" is not part of the response


def test_token_ids_round_trip_and_inexact_text_is_flagged() -> None:
    tok = build_byte_tokenizer()
    good, bad = enc(tok, "héllo wörld"), [104, 0xC3, 105]  # 0xC3 then 'i': invalid UTF-8
    model = ScriptedLM([good + [EOS], bad + [EOS]])
    draws = G.sample_prompts(model, tok, [enc(tok, "q")], [0], template="nemo", num_responses=2, max_new_tokens=40)[0]
    assert draws[0].exact and list(draws[0].token_ids) == good == enc(tok, draws[0].text)
    ids, start = encode_example(tok, "nemo", "", [("User", "q")], "verbosity:1", draws[0].text)
    assert ids[start:start + len(good)] == good  # what score/train render is what was sampled
    assert not draws[1].exact and "\ufffd" in draws[1].text and list(draws[1].token_ids) == bad
    rec = {"system": "", "responses": [{"value": "a", **G.draw_fields(d)} for d in draws]
           + [{"value": "c", "capped": True, "exact": True}, {"value": "old"}]}
    kept, dropped = G.drop_flagged(rec)
    assert dropped == 2 and [r["value"] for r in kept["responses"]] == ["héllo wörld", "old"]
    assert len(rec["responses"]) == 4  # the input is not modified


def test_empty_draws_are_drawn_again_then_refused() -> None:
    tok = build_byte_tokenizer()
    model = ScriptedLM([[EOS], enc(tok, "x") + [EOS]])
    draws = G.sample_prompts(model, tok, [enc(tok, "q")], [0], template="nemo", num_responses=1, max_new_tokens=5)
    assert draws[0][0].text == "x"
    with pytest.raises(ValueError, match="prompt 0: 8 draws gave only 0 non-empty"):
        G.sample_prompts(ScriptedLM([[EOS]]), tok, [enc(tok, "q")], [0], template="nemo", num_responses=1,
                         max_new_tokens=5)
    empty = G.sample_prompts(ScriptedLM([[EOS], enc(tok, "x") + [EOS]]), tok, [enc(tok, "q")], [0], template="nemo",
                             num_responses=2, max_new_tokens=5, allow_empty=True)[0]
    assert [d.text for d in empty] == ["", "x"] and not empty[0].capped  # steer-eval: an empty answer counts


def test_bad_arguments_are_named() -> None:
    tok = build_byte_tokenizer()
    model = ScriptedLM([[EOS]])
    with pytest.raises(ValueError, match="same length"):
        G.generate_rows(model, [[1]], [1, 2], stops=[EOS], pad_id=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        G.generate_rows(model, [[1]], [1], stops=[EOS], pad_id=0, max_new_tokens=0)
    with pytest.raises(ValueError, match="prompts"):
        G.generate_rows(model, [[]], [1], stops=[EOS], pad_id=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="num_responses"):
        G.sample_prompts(model, tok, [[1]], [1], template="nemo", num_responses=0, max_new_tokens=2)


def test_sample_file_stores_ids_and_flags_and_batches_transparently(tiny, tmp_path) -> None:
    model, tok = tiny
    rows = [{"system": "s", "prompt_turns": [{"from": "User", "value": "q" * (k + 1)}], "label": f"verbosity:{k}"}
            for k in range(5)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = {"num_responses": 2, "max_new_tokens": 5, "seed": 3, "quiet": True}
    SM.sample_file(prompts, tmp_path / "a.jsonl", model, tok, batch_prompts=4, **kw)
    SM.sample_file(prompts, tmp_path / "b.jsonl", model, tok, batch_prompts=1, **kw)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    out = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    resp = [r for o in out for r in o["responses"]]
    assert all(set(r) == {"from", "value", "token_ids", "capped", "exact"} for r in resp)
    assert all(r["capped"] == (len(r["token_ids"]) == 5) for r in resp)  # random tiny model: no stop in 5
    assert all(enc(tok, r["value"]) == r["token_ids"] for r in resp if r["exact"])
    assert any(not r["exact"] for r in resp)  # random bytes: some invalid UTF-8, flagged
    assert all(torch.tensor(r["token_ids"]).lt(262).all() for r in resp)


class _EarlyStop(torch.nn.Module):
    """The tiny Llama with its EOS logit raised: rows end at different steps (finished rows leave the batch)."""

    def __init__(self, inner, bonus: float = 4.0) -> None:
        super().__init__()
        self.inner, self.bonus = inner, bonus

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=use_cache)
        out.logits[..., EOS] += self.bonus
        return out


def test_batched_equals_alone_when_rows_finish_at_different_steps(tiny) -> None:
    model, tok = tiny
    early = _EarlyStop(model, bonus=3.0)
    prompts, seeds = _prompts(tok, 4) * 4, list(range(16))
    kw = {"stops": [EOS], "pad_id": 256, "max_new_tokens": 30}
    together = G.generate_rows(early, prompts, seeds, **kw)
    alone = [G.generate_rows(early, [p], [s], **kw)[0] for p, s in zip(prompts, seeds)]
    assert together == alone
    lengths = {len(r) for r in together}
    assert len(lengths) > 3 and all(r[-1] == EOS for r in together if len(r) < 30)  # varied ends: rows dropped
