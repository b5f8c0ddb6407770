"""steerlm2.templates: the nemo / chat / plain renderings and their token ids.

The ``nemo`` expectation is written here independently, from NeMo-Aligner's ``SteerLM2Dataset``
(nemo_aligner/data/nlp/datasets.py: ``get_prompt``, ``_process_example``, ``collate_fn``).
"""

from __future__ import annotations

import re

import pytest

from steerlm_kernels.steerlm2.formats import templates as T
from steerlm_kernels.steerlm2.formats.tokenization import ByteTokenizer

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from steerlm_kernels.steerlm2.models.hf_models import build_byte_tokenizer  # noqa: E402

NEMO_DEFAULTS = {
    "system_turn_start": "<extra_id_0>",
    "turn_start": "<extra_id_1>",
    "label_start": "<extra_id_2>",
    "end_of_turn": "\n",
    "end_of_name": "\n",
}

EXAMPLE = {
    "system": "You are kind.",
    "prompt_turns": [
        {"from": "User", "value": "Hi there"},
        {"from": "Assistant", "value": "Hello! How can I help?"},
        {"from": "User", "value": "Tell me\nabout tea."},
    ],
    "label": "helpfulness:4,verbosity:1",
    "responses": [
        {"from": "Assistant", "value": "Tea is warm."},
        {"from": "Assistant", "value": "\nTea leaves, steeped."},  # a leading newline meets the prompt's
    ],
}


def nemo_process_example(example: dict, text_to_ids, special_tokens: dict) -> dict:
    """NeMo-Aligner's ``SteerLM2Dataset._process_example`` (text and masks), re-typed from its code."""
    st = special_tokens
    prompt = f"{st['system_turn_start']}System{st['end_of_name']}"
    prompt += f"{example['system']}{st['end_of_turn']}"
    for turn in example["prompt_turns"]:
        prompt += f"{st['turn_start']}{turn['from']}{st['end_of_name']}"
        prompt += f"{turn['value']}{st['end_of_turn']}"
    response_from = example["responses"][0]["from"]
    prompt += f"{st['turn_start']}{response_from}{st['end_of_name']}"
    if "label" in example and example["label"] is not None:
        prompt += f"{st['label_start']}{example['label']}{st['end_of_turn']}"
    num_prompt_tokens = len(text_to_ids(prompt))
    ids, masks, texts = [], [], []
    for item in example["responses"]:
        full_text = prompt + item["value"] + st["end_of_turn"] + st["turn_start"]
        token_ids = text_to_ids(full_text)
        ids.append(token_ids)
        masks.append([0] * num_prompt_tokens + [1] * (len(token_ids) - num_prompt_tokens))
        texts.append(full_text)
    return {"input_ids": ids, "mask": masks, "text": texts}


class MergingTokenizer:
    """Characters, NeMo's special tokens as single ids, and "\\n\\n" merged into one id: a prompt
    ending in "\\n" followed by a response starting with "\\n" tokenises differently joined."""

    SPECIALS = ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>", "[T]", "[L]", "[S]")

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in re.split("(" + "|".join(re.escape(s) for s in self.SPECIALS) + "|\n\n)", text):
            if piece in self.SPECIALS:
                ids.append(1000 + self.SPECIALS.index(piece))
            elif piece == "\n\n":
                ids.append(2000)
            else:
                ids.extend(ord(c) for c in piece)
        return ids


def ours(tokenizer, example: dict, template: str = "nemo", **kw) -> list[tuple[list[int], int]]:
    return [
        T.encode_example(tokenizer, template, example["system"], example["prompt_turns"], example.get("label"),
                         r["value"], response_role=r["from"], **kw)
        for r in example["responses"]
    ]


@pytest.mark.parametrize("tokenizer", ["bytes", "merging", "hf_tiny"])
@pytest.mark.parametrize("label", ["helpfulness:4,verbosity:1", None])
def test_nemo_template_equals_nemo_aligner(tokenizer: str, label: str | None) -> None:
    tok = {"bytes": ByteTokenizer, "merging": MergingTokenizer, "hf_tiny": build_byte_tokenizer}[tokenizer]()
    example = dict(EXAMPLE, label=label)
    if tokenizer == "hf_tiny":
        text_to_ids = lambda s: tok.convert_tokens_to_ids(tok.tokenize(s))  # noqa: E731 - NeMo's AutoTokenizer
    else:
        text_to_ids = tok.encode
    want = nemo_process_example(example, text_to_ids, NEMO_DEFAULTS)
    got = ours(tok, example)
    for i, (ids, start) in enumerate(got):
        assert ids == want["input_ids"][i]
        mask = [0] * start + [1] * (len(ids) - start)
        assert mask == want["mask"][i]
        # NeMo's collate: labels = ids[1:], loss_mask = mask[1:]
        assert sum(want["mask"][i][1:]) == len(ids) - start
    if tokenizer == "merging":  # the joined "\n\n" is one token, counted on NeMo's positional mask
        assert 2000 in got[1][0]
    prompt, scored = T.render_text(tok, "nemo", example["system"], example["prompt_turns"], label,
                                   "Tea is warm.")
    assert prompt + scored == want["text"][0]
    assert scored == "Tea is warm.\n<extra_id_1>"
    assert ("<extra_id_2>" in prompt) == (label is not None)
    assert not prompt.startswith("<s>")


def test_nemo_template_literal_text() -> None:
    prompt, scored = T.render_text(None, "nemo", "sys", [("User", "q1"), ("Assistant", "a1"), ("User", "q2")],
                                   "quality:4", "ans")
    assert prompt == ("<extra_id_0>System\nsys\n<extra_id_1>User\nq1\n<extra_id_1>Assistant\na1\n"
                      "<extra_id_1>User\nq2\n<extra_id_1>Assistant\n<extra_id_2>quality:4\n")
    assert scored == "ans\n<extra_id_1>"
    # empty system text still renders NeMo's system turn
    prompt, _ = T.render_text(None, "nemo", "", [("User", "q")], None, "a")
    assert prompt == "<extra_id_0>System\n\n<extra_id_1>User\nq\n<extra_id_1>Assistant\n"


def test_nemo_tokens_configurable() -> None:
    special = {"system_turn_start": "[S]", "turn_start": "[T]", "label_start": "[L]", "end_of_turn": "|",
               "end_of_name": ":"}
    toks = T.NemoTokens(system="[S]", turn="[T]", label="[L]", end_of_turn="|", end_of_name=":")
    tok = MergingTokenizer()
    want = nemo_process_example(EXAMPLE, tok.encode, special)
    got = ours(tok, EXAMPLE, nemo_tokens=toks)
    assert [ids for ids, _ in got] == want["input_ids"]
    assert [[0] * s + [1] * (len(ids) - s) for ids, s in got] == want["mask"]
    assert T.NemoTokens() == T.NemoTokens("<extra_id_0>", "<extra_id_1>", "<extra_id_2>", "\n", "\n")


def test_plain_template_is_todays_format() -> None:
    tok = ByteTokenizer()
    prompt, scored = T.render_text(tok, "plain", "sys", [{"from": "User", "value": "hello?"}], "helpfulness:4", "ok")
    assert prompt == "System: sys\nUser: hello?\nAssistant [helpfulness:4]: " and scored == "ok"
    prompt, _ = T.render_text(tok, "plain", "", [{"from": "User", "value": "hello?"}], None, "ok")
    assert prompt == "User: hello?\nAssistant: "
    ids, start = T.encode_example(tok, "plain", "", [("User", "q")], None, "ok")
    assert ids == [tok.bos_token_id, *b"User: q\nAssistant: ", *b"ok", tok.eos_token_id]
    assert start == 1 + len(b"User: q\nAssistant: ")
    ids, start = T.encode_example(tok, "plain", "", [("User", "q")], None, "ok", add_bos=False, add_eos=False)
    assert ids == [*b"User: q\nAssistant: ", *b"ok"] and start == len(b"User: q\nAssistant: ")
    assert T.encode_prompt(tok, "plain", "", [("User", "q")], None, add_bos=False) == ids[:start]


def test_encode_prompt_is_the_prompt_part() -> None:
    tok = build_byte_tokenizer()
    turns = EXAMPLE["prompt_turns"]
    for template in T.TEMPLATES:
        ids, start = T.encode_example(tok, template, "s", turns, "a:1", "resp")
        assert T.encode_prompt(tok, template, "s", turns, "a:1") == ids[:start], template


def test_chat_template_places_attributes_in_the_system_message() -> None:
    tok = build_byte_tokenizer()
    turns = [{"from": "User", "value": "q1"}, {"from": "Assistant", "value": "a1"}, {"from": "user", "value": "q2"}]
    prompt, scored = T.render_text(tok, "chat", "sys", turns, "helpfulness:4", "resp")
    assert prompt == ("<extra_id_1>system\nsys\n\nAttributes: helpfulness:4</s><extra_id_1>user\nq1</s>"
                      "<extra_id_1>assistant\na1</s><extra_id_1>user\nq2</s><extra_id_1>assistant\n")
    assert scored == "resp</s>"
    # the tokenizer's own rendering of the whole conversation is prompt + scored span
    msgs = [{"role": "system", "content": "sys\n\nAttributes: helpfulness:4"},
            {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "resp"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == prompt + scored
    ids, start = T.encode_example(tok, "chat", "sys", turns, "helpfulness:4", "resp")
    assert tok.decode(ids[start:]) == "resp</s>" and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:start]) == prompt
    # no label: no attribute line; no system text and no label: no system message at all
    p_nolabel, _ = T.render_text(tok, "chat", "sys", turns, None, "resp")
    assert "Attributes" not in p_nolabel and p_nolabel.startswith("<extra_id_1>system\nsys</s>")
    p_bare, _ = T.render_text(tok, "chat", "", turns, None, "resp")
    assert p_bare.startswith("<extra_id_1>user\nq1</s>")
    p_label_only, _ = T.render_text(tok, "chat", "", turns, "x:1", "resp")
    assert p_label_only.startswith("<extra_id_1>system\nAttributes: x:1</s>")


def test_chat_template_errors() -> None:
    with pytest.raises(ValueError, match="chat template"):
        T.encode_example(ByteTokenizer(), "chat", "", [("User", "q")], None, "r")
    tok = build_byte_tokenizer()
    with pytest.raises(ValueError, match=r"prompt_turns\[0\].from"):
        T.encode_example(tok, "chat", "", [("Narrator", "q")], None, "r")
    tok.chat_template = "{% for m in messages[-1:] %}{{ m['content'] }}{% endfor %}"  # rewrites earlier turns
    with pytest.raises(ValueError, match="does not render"):
        T.encode_example(tok, "chat", "", [("User", "q")], None, "r")


@pytest.mark.parametrize("bad", [
    {"template": "nemo2"}, {"prompt_turns": "User: hi"}, {"prompt_turns": [("User",)]},
    {"prompt_turns": [{"from": "User", "value": 3}]}, {"response": ""},
])
def test_bad_arguments_are_named(bad: dict) -> None:
    args = {"template": "plain", "prompt_turns": [("User", "q")], "response": "r"} | bad
    with pytest.raises((ValueError, TypeError), match="template|prompt_turns|scored span"):
        T.encode_example(ByteTokenizer(), args["template"], "", args["prompt_turns"], None, args["response"],
                         add_eos=False)
