"""The logit transforms (``softcap`` / ``logit_scale``) under vocabulary (tensor) and context
parallelism, 2 CPU processes (gloo), every backend available here (Triton under the interpreter,
the fused-linear tile kernels too).

The transform is elementwise, so each vocabulary shard's statistics are those of its transformed
logits and merge as before; these tests check that every rank's values and gradients equal the
single-process ones WITH the transform (themselves checked against float64 here and in
test_ops_logit_transforms.py), and that the transform changed them (a transform dropped on the
way to a shard fails).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import steerlm_kernels as sk
from tests import reference as ref
from tests.test_distributed import _init, _spawn, _usable_backends
from tests.test_distributed_linear import _groups, _summed

B, S, H, V_PER_RANK = 3, 8, 16, 37
SOFTCAP, SCALE = 4.0, 1.5


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


def _logits_inputs(v: int):
    g = torch.Generator().manual_seed(99)
    logits = torch.randn(B, S, v, generator=g) * 5
    labels = torch.randint(0, v, (B, S), generator=g)
    labels[0, 1] = -100
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    weight = torch.randn(B, generator=g)
    normalizer = torch.rand(B, generator=g) + 0.5
    return logits, labels, mask, weight, normalizer


def _logits_ops(logits, labels, mask, weight, normalizer, backend, tp=None, cp=None, transform=True):
    kw = {"softcap": SOFTCAP, "logit_scale": SCALE} if transform else {}
    tok = sk.token_nll(logits, labels, process_group=tp, backend=backend, **kw) if cp is None else None
    seq = sk.sequence_nll(logits, labels, mask, process_group=tp, cp_group=cp, backend=backend, **kw)
    x = logits.clone().requires_grad_()
    loss = sk.weighted_sequence_loss(x, labels, mask, weight, normalizer, process_group=tp, cp_group=cp,
                                     backend=backend, **kw)
    loss.backward()
    y = logits.clone().requires_grad_()
    sk.weighted_sequence_loss(y * 1, labels, mask, weight, normalizer, process_group=tp, cp_group=cp,
                              inplace_backward=True, backend=backend, **kw).backward()
    return tok, seq, loss.detach(), x.grad, y.grad


def _linear_inputs(v: int):
    g = torch.Generator().manual_seed(77)
    hidden = torch.randn(B, S, H, generator=g) * 2
    w = torch.randn(v, H, generator=g) * (2.0 / H**0.5)
    bias = torch.randn(v, generator=g) * 0.5
    labels = torch.randint(0, v, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    weight = torch.randn(B, generator=g)
    normalizer = torch.rand(B, generator=g) + 0.5
    return hidden, w, bias, labels, mask, weight, normalizer


def _linear_ops(hidden, w, bias, labels, mask, weight, normalizer, backend, tp=None, cp=None):
    opts = {"process_group": tp, "cp_group": cp, "backend": backend, "chunk_size": 5, "softcap": SOFTCAP,
            "logit_scale": SCALE}
    h, ww, b = (t.detach().clone().requires_grad_() for t in (hidden, w, bias))
    seq = sk.linear_sequence_nll(h, ww, labels, mask, bias=b, **opts)
    seq.sum().backward()
    h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (hidden, w, bias))
    loss = sk.linear_weighted_sequence_loss(h2, w2, labels, mask, weight, normalizer, bias=b2, **opts)
    loss.backward()
    return {"seq": seq.detach(), "loss": loss.detach(), "seq_h": h.grad, "seq_w": ww.grad, "seq_b": b.grad,
            "loss_h": h2.grad, "loss_w": w2.grad, "loss_b": b2.grad}


def _check(rank: int, world: int, tp_size: int, backends: list[str]) -> None:
    tp, cp, tp_index, cp_index = _groups(rank, world, tp_size)
    cp_size = world // tp_size
    v = V_PER_RANK * tp_size
    cols = slice(tp_index * V_PER_RANK, (tp_index + 1) * V_PER_RANK)
    rows = slice(cp_index * (S // cp_size), (cp_index + 1) * (S // cp_size))
    for entry in backends:
        backend, _, strategy = entry.partition("-")
        os.environ[sk.registry.LINEAR_ENV_VAR] = strategy or "chunks"
        tag = f"{entry} tp={tp_size} cp={cp_size}"
        if not strategy:  # the logits-in ops (no strategy)
            logits, labels, mask, weight, normalizer = _logits_inputs(v)
            want = _logits_ops(logits, labels, mask, weight, normalizer, backend)
            expected = ref.sequence_nll(logits, labels, mask, softcap=SOFTCAP, logit_scale=SCALE)
            torch.testing.assert_close(want[1].double(), expected, rtol=1e-5, atol=1e-5)
            plain = _logits_ops(logits, labels, mask, weight, normalizer, backend, transform=False)
            assert (plain[1] - want[1]).abs().max() > 0.1, "the transform must change the result"
            got = _logits_ops(logits[:, rows, cols].contiguous(), labels[:, rows], mask[:, rows], weight, normalizer,
                              backend, tp=tp, cp=cp)
            if cp is None:
                _close(got[0], want[0][:, rows], f"{tag} token")
            _close(got[1], want[1], f"{tag} seq")
            _close(got[2], want[2], f"{tag} loss")
            _close(got[3], want[3][:, rows, cols], f"{tag} grad")
            _close(got[4], want[4][:, rows, cols], f"{tag} grad in place")
        hidden, w, bias, labels, mask, weight, normalizer = _linear_inputs(v)
        want = _linear_ops(hidden, w, bias, labels, mask, weight, normalizer, backend)
        got = _linear_ops(hidden[:, rows], w[cols], bias[cols], labels[:, rows], mask[:, rows], weight, normalizer,
                          backend, tp=tp, cp=cp)
        for key in ("seq", "loss"):
            _close(got[key], want[key], f"{tag} linear {key}")
            _close(_summed(got[f"{key}_h"], tp), want[f"{key}_h"][:, rows], f"{tag} linear {key} sum_tp grad_h")
            _close(_summed(got[f"{key}_w"], cp), want[f"{key}_w"][cols], f"{tag} linear {key} sum_cp grad_w")
            _close(_summed(got[f"{key}_b"], cp), want[f"{key}_b"][cols], f"{tag} linear {key} sum_cp grad_b")


def _worker(rank: int, world: int, port: int, backends: list[str]) -> None:
    _init(rank, world, port)
    try:
        for tp_size in (2, 1):  # vocabulary parallel; context parallel
            _check(rank, world, tp_size, backends)
    finally:
        dist.destroy_process_group()


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_transforms_under_vocab_and_context_parallel_match_single_process():
    backends = _usable_backends()
    _spawn(_worker, 2, backends + (["triton-tiles"] if "triton" in backends else []))
