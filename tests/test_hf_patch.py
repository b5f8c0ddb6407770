"""steerlm_kernels.hf.patch: a Hugging Face *ForCausalLM's labelled loss through sk.linear_cross_entropy.

Every architecture is built from a tiny config (nothing downloads). The reference is the same model
unpatched (transformers' ForCausalLMLoss on the full float32 logits): the patched loss and every
parameter's gradient equal it to float32 rounding, with ignored labels, num_items_in_batch and
shift_labels; generation and label-free forwards are untouched; unpatch restores the model; the
Trainer with gradient accumulation logs the same losses and ends at the same weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from steerlm_kernels.hf import is_patched, patch, unpatch  # noqa: E402
from steerlm_kernels.hf.heads import FusedPathUnsupported  # noqa: E402

from .conftest import DEVICE_BACKENDS  # noqa: E402

V = 96
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)

#: name -> (config class, model class, extra config). Gemma's soft-cap is set low so that it bites.
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
}


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    cfg_name, model_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).float().train()
    with torch.no_grad():  # HF initialises with std 0.02: make the logits spread so every term counts
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
    return model


def batch(seed: int = 1, b: int = 3, s: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, -3:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # a prompt
    return ids, mask, labels


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, grads(model)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.isfinite(b[name]).all(), name
        torch.testing.assert_close(b[name], a[name], rtol=2e-5, atol=2e-6, msg=name)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_loss_and_gradients_equal_unpatched(arch):
    ref_model = tiny(arch)
    model = patch(copy.deepcopy(ref_model))
    ids, mask, labels = batch()
    ref, ref_g = loss_and_grads(ref_model, input_ids=ids, attention_mask=mask, labels=labels)
    out, g = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert ref.logits is not None and out.logits is None  # no logits while training
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_same(ref_g, g)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_every_backend(backend):
    ref_model = tiny("gemma2")
    model = patch(copy.deepcopy(ref_model), backend=backend)
    ids, mask, labels = batch(s=7)
    ref, ref_g = loss_and_grads(ref_model, input_ids=ids, attention_mask=mask, labels=labels)
    out, g = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_same(ref_g, g)


@pytest.mark.parametrize("num_items", [7, 40])
def test_num_items_in_batch_divides_the_sum(num_items):
    """The Trainer's gradient-accumulation count replaces the batch's own (HF: sum / num_items_in_batch)."""
    ref_model = tiny("llama")
    model = patch(copy.deepcopy(ref_model))
    ids, mask, labels = batch()
    n = torch.tensor(num_items)
    ref, ref_g = loss_and_grads(ref_model, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    out, g = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_same(ref_g, g)
    own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    counted = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(out.loss * num_items, own * counted, rtol=1e-5, atol=1e-5)


def test_shift_labels_are_used_as_given():
    ref_model = tiny("qwen3")
    model = patch(copy.deepcopy(ref_model))
    ids, mask, labels = batch()
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    shifted[2, 5] = -100
    ref, ref_g = loss_and_grads(ref_model, input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted)
    out, g = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_same(ref_g, g)


def test_positional_labels_and_tuple_output():
    ref_model = tiny("llama")
    model = patch(copy.deepcopy(ref_model))
    ids, mask, labels = batch()
    ref = ref_model(ids, mask, None, None, None, labels).loss
    out = model(ids, mask, None, None, None, labels, return_dict=False)
    assert isinstance(out, tuple)
    assert not any(torch.is_tensor(x) and x.shape[-1:] == (V,) for x in out)  # no logits in the tuple
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_without_labels_eval_and_generate_unchanged(arch):
    ref_model = tiny(arch)
    model = patch(copy.deepcopy(ref_model))
    ids, mask, labels = batch()
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                       ref_model(input_ids=ids, attention_mask=mask).logits)
    ref_model.eval()
    model.eval()
    ref, out = ref_model(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels)
    assert out.logits is not None and torch.equal(out.logits, ref.logits)  # eval keeps the model's own path
    assert torch.equal(out.loss, ref.loss)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:, :4], **kw), ref_model.generate(ids[:, :4], **kw))


def test_autocast_runs_the_head_in_the_autocast_dtype():
    """Under bf16 autocast (the Trainer's bf16=True) the fused loss sees the bf16 operands the model's own head
    would: equal to the unpatched loss at bf16 rounding, and not the float32 loss."""
    ref_model = tiny("llama")
    model = patch(copy.deepcopy(ref_model))
    ids, mask, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = ref_model(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels)
    fp32 = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-2, atol=1e-2)
    assert abs(out.loss.item() - fp32.item()) > 1e-5
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_chunk_size_changes_nothing_but_the_chunks(chunk_size):
    from steerlm_kernels.hf.patch import default_chunk_rows

    ref_model = tiny("gemma3")
    model = patch(copy.deepcopy(ref_model), chunk_size=chunk_size)
    ids, mask, labels = batch()
    ref, ref_g = loss_and_grads(ref_model, input_ids=ids, attention_mask=mask, labels=labels)
    out, g = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_same(ref_g, g)
    assert default_chunk_rows(torch.empty(128256, 256)) == 256  # bounded by H
    assert default_chunk_rows(torch.empty(128256, 4096)) == (256 << 20) // (4 * 128256)  # by 256 MiB
    assert default_chunk_rows(torch.empty(128256, 4096, device="meta")) is None  # not CPU: the library's default
    with pytest.raises(ValueError, match="chunk_size"):
        patch(tiny("llama"), chunk_size=0)


def test_skip_logits_true_fuses_in_eval_too():
    ref_model = tiny("llama").eval()
    model = patch(copy.deepcopy(ref_model), skip_logits=True)
    ids, mask, labels = batch()
    with torch.no_grad():
        ref, out = ref_model(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    patch(model, skip_logits=False)  # patching again updates the options
    assert model(input_ids=ids, labels=labels).logits is not None


def test_unpatch_restores():
    model = tiny("llama")
    cls_forward = type(model).forward
    patch(model)
    assert is_patched(model) and "forward" in vars(model)
    patch(model)  # idempotent
    unpatch(model)
    assert not is_patched(model) and "forward" not in vars(model) and "_loss_function" not in vars(model)
    assert model.forward.__func__ is cls_forward
    assert "forward" not in vars(model.get_output_embeddings())
    ids, mask, labels = batch()
    assert model(input_ids=ids, labels=labels).logits is not None
    unpatch(model)  # a no-op on an unpatched model


def test_unpatch_under_a_later_wrapper_passes_through():
    """A wrapper installed after the patch (as TRL's fused head does) keeps working; ours steps aside."""
    ref_model = tiny("llama")
    model = patch(copy.deepcopy(ref_model))
    inner = model.forward
    model.forward = lambda *a, **k: inner(*a, **k)
    unpatch(model)
    assert not is_patched(model)
    ids, mask, labels = batch()
    out = model(input_ids=ids, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, ref_model(input_ids=ids, labels=labels).loss, rtol=0, atol=0)


def test_the_model_state_is_restored_after_each_call():
    model = patch(tiny("llama"))
    ids, mask, labels = batch()
    model(input_ids=ids, labels=labels)
    assert "_loss_function" not in vars(model) and "forward" not in vars(model.get_output_embeddings())
    with pytest.raises(Exception):  # noqa: B017 - a failing forward still restores the model
        model(input_ids=ids, labels=labels[:, :3])
    assert "_loss_function" not in vars(model) and "forward" not in vars(model.get_output_embeddings())


def test_refusals_name_the_reason():
    with pytest.raises(TypeError, match="model"):
        patch("meta-llama/Llama-3.2-1B")
    base = transformers.LlamaModel(transformers.LlamaConfig(**COMMON))
    with pytest.raises(ValueError, match="output embedding|LM head"):
        patch(base)
    odd = tiny("llama")
    odd.config.output_multiplier = 3.0  # a transform of the logits the fused path does not know
    with pytest.raises(FusedPathUnsupported, match="output_multiplier"):
        patch(odd)
    assert not is_patched(odd) and "forward" not in vars(odd)
    with pytest.raises(TypeError, match="skip_logits"):
        patch(tiny("llama"), skip_logits="yes")


class _Rows(torch.utils.data.Dataset):
    """Rows of different lengths and prompt masks: every micro-batch counts a different number of targets."""

    def __init__(self, n: int = 16, s: int = 12):
        g = torch.Generator().manual_seed(5)
        self.rows = []
        for i in range(n):
            ids = torch.randint(3, V, (s,), generator=g)
            labels = ids.clone()
            labels[: 1 + (i * 5) % (s - 2)] = -100
            self.rows.append({"input_ids": ids, "attention_mask": torch.ones(s, dtype=torch.long), "labels": labels})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def _train(model, tmp_path, name):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows())
    trainer.train()
    assert trainer.model_accepts_loss_kwargs  # num_items_in_batch reaches the forward
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], model


def test_trainer_with_gradient_accumulation_matches_unpatched(tmp_path):
    ref_model = tiny("llama")
    model = patch(copy.deepcopy(ref_model))
    ref_losses, ref_model = _train(ref_model, tmp_path, "ref")
    losses, model = _train(model, tmp_path, "patched")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert is_patched(model)
