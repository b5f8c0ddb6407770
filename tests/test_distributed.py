"""Vocabulary (tensor) and context parallelism across 2 and 4 CPU processes (gloo): every op's
values and gradients equal the single-process results, for every backend available here.

Workers are spawned processes; each builds the same full inputs from a fixed seed, computes the
single-process result itself, then its shard's result with the groups, and compares."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import steerlm_kernels as sk
from tests.conftest import ALL_BACKENDS, backend_usable

B, S, V_PER_RANK = 3, 8, 37


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker: Callable, world: int, *args) -> None:
    """Run ``worker(rank, world, port, *args)`` in ``world`` spawned processes; raise if any fails."""
    port = _free_port()
    mp.start_processes(_run_then_exit, args=(worker, world, port, *args), nprocs=world, start_method="spawn",
                       join=True)


def _run_then_exit(rank: int, worker: Callable, *args) -> None:
    """``worker(rank, *args)``; when it returns (its assertions held), leave with status 0 at once.

    Skipping the interpreter's finalisation is deliberate: with gloo, tearing down torch's
    distributed state at exit sometimes calls std::terminate ("terminate called without an active
    exception", SIGABRT, no Python frame on the stack): about one run in two after a timed-out
    collective, rarely otherwise (seen once in a loaded full-suite run). That is torch's teardown,
    not what these tests check. A worker that raises still fails the test (spawn reports it)."""
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init(rank: int, world: int, port: int, timeout_s: float = 60.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _inputs(v: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1234)
    logits = (torch.randn(B, S, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (B, S), generator=g)
    labels[0, 1] = -100
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    mask[2] = 0.0
    weight = torch.randn(B, generator=g)
    normalizer = torch.rand(B, generator=g) + 0.5
    return logits, labels, mask, weight, normalizer


def _all_ops(logits: torch.Tensor, labels, mask, weight, normalizer, backend: str, tp=None, cp=None):
    """Values of every op and the logits' gradient of the weighted loss (also in place)."""
    tok = sk.token_nll(logits, labels, process_group=tp, backend=backend)
    seq = sk.sequence_nll(logits, labels, mask, process_group=tp, cp_group=cp, backend=backend)
    x = logits.clone().requires_grad_()
    loss = sk.weighted_sequence_loss(x, labels, mask, weight, normalizer, process_group=tp, cp_group=cp,
                                     backend=backend)
    loss.backward()
    y = logits.clone().requires_grad_()
    sk.weighted_sequence_loss(y * 1, labels, mask, weight, normalizer, process_group=tp, cp_group=cp,
                              inplace_backward=True, backend=backend).backward()
    return tok, seq, loss.detach(), x.grad, y.grad


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def _tp_cp_worker(rank: int, world: int, port: int, backends: list[str]) -> None:
    _init(rank, world, port)
    tp_size = 2 if world == 4 else world
    cp_size = world // tp_size
    # rank = cp_index * tp_size + tp_index
    tp_index, cp_index = rank % tp_size, rank // tp_size
    tp_groups = [dist.new_group([c * tp_size + t for t in range(tp_size)]) for c in range(cp_size)]
    cp_groups = [dist.new_group([c * tp_size + t for c in range(cp_size)]) for t in range(tp_size)]
    tp, cp = tp_groups[cp_index], (cp_groups[tp_index] if cp_size > 1 else None)
    v = V_PER_RANK * tp_size
    for backend in backends:
        full = _inputs(v)
        logits, labels, mask, weight, normalizer = full
        ref = _all_ops(*full, backend)
        cols = slice(tp_index * V_PER_RANK, (tp_index + 1) * V_PER_RANK)
        # vocabulary parallel only
        got = _all_ops(logits[..., cols].contiguous(), labels, mask, weight, normalizer, backend, tp=tp)
        for name, a, b in zip(("token", "seq", "loss"), got[:3], ref[:3]):
            _close(a, b, f"{backend} tp {name}")
        _close(got[3], ref[3][..., cols], f"{backend} tp grad")
        _close(got[4], ref[4][..., cols], f"{backend} tp grad in place")
        if cp is None:
            continue
        # vocabulary x context parallel: this rank holds a slice of the sequence and of the vocabulary
        per = S // cp_size
        rows = slice(cp_index * per, (cp_index + 1) * per)
        shard = logits[:, rows, cols].contiguous()
        got = _all_ops(shard, labels[:, rows], mask[:, rows], weight, normalizer, backend, tp=tp, cp=cp)
        _close(got[0], ref[0][:, rows], f"{backend} tp x cp token")
        _close(got[1], ref[1], f"{backend} tp x cp seq")
        _close(got[2], ref[2], f"{backend} tp x cp loss")
        _close(got[3], ref[3][:, rows, cols], f"{backend} tp x cp grad")
    dist.destroy_process_group()


def _cp_packed_worker(rank: int, world: int, port: int, backends: list[str]) -> None:
    """Context parallel with packed sequences: each rank holds a piece of every sequence."""
    _init(rank, world, port)
    lengths = torch.tensor([4 * world, 2 * world, 0, 3 * world])  # divisible by world: equal slices
    for backend in backends:
        g = torch.Generator().manual_seed(99)
        t, v = int(lengths.sum()), 29
        logits = torch.randn(t, v, generator=g)
        labels = torch.randint(0, v, (t,), generator=g)
        mask = (torch.rand(t, generator=g) > 0.2).float()
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        cu[1:] = lengths.cumsum(0)
        ref = sk.sequence_nll(logits, labels, mask, cu_seqlens=cu, backend=backend)
        # rank r takes the r-th slice of every sequence
        pieces = [torch.arange(a, b).chunk(world)[rank] if b > a else torch.arange(0) for a, b in
                  zip(cu[:-1].tolist(), cu[1:].tolist())]
        idx = torch.cat(pieces)
        local_cu = torch.zeros_like(cu)
        local_cu[1:] = torch.tensor([len(p) for p in pieces]).cumsum(0)
        x = logits[idx].clone().requires_grad_()
        got = sk.sequence_nll(x, labels[idx], mask[idx], cu_seqlens=local_cu, cp_group=dist.group.WORLD,
                              backend=backend)
        _close(got, ref, f"{backend} cp packed")
        got.sum().backward()
        xr = logits.clone().requires_grad_()
        sk.sequence_nll(xr, labels, mask, cu_seqlens=cu, backend=backend).sum().backward()
        _close(x.grad, xr.grad[idx], f"{backend} cp packed grad")
    dist.destroy_process_group()


def _megatron_parity_worker(rank: int, world: int, port: int, backends: list[str]) -> None:
    _init(rank, world, port)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy as megatron_ce

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    g = torch.Generator().manual_seed(7)
    v = V_PER_RANK * world
    logits = torch.randn(S, B, v, generator=g) * 2
    target = torch.randint(0, v, (S, B), generator=g)
    cols = slice(rank * V_PER_RANK, (rank + 1) * V_PER_RANK)
    theirs_x = logits[..., cols].clone().requires_grad_()
    theirs = megatron_ce(theirs_x, target)
    theirs.sum().backward()
    for backend in backends:
        ours_x = logits[..., cols].clone().requires_grad_()
        ours = sk.megatron.vocab_parallel_cross_entropy(ours_x, target, backend=backend)
        _close(ours, theirs.float(), f"{backend} vs megatron loss")
        ours.sum().backward()
        _close(ours_x.grad, theirs_x.grad, f"{backend} vs megatron grad")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _failing_rank_worker(rank: int, world: int, port: int, backends: list[str]) -> None:
    """Rank 1 passes a bad label: it raises IndexError at once, before any collective; rank 0
    raises when the group's timeout expires instead of hanging. (Rank 1 stays alive past that
    timeout so that rank 0 sees the timeout, not a closed connection.)"""
    timeout_s = 2.0
    _init(rank, world, port, timeout_s=timeout_s)
    logits, labels, _, _, _ = _inputs(V_PER_RANK * world)
    if rank == 1:
        labels[1, 1] = 10**6
    cols = slice(rank * V_PER_RANK, (rank + 1) * V_PER_RANK)
    start = time.monotonic()
    try:
        sk.token_nll(logits[..., cols].contiguous(), labels, process_group=dist.group.WORLD, backend="torch")
    except IndexError:
        assert rank == 1
        time.sleep(5 * timeout_s + 2.0)
        return
    except RuntimeError:  # the collective timed out: bounded, no hang
        elapsed = time.monotonic() - start
        print(f"rank 0 raised after {elapsed:.1f} s", flush=True)
        assert rank == 0 and elapsed < 5 * timeout_s, elapsed
        return
    raise AssertionError("expected an error on every rank")


def _usable_backends() -> list[str]:
    return [b for b in ALL_BACKENDS if backend_usable(b, torch.device("cpu"))[0]]


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_and_context_parallel_match_single_process(world):
    _spawn(_tp_cp_worker, world, _usable_backends())


def test_context_parallel_packed_sequences():
    _spawn(_cp_packed_worker, 2, _usable_backends())


def test_parity_with_megatron_core():
    pytest.importorskip("megatron.core.tensor_parallel.cross_entropy")
    _spawn(_megatron_parity_worker, 2, _usable_backends())


def test_a_failing_rank_does_not_hang_the_others():
    _spawn(_failing_rank_worker, 2, [])


def test_single_process_megatron_signature():
    logits = torch.randn(S, B, 50)
    target = torch.randint(0, 50, (S, B))
    out = sk.megatron.vocab_parallel_cross_entropy(logits, target, backend="torch")
    assert out.shape == (S, B) and out.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 50), target.view(-1), reduction="none").view(S, B)
    torch.testing.assert_close(out, expected)
    with pytest.raises(NotImplementedError, match="label_smoothing"):
        sk.megatron.vocab_parallel_cross_entropy(logits, target, label_smoothing=0.1)


if os.environ.get("STEERLM_TEST_DEVICE", "cpu") != "cpu":  # gloo on CPU tensors only
    pytestmark = pytest.mark.skip(reason="distributed tests run on CPU (gloo)")
