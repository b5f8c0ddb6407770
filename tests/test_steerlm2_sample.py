"""steerlm2.sample: ``steerlm-kernels sample`` - reproducible, resumable, its output is training data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from steerlm_kernels import cli  # noqa: E402
from steerlm_kernels.steerlm2.datatools import sample as SM  # noqa: E402
from steerlm_kernels.steerlm2.datatools import score as SC  # noqa: E402
from steerlm_kernels.steerlm2.formats.example_scorers import verbosity_length  # noqa: E402
from steerlm_kernels.steerlm2.formats.records import LOG_P_Y, LOG_Q, parse_record, read_jsonl  # noqa: E402
from steerlm_kernels.steerlm2.formats.templates import encode_prompt  # noqa: E402
from steerlm_kernels.steerlm2.models.hf_models import build_byte_tokenizer, build_tiny  # noqa: E402
from steerlm_kernels.steerlm2.models.logprobs import SpanScorer  # noqa: E402

PROMPTS = [
    {"system": "Be kind.", "prompt_turns": [{"from": "User", "value": "Why tea?"}], "label": "verbosity:1"},
    {"system": "", "prompt_turns": [{"from": "User", "value": "Hi"}, {"from": "Assistant", "value": "Hello"},
                                    {"from": "User", "value": "Rain?"}], "label": "helpfulness:2,verbosity:4",
     "id": "keep-me"},
    {"system": "x", "prompt_turns": [{"from": "User", "value": "Cats?"}], "label": None,
     "responses": [{"from": "Bot", "value": "old response, replaced"}]},
]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(0)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_sample(tiny, prompts: Path, out: Path, **kw) -> SM.SampleSummary:
    model, tok = tiny
    args = {"num_responses": 3, "max_new_tokens": 6, "seed": 7, "quiet": True, "template": "nemo", **kw}
    return SM.sample_file(prompts, out, model, tok, **args)


def test_sample_is_reproducible_with_a_seed(tiny, tmp_path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    run_sample(tiny, prompts, tmp_path / "a.jsonl")
    run_sample(tiny, prompts, tmp_path / "b.jsonl")
    run_sample(tiny, prompts, tmp_path / "c.jsonl", seed=8)
    a = (tmp_path / "a.jsonl").read_bytes()
    assert a == (tmp_path / "b.jsonl").read_bytes()
    assert a != (tmp_path / "c.jsonl").read_bytes()
    out = [json.loads(x) for x in a.decode().splitlines()]
    assert [len(o["responses"]) for o in out] == [3, 3, 3]
    assert out[1]["id"] == "keep-me" and out[2]["label"] is None
    assert {r["from"] for r in out[2]["responses"]} == {"Bot"}  # the input's responding role
    assert all(r["value"] and r["value"] != "old response, replaced" for o in out for r in o["responses"])
    # a record's responses do not depend on the records before it (per-record seeds)
    write_jsonl(tmp_path / "p2.jsonl", ["", PROMPTS[1]])  # PROMPTS[1] on line 2 again, alone
    run_sample(tiny, tmp_path / "p2.jsonl", tmp_path / "d.jsonl")
    assert json.loads((tmp_path / "d.jsonl").read_text()) == out[1]


def test_sample_resumes_to_the_uninterrupted_output(tiny, tmp_path, monkeypatch) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    run_sample(tiny, prompts, whole)
    real, calls = SM.sample_batch, []

    def dies_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(SM, "sample_batch", dies_second_time)
    with pytest.raises(KeyboardInterrupt):
        run_sample(tiny, prompts, part, batch_prompts=1)
    monkeypatch.setattr(SM, "sample_batch", real)
    assert len(part.read_text().splitlines()) == 1
    with open(part, "a") as f:
        f.write('{"system": "Be')  # a line cut by the kill
    summary = run_sample(tiny, prompts, part)
    assert (summary.resumed, summary.written) == (1, 2)
    assert part.read_bytes() == whole.read_bytes()


def test_sample_refuses_to_resume_an_output_of_other_prompts(tiny, tmp_path) -> None:
    other = write_jsonl(tmp_path / "out.jsonl", [{**PROMPTS[1], "responses": [{"value": "y"}]}])
    with pytest.raises(SM.CommandError, match="no provenance record"):  # not an output of sample
        run_sample(tiny, write_jsonl(tmp_path / "p.jsonl", PROMPTS), other)
    out = tmp_path / "s.jsonl"
    run_sample(tiny, write_jsonl(tmp_path / "p2.jsonl", PROMPTS[:2]), out)
    swapped = write_jsonl(tmp_path / "p3.jsonl", [PROMPTS[0], PROMPTS[2], PROMPTS[1]])
    with pytest.raises(SM.CommandError, match=r"s.jsonl, line 2: was made from another record than .*p3.jsonl, "
                                              r"line 2"):
        run_sample(tiny, swapped, out, allow_changed={"prompts"})
    grown = write_jsonl(tmp_path / "p4.jsonl", PROMPTS)  # the same two prompts, then one more
    assert run_sample(tiny, grown, out, allow_changed={"prompts"}).resumed == 2


def test_sample_output_is_training_data_after_scoring(tiny, tmp_path) -> None:
    model, tok = tiny
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    sampled = tmp_path / "s.jsonl"
    run_sample(tiny, prompts, sampled, template="plain")
    for n, line in enumerate(sampled.read_text().splitlines(), start=1):  # every response valid but unscored
        obj = json.loads(line)
        assert all(set(r) == {"from", "value", "token_ids", "capped", "exact"} for r in obj["responses"])
        parse_record({**obj, "responses": [{**r, "log(P(a|x,y))": -1.0, LOG_P_Y: -1.0, LOG_Q: -1.0}
                                           for r in obj["responses"]]}, "s", n)
    sides = [SC.Side(name, key, lab, SpanScorer(model, tok.pad_token_id), tok, "fused")
             for name, key, lab in (("sft", LOG_P_Y, False), ("steerlm", LOG_Q, True))]
    SC.score_file(sampled, tmp_path / "scored.jsonl", sides, template="plain", attribute_scorer=verbosity_length,
                  quiet=True)
    recs = read_jsonl(tmp_path / "scored.jsonl")
    assert [len(r.responses) for r in recs] == [3, 3]
    assert all(r.log_p_y < 0 and r.log_q < 0 for rec in recs for r in rec.responses)


def test_response_ends_at_the_templates_end_of_turn() -> None:
    from tests.lm_stubs import ScriptedLM

    tok = build_byte_tokenizer()
    turn, eos = tok.convert_tokens_to_ids("<extra_id_1>"), tok.eos_token_id
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    rows = [enc("ab\n") + [turn] + enc("junk"), enc("c d") + [eos], enc("\n") + [turn], enc("no stop")]
    fake = ScriptedLM(rows, after=eos)
    rec = parse_record({"system": "", "prompt_turns": [{"from": "User", "value": "q"}], "label": "verbosity:1",
                        "responses": [{"value": "-", "log(P(a|x,y))": 0, LOG_P_Y: 0, LOG_Q: 0}]})
    texts, _ = SM.sample_record(fake, tok, rec, template="nemo", num_responses=3, seed=0)
    # "\n<extra_id_1>" is the scored span's end (not in the value); an empty draw does not count
    assert texts == ["ab", "c d", "no stop"]  # the empty third draw skipped
    prompt = encode_prompt(tok, "nemo", "", [("User", "q")], "verbosity:1")
    assert tok.decode(prompt).endswith("<extra_id_2>verbosity:1\n")  # sampled from Q'(y|a,x): with the label
    never = ScriptedLM([enc("\n") + [turn]])
    with pytest.raises(ValueError, match="non-empty responses"):
        SM.sample_record(never, tok, rec, template="nemo", num_responses=1, seed=0)


def test_sample_cli(tmp_path, capsys) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [PROMPTS[0], "{oops", {"system": "x"}, PROMPTS[1]])
    out = tmp_path / "out.jsonl"
    argv = ["sample", "--prompts", str(prompts), "--model", "tiny", "--num-responses", "2", "--output", str(out),
            "--max-new-tokens", "4", "--temperature", "0", "--quiet"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "line 2: invalid JSON" in err and "line 3" in err and "prompt_turns" in err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt_turns"] for r in rows] == [PROMPTS[0]["prompt_turns"], PROMPTS[1]["prompt_turns"]]
    assert rows[0]["responses"][0] == rows[0]["responses"][1]  # temperature 0: greedy
    assert cli.main([*argv[:6], "0", *argv[7:], "--overwrite"]) == 2
    assert capsys.readouterr().err.strip().endswith("--num-responses must be positive, got 0")
    for bad, needle in (("nan", "--temperature"), ("inf", "--temperature")):  # caught before generate
        assert cli.main([*argv, "--temperature", bad, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith(f"steerlm-kernels sample: error: {needle}"), err
        assert "Traceback" not in err
    assert rows == [json.loads(x) for x in out.read_text().splitlines()]  # refused before anything was written
