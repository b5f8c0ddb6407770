"""steerlm2.score: ``steerlm-kernels score`` against float64 sums computed here from the HF model.

Every expected value is computed independently in this file: the text is rendered here from each
template's documented format (``nemo`` re-typed from NeMo-Aligner's ``SteerLM2Dataset``:
``get_prompt`` + ``_process_example``, positional mask after ``len(text_to_ids(prompt))``), and the
log-probabilities come from a float64 copy of the Hugging Face model, one unpadded sequence at a
time, ``log_softmax`` + gather + sum over the scored span.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from steerlm_kernels import cli  # noqa: E402
from steerlm_kernels.steerlm2.datatools import score as S  # noqa: E402
from steerlm_kernels.steerlm2.formats.example_scorers import verbosity_length  # noqa: E402
from steerlm_kernels.steerlm2.formats.jsonl_stream import CommandError  # noqa: E402
from steerlm_kernels.steerlm2.formats.outputs import OutputError  # noqa: E402
from steerlm_kernels.steerlm2.formats.records import LOG_P_A, LOG_P_Y, LOG_Q, read_jsonl  # noqa: E402
from steerlm_kernels.steerlm2.models.hf_models import build_tiny  # noqa: E402
from steerlm_kernels.steerlm2.models.logprobs import SpanScorer  # noqa: E402

from .conftest import require_backend  # noqa: E402

V = 1024  # the models' vocabulary (the byte tokenizer's 262 tokens, padded): V >= 1000
SCORER = "steerlm_kernels.steerlm2.formats.example_scorers:verbosity_length"

RECORDS = [
    {"system": "Be kind.",
     "prompt_turns": [{"from": "User", "value": "Why do we like tea?"},
                      {"from": "Assistant", "value": "It is warm."},
                      {"from": "User", "value": "And coffee?"}],
     "label": "helpfulness:4,verbosity:1",
     "responses": [{"from": "Assistant", "value": "Coffee is bitter."},
                   {"from": "Assistant", "value": "Both are drinks: one from leaves, one from roasted beans."},
                   {"from": "Assistant", "value": "ok"}]},
    {"system": "", "prompt_turns": [{"from": "User", "value": "What is rain?"}], "label": "verbosity:3",
     "responses": [{"from": "Assistant", "value": "Water falling from clouds.", LOG_P_A: -1.25},
                   {"from": "Assistant", "value": "\nDrops.", LOG_P_A: -0.5}]},
    {"system": "Short answers.", "prompt_turns": [{"from": "User", "value": "Say hi"}], "label": None,
     "responses": [{"from": "Assistant", "value": "hi"}, {"from": "Assistant", "value": "café ☕ hello"},
                   {"from": "Assistant", "value": "Hello there, friend."},
                   {"from": "Assistant", "value": "hey"}]},
]


# ------------------------------------------------------------------------------------------------
# independent renderings and the float64 reference


def nemo_ids(tok, rec: dict, label: str | None, response: str) -> tuple[list[int], int]:
    """NeMo-Aligner's SteerLM2Dataset text (default special tokens) and positional mask."""
    prompt = "<extra_id_0>System\n" + rec["system"] + "\n"
    for turn in rec["prompt_turns"]:
        prompt += "<extra_id_1>" + turn["from"] + "\n" + turn["value"] + "\n"
    prompt += "<extra_id_1>" + rec["responses"][0]["from"] + "\n"
    if label is not None:
        prompt += "<extra_id_2>" + label + "\n"
    full = prompt + response + "\n" + "<extra_id_1>"
    return tok.encode(full, add_special_tokens=False), len(tok.encode(prompt, add_special_tokens=False))


def plain_ids(tok, rec: dict, label: str | None, response: str) -> tuple[list[int], int]:
    prompt = f"System: {rec['system']}\n" if rec["system"] else ""
    prompt += "".join(f"{t['from']}: {t['value']}\n" for t in rec["prompt_turns"])
    role = rec["responses"][0]["from"]
    prompt += f"{role} [{label}]: " if label is not None else f"{role}: "
    head = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
    return head + tok.encode(response, add_special_tokens=False) + [tok.eos_token_id], len(head)


def chat_ids(tok, rec: dict, label: str | None, response: str) -> tuple[list[int], int]:
    system = rec["system"]
    if label is not None:
        system = f"{system}\n\nAttributes: {label}" if system else f"Attributes: {label}"
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": t["from"].lower(), "content": t["value"]} for t in rec["prompt_turns"]]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=False)
    assert full.startswith(prompt)
    head = tok.encode(prompt, add_special_tokens=False)
    return head + tok.encode(full[len(prompt):], add_special_tokens=False), len(head)


RENDER = {"nemo": nemo_ids, "plain": plain_ids, "chat": chat_ids}


def ref_logprob(model64, ids: list[int], start: int) -> float:
    """float64: sum over t >= start of log softmax(logits[t-1])[ids[t]], one unpadded sequence."""
    with torch.no_grad():
        logits = model64(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return float(sum(lp[t - 1, ids[t]] for t in range(start, len(ids))))


@pytest.fixture(scope="module")
def models():
    sft, tok = build_tiny(1, vocab_size=V)
    steer, _ = build_tiny(2, vocab_size=V)
    return {"sft": sft, "steerlm": steer, "tok": tok,
            "sft64": copy.deepcopy(sft).double(), "steerlm64": copy.deepcopy(steer).double()}


@pytest.fixture(scope="module")
def model_dirs(models, tmp_path_factory):
    out = {}
    for name in ("sft", "steerlm"):
        d = tmp_path_factory.mktemp(name)
        models[name].save_pretrained(d)
        models["tok"].save_pretrained(d)
        out[name] = str(d)
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def strict_lines(path: Path) -> list[dict]:
    def no_constants(name: str):
        raise AssertionError(f"non-strict JSON constant {name} in {path}")

    return [json.loads(line, parse_constant=no_constants) for line in path.read_text().splitlines()]


def sides(models, path: str = "fused", backend: str = "auto", dtype: torch.dtype = torch.float32) -> list[S.Side]:
    out = []
    for name, key, with_label in (("sft", LOG_P_Y, False), ("steerlm", LOG_Q, True)):
        model = models[name] if dtype == torch.float32 else copy.deepcopy(models[name]).to(dtype)
        out.append(S.Side(name, key, with_label, SpanScorer(model, models["tok"].pad_token_id, path, backend),
                          models["tok"], path))
    return out


def check_against_reference(models, records: list[dict], out: list[dict], template: str, rel: float,
                            abs_: float) -> None:
    tok = models["tok"]
    assert len(out) == len(records)
    for rec, got in zip(records, out):
        assert [r["value"] for r in got["responses"]] == [r["value"] for r in rec["responses"]]
        for resp in got["responses"]:
            for name, key, label in (("sft", LOG_P_Y, None), ("steerlm", LOG_Q, rec["label"])):
                ids, start = RENDER[template](tok, rec, label, resp["value"])
                want = ref_logprob(models[name + "64"], ids, start)
                assert resp[key] == pytest.approx(want, rel=rel, abs=abs_), (template, key, resp["value"])
                assert resp[key] <= 0


# ------------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("path", ["fused", "logits"])
@pytest.mark.parametrize("template", ["nemo", "chat", "plain"])
def test_score_equals_float64_sums(models, tmp_path, template, path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out_path = tmp_path / "out.jsonl"
    # a small token budget: several padded batches of unequal lengths per window
    summary = S.score_file(data, out_path, sides(models, path), template=template, max_tokens_per_batch=160,
                           quiet=True)
    out = strict_lines(out_path)
    check_against_reference(models, RECORDS, out, template, rel=2e-5, abs_=2e-4)
    assert summary.written == 3 and summary.scored_responses == 2 * 9
    assert not summary.unscored and not summary.malformed
    # the SFT sum is of the prompt without the label, the SteerLM one with it: they differ
    assert out[0]["responses"][0][LOG_P_Y] != out[0]["responses"][0][LOG_Q]


def test_score_each_backend(models, tmp_path, backend) -> None:
    require_backend(backend, torch.device("cpu"))
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS[:2])
    S.score_file(data, tmp_path / "out.jsonl", sides(models, "fused", backend), template="nemo", quiet=True)
    check_against_reference(models, RECORDS[:2], strict_lines(tmp_path / "out.jsonl"), "nemo", rel=2e-5, abs_=2e-4)


def test_score_bf16_model(models, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS[:1])
    S.score_file(data, tmp_path / "out.jsonl", sides(models, dtype=torch.bfloat16), template="nemo", quiet=True)
    check_against_reference(models, RECORDS[:1], strict_lines(tmp_path / "out.jsonl"), "nemo", rel=2e-2, abs_=0.5)


def test_scores_parse_as_training_data_and_keep_attribute(models, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out_path = tmp_path / "out.jsonl"
    S.score_file(data, out_path, sides(models), attribute_scorer=verbosity_length, quiet=True)
    out = strict_lines(out_path)
    # present in the input: kept exactly; missing: the scorer's values
    assert [r[LOG_P_A] for r in out[1]["responses"]] == [-1.25, -0.5]
    assert [r[LOG_P_A] for r in out[0]["responses"]] == verbosity_length([RECORDS[0]])[0]
    assert [r[LOG_P_A] for r in out[2]["responses"]] == [0.0] * 4  # no label: nothing to judge
    recs = read_jsonl(out_path)
    assert [len(r.responses) for r in recs] == [3, 2, 4]


def test_missing_attribute_is_reported(models, tmp_path, capsys) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    summary = S.score_file(data, tmp_path / "out.jsonl", sides(models), quiet=True)
    assert summary.missing_attribute == [1, 3]
    err = capsys.readouterr().err
    assert "2 records have responses without log(P(a|x,y)) (lines 1, 3)" in err
    out = strict_lines(tmp_path / "out.jsonl")
    assert all(LOG_P_A not in r for r in out[0]["responses"]) and all(LOG_Q in r for r in out[0]["responses"])


def test_too_long_records_are_left_unscored_with_the_reason(models, tmp_path, capsys) -> None:
    long_rec = copy.deepcopy(RECORDS[2])
    long_rec["responses"][1]["value"] = "word " * 40
    data = write_jsonl(tmp_path / "in.jsonl", [RECORDS[1], long_rec, RECORDS[1]])
    summary = S.score_file(data, tmp_path / "out.jsonl", sides(models), max_seq_length=120, quiet=True)
    out = strict_lines(tmp_path / "out.jsonl")
    assert [n for n, _ in summary.unscored] == [2]
    assert "response 1" in out[1]["unscored"] and "--max-seq-length 120" in out[1]["unscored"]
    assert all(LOG_Q not in r and LOG_P_Y not in r for r in out[1]["responses"])  # never truncated + scored
    assert all(LOG_Q in r for r in out[0]["responses"] + out[2]["responses"])
    assert "line 2: left unscored" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# streaming, resuming, bad input


def _many(n: int) -> list[dict]:
    recs = []
    for i in range(n):
        r = copy.deepcopy(RECORDS[i % 3])
        r["prompt_turns"][-1]["value"] += f" ({i})"
        recs.append(r)
    return recs


def test_resume_after_a_kill_gives_the_same_output(models, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", _many(6))
    whole = tmp_path / "whole.jsonl"
    # the provenance names the scorer as the command does (its spec), not by the test's wrapper
    kw = {"template": "nemo", "max_tokens_per_batch": 48, "quiet": True, "settings": {"attribute_scorer": SCORER}}
    S.score_file(data, whole, sides(models), attribute_scorer=verbosity_length, **kw)

    calls = []

    def dies_second_time(records):
        calls.append(len(records))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the second window is in flight
        return verbosity_length(records)

    part = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        S.score_file(data, part, sides(models), attribute_scorer=dies_second_time, **kw)
    written = part.read_text().splitlines()
    assert 1 <= len(written) < 6
    assert written == whole.read_text().splitlines()[: len(written)]
    with open(part, "a") as f:  # and a line cut in the middle, as a kill during a write leaves it
        f.write(whole.read_text().splitlines()[len(written)][:37])
    summary = S.score_file(data, part, sides(models), attribute_scorer=verbosity_length, **kw)
    assert summary.resumed == len(written) and summary.written == 6 - len(written)
    assert part.read_bytes() == whole.read_bytes()
    # a third run has nothing left to do and changes nothing
    assert S.score_file(data, part, sides(models), attribute_scorer=verbosity_length, **kw).written == 0
    assert part.read_bytes() == whole.read_bytes()


def test_resume_refuses_an_output_of_another_input(models, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    other = write_jsonl(tmp_path / "out.jsonl", [RECORDS[1]])
    with pytest.raises(CommandError, match="no provenance record out.jsonl.provenance.json"):
        S.score_file(data, other, sides(models), quiet=True)
    assert other.read_text() == json.dumps(RECORDS[1]) + "\n"  # refused: untouched
    out = tmp_path / "scored.jsonl"
    S.score_file(data, out, sides(models), quiet=True)
    edited = copy.deepcopy(RECORDS)
    edited[0]["responses"][1]["value"] = "An edited earlier response."  # an EARLIER record, not the last kept one
    data2 = write_jsonl(tmp_path / "in2.jsonl", edited + [RECORDS[0]])
    with pytest.raises(OutputError, match="was made with data = "):  # the input's fingerprint differs
        S.score_file(data2, out, sides(models), quiet=True)
    with pytest.raises(CommandError, match=r"scored.jsonl, line 1: was made from another record than .*in2.jsonl, "
                                           r"line 1"):  # the change accepted: every kept record is still checked
        S.score_file(data2, out, sides(models), quiet=True, allow_changed={"data"})
    grown = write_jsonl(tmp_path / "in3.jsonl", RECORDS + [RECORDS[0]])  # records appended: kept ones all match
    summary = S.score_file(grown, out, sides(models), quiet=True, allow_changed={"data"})
    assert (summary.resumed, summary.written) == (3, 1)


def test_malformed_lines_are_named_and_nothing_after_them_is_lost(models, model_dirs, tmp_path, capsys) -> None:
    lines = [RECORDS[0], '{"system": "x", "prompt_turns": [', RECORDS[1],
             {"system": "x", "label": None, "responses": [{"value": "y"}]}, "", RECORDS[2], "[1, 2]",
             json.dumps({**RECORDS[1], "responses": [{"value": "z", LOG_P_A: float("nan")}]}), RECORDS[0]]
    data = write_jsonl(tmp_path / "in.jsonl", lines)
    out_path = tmp_path / "out.jsonl"
    status = cli.main(["score", "--data", str(data), "--output", str(out_path), "--sft-model", model_dirs["sft"],
                       "--steerlm-model", model_dirs["steerlm"], "--quiet"])
    err = capsys.readouterr().err
    assert status == 0, err
    out = strict_lines(out_path)
    assert [o["prompt_turns"] for o in out] == [RECORDS[i]["prompt_turns"] for i in (0, 1, 2, 0)]
    for n, what in ((2, "invalid JSON"), (4, "prompt_turns"), (7, "a record must be a JSON object"),
                    (8, "must be a finite log-probability")):
        assert f"line {n}" in err and what in err, (n, what, err)
    assert "4 malformed lines" in err and "(lines 2, 4, 7, 8)" in err
    assert "Traceback" not in err
    check_against_reference(models, [RECORDS[0]], out[:1], "nemo", rel=2e-5, abs_=2e-4)


@pytest.mark.parametrize("case, needle", [
    ("no_data", "--data"),
    ("no_dir", "--output"),
    ("bad_scorer", "--attribute-scorer"),
    ("bad_model", "--sft-model"),
    ("budget", "--max-tokens-per-batch"),
])
def test_cli_failures_are_one_line(model_dirs, tmp_path, capsys, case, needle) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    argv = {"--data": str(data), "--output": str(tmp_path / "out.jsonl"), "--sft-model": model_dirs["sft"],
            "--steerlm-model": model_dirs["steerlm"]}
    extra: list[str] = []
    if case == "no_data":
        argv["--data"] = str(tmp_path / "missing.jsonl")
    elif case == "no_dir":
        argv["--output"] = str(tmp_path / "no" / "out.jsonl")
    elif case == "bad_scorer":
        extra = ["--attribute-scorer", "steerlm_kernels.steerlm2.formats.example_scorers:nope"]
    elif case == "bad_model":
        argv["--sft-model"] = str(tmp_path / "nowhere")
    else:
        extra = ["--max-tokens-per-batch", "0"]
    status = cli.main(["score", *[x for kv in argv.items() for x in kv], *extra, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("steerlm-kernels score: error: ") and needle in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_attribute_scorer_bad_values_fail_naming_the_line(models, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    with pytest.raises(CommandError, match=r"line 1: --attribute-scorer, responses\[0\]: .*<= 0, got 0.5"):
        S.score_file(data, tmp_path / "out.jsonl", sides(models), quiet=True,
                     attribute_scorer=lambda recs: [[0.5] * len(r["responses"]) for r in recs])


def test_attribute_scorer_from_a_file(tmp_path) -> None:
    f = tmp_path / "my_scorer.py"
    f.write_text("def judge(records):\n    return [[-1.0] * len(r['responses']) for r in records]\n")
    fn = S.load_attribute_scorer(f"{f}:judge")
    assert fn([{"responses": [1, 2]}]) == [[-1.0, -1.0]]
    with pytest.raises(CommandError, match="expected MODULE:FUNCTION"):
        S.load_attribute_scorer("no_colon")
    assert S.load_attribute_scorer(SCORER) is verbosity_length
