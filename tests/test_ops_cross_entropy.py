"""The backend contract of ``ce_forward`` / ``ce_backward`` (see steerlm_kernels/registry.py),
checked directly on each backend: poisoned outputs, rows that must not be read, vocabulary
shards (``vocab_start``), in place, and offsets beyond 2**31."""

from __future__ import annotations

import pytest
import torch

from steerlm_kernels import registry
from tests import reference as ref

IGNORE = -100


def _impl(backend: str):
    return registry.backend_kernels(backend)


def _float64_grad(logits: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor, vocab_start: int,
                  lse: torch.Tensor | None = None) -> torch.Tensor:
    """(softmax - onehot) * coef in float64 for a shard; ignored rows 0.

    ``lse``: the float32 log-sum-exp handed to the backward kernel, when given: its contract is
    ``exp(x - lse)``, so the expectation uses that value (its float32 rounding, up to half an ulp
    of |lse|, is an absolute error of the softmax that is the caller's, not the kernel's)."""
    x = logits.double()
    p = torch.softmax(x, dim=1) if lse is None else torch.exp(x - lse.double().cpu()[:, None])
    local = labels.long() - vocab_start
    hit = (local >= 0) & (local < x.shape[1]) & (labels != IGNORE)
    p[hit.nonzero().squeeze(1), local[hit]] -= 1.0
    c = torch.where(labels == IGNORE, 0.0, coef.double())
    return p * c.unsqueeze(1)


@pytest.mark.parametrize("v", [5, 1000, 8193])
def test_forward_contract(backend, dtype, device, v):
    n = 9
    logits = (torch.randn(n, v) * 4).to(dtype).to(device)
    labels = torch.randint(0, v, (n,), device=device)
    labels[[1, 4]] = IGNORE
    logits[4] = float("nan")  # an ignored row is never read
    lse, target = _impl(backend).ce_forward(logits, labels, 0, IGNORE)
    assert lse.dtype == target.dtype == torch.float32 and lse.shape == target.shape == (n,)
    x = logits.double().cpu()
    active = (labels != IGNORE).cpu()
    expected_lse = torch.where(active, torch.logsumexp(x.nan_to_num(), 1), 0.0)
    expected_target = torch.where(active, x.nan_to_num().gather(1, labels.cpu().clamp(min=0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(lse.double().cpu(), expected_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target.double().cpu(), expected_target, rtol=0, atol=0)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("v", [5, 1000, 8193])
def test_backward_contract_poisoned(backend, dtype, device, v, inplace):
    n = 7
    logits = (torch.randn(n, v) * 4).to(dtype).to(device)
    labels = torch.randint(0, v, (n,), device=device)
    labels[2] = IGNORE
    coef = torch.randn(n, device=device)
    coef[5] = 0.0  # a dead row (masked token): written as zeros
    x64 = logits.double().cpu()
    lse = torch.logsumexp(x64, 1).float().to(device)
    expected = _float64_grad(x64, labels.cpu(), coef.cpu(), 0, lse=lse)
    if inplace:
        out = logits.clone()
        logits_in = out
    else:
        out = torch.full_like(logits, float("nan"))  # every element must be written
        logits_in = logits
    _impl(backend).ce_backward(logits_in, labels, lse, coef, 0, IGNORE, out)
    assert not torch.isnan(out).any()
    assert (out[2] == 0).all() and (out[5] == 0).all()
    torch.testing.assert_close(out.double().cpu(), expected, **ref.grad_tolerances(dtype))


def test_dead_rows_are_not_read(backend, device):
    n, v = 4, 300
    logits = torch.randn(n, v, device=device)
    labels = torch.randint(0, v, (n,), device=device)
    logits[1] = float("nan")
    coef = torch.tensor([1.0, 0.0, 2.0, 1.0], device=device)
    lse = torch.logsumexp(logits, 1)
    out = torch.empty_like(logits)
    _impl(backend).ce_backward(logits, labels, lse, coef, 0, IGNORE, out)
    assert (out[1] == 0).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("shards", [2, 3])
def test_vocabulary_shards_combine_to_full_row(backend, device, shards):
    """Each shard's (lse, target) partials combine into the full row's, as under tensor parallelism."""
    n, v = 6, 301
    logits = torch.randn(n, v, device=device) * 3
    labels = torch.randint(0, v, (n,), device=device)
    labels[0] = IGNORE
    bounds = [round(i * v / shards) for i in range(shards + 1)]
    parts = [_impl(backend).ce_forward(logits[:, a:b], labels, a, IGNORE) for a, b in zip(bounds[:-1], bounds[1:])]
    lse = torch.logsumexp(torch.stack([p[0] for p in parts]), 0)
    target = torch.stack([p[1] for p in parts]).sum(0)
    nll = torch.where(labels == IGNORE, 0.0, lse - target)
    torch.testing.assert_close(nll.double().cpu(), ref.token_nll(logits.cpu(), labels.cpu()), rtol=1e-5, atol=1e-5)
    coef = torch.rand(n, device=device)
    grads = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out = torch.empty(n, b - a, device=device)
        _impl(backend).ce_backward(logits[:, a:b].contiguous(), labels, lse, coef, a, IGNORE, out)
        grads.append(out)
    expected = _float64_grad(logits.cpu(), labels.cpu(), coef.cpu(), 0, lse=lse)
    torch.testing.assert_close(torch.cat(grads, 1).double().cpu(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_offsets_beyond_2_31(backend, device):
    """Rows that start past element 2**31 of the storage are read and written correctly."""
    v = 96
    stride = 2**31 + 64  # row 1 starts past 2**31 elements (bf16: 4 GiB of address space)
    try:
        storage = torch.empty(stride + v, dtype=torch.bfloat16, device=device)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve 4 GiB")
    logits = storage.as_strided((2, v), (stride, 1))
    logits.copy_(torch.randn(2, v))
    labels = torch.tensor([3, 90], device=device)
    lse, target = _impl(backend).ce_forward(logits, labels, 0, IGNORE)
    dense = logits.clone()
    torch.testing.assert_close(lse - target, (torch.logsumexp(dense.float(), 1) - dense.float()[[0, 1], [3, 90]]),
                               rtol=1e-5, atol=1e-5)
    coef = torch.ones(2, device=device)
    _impl(backend).ce_backward(logits, labels, lse, coef, 0, IGNORE, logits)  # in place, both rows
    expected = _float64_grad(dense.cpu(), labels.cpu(), coef.cpu(), 0)
    torch.testing.assert_close(logits.double().cpu(), expected, **ref.grad_tolerances(torch.bfloat16))
