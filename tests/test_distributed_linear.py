"""Fused linear losses under vocabulary (tensor) and context parallelism, 2 and 4 CPU processes (gloo).

Each worker builds the same full inputs from a fixed seed, computes the single-process result
itself, then its shard's result with the groups, and compares:

* values (per-sequence NLL, weighted loss; also without grad) equal the single-process ones on
  every rank;
* ``grad_hidden`` is a partial under vocabulary parallelism: its SUM over the tensor-parallel group
  equals the single-process gradient of this rank's tokens;
* ``lm_head_weight`` / ``bias`` gradients: the SUM over the context-parallel group equals this
  rank's vocabulary shard of the single-process gradient;
* the gradient w.r.t. the per-sequence ``weight`` equals the single-process one on every rank.

Layouts run in one spawn per world size (spawning costs seconds): world 2 = TP 2 and CP 2;
world 4 = TP 2 x CP 2, TP 4 and CP 4. Backends: all available here (Triton under the interpreter,
float32).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import steerlm_kernels as sk
from tests.test_distributed import _init, _spawn, _usable_backends

B, S, H, V_PER_RANK = 3, 8, 16, 37
IGNORE = -100


def _inputs(v: int):
    g = torch.Generator().manual_seed(4321)
    hidden = torch.randn(B, S, H, generator=g)
    weight = torch.randn(v, H, generator=g) * (2.0 / H**0.5)
    bias = torch.randn(v, generator=g) * 0.5
    labels = torch.randint(0, v, (B, S), generator=g)
    labels[0, 1] = IGNORE
    mask = (torch.rand(B, S, generator=g) > 0.3).float() * (0.5 + torch.rand(B, S, generator=g))
    mask[2, : S // 2] = 0.0
    seq_weight = torch.randn(B, generator=g)
    seq_weight[1] = 0.0
    normalizer = torch.rand(B, generator=g) + 0.5
    normalizer[1] = 0.0  # allowed where the weight is 0
    upstream = torch.randn(B, generator=g)
    return hidden, weight, bias, labels, mask, seq_weight, normalizer, upstream


def _run(hidden, weight, bias, labels, mask, seq_weight, normalizer, upstream, backend, tp=None, cp=None, cu=None):
    """Values and gradients of both fused losses (and their no-grad values)."""
    opts = {"process_group": tp, "cp_group": cp, "backend": backend, "chunk_size": 5, "cu_seqlens": cu}
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    seq = sk.linear_sequence_nll(h, w, labels, mask, bias=b, **opts)
    (seq * upstream).sum().backward()
    h2, w2, b2, sw = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias, seq_weight))
    loss = sk.linear_weighted_sequence_loss(h2, w2, labels, mask, sw, normalizer, bias=b2, **opts)
    loss.backward()
    with torch.no_grad():
        seq_ng = sk.linear_sequence_nll(hidden, weight, labels, mask, bias=bias, **opts)
        loss_ng = sk.linear_weighted_sequence_loss(hidden, weight, labels, mask, seq_weight, normalizer, bias=bias,
                                                   **opts)
    return {
        "seq": seq.detach(), "seq_grad_h": h.grad, "seq_grad_w": w.grad, "seq_grad_b": b.grad,
        "loss": loss.detach(), "loss_grad_h": h2.grad, "loss_grad_w": w2.grad, "loss_grad_b": b2.grad,
        "loss_grad_weight": sw.grad, "seq_no_grad": seq_ng, "loss_no_grad": loss_ng,
    }


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


def _summed(x: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return x
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


def _groups(rank: int, world: int, tp_size: int):
    """(tp group, cp group, tp index, cp index) with rank = cp_index * tp_size + tp_index; every rank
    creates every group (new_group is collective)."""
    cp_size = world // tp_size
    tp_groups = [dist.new_group([c * tp_size + t for t in range(tp_size)]) for c in range(cp_size)]
    cp_groups = [dist.new_group([c * tp_size + t for c in range(cp_size)]) for t in range(tp_size)]
    tp_index, cp_index = rank % tp_size, rank // tp_size
    tp = tp_groups[cp_index] if tp_size > 1 else None
    cp = cp_groups[tp_index] if cp_size > 1 else None
    return tp, cp, tp_index, cp_index


def _check_layout(rank: int, world: int, tp_size: int, backends: list[str]) -> None:
    tp, cp, tp_index, cp_index = _groups(rank, world, tp_size)
    cp_size = world // tp_size
    v = V_PER_RANK * tp_size
    cols = slice(tp_index * V_PER_RANK, (tp_index + 1) * V_PER_RANK)
    per = S // cp_size
    rows = slice(cp_index * per, (cp_index + 1) * per)
    hidden, weight, bias, labels, mask, seq_weight, normalizer, upstream = _inputs(v)
    for entry in backends:
        backend, _, strategy = entry.partition("-")  # "triton-tiles": the Triton tile kernels
        os.environ[sk.registry.LINEAR_ENV_VAR] = strategy or "chunks"
        tag = f"{entry} tp={tp_size} cp={cp_size}"
        ref = _run(hidden, weight, bias, labels, mask, seq_weight, normalizer, upstream, backend)
        got = _run(hidden[:, rows], weight[cols], bias[cols], labels[:, rows], mask[:, rows], seq_weight, normalizer,
                   upstream, backend, tp=tp, cp=cp)
        for key in ("seq", "loss", "seq_no_grad", "loss_no_grad", "loss_grad_weight"):
            _close(got[key], ref[key], f"{tag} {key}")
        for kind in ("seq", "loss"):
            _close(_summed(got[f"{kind}_grad_h"], tp), ref[f"{kind}_grad_h"][:, rows], f"{tag} {kind} sum_tp grad_h")
            _close(_summed(got[f"{kind}_grad_w"], cp), ref[f"{kind}_grad_w"][cols], f"{tag} {kind} sum_cp grad_w")
            _close(_summed(got[f"{kind}_grad_b"], cp), ref[f"{kind}_grad_b"][cols], f"{tag} {kind} sum_cp grad_b")
        if cp is None or tp is not None:
            continue
        # context parallel, packed: rank r holds the r-th slice of every sequence (lengths divisible by cp)
        lengths = [2 * cp_size, 0, 3 * cp_size]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        t = int(cu[-1])
        flat = [x.reshape(-1, *x.shape[2:])[:t] for x in (hidden, labels, mask)]
        ref = _run(flat[0], weight, bias, flat[1], flat[2], seq_weight, normalizer, upstream, backend, cu=cu)
        pieces = [torch.arange(a, e).chunk(cp_size)[cp_index] if e > a else torch.arange(0)
                  for a, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
        idx = torch.cat(pieces)
        local_cu = torch.tensor([0, *torch.tensor([len(p) for p in pieces]).cumsum(0).tolist()])
        got = _run(flat[0][idx], weight, bias, flat[1][idx], flat[2][idx], seq_weight, normalizer, upstream,
                   backend, cp=cp, cu=local_cu)
        for key in ("seq", "loss", "seq_no_grad", "loss_no_grad", "loss_grad_weight"):
            _close(got[key], ref[key], f"{tag} packed {key}")
        for kind in ("seq", "loss"):
            _close(got[f"{kind}_grad_h"], ref[f"{kind}_grad_h"][idx], f"{tag} packed {kind} grad_h")
            _close(_summed(got[f"{kind}_grad_w"], cp), ref[f"{kind}_grad_w"], f"{tag} packed {kind} grad_w")


def _worker(rank: int, world: int, port: int, backends: list[str]) -> None:
    _init(rank, world, port)
    try:
        for tp_size in ([2, 1] if world == 2 else [2, 4, 1]):
            _check_layout(rank, world, tp_size, backends)
    finally:
        dist.destroy_process_group()


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.mark.parametrize("world", [2, 4])
def test_fused_linear_vocab_and_context_parallel_match_single_process(world):
    backends = _usable_backends()
    _spawn(_worker, world, backends + (["triton-tiles"] if "triton" in backends else []))


if os.environ.get("STEERLM_TEST_DEVICE", "cpu") != "cpu":  # gloo on CPU tensors only
    pytestmark = pytest.mark.skip(reason="distributed tests run on CPU (gloo)")
