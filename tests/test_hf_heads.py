"""hf.heads: a Hugging Face causal LM's LM head, base model and config logit transform; the head intercept."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import steerlm_kernels as sk  # noqa: E402
from steerlm_kernels.hf import heads as H  # noqa: E402

SMALL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
         "intermediate_size": 64, "vocab_size": 97, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
ARCHS = {
    "llama": (transformers.LlamaConfig, {}, H.LogitTransform()),
    "llama_tied": (transformers.LlamaConfig, {"tie_word_embeddings": True}, H.LogitTransform()),
    "gemma2": (transformers.Gemma2Config, {"final_logit_softcapping": 0.7, "head_dim": 16},
               H.LogitTransform(softcap=0.7)),
    "cohere": (transformers.CohereConfig, {"logit_scale": 3.0}, H.LogitTransform(logit_scale=3.0)),
    "granite": (transformers.GraniteConfig, {"logits_scaling": 0.5}, H.LogitTransform(logit_scale=2.0)),
}


def build(arch: str, **extra) -> torch.nn.Module:
    cls, kw, _ = ARCHS[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(cls(**SMALL, **kw, **extra)).eval()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_config_transform_and_head_give_the_models_logits(arch) -> None:
    """find_head's transform, weight and bias applied to the base model's hidden states = the model's own
    logits (float64); tied heads are the input embedding."""
    model = build(arch).double()
    head = H.find_head(model)
    assert head.transform == ARCHS[arch][2]
    assert head.tied == (arch in ("llama_tied", "gemma2", "cohere"))
    assert head.weight is model.get_output_embeddings().weight and head.base_model is model.model
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = head.logits(head.hidden_states(ids))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_transform_kwargs_apply_and_describe() -> None:
    t = H.LogitTransform(softcap=2.0, logit_scale=0.5)
    assert t.kwargs() == {"softcap": 2.0, "logit_scale": 0.5} and not t.identity
    z = torch.tensor([-8.0, 0.3, 9.0], dtype=torch.float64)
    torch.testing.assert_close(t.apply(z), 2.0 * torch.tanh(0.5 * z / 2.0))
    assert H.LogitTransform().kwargs() == {} and H.LogitTransform(logit_scale=1.0).identity
    assert t.describe() == "scaled by 0.5, soft-capped at 2" and H.LogitTransform().describe() == "none"


@pytest.mark.parametrize("key, value", [("output_multiplier", 2.0), ("lm_head_multiplier", 0.1),
                                        ("final_logits_temperature", 0.7)])
def test_unknown_transform_is_refused_with_its_key(key, value) -> None:
    model = build("llama")
    setattr(model.config, key, value)
    with pytest.raises(H.FusedPathUnsupported, match=key):
        H.find_head(model)
    head, why = H.fused_support(model)
    assert head is None and key in why
    setattr(model.config, key, 1.0)  # a neutral value is no transform
    assert H.find_head(model).transform.identity


def test_benign_and_invalid_settings() -> None:
    model = build("gemma2")  # attn_logit_softcapping acts inside the model: not a head transform
    assert model.config.attn_logit_softcapping is not None and H.find_head(model).transform.softcap == 0.7
    model.config.output_router_logits = True
    assert H.find_head(model).transform.softcap == 0.7
    model.config.final_logit_softcapping = -1.0
    with pytest.raises(H.FusedPathUnsupported, match="final_logit_softcapping"):
        H.find_head(model)


def test_no_head_or_no_base_model_is_refused() -> None:
    assert H.fused_support(torch.nn.Linear(3, 3))[0] is None
    with pytest.raises(H.FusedPathUnsupported, match="output embedding"):
        H.find_head(torch.nn.Linear(3, 3))

    class HeadOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 5)

        def get_output_embeddings(self):
            return self.lm_head

    with pytest.raises(H.FusedPathUnsupported, match="base model"):
        H.find_head(HeadOnly())


def test_transform_refused_when_the_fused_ops_cannot_apply_it(monkeypatch) -> None:
    monkeypatch.setattr(H, "kernels_take_transforms", lambda: False)
    with pytest.raises(H.FusedPathUnsupported, match="soft-capped at 0.7"):
        H.find_head(build("gemma2"))
    assert H.find_head(build("llama")).transform.identity  # no transform: still served


@pytest.mark.parametrize("arch", ["llama", "gemma2", "cohere", "granite"])
def test_intercept_runs_the_fused_loss_in_place_of_the_head(arch) -> None:
    """In the block, the head's call runs fn on the hidden states the head would see and the current weight
    and bias (a biased head here for llama), returns zero-width logits; the fused NLL with the transform equals
    the float64 log-softmax of the model's logits; the head's forward is restored afterwards."""
    if arch != "llama" and not H.kernels_take_transforms():
        pytest.skip("the installed fused ops take no softcap= / logit_scale=")
    model = build(arch)
    if arch == "llama":
        model.lm_head = torch.nn.Linear(32, 97, bias=True)
        torch.nn.init.normal_(model.lm_head.bias)
    head = H.find_head(model)
    ids = torch.randint(3, 97, (2, 9))
    labels = torch.roll(ids, -1, 1)
    seen = {}

    def fn(hidden, weight, bias):
        seen.update(hidden=hidden, weight=weight, bias=bias)
        return sk.linear_sequence_nll(hidden, weight, labels, bias=bias, backend="torch", **head.transform.kwargs())

    with torch.no_grad():
        with head.intercept(fn) as slot:
            out = model(input_ids=ids)
        assert out.logits.shape == (2, 9, 0) and slot.calls == 1
        assert seen["weight"] is model.get_output_embeddings().weight
        assert (seen["bias"] is None) == (arch != "llama")
        torch.testing.assert_close(seen["hidden"], head.hidden_states(ids))
        logits = model.double()(input_ids=ids).logits
    want = -torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0].sum(-1)
    torch.testing.assert_close(slot.value.double(), want, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(model.get_output_embeddings())


def test_intercept_gradient_reaches_hidden_and_head() -> None:
    model = build("llama_tied").train()
    head = H.find_head(model)
    ids = torch.randint(3, 97, (2, 6))
    with head.intercept(lambda h, w, b: sk.linear_sequence_nll(h, w, torch.roll(ids, -1, 1), backend="torch")) as s:
        model(input_ids=ids)
    s.value.sum().backward()
    ref = build("llama_tied").train()
    out = ref(input_ids=ids).logits
    (-torch.log_softmax(out, -1).gather(-1, torch.roll(ids, -1, 1)[..., None])).sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_intercept_misuse_is_refused() -> None:
    model = build("llama")
    head = H.find_head(model)
    with pytest.raises(RuntimeError, match="did not call"):
        with head.intercept(lambda h, w, b: h.sum()):
            pass
    with pytest.raises(RuntimeError, match="nested"):
        with head.intercept(lambda h, w, b: h.sum()):
            with head.intercept(lambda h, w, b: h.sum()):
                pass
    assert "forward" not in vars(model.lm_head)
    with pytest.raises(RuntimeError, match="twice"):
        with head.intercept(lambda h, w, b: h.sum()):
            model.lm_head(torch.zeros(1, 32))
            model.lm_head(torch.zeros(1, 32))
    assert "forward" not in vars(model.lm_head)
    assert model(input_ids=torch.tensor([[3, 4]])).logits.shape == (1, 2, 97)  # the real head again
