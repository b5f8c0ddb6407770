"""steerlm2.hf_models: the built-in tiny Hugging Face model, its tokenizer, local loading, LM head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from steerlm_kernels.steerlm2.formats.tokenization import ByteTokenizer  # noqa: E402
from steerlm_kernels.steerlm2.models import hf_models as hm  # noqa: E402

TEXTS = ["", "plain ascii", "héllo wörld 日本語 🙂", "<extra_id_0>System\n\n<extra_id_1>User\nq\n<extra_id_2>a:1\n",
         "  leading and trailing  ", "tabs\tand\r\nnewlines\n\n"]


@pytest.fixture(scope="module")
def tiny():
    return hm.build_tiny(0)


def test_tokenizer_is_bytes_plus_specials(tiny) -> None:
    _, tok = tiny
    byte = ByteTokenizer()
    assert len(tok) == 262
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]) == [259, 260, 261]
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        plain = text.replace("<extra_id_0>", "").replace("<extra_id_1>", "").replace("<extra_id_2>", "")
        if plain == text:
            assert ids == byte.encode(text), text  # ids 0..255 are exactly the UTF-8 bytes
        assert tok.decode(ids) == text
    assert tok.encode("<extra_id_1>", add_special_tokens=False) == [260]


def test_build_tiny_is_a_llama_config_and_deterministic(tiny) -> None:
    model, tok = tiny
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.config.vocab_size == len(tok) and model.config.hidden_size == 64
    assert model.config.num_hidden_layers == 2 and not model.config.tie_word_embeddings
    state = torch.random.get_rng_state()
    again, _ = hm.build_tiny(0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    other, _ = hm.build_tiny(1)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
    padded, _ = hm.build_tiny(0, vocab_size=512, size="small")
    assert padded.lm_head.weight.shape == (512, 128)
    with pytest.raises(ValueError, match="vocab_size"):
        hm.build_tiny(0, vocab_size=100)
    with pytest.raises(ValueError, match="size"):
        hm.build_tiny(0, size="huge")


def test_save_and_from_pretrained_round_trip(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    tok2 = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tok.encode("<extra_id_1>User\nhéllo\n", add_special_tokens=False)])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, want)
    for text in TEXTS:
        assert tok2.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert tok2.chat_template == hm.TINY_CHAT_TEMPLATE
    assert (tok2.pad_token_id, tok2.bos_token_id, tok2.eos_token_id) == (256, 257, 258)
    # load_model_and_tokenizer: the directory, local only, dtype kept unless asked
    m3, t3 = hm.load_model_and_tokenizer(str(tmp_path))
    assert m3.dtype == torch.float32 and not m3.training
    with torch.no_grad():
        assert torch.equal(m3(input_ids=ids).logits, want)
    m4, _ = hm.load_model_and_tokenizer(tmp_path, dtype=torch.bfloat16)
    assert m4.dtype == torch.bfloat16


def test_load_model_and_tokenizer_builtin_and_errors(tmp_path: Path) -> None:
    model, tok = hm.load_model_and_tokenizer("tiny", seed=3)
    ref, _ = hm.build_tiny(3)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    small, _ = hm.load_model_and_tokenizer("small", dtype=torch.float64)
    assert small.config.hidden_size == 128 and small.dtype == torch.float64
    with pytest.raises(ValueError, match="neither a built-in model"):
        hm.load_model_and_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="tokenizer"):
        hm.load_model_and_tokenizer(tmp_path)  # an empty directory: nothing to load, nothing downloads


def test_lm_head_and_final_hidden_states_give_the_logits(tiny) -> None:
    model, _ = tiny
    ids = torch.randint(0, 262, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    pos = torch.arange(9).expand(2, 9)
    weight, bias = hm.lm_head_of(model)
    assert weight is model.lm_head.weight and bias is None
    with torch.no_grad():
        hidden = hm.final_hidden_states(model, ids, mask, pos)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert hidden.shape == (2, 9, 64)
    torch.testing.assert_close(hidden.double() @ weight.double().T, logits.double(), rtol=1e-5, atol=1e-5)


def test_lm_head_of_refuses_scaled_logits(tiny) -> None:
    model, _ = hm.build_tiny(0, final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        hm.lm_head_of(model)
    with pytest.raises(ValueError, match="output embeddings"):
        hm.lm_head_of(torch.nn.Linear(2, 2))
