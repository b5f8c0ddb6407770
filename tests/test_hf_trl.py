"""steerlm_kernels.hf.trl: TRL's per-token log-probabilities through sk.linear_token_logprobs.

The reference is TRL's own fused LM head (trl.trainer.utils.add_fused_lm_head) on a copy of the same
tiny model: every field of its FusedCausalLMOutput and the gradients equal ours to float32 rounding.
The trainers (SFT, DPO, GRPO) run a few CPU steps on tiny Llamas with the byte tokenizer; nothing
downloads. DPO and GRPO losses at the first step are differences of nearly equal sums (policy ==
reference, advantages summing to zero), so there both implementations are held to a float64 run of
TRL: ours may not be further from it than TRL's float32 run (x2).
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl.trainer import utils as trl_utils  # noqa: E402

from steerlm_kernels.hf import patch  # noqa: E402
from steerlm_kernels.hf import trl as sk_trl  # noqa: E402
from steerlm_kernels.steerlm2.models.hf_models import build_byte_tokenizer  # noqa: E402

ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
V = 96
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def tiny(arch: str = "llama") -> torch.nn.Module:
    cfg_name, model_name, extra = ARCHS[arch]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**{**SMALL, **extra})).float()
    if arch == "llama_bias":
        model.lm_head = torch.nn.Linear(32, V, bias=True)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
    return model.train()


def pair(arch: str, temperature: float = 1.0, outputs: tuple[str, ...] = ALL):
    ref = tiny(arch)
    ours = copy.deepcopy(ref)
    trl_utils.add_fused_lm_head(ref, temperature=temperature, outputs=outputs)
    sk_trl.add_fused_lm_head(ours, temperature=temperature, outputs=outputs)
    return ref, ours


def batch(b: int = 3, s: int = 10):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, V, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, -2:] = -100
    return ids, labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fused_head_equals_trl(arch, temperature):
    ref, ours = pair(arch, temperature)
    ids, labels = batch()
    a = ref(input_ids=ids, labels=labels, fused_lm_head=True)
    b = ours(input_ids=ids, labels=labels, fused_lm_head=True)
    assert type(b) is type(a)
    assert torch.equal(b.label_mask, a.label_mask) and b.label_mask.shape == (3, 9)
    assert torch.equal(b.is_top1, a.is_top1) and b.is_top1.dtype == torch.bool
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "loss"):
        x, y = getattr(a, name), getattr(b, name)
        assert y.dtype == torch.float32 and torch.isfinite(y).all(), name
        torch.testing.assert_close(y, x, rtol=2e-5, atol=2e-5, msg=name)
    assert (b.log_probs <= 0).all() and (b.log_probs[~b.label_mask] == 0).all()
    assert (b.entropy[~b.label_mask] == 0).all()
    (a.log_probs.sum() + 0.3 * a.entropy.sum()).backward()
    (b.log_probs.sum() + 0.3 * b.entropy.sum()).backward()
    ga, gb = grads(ref), grads(ours)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=2e-5, atol=2e-5 * ga[n].abs().max().item(), msg=n)


def test_only_requested_fields_and_shift_labels_and_num_items():
    ref, ours = pair("llama", outputs=("log_probs",))
    ids, labels = batch()
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    a = ref(input_ids=ids, labels=labels, shift_labels=shifted, fused_lm_head=True, num_items_in_batch=7)
    b = ours(input_ids=ids, labels=labels, shift_labels=shifted, fused_lm_head=True, num_items_in_batch=7)
    assert b.entropy is None and b.is_top1 is None and b.mean_logits is None and b.log_sum_sq_probs is None
    assert b.log_probs.shape == ids.shape
    torch.testing.assert_close(b.log_probs, a.log_probs, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(b.loss, -b.log_probs.sum() / 7, rtol=1e-6, atol=0)
    torch.testing.assert_close(b.loss, a.loss, rtol=2e-5, atol=2e-5)


def test_all_ignored_micro_batch_is_a_differentiable_zero():
    _, ours = pair("llama")
    ids, _ = batch()
    out = ours(input_ids=ids, labels=torch.full_like(ids, -100), fused_lm_head=True)
    assert out.loss.item() == 0.0 and not out.label_mask.any()
    out.loss.backward()  # connected to the model, no error
    assert all(torch.count_nonzero(g) == 0 for g in grads(ours).values())


def test_scoring_pass_and_training_pass_are_bit_identical():
    """GRPO's old-policy / reference log-probs (no grad) and the policy's (grad) of the same input."""
    _, ours = pair("gemma2", temperature=0.9)
    ids, labels = batch()
    with torch.no_grad():
        scored = ours(input_ids=ids, labels=labels, fused_lm_head=True)
    trained = ours(input_ids=ids, labels=labels, fused_lm_head=True)
    assert trained.log_probs.requires_grad
    assert torch.equal(scored.log_probs, trained.log_probs.detach())
    assert torch.equal(scored.entropy, trained.entropy.detach())


def test_without_fused_lm_head_the_model_is_unchanged():
    ref = tiny("llama")
    ours = copy.deepcopy(ref)
    sk_trl.add_fused_lm_head(ours, outputs=ALL)
    ids, labels = batch()
    a, b = ref(input_ids=ids, labels=labels), ours(input_ids=ids, labels=labels)
    assert torch.equal(b.logits, a.logits) and torch.equal(b.loss, a.loss)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.eval().generate(ids[:, :3], **kw), ref.eval().generate(ids[:, :3], **kw))


def test_refusals():
    with pytest.raises(ValueError, match="temperature"):
        sk_trl.add_fused_lm_head(tiny(), temperature=0.0)
    with pytest.raises(ValueError, match="outputs"):
        sk_trl.add_fused_lm_head(tiny(), outputs=("log_probs", "logits"))
    odd = tiny()
    odd.config.lm_head_multiplier = 2.0
    with pytest.raises(ValueError, match="lm_head_multiplier"):
        sk_trl.add_fused_lm_head(odd)
    _, ours = pair("llama")
    with pytest.raises(ValueError, match="labels"):
        ours(input_ids=batch()[0], fused_lm_head=True)


def test_use_steerlm_kernels_swaps_and_restores():
    from trl.trainer import dpo_trainer, grpo_trainer, sft_trainer

    before = [m.add_fused_lm_head for m in (dpo_trainer, grpo_trainer, sft_trainer)]
    with pytest.raises(RuntimeError), sk_trl.use_steerlm_kernels():
        assert all(m.add_fused_lm_head is sk_trl.add_fused_lm_head for m in (dpo_trainer, grpo_trainer, sft_trainer))
        raise RuntimeError("restored even so")
    assert [m.add_fused_lm_head for m in (dpo_trainer, grpo_trainer, sft_trainer)] == before


# ------------------------------------------------------------------------------------------------
# trainers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def byte_llama(tok, dtype=torch.float32):
    cfg = transformers.LlamaConfig(**{**SMALL, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                                      "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def common_args(tmp_path, name, **kw):
    # TRL's configs default to bf16=True (CPU autocast): float32 here, so that equal means float32 rounding
    return dict(output_dir=str(tmp_path / name), learning_rate=0.5, optim="sgd", logging_steps=1, report_to=[],
                save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                **{"bf16": False, **kw})


def losses(trainer):
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])


def test_sft_trainer_on_a_patched_model_and_adapted(tok, tmp_path):
    """Plain TRL SFTTrainer == on patch(model) == our SFTTrainer: losses over 3 steps of accumulation 2."""
    rows = [{"text": f"question {i}: " + "abc " * (1 + i % 5) + f"answer {i * 7}"} for i in range(12)]
    ds = datasets.Dataset.from_list(rows)
    runs = {}
    for name, cls, prep in (("trl", trl.SFTTrainer, lambda m: m), ("patched", trl.SFTTrainer, patch),
                            ("ours", sk_trl.SFTTrainer, lambda m: m)):
        args = trl.SFTConfig(**common_args(tmp_path, name, per_device_train_batch_size=2,
                                           gradient_accumulation_steps=2, max_steps=3, max_length=64))
        trainer = cls(model=prep(byte_llama(tok)), args=args, train_dataset=ds, processing_class=tok)
        trainer.train()
        runs[name] = (losses(trainer), trainer)
    ref = runs["trl"][0]
    assert ref.numel() == 3 and torch.isfinite(ref).all()
    for name in ("patched", "ours"):
        torch.testing.assert_close(runs[name][0], ref, rtol=1e-5, atol=1e-6, msg=name)
    acc = [h["mean_token_accuracy"] for h in runs["ours"][1].state.log_history if "mean_token_accuracy" in h]
    ref_acc = [h["mean_token_accuracy"] for h in runs["trl"][1].state.log_history if "mean_token_accuracy" in h]
    assert acc == ref_acc and len(acc) == 3


def test_sft_trainer_under_bf16_autocast_computes_the_head_in_bf16(tok, tmp_path):
    """TRL's default bf16=True: the head runs in bfloat16 as the model's own (and TRL's kernel) would."""
    ds = datasets.Dataset.from_list([{"text": f"question {i}: " + "abc " * (1 + i % 3)} for i in range(4)])
    runs = {}
    for name, cls in (("trl", trl.SFTTrainer), ("ours", sk_trl.SFTTrainer)):
        args = trl.SFTConfig(**common_args(tmp_path, name, per_device_train_batch_size=2, max_steps=1,
                                           max_length=64, bf16=True))
        trainer = cls(model=byte_llama(tok), args=args, train_dataset=ds, processing_class=tok)
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate wraps the forward in for bf16=True
            out = trainer.model(**inputs, fused_lm_head=True)
        runs[name] = out.log_probs.detach()
    fp32 = byte_llama(tok)
    sk_trl.add_fused_lm_head(fp32)
    exact = fp32(**inputs, fused_lm_head=True).log_probs.detach()
    torch.testing.assert_close(runs["ours"], runs["trl"], rtol=2e-2, atol=2e-2)
    assert (runs["ours"] - exact).abs().max() > 1e-4  # not the float32 head


def _dpo(cls, tok, tmp_path, name, dtype=torch.float32):
    rows = [{"prompt": f"q{i}: what is {i}+{i}?", "chosen": f" {2 * i}, indeed", "rejected": f" no idea {i}"}
            for i in range(8)]
    args = trl.DPOConfig(**common_args(tmp_path, name, per_device_train_batch_size=2, max_steps=2))
    model = byte_llama(tok, dtype)
    return cls(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=datasets.Dataset.from_list(rows),
               processing_class=tok)


def _loss_and_grads(trainer, inputs):
    model = trainer.model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.double(), torch.cat([p.grad.double().flatten() for p in model.parameters()])


def test_dpo_trainer_log_probs_and_loss_step(tok, tmp_path):
    ref, ours, exact = (_dpo(trl.DPOTrainer, tok, tmp_path, "trl"), _dpo(sk_trl.DPOTrainer, tok, tmp_path, "ours"),
                        _dpo(trl.DPOTrainer, tok, tmp_path, "trl64", torch.float64))
    inputs = ref._prepare_inputs(next(iter(ref.get_train_dataloader())))
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    kw = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
              fused_lm_head=True)
    a, b = ref.model(**kw), ours.model(**kw)
    torch.testing.assert_close(b.log_probs, a.log_probs, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(b.mean_logits, a.mean_logits, rtol=2e-5, atol=2e-5)
    assert torch.equal(b.is_top1, a.is_top1)
    # the reference model is ours too
    torch.testing.assert_close(ours.ref_model(**kw).log_probs, b.log_probs, rtol=0, atol=0)
    (la, ga), (lb, gb), (l64, g64) = (_loss_and_grads(t, inputs) for t in (ref, ours, exact))
    assert torch.isfinite(gb).all() and gb.norm() > 0
    assert abs(lb - l64) <= 2 * abs(la - l64) + 1e-6
    assert (gb - g64).norm() <= 2 * (ga - g64).norm() + 1e-6 * g64.norm()
    for trainer in (ref, ours):
        transformers.set_seed(0)
        trainer.train()
    torch.testing.assert_close(losses(ours)[:1], losses(ref)[:1], rtol=1e-5, atol=1e-5)


def _grpo(cls, tok, tmp_path, name):
    def reward(completions, **_):
        return [float(c.count("a")) - 0.1 * len(c) for c in completions]

    args = trl.GRPOConfig(**common_args(tmp_path, name, per_device_train_batch_size=4, num_generations=4,
                                        max_completion_length=8, max_steps=2, beta=0.0, num_iterations=2,
                                        temperature=0.9))
    ds = datasets.Dataset.from_list([{"prompt": f"q{i}: what is {i}+{i}?"} for i in range(8)])
    return cls(model=byte_llama(tok), reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)


def test_grpo_trainer_log_probs_and_entropies_and_run(tok, tmp_path):
    ref, ours = _grpo(trl.GRPOTrainer, tok, tmp_path, "trl"), _grpo(sk_trl.GRPOTrainer, tok, tmp_path, "ours")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 256, (4, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    a = ref._get_per_token_logps_and_entropies(ref.model, ids, mask, 6, compute_entropy=True)
    b = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, 6, compute_entropy=True)
    assert b[0].shape == (4, 6) and b[1].shape == (4, 6)
    torch.testing.assert_close(b[0], a[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(b[1], a[1], rtol=2e-5, atol=2e-5)
    with torch.no_grad():
        old = ours._get_per_token_logps_and_entropies(ours.model, ids, mask, 6)[0]
    assert torch.equal(old, b[0].detach())  # ratio exp(logp - old_logp) is exactly 1 on the first iteration
    for trainer in (ref, ours):
        transformers.set_seed(0)  # the same sampled completions
        trainer.train()
    la, lb = losses(ref), losses(ours)
    assert la.numel() == 2 and torch.isfinite(lb).all()
    hist = [{k: h[k] for k in ("reward", "entropy") if k in h} for h in ours.state.log_history if "loss" in h]
    ref_hist = [{k: h[k] for k in ("reward", "entropy") if k in h} for h in ref.state.log_history if "loss" in h]
    assert [h.get("reward") for h in hist] == [h.get("reward") for h in ref_hist]  # same completions
    torch.testing.assert_close(torch.tensor([h["entropy"] for h in hist]),
                               torch.tensor([h["entropy"] for h in ref_hist]), rtol=1e-5, atol=1e-5)
    # the loss is an advantage-weighted sum that cancels to ~0 at the first step; after it, rounding of the
    # first step's gradient (as between any two float32 kernels) moves the second loss slightly
    torch.testing.assert_close(lb, la, rtol=1e-3, atol=1e-5)
