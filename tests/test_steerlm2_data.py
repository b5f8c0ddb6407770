"""Tests of steerlm_kernels.steerlm2.training.data and the records / tokenization modules it re-exports: reader,
ws, tokenisation, collation, sampler, policies, errors."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from steerlm_kernels.steerlm2.training import data as skd

REPO = Path(__file__).resolve().parents[1]


def _sample_lines() -> list[dict]:
    return [json.loads(x) for x in skd.sample_data_path().read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def sample_ds() -> skd.SteerLM2Dataset:
    return skd.SteerLM2Dataset(skd.sample_data_path(), max_seq_length=160)


def _record(n: int = 3, text: str = "resp", label: str | None = "helpfulness:4") -> dict:
    return {
        "system": "sys",
        "prompt_turns": [{"from": "User", "value": "hello?"}],
        "label": label,
        "responses": [
            {
                "from": "Assistant",
                "value": f"{text}{i}" * (i + 1),
                "log(P(a|x,y))": -0.5 * i,
                "log(P(y|x))": -3.0 - i,
                "log(Q(y|a,x))": -2.0 - 0.25 * i,
            }
            for i in range(n)
        ],
    }


# ------------------------------------------------------------------------------------------------
# the bundled sample


def test_sample_round_trip(sample_ds: skd.SteerLM2Dataset) -> None:
    raw = _sample_lines()
    assert len(raw) == 40
    assert len(sample_ds) == 40 and sample_ds.num_dropped == 0 and sample_ds.num_records == 40
    assert all(4 <= n <= 8 for n in sample_ds.group_sizes)
    assert len(set(sample_ds.group_sizes)) > 1  # unequal group sizes in the sample
    for rec, group in zip(raw, sample_ds):
        assert group.num_responses == len(rec["responses"])
        assert group.ws.dtype == torch.float32 and group.log_q.dtype == torch.float32
        assert abs(group.ws.double().sum().item() - 1.0) < 1e-6
        logw = [r["log(P(a|x,y))"] + r["log(P(y|x))"] - r["log(Q(y|a,x))"] for r in rec["responses"]]
        m = max(logw)
        z = sum(math.exp(x - m) for x in logw)
        expected = [math.exp(x - m) / z for x in logw]
        assert group.ws.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert group.log_q.tolist() == pytest.approx([r["log(Q(y|a,x))"] for r in rec["responses"]], rel=1e-6)
        for r in rec["responses"]:
            assert 5 <= len(r["value"].encode()) <= 60
            assert r["log(P(a|x,y))"] <= 0 and r["log(P(y|x))"] < 0 and r["log(Q(y|a,x))"] < 0
        assert max(len(s) for s in group.input_ids) <= 160


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_sample_data", REPO / "python" / "make_sample_data.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sample_is_reproducible_and_consistent() -> None:
    gen = _load_generator()
    records = gen.make_records()
    assert gen.render_jsonl(records) == skd.sample_data_path().read_text(encoding="utf-8")
    # the log-probabilities are those of the documented story (log Q' is the exact sampling probability)
    topic_of = {}
    for rec in records:
        question = rec["prompt_turns"][-1]["value"]
        topic_of[id(rec)] = next(t for t in gen.TOPICS if t in question)
        h, v = (int(p.split(":")[1]) for p in rec["label"].split(","))
        for r in rec["responses"]:
            words = r["value"][:-1].split(" ")
            t = topic_of[id(rec)]
            assert r["log(Q(y|a,x))"] == pytest.approx(
                gen.sequence_log_prob(words, t, gen.Q_LEN, gen.Q_TOPIC), abs=1e-6
            )
            assert r["log(P(y|x))"] == pytest.approx(gen.sequence_log_prob(words, t, gen.P_LEN, gen.P_TOPIC), abs=1e-6)
            assert r["log(P(a|x,y))"] == pytest.approx(gen.attribute_log_prob(words, t, h, v), abs=1e-6)


def test_render_prompt_template() -> None:
    rec = skd.parse_record(_record())
    assert skd.render_prompt(rec) == "System: sys\nUser: hello?\nAssistant [helpfulness:4]: "
    rec = skd.parse_record({**_record(), "system": "", "label": None})
    assert skd.render_prompt(rec) == "User: hello?\nAssistant: "
    rec2 = _record()
    del rec2["label"]
    assert skd.render_prompt(skd.parse_record(rec2)) == "System: sys\nUser: hello?\nAssistant: "


# ------------------------------------------------------------------------------------------------
# collation


def test_collate_shift_mask_positions_padding(sample_ds: skd.SteerLM2Dataset) -> None:
    groups = [sample_ds[0], sample_ds[3], sample_ds[7]]
    batch = sample_ds.collate_fn(groups)
    assert tuple(batch) == skd.BATCH_KEYS
    tok = sample_ds.tokenizer
    seqs = [s for g in groups for s in g.input_ids]
    bsz = len(seqs)
    width = max(len(s) for s in seqs) - 1
    assert batch["tokens"].shape == (bsz, width)
    for key in ("tokens", "labels", "position_ids", "attention_mask", "num_responses"):
        assert batch[key].dtype == torch.int64, key
    for key in ("loss_mask", "ws", skd.LOG_Q):
        assert batch[key].dtype == torch.float32, key
    row = 0
    for g in groups:
        for seq in g.input_ids:
            n = len(seq) - 1
            assert batch["tokens"][row, :n].tolist() == seq[:-1]
            assert batch["labels"][row, :n].tolist() == seq[1:]
            # labels[t] == tokens[t+1] on the real part
            assert torch.equal(batch["labels"][row, : n - 1], batch["tokens"][row, 1:n])
            # loss_mask is exactly on the labels that are response tokens (incl. eos)
            mask = batch["loss_mask"][row]
            assert mask[: g.prompt_length - 1].sum() == 0
            assert torch.all(mask[g.prompt_length - 1 : n] == 1)
            assert mask[n:].sum() == 0
            masked_labels = batch["labels"][row][mask.bool()].tolist()
            assert masked_labels == seq[g.prompt_length :]
            assert masked_labels[-1] == tok.eos_token_id
            assert tok.decode(masked_labels) == tok.decode(seq[g.prompt_length :])
            # padding
            assert torch.all(batch["tokens"][row, n:] == tok.pad_token_id)
            assert torch.all(batch["labels"][row, n:] == tok.pad_token_id)
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
            # per-response positions: 0..len-1 on the real tokens
            assert batch["position_ids"][row, :n].tolist() == list(range(n))
            row += 1
    assert row == bsz


def test_collate_num_responses_unequal_groups() -> None:
    recs = [_record(2), _record(5), _record(1), _record(3)]
    ds = skd.SteerLM2Dataset(recs)
    batch = ds.collate_fn([ds[i] for i in range(4)])
    assert batch["num_responses"].tolist() == [2, 2, 5, 5, 5, 5, 5, 1, 3, 3, 3]
    assert batch["ws"].shape == (11,) and batch[skd.LOG_Q].shape == (11,)
    start = 0
    for rec, n in zip(recs, (2, 5, 1, 3)):
        ws = batch["ws"][start : start + n]
        assert abs(ws.double().sum().item() - 1) < 1e-6
        assert batch[skd.LOG_Q][start : start + n].tolist() == pytest.approx(
            [r["log(Q(y|a,x))"] for r in rec["responses"]]
        )
        start += n
    assert batch["ws"][7].item() == 1.0  # a group of one


def test_collate_pad_to_multiple_of() -> None:
    ds = skd.SteerLM2Dataset([_record(3)], pad_to_multiple_of=16)
    longest = max(ds[0].row_lengths)
    batch = ds.collate_fn([ds[0]])
    assert batch["tokens"].shape[1] == -(-longest // 16) * 16 > longest
    # capped at max_seq_length, but never below the longest row
    ds2 = skd.SteerLM2Dataset([_record(3)], pad_to_multiple_of=64, max_seq_length=longest + 1)
    assert ds2.collate_fn([ds2[0]])["tokens"].shape[1] == longest + 1
    batch3 = skd.collate_fn([ds[0]], label_pad_id=-100)
    assert (batch3["labels"] == -100).any() and (batch3["labels"][batch3["attention_mask"] == 1] >= 0).all()


def test_collate_with_dataloader_and_sampler(sample_ds: skd.SteerLM2Dataset) -> None:
    sampler = skd.GroupBatchSampler(sample_ds, groups_per_step=3, shuffle=True, seed=1)
    loader = torch.utils.data.DataLoader(sample_ds, batch_sampler=sampler, collate_fn=sample_ds.collate_fn)
    total = 0
    for step_idx, batch in zip(list(skd.GroupBatchSampler(sample_ds, 3, shuffle=True, seed=1)), loader):
        sizes = [sample_ds[i].num_responses for i in step_idx]
        assert batch["num_responses"].tolist() == [n for n in sizes for _ in range(n)]
        total += batch["tokens"].shape[0]
    assert total == sample_ds.num_responses_total


def test_causal_attention_mask() -> None:
    am = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    m = skd.causal_attention_mask(am)
    assert m.shape == (2, 1, 4, 4) and m.dtype == torch.bool
    assert m[0, 0].tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, True, True, False],
    ]
    assert not m[1, 0, :, 2:].any()
    assert m.any(dim=-1).all()  # no empty softmax row


# ------------------------------------------------------------------------------------------------
# sampler


@pytest.mark.parametrize("n,k,drop_last", [(40, 3, False), (40, 3, True), (10, 10, False), (7, 2, False), (5, 8, True)])
def test_sampler_covers_every_group_once(n: int, k: int, drop_last: bool) -> None:
    sampler = skd.GroupBatchSampler(n, groups_per_step=k, shuffle=True, seed=3, drop_last=drop_last)
    seen_orders = []
    for _epoch in range(3):
        steps = list(sampler)
        assert len(steps) == len(sampler)
        assert all(len(s) == k for s in steps[:-1])
        flat = [i for s in steps for i in s]
        assert len(flat) == len(set(flat))  # no group twice (never split: an index is a whole group)
        if drop_last:
            assert all(len(s) == k for s in steps) and len(flat) == (n // k) * k
        else:
            assert sorted(flat) == list(range(n))
        seen_orders.append(flat)
    if n > 4 and not drop_last:
        assert seen_orders[0] != seen_orders[1]  # reshuffled per epoch
    again = skd.GroupBatchSampler(n, groups_per_step=k, shuffle=True, seed=3, drop_last=drop_last)
    assert [i for s in again for i in s] == seen_orders[0]  # deterministic in the seed
    again.set_epoch(2)
    assert [i for s in again for i in s] == seen_orders[2]


def test_sampler_no_shuffle_and_errors() -> None:
    assert list(skd.GroupBatchSampler(5, 2, shuffle=False)) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="groups_per_step"):
        skd.GroupBatchSampler(5, 0)


# ------------------------------------------------------------------------------------------------
# long-response policy


def test_overflow_drop_with_counted_warning(tmp_path: Path) -> None:
    recs = [_record(3), _record(3, text="x" * 80), _record(2), _record(2, text="y" * 90)]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.warns(skd.SteerLMDataWarning, match=r"dropped 2 of 4 prompt groups") as rec:
        ds = skd.SteerLM2Dataset(path, max_seq_length=100)
    assert len([w for w in rec if issubclass(w.category, skd.SteerLMDataWarning)]) == 1  # once per load
    assert ds.num_dropped == 2 and ds.dropped_lines == [2, 4] and ds.num_records == 4
    assert len(ds) == 2 and ds.group_sizes == [3, 2]
    assert all(max(g.row_lengths) <= 100 for g in ds)  # never truncated: kept groups are whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        skd.SteerLM2Dataset(path, max_seq_length=None)  # no limit: nothing dropped, no warning


def test_overflow_boundary_is_row_length() -> None:
    ds = skd.SteerLM2Dataset([_record(1)])
    row = ds[0].row_lengths[0]
    assert len(skd.SteerLM2Dataset([_record(1)], max_seq_length=row)) == 1
    with pytest.raises(skd.SteerLMDataError, match="every prompt group"), pytest.warns(skd.SteerLMDataWarning):
        skd.SteerLM2Dataset([_record(1)], max_seq_length=row - 1)


def test_overflow_error_mode(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(_record(2)) + "\n" + json.dumps(_record(3, text="z" * 20)) + "\n")
    with pytest.raises(skd.SteerLMDataError) as ei:
        skd.SteerLM2Dataset(path, max_seq_length=100, on_overflow="error")
    err = ei.value
    assert err.source == str(path) and err.line == 2 and err.key == "responses[2].value"
    assert str(path) in str(err) and "line 2" in str(err) and "max_seq_length=100" in str(err)
    with pytest.raises(ValueError, match="on_overflow"):
        skd.SteerLM2Dataset(path, on_overflow="truncate")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# malformed input


def _mutate(fn):
    rec = _record(3)
    fn(rec)
    return json.dumps(rec)


def _set(path: tuple, value):
    def fn(rec: dict) -> None:
        obj = rec
        for p in path[:-1]:
            obj = obj[p]
        obj[path[-1]] = value

    return fn


def _del(path: tuple):
    def fn(rec: dict) -> None:
        obj = rec
        for p in path[:-1]:
            obj = obj[p]
        del obj[path[-1]]

    return fn


BAD_LINES = {
    "missing system": (_mutate(_del(("system",))), "system", "missing"),
    "missing prompt_turns": (_mutate(_del(("prompt_turns",))), "prompt_turns", "missing"),
    "missing responses": (_mutate(_del(("responses",))), "responses", "missing"),
    "missing turn from": (_mutate(_del(("prompt_turns", 0, "from"))), "prompt_turns[0].from", "missing"),
    "missing value": (_mutate(_del(("responses", 1, "value"))), "responses[1].value", "missing"),
    "missing log P(a)": (_mutate(_del(("responses", 2, skd.LOG_P_A))), f"responses[2].{skd.LOG_P_A}", "missing"),
    "missing log P(y)": (_mutate(_del(("responses", 0, skd.LOG_P_Y))), f"responses[0].{skd.LOG_P_Y}", "missing"),
    "missing log Q": (_mutate(_del(("responses", 1, skd.LOG_Q))), f"responses[1].{skd.LOG_Q}", "missing"),
    "system not str": (_mutate(_set(("system",), 3)), "system", "string"),
    "label not str": (_mutate(_set(("label",), 4)), "label", "string"),
    "turns not list": (_mutate(_set(("prompt_turns",), "hi")), "prompt_turns", "list"),
    "turns empty": (_mutate(_set(("prompt_turns",), [])), "prompt_turns", "empty"),
    "turn value not str": (_mutate(_set(("prompt_turns", 0, "value"), None)), "prompt_turns[0].value", "string"),
    "responses not list": (_mutate(_set(("responses",), {"value": "x"})), "responses", "list"),
    "responses empty": (_mutate(_set(("responses",), [])), "responses", "empty"),
    "response not object": (_mutate(_set(("responses", 1), "text")), "responses[1]", "object"),
    "value not str": (_mutate(_set(("responses", 0, "value"), 5)), "responses[0].value", "string"),
    "empty value": (_mutate(_set(("responses", 2, "value"), "")), "responses[2].value", "empty"),
    "log-prob is str": (_mutate(_set(("responses", 1, skd.LOG_Q), "-1.0")), f"responses[1].{skd.LOG_Q}", "number"),
    "log-prob is bool": (_mutate(_set(("responses", 1, skd.LOG_P_Y), True)), f"responses[1].{skd.LOG_P_Y}", "number"),
    "log-prob is null": (_mutate(_set(("responses", 0, skd.LOG_P_A), None)), f"responses[0].{skd.LOG_P_A}", "number"),
    "log-prob NaN": (_mutate(_set(("responses", 2, skd.LOG_Q), float("nan"))), f"responses[2].{skd.LOG_Q}", "finite"),
    "log-prob -inf": (
        _mutate(_set(("responses", 0, skd.LOG_P_A), float("-inf"))),
        f"responses[0].{skd.LOG_P_A}",
        "finite",
    ),
    "log-prob huge": (
        '{"system": "", "prompt_turns": [{"from": "User", "value": "q"}], "responses": '
        '[{"value": "a", "log(P(a|x,y))": 1e999, "log(P(y|x))": 0, "log(Q(y|a,x))": 0}]}',
        f"responses[0].{skd.LOG_P_A}",
        "finite",
    ),
    "log-prob 1e400 integer": (
        _mutate(_set(("responses", 1, skd.LOG_P_A), 10**400)), f"responses[1].{skd.LOG_P_A}", "finite number"),
    "log-prob -1e400 integer in log Q": (
        _mutate(_set(("responses", 0, skd.LOG_Q), -(10**400))), f"responses[0].{skd.LOG_Q}", "finite number"),
    "log-prob 5000-digit integer": (
        _mutate(_set(("responses", 0, skd.LOG_Q), "@")).replace('"@"', "9" * 5000), "<json>", "invalid JSON"),
    "log-prob 1.7e308": (_mutate(_set(("responses", 2, skd.LOG_P_Y), 1.7e308)), f"responses[2].{skd.LOG_P_Y}", "<= 0"),
    "log-prob positive": (_mutate(_set(("responses", 0, skd.LOG_P_A), 0.5)), f"responses[0].{skd.LOG_P_A}", "<= 0"),
    "log-prob just over tolerance": (
        _mutate(_set(("responses", 1, skd.LOG_Q), 0.0101)), f"responses[1].{skd.LOG_Q}", "<= 0"),
    "log Q beyond float32": (_mutate(_set(("responses", 1, skd.LOG_Q), -1e39)), f"responses[1].{skd.LOG_Q}", "float32"),
    "log w overflows": (
        _mutate(lambda r: r["responses"][2].update({skd.LOG_P_A: -1.7e308, skd.LOG_P_Y: -1.7e308})),
        "responses[2]", "overflows float64"),
    "nested 200000 deep": ("[" * 200_000 + "]" * 200_000, "<json>", "nested too deeply"),
    "nested 200000 deep in a value": (
        _mutate(_set(("system",), "@")).replace('"@"', "{\"a\": " * 200_000 + "1" + "}" * 200_000),
        "<json>", "nested too deeply"),
    "mixed response roles": (_mutate(_set(("responses", 2, "from"), "Bot")), "responses[2].from", "same role"),
    "invalid JSON": ('{"system": "s", "prompt_turns": [', "<json>", "invalid JSON"),
    "not an object": ("[1, 2, 3]", "<record>", "JSON object"),
}


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_malformed_file_names_file_line_key(tmp_path: Path, name: str) -> None:
    bad, key, problem = BAD_LINES[name]
    path = tmp_path / "bad.jsonl"
    # line 1 good, line 2 blank (skipped, still counted), line 3 bad
    path.write_text(json.dumps(_record(2)) + "\n\n" + bad + "\n" + json.dumps(_record(2)) + "\n")
    with pytest.raises(skd.SteerLMDataError) as ei:
        skd.SteerLM2Dataset(path)
    err = ei.value
    assert isinstance(err, ValueError)
    assert (err.source, err.line, err.key) == (str(path), 3, key)
    msg = str(err)
    assert str(path) in msg and "line 3" in msg and repr(key) in msg and problem in msg
    assert "\n" not in msg and len(msg) < 500  # one line, never the offending value in full
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)  # no chained traceback


def test_malformed_invalid_utf8_and_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "bin.jsonl"
    path.write_bytes(json.dumps(_record(2)).encode() + b"\n\xff\xfe{}\n")
    with pytest.raises(skd.SteerLMDataError, match=r"line 2, key '<line>': invalid UTF-8"):
        skd.read_jsonl(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(skd.SteerLMDataError, match="no records"):
        skd.SteerLM2Dataset(empty)


def test_malformed_in_memory_records_name_the_record() -> None:
    bad = _record(2)
    bad["responses"][1]["log(P(y|x))"] = float("inf")
    with pytest.raises(skd.SteerLMDataError, match=r"<records>, record 2, key 'responses\[1\].log\(P\(y\|x\)\)'"):
        skd.SteerLM2Dataset([_record(1), bad])


def test_from_key_optional_and_label_optional() -> None:
    rec = copy.deepcopy(_record(2, label=None))
    for r in rec["responses"]:
        del r["from"]
    ds = skd.SteerLM2Dataset([rec])
    assert ds.records[0].response_role == "Assistant" and ds.records[0].label is None


# ------------------------------------------------------------------------------------------------
# tokenizers


def test_byte_tokenizer() -> None:
    tok = skd.ByteTokenizer()
    assert tok.vocab_size == 259 and {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id} == {256, 257, 258}
    ids = tok.encode("héllo ✓")
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == "héllo ✓"
    assert tok.encode("a", add_special_tokens=True) == [257, 97]
    assert tok.decode([257, 104, 105, 258], skip_special_tokens=False) == "<bos>hi<eos>"


class DictWordTokenizer:
    """Word-level toy tokenizer; encode returns a dict like a HF BatchEncoding and takes no kwargs."""

    eos_token_id = 1
    pad_token_id = 0

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str) -> dict:
        ids = [self.vocab.setdefault(w, len(self.vocab) + 2) for w in text.replace("\n", " \n ").split(" ") if w]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


class HFLikeTokenizer:
    """Adds a bos unless add_special_tokens=False (like HF); returns a tensor batch of one."""

    bos_token_id = 500
    eos_token_id = 501
    pad_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None) -> torch.Tensor:
        ids = [ord(c) % 400 + 2 for c in text]
        if add_special_tokens:
            ids = [self.bos_token_id, *ids]
        return torch.tensor([ids])


def test_custom_tokenizer_dict_output() -> None:
    tok = DictWordTokenizer()
    ds = skd.SteerLM2Dataset([_record(3), _record(2)], tokenizer=tok)
    g = ds[0]
    prompt_ids = tok.encode(skd.render_prompt(ds.records[0]))["input_ids"]
    assert g.prompt_length == len(prompt_ids)  # no bos: the tokenizer has none
    for seq, r in zip(g.input_ids, ds.records[0].responses):
        assert seq == prompt_ids + tok.encode(r.value)["input_ids"] + [1]
    batch = ds.collate_fn(list(ds))
    assert batch["tokens"].shape[0] == 5
    masked = batch["labels"][0][batch["loss_mask"][0].bool()].tolist()
    assert masked == tok.encode(ds.records[0].responses[0].value)["input_ids"] + [1]
    assert (batch["tokens"][batch["attention_mask"] == 0] == 0).all()


def test_custom_tokenizer_hf_like() -> None:
    tok = HFLikeTokenizer()
    ds = skd.SteerLM2Dataset([_record(2)], tokenizer=tok)
    g = ds[0]
    assert ds.pad_id == tok.eos_token_id  # no pad id: falls back to eos
    for seq in g.input_ids:
        assert seq[0] == 500 and seq.count(500) == 1 and seq[-1] == 501  # one bos, at the start; eos at the end
    ds_no = skd.SteerLM2Dataset([_record(2)], tokenizer=tok, add_bos=False, add_eos=False)
    assert all(500 not in s and 501 not in s for s in ds_no[0].input_ids)


def test_tokenizer_without_encode_rejected() -> None:
    with pytest.raises(TypeError, match="encode"):
        skd.SteerLM2Dataset([_record(1)], tokenizer=object())


# ------------------------------------------------------------------------------------------------
# what a log-probability may be; BOM; groups of one response


@pytest.mark.parametrize("value", [0.0, -0.0, 0.01, 0.004, -1.7e308, -3.4e38, -(10**300), -12])
def test_log_prob_accepted_values_give_finite_ws(value: float) -> None:
    rec = _record(3)
    keys = (skd.LOG_P_A, skd.LOG_P_Y, skd.LOG_Q) if value >= -3.4e38 else (skd.LOG_P_A, skd.LOG_P_Y)
    for key in keys:  # log Q is carried as float32: below -3.4e38 it is refused (BAD_LINES)
        one = copy.deepcopy(rec)
        one["responses"][1][key] = value
        ds = skd.SteerLM2Dataset([one])
        ws = ds[0].ws
        assert torch.isfinite(ws).all() and abs(float(ws.sum()) - 1) < 1e-6
        assert torch.isfinite(ds[0].log_q).all()


def test_log_prob_problem_names_the_class() -> None:
    from steerlm_kernels.steerlm2.formats.records import LOG_PROB_TOLERANCE, log_prob_problem

    assert LOG_PROB_TOLERANCE == 0.01
    assert log_prob_problem(-3.5) is None and log_prob_problem(-7) is None and log_prob_problem(0.01) is None
    for bad, word in [(10**400, "10^400"), (float("nan"), "finite"), (float("inf"), "finite"), (0.0100001, "<= 0"),
                      (1.7e308, "<= 0"), ("-1", "number"), (None, "null"), (False, "bool"), ([-1.0], "list")]:
        problem = log_prob_problem(bad)
        assert problem is not None and word in problem, (bad, problem)


def test_utf8_bom_at_file_start_is_accepted(tmp_path: Path) -> None:
    body = json.dumps(_record(2)) + "\n" + json.dumps(_record(3)) + "\n"
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    plain = tmp_path / "plain.jsonl"
    plain.write_text(body)
    with_bom, without = skd.read_jsonl(path), skd.read_jsonl(plain)
    assert [r.responses for r in with_bom] == [r.responses for r in without] and len(with_bom) == 2
    assert with_bom[0].system == "sys"
    path.write_bytes(b"\xef\xbb\xbf\n" + body.encode())  # a BOM alone on the first line: a blank line
    assert len(skd.read_jsonl(path)) == 2
    path.write_bytes(body.encode() + b"\xef\xbb\xbf" + body.encode())  # anywhere else: invalid JSON, named
    with pytest.raises(skd.SteerLMDataError, match=r"line 3, key '<json>': invalid JSON"):
        skd.read_jsonl(path)


def test_single_response_groups_warned_counted_dropped_or_refused() -> None:
    recs = [_record(3), _record(1), _record(2), _record(1)]
    with pytest.warns(skd.SteerLMDataWarning, match=r"2 prompt group\(s\) with a single response kept \(lines 2, 4\)"):
        ds = skd.SteerLM2Dataset(recs)
    assert ds.num_single == 2 and ds.single_lines == [2, 4] and ds.group_sizes == [3, 1, 2, 1]
    assert ds[1].ws.tolist() == [1.0]
    with pytest.warns(skd.SteerLMDataWarning, match="dropped"):
        dropped = skd.SteerLM2Dataset(recs, on_single="drop")
    assert dropped.group_sizes == [3, 2] and dropped.num_single == 2
    with pytest.raises(skd.SteerLMDataError, match=r"record 2, key 'responses': a group of one"):
        skd.SteerLM2Dataset(recs, on_single="error")
    with pytest.raises(skd.SteerLMDataError, match="on_single='drop'"), pytest.warns(skd.SteerLMDataWarning):
        skd.SteerLM2Dataset([_record(1)], on_single="drop")
    with pytest.raises(ValueError, match="on_single"):
        skd.SteerLM2Dataset(recs, on_single="keep")  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert skd.SteerLM2Dataset([_record(2)]).num_single == 0  # no singles: no warning


def test_single_response_group_has_weight_zero() -> None:
    sk = pytest.importorskip("steerlm_kernels")
    with pytest.warns(skd.SteerLMDataWarning):
        ds = skd.SteerLM2Dataset([_record(3), _record(1)])
    batch = ds.collate_fn(list(ds))
    nll = torch.tensor([5.0, 7.0, 9.0, 11.0])
    w = sk.steerlm2_weights(nll, batch[skd.LOG_Q], batch["ws"], batch["num_responses"], backend="torch")
    assert w.weight[3].item() == 0.0 and w.baseline[3].item() == 1.0
    assert (w.weight[:3] != 0).any()


def test_length_report_says_how_many_which_and_why() -> None:
    recs = [_record(3), _record(2, text="q" * 60), _record(2), _record(3, text="z" * 70)]
    with pytest.warns(skd.SteerLMDataWarning) as rec:
        ds = skd.SteerLM2Dataset(recs, max_seq_length=100)
    longest = max(len(s) - 1 for r in (1, 3) for s in skd.SteerLM2Dataset([recs[r]], max_seq_length=None)[0].input_ids)
    msg = str(rec[0].message)
    assert ds.length_report == msg
    assert "dropped 2 of 4 prompt groups" in msg and "lines 2, 4" in msg and "max_seq_length=100" in msg
    assert f"longest needs {longest}" in msg and "not truncated" in msg
    assert skd.SteerLM2Dataset(recs[:1], max_seq_length=100).length_report is None


# ------------------------------------------------------------------------------------------------
# templates through the dataset


def test_dataset_nemo_template_masks_equal_nemo_collate() -> None:
    from tests.test_steerlm2_templates import EXAMPLE, NEMO_DEFAULTS, MergingTokenizer, nemo_process_example

    example = copy.deepcopy(EXAMPLE)
    for i, r in enumerate(example["responses"]):
        r.update({skd.LOG_P_A: -0.5 * i, skd.LOG_P_Y: -3.0 - i, skd.LOG_Q: -2.0})
    for tok in (skd.ByteTokenizer(), MergingTokenizer()):
        want = nemo_process_example(example, tok.encode, NEMO_DEFAULTS)
        ds = skd.SteerLM2Dataset([example], tokenizer=tok, template="nemo", max_seq_length=None)
        assert ds[0].input_ids == want["input_ids"]  # no BOS, no EOS
        batch = ds.collate_fn([ds[0]])
        for row, (ids, mask) in enumerate(zip(want["input_ids"], want["mask"])):
            n = len(ids) - 1
            assert batch["tokens"][row, :n].tolist() == ids[:-1]  # NeMo: input_ids = item[:-1]
            assert batch["labels"][row, :n].tolist() == ids[1:]  # labels = item[1:]
            assert batch["loss_mask"][row, :n].tolist() == [float(m) for m in mask[1:]]  # loss_mask = mask[1:]
            assert batch["loss_mask"][row, n:].sum() == 0
            # our fixes of NeMo's two defects: per-response positions / padding mask, no truncation
            assert batch["position_ids"][row, :n].tolist() == list(range(n))
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["tokens"].shape[1] - n)


@pytest.mark.parametrize("template", ["nemo", "chat", "plain"])
def test_dataset_templates_scored_span(template: str) -> None:
    pytest.importorskip("transformers")
    from steerlm_kernels.steerlm2.formats.templates import render_text
    from steerlm_kernels.steerlm2.models.hf_models import build_byte_tokenizer

    tok = build_byte_tokenizer()
    ds = skd.SteerLM2Dataset([_record(3)], tokenizer=tok, template=template)
    rec = ds.records[0]
    batch = ds.collate_fn([ds[0]])
    for row, resp in enumerate(rec.responses):
        _, scored = render_text(tok, template, rec.system, rec.prompt_turns, rec.label, resp.value)
        masked = batch["labels"][row][batch["loss_mask"][row].bool()].tolist()
        text = tok.decode(masked)
        assert text == (scored + "</s>" if template == "plain" else scored)
        assert text.startswith(resp.value)
    with pytest.raises(ValueError, match="template"):
        skd.SteerLM2Dataset([_record(3)], template="nemo2")


def test_dataset_chat_template_without_one_is_a_named_error() -> None:
    with pytest.raises(skd.SteerLMDataError, match=r"record 1, key 'responses\[0\].value'.*chat template"):
        skd.SteerLM2Dataset([_record(2)], template="chat")


def test_unscored_records_are_skipped_counted_and_warned(tmp_path) -> None:
    unscored = {**_record(2, "long"), "unscored": "too long"}  # stale sums beside the marker
    bare = {**_record(2), "unscored": "too long"}
    for r in bare["responses"]:
        del r["log(Q(y|a,x))"]  # no sums at all: still skipped, not a missing-key error
    path = tmp_path / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (_record(3), unscored, _record(2, "x"), bare)))
    with pytest.warns(skd.SteerLMDataWarning, match=r'skipped 2 record\(s\) marked "unscored" by score \(lines 2, 4\)'):
        ds = skd.SteerLM2Dataset(path, max_seq_length=None)
    assert len(ds) == 2 and ds.unscored_lines == [2, 4] and ds.group_sizes == [3, 2]
    with pytest.warns(skd.SteerLMDataWarning, match=r"skipped 1 record"):
        assert len(skd.SteerLM2Dataset([_record(3), unscored], max_seq_length=None)) == 1
    only = tmp_path / "only.jsonl"
    only.write_text(json.dumps(unscored) + "\n")
    with pytest.raises(skd.SteerLMDataError, match='all 1 records are marked "unscored"'):
        skd.SteerLM2Dataset(only)
    with pytest.raises(skd.SteerLMDataError, match="line 4, key 'responses\\[0\\].log\\(Q"):
        skd.read_jsonl(path)  # without the list: validated like any record


def test_lone_surrogate_escape_is_a_named_line_error(tmp_path) -> None:
    good = json.dumps(_record(2))
    path = tmp_path / "s.jsonl"
    path.write_text(good + "\n" + good.replace('"sys"', '"sys\\ud800"') + "\n")
    with pytest.raises(skd.SteerLMDataError, match=r"s.jsonl, line 2, key '<json>': .*lone surrogate"):
        skd.read_jsonl(path)
    pair = tmp_path / "pair.jsonl"  # a valid surrogate pair is one character: accepted
    pair.write_text(good.replace('"sys"', '"sys \\ud83d\\ude00"') + "\n")
    assert skd.read_jsonl(pair)[0].system == "sys \U0001f600"
