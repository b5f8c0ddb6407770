"""The drop-in losses under vocabulary (tensor) parallelism, 2 CPU processes (gloo).

Each worker builds the full inputs from a fixed seed, computes the single-process result, then its
vocabulary shard's result with ``process_group``, and compares on every rank:

* ``linear_cross_entropy`` (label smoothing over the FULL vocabulary, z-loss, per-token weights,
  shift, ``num_items``, ``return_lse``) and ``cross_entropy``: values equal the single-process
  ones; the ``hidden`` gradient summed over the group equals the full one; ``weight`` / ``bias`` /
  logits gradients are this rank's shard of the full ones;
* ``linear_token_logprobs`` (temperature, softcap, entropy): the same checks;
* each call runs exactly ONE data collective (one all_gather), plus the 32-byte shape check (one
  all_reduce), counted by wrapping torch.distributed's functions.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import steerlm_kernels as sk
from tests.test_distributed import _init, _spawn, _usable_backends

B, S, H, V_PER_RANK = 2, 7, 12, 23
IGNORE = -100


def _inputs(v: int):
    g = torch.Generator().manual_seed(777)
    hidden = torch.randn(B, S, H, generator=g)
    weight = torch.randn(v, H, generator=g) * (2.0 / H**0.5)
    bias = torch.randn(v, generator=g) * 0.5
    target = torch.randint(0, v, (B, S), generator=g)
    target[0, 2] = IGNORE
    w_tok = torch.rand(B, S, generator=g) * 2
    up = torch.randn(B, S - 1, generator=g)
    return hidden, weight, bias, target, w_tok, up


class _Counter:
    """Counts torch.distributed collectives while active."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
             "reduce_scatter_tensor")

    def __enter__(self):
        self.calls: list[str] = []
        self.saved = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}
        for name, fn in self.saved.items():
            def wrapped(*args, _fn=fn, _name=name, **kwargs):
                self.calls.append(_name)
                return _fn(*args, **kwargs)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)

    @property
    def data_collectives(self) -> int:
        return sum(1 for c in self.calls if c != "all_reduce")


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


def _summed(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x


def _linear_ce(hidden, weight, bias, target, w_tok, up, backend, group=None):
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    opts = {"label_smoothing": 0.1, "z_loss": 1e-2, "weight_per_token": w_tok, "shift": True, "backend": backend,
            "process_group": group, "chunk_size": 4}
    per, lse = sk.linear_cross_entropy(h, w, target, b, reduction="none", return_lse=True, **opts)
    mean = sk.linear_cross_entropy(h, w, target, b, num_items=torch.tensor(9), **opts)
    ((per * up).sum() + mean + lse.sum()).backward()
    return per.detach(), lse.detach(), mean.detach(), h.grad, w.grad, b.grad


def _logits_ce(logits, target, up, backend, group=None):
    x = logits.clone().requires_grad_()
    per = sk.cross_entropy(x, target, reduction="none", label_smoothing=0.2, z_loss=1e-3, shift=True,
                           process_group=group, backend=backend)
    (per * up).sum().backward()
    return per.detach(), x.grad


def _logprobs(hidden, weight, bias, target, up, group=None):
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    labels = target.masked_fill(target == IGNORE, 0)
    labels[1, 3] = IGNORE
    lp, ent = sk.linear_token_logprobs(h, w, labels, bias=b, temperature=0.8, softcap=6.0, return_entropy=True,
                                       process_group=group, chunk_size=5)
    ((lp[:, 1:] * up).sum() + ent.sum()).backward()
    with torch.no_grad():
        lp_ng = sk.linear_token_logprobs(h, w, labels, bias=b, temperature=0.8, softcap=6.0, process_group=group,
                                         chunk_size=5)
    assert torch.equal(lp_ng, lp.detach())
    return lp.detach(), ent.detach(), h.grad, w.grad, b.grad


def _worker(rank: int, world: int, port: int, backends: list[str]) -> None:
    _init(rank, world, port)
    try:
        v = V_PER_RANK * world
        cols = slice(rank * V_PER_RANK, (rank + 1) * V_PER_RANK)
        hidden, weight, bias, target, w_tok, up = _inputs(v)
        for backend in backends:
            tag = f"{backend} tp={world}"
            full = _linear_ce(hidden, weight, bias, target, w_tok, up, backend)
            with _Counter() as count:
                got = _linear_ce(hidden, weight[cols], bias[cols], target, w_tok, up, backend, dist.group.WORLD)
            # two loss calls (none + mean): one data collective and one shape check each; none in backward
            assert count.data_collectives == 2 and count.calls.count("all_reduce") == 2, count.calls
            for name, a, b in zip(("per-token", "lse", "mean"), got[:3], full[:3]):
                _close(a, b, f"{tag} linear {name}")
            _close(_summed(got[3]), full[3], f"{tag} linear sum_tp grad_hidden")
            _close(got[4], full[4][cols], f"{tag} linear grad_weight shard")
            _close(got[5], full[5][cols], f"{tag} linear grad_bias shard")

            logits = hidden @ weight.T + bias
            full_l = _logits_ce(logits, target, up, backend)
            with _Counter() as count:
                got_l = _logits_ce(logits[..., cols].contiguous(), target, up, backend, dist.group.WORLD)
            assert count.data_collectives == 1, count.calls
            _close(got_l[0], full_l[0], f"{tag} logits per-token")
            _close(got_l[1], full_l[1][..., cols], f"{tag} logits grad shard")

        full_p = _logprobs(hidden, weight, bias, target, up)
        with _Counter() as count:
            got_p = _logprobs(hidden, weight[cols], bias[cols], target, up, dist.group.WORLD)
        assert count.data_collectives == 2, count.calls  # the training call and the no-grad call
        _close(got_p[0], full_p[0], "logprobs")
        _close(got_p[1], full_p[1], "entropy")
        _close(_summed(got_p[2]), full_p[2], "logprobs sum_tp grad_hidden")
        _close(got_p[3], full_p[3][cols], "logprobs grad_weight shard")
        _close(got_p[4], full_p[4][cols], "logprobs grad_bias shard")
    finally:
        dist.destroy_process_group()


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
if os.environ.get("STEERLM_TEST_DEVICE", "cpu") != "cpu":  # gloo on CPU tensors only
    pytestmark = pytest.mark.skip(reason="distributed tests run on CPU (gloo)")


def test_dropin_losses_vocab_parallel_match_single_process():
    _spawn(_worker, 2, _usable_backends())
