"""GPTSteerLMModel: loss, every parameter gradient and distance against a float64 closed form."""

from __future__ import annotations

import copy
from types import MappingProxyType, SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from steerlm_kernels.steerlm2.models.model import GPTSteerLMModel, cfg_get
from steerlm_kernels.steerlm2.models.tiny_lm import TinyCausalLM

V = 48
S = 14


def make_batch(group_sizes: tuple[int, ...], seed: int = 0, seq_len: int = S, vocab: int = V) -> dict[str, Tensor]:
    """A SteerLM 2.0 batch as NeMo's collate_fn lays it out, with right padding and prompt masks."""
    g = torch.Generator().manual_seed(seed)
    b = sum(group_sizes)
    seq = torch.randint(0, vocab, (b, seq_len + 1), generator=g)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (b,), generator=g)
    prompt = torch.randint(1, seq_len // 3, (b,), generator=g)
    pos = torch.arange(seq_len)
    attention_mask = (pos[None, :] < lengths[:, None]).long()
    loss_mask = (attention_mask.bool() & (pos[None, :] >= prompt[:, None])).long()
    num_responses = torch.cat([torch.full((n,), n) for n in group_sizes])
    logits_w = torch.randn(b, generator=g) * 2
    ws = torch.cat([t.softmax(0) for t in logits_w.split(list(group_sizes))])
    log_q = -loss_mask.sum(-1).float() * 3.9 + torch.randn(b, generator=g)
    return {
        "tokens": seq[:, :-1].contiguous(),
        "labels": seq[:, 1:].contiguous(),
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "position_ids": pos.expand(b, seq_len).contiguous(),
        "ws": ws,
        "log(Q(y|a,x))": log_q,
        "num_responses": num_responses,
    }


def reference(model: nn.Module, batch: dict[str, Tensor], group_sizes: tuple[int, ...]):
    """float64 closed form: ``(1/G) sum_g sum_{i in g} w_i nll_i / mean_tokens_g`` with
    ``w = ws - softmax_g(-nll - log_q)`` held constant; returns (objective, distance, grads)."""
    m64 = copy.deepcopy(model).double()
    out = m64(input_ids=batch["tokens"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    logits = getattr(out, "logits", out).double()
    logp = logits.log_softmax(-1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    mask = batch["loss_mask"].double()
    nll = -(logp * mask).sum(-1)
    sizes = list(group_sizes)
    ws = batch["ws"].double()
    log_q = batch["log(Q(y|a,x))"].double()
    objective = torch.zeros((), dtype=torch.float64)
    kls = []
    for nll_g, ws_g, lq_g, mask_g in zip(nll.split(sizes), ws.split(sizes), log_q.split(sizes), mask.split(sizes)):
        baseline = torch.softmax(-nll_g.detach() - lq_g, 0)
        weight = ws_g - baseline
        objective = objective + (weight * nll_g).sum() / mask_g.sum(-1).mean()
        kls.append(((ws_g + 1e-8) * torch.log((ws_g + 1e-8) / (baseline + 1e-8))).sum())
    objective = objective / len(sizes)
    objective.backward()
    grads = {name: p.grad.float() for name, p in m64.named_parameters()}
    return objective.item(), torch.stack(kls).mean().item(), grads


def cfg_of(fmbs: int, mbs: int, kind: str = "dict"):
    d = {"steerlm2": {"forward_micro_batch_size": fmbs, "micro_batch_size": mbs}}
    if kind == "dict":
        return d
    if kind == "namespace":
        return SimpleNamespace(steerlm2=SimpleNamespace(**d["steerlm2"]))
    omegaconf = pytest.importorskip("omegaconf")
    return omegaconf.OmegaConf.create(d)


def check_against_reference(model: nn.Module, wrapper: GPTSteerLMModel, batch, group_sizes, grad_rtol=2e-4):
    ref_loss, ref_distance, ref_grads = reference(model, batch, group_sizes)
    model.zero_grad(set_to_none=True)
    loss, metrics = wrapper.get_loss_and_metrics(batch, forward_only=False)
    assert isinstance(loss, float) and set(metrics) == {"loss", "distance"}
    assert metrics["loss"] == loss
    assert loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-6)
    assert metrics["distance"] == pytest.approx(ref_distance, rel=1e-4, abs=1e-6)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        ref = ref_grads[name]
        scale = ref.abs().max().item()
        torch.testing.assert_close(p.grad, ref, rtol=grad_rtol, atol=grad_rtol * scale + 1e-9, msg=name)


GROUPS = [(3, 5, 2), (4, 4, 4)]


@pytest.mark.parametrize("group_sizes", GROUPS, ids=lambda g: "groups" + "-".join(map(str, g)))
@pytest.mark.parametrize("fmbs,mbs", [(1, 1), (2, 3), (5, 2), (4, 7), (None, None)], ids=str)
def test_loss_and_grads_match_closed_form(group_sizes, fmbs, mbs):
    b = sum(group_sizes)
    fmbs, mbs = fmbs or b, mbs or b
    model = TinyCausalLM(V, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, seed=1)
    batch = make_batch(group_sizes, seed=fmbs * 10 + mbs)
    wrapper = GPTSteerLMModel(model, cfg_of(fmbs, mbs), backend="torch")
    check_against_reference(model, wrapper, batch, group_sizes)


def test_micro_batch_sizes_agree_with_each_other():
    """Whatever the split, the step (loss, distance, grads) is the same."""
    groups = (2, 6, 1, 3)
    batch = make_batch(groups, seed=3)
    results = []
    for fmbs, mbs in [(1, 1), (3, 5), (12, 12), (7, 4)]:
        model = TinyCausalLM(V, d_model=32, n_layers=1, max_seq_len=32, seed=2)
        loss, metrics = GPTSteerLMModel(model, cfg_of(fmbs, mbs), backend="torch").get_loss_and_metrics(batch, False)
        results.append((loss, metrics["distance"], [p.grad.clone() for p in model.parameters()]))
    for loss, distance, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5, abs=1e-7)
        assert distance == pytest.approx(results[0][1], rel=1e-5)
        for g, g0 in zip(grads, results[0][2]):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-4 * g0.abs().max().item() + 1e-10)


def test_backends(backend):
    """The same closed form through each available kernel backend (Triton under the interpreter)."""
    groups = (3, 5, 2)
    model = TinyCausalLM(V, d_model=32, n_layers=1, max_seq_len=32, seed=4)
    batch = make_batch(groups, seed=5)
    check_against_reference(model, GPTSteerLMModel(model, cfg_of(2, 3), backend=backend), batch, groups)


def test_inplace_backward():
    groups = (3, 5, 2)
    model = TinyCausalLM(V, d_model=32, n_layers=1, max_seq_len=32, seed=4)
    batch = make_batch(groups, seed=6)
    wrapper = GPTSteerLMModel(model, cfg_of(3, 4), backend="torch", inplace_backward=True)
    check_against_reference(model, wrapper, batch, groups)


def test_forward_only_leaves_no_gradient():
    groups = (3, 5, 2)
    model = TinyCausalLM(V, d_model=32, n_layers=2, max_seq_len=32, seed=7)
    batch = make_batch(groups, seed=8)
    ref_loss, ref_distance, _ = reference(model, batch, groups)
    loss, metrics = GPTSteerLMModel(model, cfg_of(2, 3), backend="torch").get_loss_and_metrics(batch, True)
    assert all(p.grad is None for p in model.parameters())
    assert loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-6)
    assert metrics == {"loss": loss, "distance": pytest.approx(ref_distance, rel=1e-4, abs=1e-6)}
    # and it does not disturb gradients that are already there
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    GPTSteerLMModel(model, cfg_of(4, 4), backend="torch").get_loss_and_metrics(batch, forward_only=True)
    assert all(bool((p.grad == 1).all()) for p in model.parameters())


def test_gradient_accumulates():
    groups = (2, 3)
    batch = make_batch(groups, seed=9)
    model = TinyCausalLM(V, d_model=32, n_layers=1, max_seq_len=32, seed=7)
    wrapper = GPTSteerLMModel(model, cfg_of(2, 2), backend="torch")
    wrapper.get_loss_and_metrics(batch, False)
    once = [p.grad.clone() for p in model.parameters()]
    wrapper.get_loss_and_metrics(batch, False)
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g)


def test_distance_formula():
    groups = (3, 1, 4)
    model = TinyCausalLM(V, d_model=32, n_layers=1, max_seq_len=32, seed=10)
    batch = make_batch(groups, seed=11)
    _, ref_distance, _ = reference(model, batch, groups)
    wrapper = GPTSteerLMModel(model, cfg_of(3, 3), backend="torch")
    res = wrapper.compute_baseline_weights(batch)
    assert res.distance.item() == pytest.approx(ref_distance, rel=1e-5)
    torch.testing.assert_close(res.weight, batch["ws"] - res.baseline)
    assert "weight" not in batch  # the richer form leaves the batch alone
    sums = torch.stack([x.sum() for x in res.baseline.split(list(groups))])
    torch.testing.assert_close(sums, torch.ones(len(groups)))


@pytest.mark.parametrize("kind", ["dict", "namespace", "omegaconf"])
def test_cfg_forms(kind):
    groups = (3, 5, 2)
    model = TinyCausalLM(V, d_model=32, n_layers=1, max_seq_len=32, seed=12)
    wrapper = GPTSteerLMModel(model, cfg_of(5, 2, kind), backend="torch")
    assert (wrapper.forward_micro_batch_size, wrapper.micro_batch_size) == (5, 2)
    check_against_reference(model, wrapper, make_batch(groups, seed=13), groups)


def test_cfg_get_and_errors():
    assert cfg_get({"a": SimpleNamespace(b={"c": 3})}, "a.b.c") == 3
    assert cfg_get({}, "a.b", default=7) == 7
    with pytest.raises(KeyError, match="steerlm2"):
        GPTSteerLMModel(nn.Linear(2, 2), {"model": {}})
    with pytest.raises(ValueError, match="micro_batch_size"):
        GPTSteerLMModel(nn.Linear(2, 2), cfg_of(1, 0))
    with pytest.raises(TypeError, match="lm_head_weight"):
        GPTSteerLMModel(nn.Linear(2, 2), cfg_of(1, 1), lm_head_weight="weight")
    with pytest.raises(ValueError, match="lm_head_bias"):
        GPTSteerLMModel(nn.Linear(2, 2), cfg_of(1, 1), lm_head_bias=torch.zeros(2))
    with pytest.raises(ValueError, match="process_group"):
        GPTSteerLMModel(nn.Linear(2, 2), cfg_of(1, 1), process_group=object())


def test_bad_batch():
    model = TinyCausalLM(V, d_model=32, n_layers=1, max_seq_len=32)
    wrapper = GPTSteerLMModel(model, cfg_of(2, 2), backend="torch")
    batch = make_batch((2, 3))
    with pytest.raises(KeyError, match="ws"):
        wrapper.get_loss_and_metrics({k: x for k, x in batch.items() if k != "ws"}, False)
    bad = dict(batch, num_responses=torch.tensor([2, 2, 3, 3, 2]))
    with pytest.raises(ValueError, match="num_responses"):
        wrapper.get_loss_and_metrics(bad, False)


class HFStyle(nn.Module):
    """Returns an object with ``.logits``, as Hugging Face models do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.inner(input_ids, attention_mask, position_ids), past_key_values=None)


def test_model_returning_logits_attribute():
    groups = (3, 5, 2)
    model = HFStyle(TinyCausalLM(V, d_model=32, n_layers=1, max_seq_len=32, seed=14))
    check_against_reference(model, GPTSteerLMModel(model, cfg_of(3, 4)), make_batch(groups, seed=15), groups)


def tiny_llama():
    """A 2-layer LlamaForCausalLM of vocabulary V, float32, eval mode, seeded."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float().eval()


def test_llama_for_causal_lm():
    model = tiny_llama()
    groups = (3, 5, 2)
    batch = make_batch(groups, seed=16)
    check_against_reference(model, GPTSteerLMModel(model, cfg_of(4, 3), backend="torch"), batch, groups, 1e-3)


def test_tiny_lm_is_causal_and_deterministic():
    a, b = TinyCausalLM(V, seed=3), TinyCausalLM(V, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(TinyCausalLM(V, seed=4).lm_head.weight, a.lm_head.weight)
    x = torch.randint(0, V, (2, 10))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % V
    torch.testing.assert_close(a(x)[:, :6], a(y)[:, :6])
    # right padding changes nothing at real positions; a padding mask equals no mask there
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 7:] = 0
    torch.testing.assert_close(a(x, mask)[0, :7], a(x)[0, :7])
    torch.testing.assert_close(a(x, mask)[1], a(x)[1])
    assert torch.isfinite(a(x, torch.zeros_like(mask))).all()
    # left padding takes the masked path: real positions equal the unpadded run
    pad = 3
    xl = torch.cat([torch.zeros(2, pad, dtype=torch.long), x], dim=1)
    ml = torch.cat([torch.zeros(2, pad, dtype=torch.long), torch.ones(2, 10, dtype=torch.long)], dim=1)
    pl = (ml.cumsum(1) - 1).clamp(min=0)
    torch.testing.assert_close(a(xl, ml, pl)[:, pad:], a(x), rtol=1e-5, atol=1e-5)


def _dp_worker(rank: int, world: int, port: int) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        groups = [(3, 2), (1, 4, 2)]
        batches = [make_batch(g, seed=20 + r) for r, g in enumerate(groups)]
        model = TinyCausalLM(V, d_model=32, n_layers=1, max_seq_len=32, seed=21)
        local = [reference(model, b, g) for b, g in zip(batches, groups)]
        loss, metrics = GPTSteerLMModel(model, cfg_of(2, 3), backend="torch").get_loss_and_metrics(batches[rank], False)
        # distance and reported loss: averaged over the data-parallel ranks
        assert loss == pytest.approx((local[0][0] + local[1][0]) / 2, rel=1e-4, abs=1e-6)
        assert metrics["distance"] == pytest.approx((local[0][1] + local[1][1]) / 2, rel=1e-4)
        # gradients stay local (averaging them is DDP's / FSDP's job)
        for name, p in model.named_parameters():
            ref = local[rank][2][name]
            torch.testing.assert_close(p.grad, ref, rtol=2e-4, atol=2e-4 * ref.abs().max().item() + 1e-9)
    finally:
        dist.destroy_process_group()


def test_data_parallel_averaging():
    from tests.test_distributed import _spawn

    _spawn(_dp_worker, 2)


# ------------------------------------------------------------------------------------------------
# fused-linear path: the wrapped model returns hidden states, the wrapper applies the LM head
# ------------------------------------------------------------------------------------------------


class TinyTrunk(nn.Module):
    """TinyCausalLM without its LM head: returns the final hidden states ``[B, S, H]`` (causal
    path only: the batches of these tests are right-padded). Shares ``lm``'s parameters."""

    def __init__(self, lm: TinyCausalLM, as_object: bool = False) -> None:
        super().__init__()
        self.lm = lm
        self.as_object = as_object

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        b, s = input_ids.shape
        pos = torch.arange(s) if position_ids is None else position_ids
        x = self.lm.tok(input_ids) + self.lm.pos(pos).expand(b, s, -1)
        for block in self.lm.blocks:
            x = block(x, None)
        x = self.lm.ln_f(x)
        return SimpleNamespace(last_hidden_state=x) if self.as_object else x


def _spy_no_logits_ops(monkeypatch):
    """Fail if the logits-based ops run (the fused path must never form [B, S, V] logits)."""
    import steerlm_kernels.steerlm2.models.model as model_mod

    def tripwire(*args, **kwargs):
        raise AssertionError("the logits path ran on the fused-linear path")

    monkeypatch.setattr(model_mod, "sequence_nll", tripwire)
    monkeypatch.setattr(model_mod, "weighted_sequence_loss", tripwire)


@pytest.mark.parametrize("group_sizes", GROUPS, ids=lambda g: "groups" + "-".join(map(str, g)))
@pytest.mark.parametrize("fmbs,mbs", [(2, 3), (5, 2), (1, 4)], ids=str)
def test_fused_linear_path_matches_closed_form(monkeypatch, group_sizes, fmbs, mbs):
    _spy_no_logits_ops(monkeypatch)
    model = TinyCausalLM(V, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, seed=1)
    batch = make_batch(group_sizes, seed=fmbs * 10 + mbs + 100)
    wrapper = GPTSteerLMModel(TinyTrunk(model), cfg_of(fmbs, mbs), lm_head_weight=model.lm_head.weight,
                              backend="torch", chunk_size=7)
    check_against_reference(model, wrapper, batch, group_sizes)  # includes lm_head.weight's gradient


def test_fused_linear_equals_logits_path():
    """Same loss, distance and every parameter gradient as the logits path (float32 vs float32)."""
    groups = (3, 1, 4)
    batch = make_batch(groups, seed=30)
    results = []
    for fused in (False, True):
        model = TinyCausalLM(V, d_model=32, n_layers=1, max_seq_len=32, seed=31)
        wrapped = TinyTrunk(model) if fused else model
        head = {"lm_head_weight": model.lm_head.weight} if fused else {}
        loss, metrics = GPTSteerLMModel(wrapped, cfg_of(3, 5), backend="cpp", **head).get_loss_and_metrics(batch,
                                                                                                           False)
        results.append((loss, metrics["distance"], {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, d0, g0), (l1, d1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-5, abs=1e-7) and d1 == pytest.approx(d0, rel=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-4 * g0[name].abs().max().item() + 1e-10,
                                   msg=name)


@pytest.mark.parametrize("head", ["callable", "module", "object_output"])
def test_fused_linear_head_forms(head):
    """The head as a callable / an nn.Module (weight + bias), and hidden states in an output object."""
    groups = (2, 3)
    model = TinyCausalLM(V, d_model=32, n_layers=1, max_seq_len=32, seed=32)
    if head == "module":  # a biased head: TinyCausalLM's has no bias, so give it one for this test
        biased = nn.Linear(32, V)
        with torch.no_grad():
            biased.weight.copy_(model.lm_head.weight)
            biased.bias.normal_(0, 0.1)
        model.lm_head = biased
    kwargs = {
        "callable": {"lm_head_weight": lambda: model.lm_head.weight},
        "module": {"lm_head_weight": model.lm_head},
        "object_output": {"lm_head_weight": model.lm_head.weight},
    }[head]
    wrapper = GPTSteerLMModel(TinyTrunk(model, as_object=head == "object_output"), cfg_of(2, 2), backend="torch",
                              **kwargs)
    check_against_reference(model, wrapper, make_batch(groups, seed=33), groups)


def test_fused_linear_backends(backend, monkeypatch):
    _spy_no_logits_ops(monkeypatch)
    groups = (3, 5, 2)
    model = TinyCausalLM(V, d_model=32, n_layers=1, max_seq_len=32, seed=4)
    wrapper = GPTSteerLMModel(TinyTrunk(model), cfg_of(2, 3), lm_head_weight=model.lm_head.weight, backend=backend)
    check_against_reference(model, wrapper, make_batch(groups, seed=34), groups)


def test_fused_linear_forward_only():
    groups = (3, 2)
    model = TinyCausalLM(V, d_model=32, n_layers=1, max_seq_len=32, seed=35)
    batch = make_batch(groups, seed=36)
    ref_loss, ref_distance, _ = reference(model, batch, groups)
    wrapper = GPTSteerLMModel(TinyTrunk(model), cfg_of(2, 3), lm_head_weight=model.lm_head.weight, backend="torch")
    loss, metrics = wrapper.get_loss_and_metrics(batch, forward_only=True)
    assert all(p.grad is None for p in model.parameters())
    assert loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-6)
    assert metrics["distance"] == pytest.approx(ref_distance, rel=1e-4, abs=1e-6)
    assert wrapper(batch["tokens"]).shape == (5, S, 32)  # forward gives the hidden states


def test_fused_linear_llama_split_into_trunk_and_head():
    """Hugging Face: LlamaModel (returns .last_hidden_state) + the LlamaForCausalLM head's weight."""
    model = tiny_llama()
    groups = (3, 5, 2)
    batch = make_batch(groups, seed=37)
    wrapper = GPTSteerLMModel(model.model, cfg_of(4, 3), lm_head_weight=model.lm_head.weight, backend="torch")
    check_against_reference(model, wrapper, batch, groups, 1e-3)


@pytest.mark.parametrize("mbs", [2, 3, 8])
def test_compute_baselilne_weights_is_nemos(mbs):
    """NeMo's spelling returns NeMo's ``(distance, seq_length, gbs)`` and stores ``base_weight``,
    ``weight`` and ``avg_num_valid_tokens_in_ub`` in the batch (gpt_steerlm_model.py)."""
    groups = (3, 1, 4)
    model = TinyCausalLM(V, d_model=32, n_layers=1, max_seq_len=32, seed=10)
    batch = make_batch(groups, seed=11)
    _, ref_distance, _ = reference(model, batch, groups)
    with torch.no_grad():  # float64 weights: ws - softmax_group(-nll - log_q)
        logits = copy.deepcopy(model).double()(input_ids=batch["tokens"], attention_mask=batch["attention_mask"],
                                               position_ids=batch["position_ids"])
        logp = logits.log_softmax(-1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
        nll = -(logp * batch["loss_mask"].double()).sum(-1)
        x = -nll - batch["log(Q(y|a,x))"].double()
        ref_base = torch.cat([torch.softmax(t, 0) for t in x.split(list(groups))])
        ref_weight = batch["ws"].double() - ref_base
    wrapper = GPTSteerLMModel(model, cfg_of(3, mbs), backend="torch")
    rich = wrapper.compute_baseline_weights(batch)
    out = wrapper.compute_baselilne_weights(batch)
    assert isinstance(out, tuple) and len(out) == 3
    distance, seq_length, gbs = out
    b, s = batch["tokens"].shape
    assert (seq_length, gbs) == (s, b) and isinstance(seq_length, int) and isinstance(gbs, int)
    assert distance.shape == (1,) and distance.dtype == torch.float32
    assert distance.item() == pytest.approx(ref_distance, rel=1e-5)
    torch.testing.assert_close(batch["weight"], rich.weight)
    torch.testing.assert_close(batch["base_weight"], rich.baseline)
    torch.testing.assert_close(batch["weight"].double(), ref_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch["base_weight"].double(), ref_base, rtol=1e-5, atol=1e-6)
    # NeMo: mean loss-masked tokens of the item's group / (num_microbatches / num_groups)
    tokens = batch["loss_mask"].double().sum(-1)
    means = torch.cat([t.mean().repeat(len(t)) for t in tokens.split(list(groups))])
    m = -(-b // mbs)
    torch.testing.assert_close(batch["avg_num_valid_tokens_in_ub"].double(), means / (m / len(groups)))
    with pytest.raises(TypeError, match="mutable mapping"):
        wrapper.compute_baselilne_weights(MappingProxyType(dict(batch)))
