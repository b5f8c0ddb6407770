"""Vocabulary / context parallelism against float64 (not only against our single process), and
shapes that differ across ranks, with 2 CPU processes (gloo).

* logits around 100 (a combine without the max shift overflows), rows whose whole vocabulary shard
  is -inf on one rank (a vocabulary padded to a multiple of the TP size and masked), non-unit
  per-sequence upstream gradients: values and gradients of the logits-in and the fused-linear
  losses equal float64 math on the full row, on every rank, every backend available here;
* different batch sizes under ``cp_group`` and different row counts under ``process_group``: every
  rank raises ``ValueError`` naming the argument, well within the group's timeout, no abort.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import steerlm_kernels as sk
from tests import reference as ref
from tests.test_distributed import _init, _spawn, _usable_backends

B, S, V_PER_RANK, H = 2, 4, 23, 8
IGNORE = -100


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    assert not torch.isnan(a).any(), f"{what}: NaN"
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _large_logits_with_inf_shards(world: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(2024)
    v = V_PER_RANK * world
    logits = torch.randn(B, S, v, generator=g) * 3 + 100
    labels = torch.randint(0, V_PER_RANK, (B, S), generator=g)  # in rank 0's shard ...
    labels[1] += V_PER_RANK  # ... or rank 1's
    logits[0, 3, V_PER_RANK:2 * V_PER_RANK] = float("-inf")  # row (0, 3): rank 1's shard is all padding
    logits[1, 1, :V_PER_RANK] = float("-inf")  # row (1, 1): rank 0's shard
    labels[0, 2] = IGNORE
    mask = torch.tensor([[1.0, 0.5, 1.0, 1.0], [1.0, 1.0, 0.0, 2.0]])
    weight = torch.tensor([0.75, -1.5])
    normalizer = torch.tensor([3.0, 2.5])
    upstream = torch.tensor([1.7, -0.6])  # per-sequence upstream gradient of sequence_nll
    return logits, labels, mask, weight, normalizer, upstream


def _f64_grad(fn, x: torch.Tensor) -> torch.Tensor:
    x64 = x.detach().double().requires_grad_()
    fn(x64).backward()
    return x64.grad


def _large_logits_worker(rank: int, world: int, port: int, backends: list[str]) -> None:
    _init(rank, world, port)
    group = dist.group.WORLD
    logits, labels, mask, weight, normalizer, upstream = _large_logits_with_inf_shards(world)
    cols = slice(rank * V_PER_RANK, (rank + 1) * V_PER_RANK)
    want_tok = ref.token_nll(logits, labels)
    want_seq = ref.sequence_nll(logits, labels, mask)
    want_loss = ref.weighted_sequence_loss(logits, labels, mask, weight, normalizer)
    want_seq_grad = _f64_grad(lambda x: (ref.sequence_nll(x, labels, mask) * upstream.double()).sum(), logits)
    want_loss_grad = _f64_grad(lambda x: 0.3 * ref.weighted_sequence_loss(x, labels, mask, weight, normalizer), logits)
    assert torch.isfinite(want_tok).all()
    for backend in backends:
        tag = f"{backend} rank {rank}"
        shard = logits[..., cols].contiguous()
        _close(sk.token_nll(shard, labels, process_group=group, backend=backend), want_tok, f"{tag} tp token")
        for inplace in (False, True):
            x = shard.clone().requires_grad_()
            seq = sk.sequence_nll(x * 1, labels, mask, process_group=group, inplace_backward=inplace, backend=backend)
            _close(seq, want_seq, f"{tag} tp seq")
            (seq * upstream).sum().backward()
            _close(x.grad, want_seq_grad[..., cols], f"{tag} tp seq grad (inplace={inplace})")
            y = shard.clone().requires_grad_()
            loss = sk.weighted_sequence_loss(y * 1, labels, mask, weight, normalizer, process_group=group,
                                             inplace_backward=inplace, backend=backend)
            _close(loss, want_loss, f"{tag} tp loss")
            (0.3 * loss).backward()
            _close(y.grad, want_loss_grad[..., cols], f"{tag} tp loss grad (inplace={inplace})")
        # context parallel: this rank holds half of every sequence (the full vocabulary)
        rows = slice(rank * (S // world), (rank + 1) * (S // world))
        x = logits[:, rows].clone().requires_grad_()
        seq = sk.sequence_nll(x, labels[:, rows], mask[:, rows], cp_group=group, backend=backend)
        _close(seq, want_seq, f"{tag} cp seq")
        (seq * upstream).sum().backward()
        _close(x.grad, want_seq_grad[:, rows], f"{tag} cp seq grad")
        y = logits[:, rows].clone().requires_grad_()
        loss = sk.weighted_sequence_loss(y, labels[:, rows], mask[:, rows], weight, normalizer, cp_group=group,
                                         backend=backend)
        _close(loss, want_loss, f"{tag} cp loss")
        (0.3 * loss).backward()
        _close(y.grad, want_loss_grad[:, rows], f"{tag} cp loss grad")
        _check_linear(rank, world, group, backend)
    dist.destroy_process_group()


def _check_linear(rank: int, world: int, group, backend: str) -> None:
    """Fused linear under TP (a -inf bias masks the padded columns of rank 1's shard, logits
    around 100) and CP, with non-unit upstream gradients, against float64."""
    g = torch.Generator().manual_seed(77)
    v = V_PER_RANK * world
    hidden = torch.randn(B, S, H, generator=g)
    w = torch.randn(v, H, generator=g) * 0.5
    bias = torch.randn(v, generator=g) + 100
    bias[-5:] = float("-inf")  # padding of the vocabulary to a multiple of the TP size
    labels = torch.randint(0, v - 5, (B, S), generator=g)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.5, 1.0, 1.0, 1.0]])
    weight, normalizer, upstream = torch.tensor([1.25, -0.5]), torch.tensor([2.0, 4.0]), torch.tensor([-0.7, 2.1])

    def f64(fn):
        h, ww, bb = (t.double().requires_grad_() for t in (hidden, w, bias))
        out = fn(h @ ww.T + bb)
        out.backward()
        return out.detach(), h.grad, ww.grad, bb.grad

    seq_ref = f64(lambda x: (ref.sequence_nll(x, labels, mask) * upstream.double()).sum())
    loss_ref = f64(lambda x: 0.3 * ref.weighted_sequence_loss(x, labels, mask, weight, normalizer))
    cols = slice(rank * V_PER_RANK, (rank + 1) * V_PER_RANK)
    tag = f"{backend} rank {rank} linear"
    for kind, want in (("seq", seq_ref), ("loss", loss_ref)):
        h, ww, bb = (t.clone().requires_grad_() for t in (hidden, w[cols], bias[cols]))
        if kind == "seq":
            out = (sk.linear_sequence_nll(h, ww, labels, mask, bias=bb, process_group=group, chunk_size=3,
                                          backend=backend) * upstream).sum()
        else:
            out = 0.3 * sk.linear_weighted_sequence_loss(h, ww, labels, mask, weight, normalizer, bias=bb,
                                                         process_group=group, chunk_size=3, backend=backend)
        out.backward()
        _close(out.detach(), want[0], f"{tag} tp {kind}", atol=1e-4)
        gh = h.grad.clone()
        dist.all_reduce(gh, group=group)  # grad_hidden is this rank's partial under TP
        _close(gh, want[1], f"{tag} tp {kind} grad_hidden", atol=1e-4)
        _close(ww.grad, want[2][cols], f"{tag} tp {kind} grad_w", atol=1e-4)
        _close(bb.grad, want[3][cols], f"{tag} tp {kind} grad_b", atol=1e-4)
    rows = slice(rank * (S // world), (rank + 1) * (S // world))
    h = hidden[:, rows].clone().requires_grad_()
    out = 0.3 * sk.linear_weighted_sequence_loss(h, w, labels[:, rows], mask[:, rows], weight, normalizer,
                                                 bias=bias, cp_group=group, backend=backend)
    out.backward()
    _close(out.detach(), loss_ref[0], f"{tag} cp loss", atol=1e-4)
    _close(h.grad, loss_ref[1][:, rows], f"{tag} cp grad_hidden", atol=1e-4)


def _mismatched_calls(rank: int, group, backend: str) -> dict:
    """Calls whose shapes differ between the ranks, by the argument their error must name."""
    v, b = 11, 3 + rank
    logits, labels = torch.randn(b, 2, v), torch.randint(0, v, (b, 2))
    return {
        "cp_group": lambda: sk.sequence_nll(logits, labels, cp_group=group, backend=backend),
        "cp_group weighted": lambda: sk.weighted_sequence_loss(
            logits.requires_grad_(), labels, None, torch.ones(b), 1.0, cp_group=group, backend=backend),
        "process_group": lambda: sk.token_nll(logits, labels, process_group=group, backend=backend),
        "process_group linear": lambda: sk.linear_sequence_nll(
            torch.randn(b, 2, 4), torch.randn(v, 4), labels, process_group=group, backend=backend),
        "process_group width": lambda: sk.token_nll(  # same rows, shards of different widths
            torch.randn(3, 2, v + rank), torch.randint(0, v, (3, 2)), process_group=group, backend=backend),
    }


def _mismatch_worker(rank: int, world: int, port: int, backends: list[str]) -> None:
    """Rank 0 passes 3 sequences / 6 rows, rank 1 passes 4 / 8: every rank raises the named
    ValueError (a mismatched collective would abort the process (gloo) or corrupt rank 0's sums
    silently; a hang would end in the group's timeout as a RuntimeError, which fails the test)."""
    timeout_s = 20.0
    _init(rank, world, port, timeout_s=timeout_s)
    group = dist.group.WORLD
    for backend in backends:
        for what, call in _mismatched_calls(rank, group, backend).items():
            with pytest.raises(ValueError, match=what.split()[0]):
                call()
        # the group is still usable afterwards: a consistent call succeeds on every rank
        same = torch.randn(3, 2, 11)
        sk.sequence_nll(same, torch.zeros(3, 2, dtype=torch.long), cp_group=group, backend=backend)
    dist.destroy_process_group()


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_tp_cp_large_logits_inf_shards_upstream_against_float64():
    _spawn(_large_logits_worker, 2, _usable_backends())


def test_mismatched_shapes_fail_on_every_rank_with_a_named_error():
    _spawn(_mismatch_worker, 2, _usable_backends())


if os.environ.get("STEERLM_TEST_DEVICE", "cpu") != "cpu":  # gloo on CPU tensors only
    pytestmark = pytest.mark.skip(reason="distributed tests run on CPU (gloo)")
