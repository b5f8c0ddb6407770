"""GPTSteerLMModel under context and tensor (vocabulary) parallelism, 2 CPU processes (gloo).

The model is a per-token toy LM (embedding + position embedding + tanh MLP + LM head, no
attention), so that a rank holding half of every sequence computes exactly the full model's
logits for its tokens (a real model needs ring attention for that, which is the model's job, not
the wrapper's). Every worker computes the float64 closed-form objective of
tests/test_steerlm2_model.py on the full batch and full model itself, then runs the wrapper on its part:

* context parallel (``cp_group``): rank r holds the r-th half of every sequence; the loss and
  distance equal the single-process ones on every rank, and the SUM over ranks of every parameter
  gradient equals the single-process gradient (each rank back-propagates its own tokens);
* tensor parallel (``process_group``): rank r holds the r-th vocabulary shard of the LM head (the
  logits path: the model returns its logits shard; the fused path: ``lm_head_weight`` is the
  shard); the trunk's gradients summed over ranks and the head shard's own gradients equal the
  single-process ones.

Both the logits path and the fused-linear path, unequal groups, two micro-batch splits, every
backend available here; one spawn for everything (spawning costs seconds).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from steerlm_kernels.steerlm2.models.model import GPTSteerLMModel
from tests.test_distributed import _init, _spawn, _usable_backends
from tests.test_steerlm2_model import cfg_of, make_batch, reference

V, S, H = 48, 14, 16
GROUPS = (3, 1, 2)
SPLITS = [(2, 3), (6, 1)]
PER_TOKEN_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


class Trunk(nn.Module):
    """Per-token hidden states ``[B, S, H]``: no mixing across positions."""

    def __init__(self, vocab: int, hidden: int, max_pos: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_pos, hidden)
        self.fc = nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        pos = torch.arange(input_ids.shape[1]) if position_ids is None else position_ids
        return torch.tanh(self.fc(self.tok(input_ids) + self.pos(pos)))


class ToyLM(nn.Module):
    """Trunk + LM head (full ``[V, H]``, or one rank's vocabulary shard): returns (shard) logits."""

    def __init__(self, trunk: Trunk, head: nn.Linear) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.head(self.trunk(input_ids, attention_mask, position_ids))


def _full_model() -> ToyLM:
    torch.manual_seed(5)
    model = ToyLM(Trunk(V, H), nn.Linear(H, V))
    with torch.no_grad():
        model.head.weight.mul_(4.0)  # logits of a few nats of spread
        model.head.bias.normal_(0.0, 0.5)
    return model


def _summed_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in module.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        out[name] = g
    return out


def _check(tag: str, loss: float, metrics: dict, ref, grads: dict[str, torch.Tensor], ref_grads: dict) -> None:
    ref_loss, ref_distance, _ = ref
    assert loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-6), tag
    assert metrics["distance"] == pytest.approx(ref_distance, rel=1e-4, abs=1e-6), tag
    for name, g in grads.items():
        r = ref_grads[name]
        torch.testing.assert_close(g, r, rtol=2e-4, atol=2e-4 * r.abs().max().item() + 1e-9,
                                   msg=lambda m, name=name: f"{tag} {name}: {m}")


def _worker(rank: int, world: int, port: int, backends: list[str]) -> None:
    _init(rank, world, port)
    group = dist.group.WORLD
    try:
        full = _full_model()
        half = S // world
        rows = slice(rank * half, (rank + 1) * half)
        v_local = V // world
        cols = slice(rank * v_local, (rank + 1) * v_local)
        for fmbs, mbs in SPLITS:
            batch = make_batch(GROUPS, seed=40 + fmbs, seq_len=S, vocab=V)
            ref = reference(full, batch, GROUPS)
            ref_grads = ref[2]
            local = {k: (x[:, rows].contiguous() if k in PER_TOKEN_KEYS else x) for k, x in batch.items()}
            for backend in backends:
                for fused in (False, True):
                    tag = f"{backend} {'fused' if fused else 'logits'} ({fmbs}, {mbs})"
                    # context parallel: each rank holds half of every sequence
                    model = copy.deepcopy(full)
                    if fused:
                        wrapper = GPTSteerLMModel(model.trunk, cfg_of(fmbs, mbs), lm_head_weight=model.head,
                                                  cp_group=group, backend=backend, chunk_size=5)
                    else:
                        wrapper = GPTSteerLMModel(model, cfg_of(fmbs, mbs), cp_group=group, backend=backend)
                    loss, metrics = wrapper.get_loss_and_metrics(local, forward_only=False)
                    _check(f"cp {tag}", loss, metrics, ref, _summed_grads(model), ref_grads)
                    # tensor parallel: each rank holds one vocabulary shard of the LM head
                    trunk = copy.deepcopy(full.trunk)
                    head = nn.Linear(H, v_local)
                    with torch.no_grad():
                        head.weight.copy_(full.head.weight[cols])
                        head.bias.copy_(full.head.bias[cols])
                    if fused:
                        wrapper = GPTSteerLMModel(trunk, cfg_of(fmbs, mbs), lm_head_weight=head.weight,
                                                  lm_head_bias=head.bias, process_group=group, backend=backend)
                    else:
                        wrapper = GPTSteerLMModel(ToyLM(trunk, head), cfg_of(fmbs, mbs), process_group=group,
                                                  backend=backend)
                    loss, metrics = wrapper.get_loss_and_metrics(batch, forward_only=False)
                    grads = {f"trunk.{n}": g for n, g in _summed_grads(trunk).items()}
                    grads |= {"head.weight": head.weight.grad, "head.bias": head.bias.grad}
                    tp_ref = dict(ref_grads, **{"head.weight": ref_grads["head.weight"][cols],
                                                "head.bias": ref_grads["head.bias"][cols]})
                    _check(f"tp {tag}", loss, metrics, ref, grads, tp_ref)
    finally:
        dist.destroy_process_group()


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_steerlm_model_context_and_tensor_parallel_match_single_process():
    _spawn(_worker, 2, _usable_backends())


if os.environ.get("STEERLM_TEST_DEVICE", "cpu") != "cpu":  # gloo on CPU tensors only
    pytestmark = pytest.mark.skip(reason="distributed tests run on CPU (gloo)")
