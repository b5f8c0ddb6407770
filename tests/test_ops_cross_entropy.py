"""The backend contract of ``ce_forward`` / ``ce_backward`` (see steerlm_kernels/registry.py),
checked directly on each backend against float64: the statistics relative to the row max (large
common offsets, rows of -inf, the max in a later tile), poisoned outputs, rows that must not be
read, vocabulary shards (``vocab_start``, -inf shards), in place, and offsets beyond 2**31."""

from __future__ import annotations

import pytest
import torch

from steerlm_kernels import registry
from steerlm_kernels.kernels.reference import merge_stats
from tests import reference as ref

IGNORE = -100


def _impl(backend: str):
    return registry.backend_kernels(backend)


def _float64_grad(logits: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor, vocab_start: int,
                  stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(softmax - onehot) * coef in float64 for a shard; ignored rows 0.

    ``stats``: the float32 ``(m, lse)`` handed to the backward kernel, when given: its contract is
    ``exp((x - m) - lse)``, so the expectation uses those values (the float32 rounding of ``lse``
    is an error of the caller's statistics, not of the kernel)."""
    x = logits.double()
    if stats is None:
        p = torch.softmax(x, dim=1)
    else:
        m, lse = (t.double().cpu()[:, None] for t in stats)
        p = torch.exp((x - m) - lse)
    local = labels.long() - vocab_start
    hit = (local >= 0) & (local < x.shape[1]) & (labels != IGNORE)
    p[hit.nonzero().squeeze(1), local[hit]] -= 1.0
    c = torch.where(labels == IGNORE, 0.0, coef.double())
    return p * c.unsqueeze(1)


def _float32_stats(x64: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, lse)`` of the contract from float64 math, rounded to float32."""
    m = x64.amax(1)
    m = torch.where(m == float("-inf"), 0.0, m)
    lse = torch.logsumexp(x64 - m[:, None], 1)
    return m.float().to(device), lse.float().to(device)


def _check_forward(backend, logits, labels, vocab_start=0, lse_tol=1e-5):
    """The contract of ce_forward against float64, on the rows of ``logits``."""
    m, lse, target = _impl(backend).ce_forward(logits, labels, vocab_start, IGNORE)
    n = logits.shape[0]
    assert m.dtype == lse.dtype == target.dtype == torch.float32 and m.shape == lse.shape == target.shape == (n,)
    x = logits.double().cpu()
    x = torch.where(x.isnan(), 0.0, x)  # ignored rows poisoned with NaN (never read)
    lab = labels.cpu().long()
    active = lab != IGNORE
    local = lab - vocab_start
    in_shard = active & (local >= 0) & (local < x.shape[1])
    row_max = x.amax(1)
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
    expected_lse = torch.logsumexp(x - row_max[:, None], 1)
    picked = x.gather(1, local.clamp(0, x.shape[1] - 1)[:, None])[:, 0]
    torch.testing.assert_close(m.double().cpu(), torch.where(active, row_max, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(lse.double().cpu(), torch.where(active, expected_lse, 0.0), rtol=lse_tol, atol=lse_tol)
    torch.testing.assert_close(target.double().cpu(), torch.where(in_shard, picked, 0.0), rtol=0, atol=0)
    return m, lse, target


@pytest.mark.parametrize("v", [5, 1000, 8193])
def test_forward_contract(backend, dtype, device, v):
    n = 9
    logits = (torch.randn(n, v) * 4).to(dtype).to(device)
    labels = torch.randint(0, v, (n,), device=device)
    labels[[1, 4]] = IGNORE
    logits[4] = float("nan")  # an ignored row is never read
    _check_forward(backend, logits, labels)


def test_forward_max_in_a_later_tile(backend, device):
    """The row max sits in the second (and third) 8192-wide tile, at several elements: the running
    sum of the earlier tiles must be rescaled when the max grows (forward), and the backward must
    use that max. Rows differ in where the large values are."""
    n, v = 3, 8192 * 2 + 300
    logits = torch.randn(n, v, device=device)
    logits[0, 8192:8192 + 40] += 6.0  # several elements of the second tile raise the max
    logits[1, 8192 * 2:] += 3.0  # the whole (short) last tile
    logits[2, ::997] += 9.0  # spread over every tile
    labels = torch.tensor([8200, 5, 8192 * 2 + 7], device=device)
    m, lse, _ = _check_forward(backend, logits, labels)
    coef = torch.tensor([1.0, -2.0, 0.5], device=device)
    out = torch.empty_like(logits)
    _impl(backend).ce_backward(logits, labels, m, lse, coef, 0, IGNORE, out)
    torch.testing.assert_close(out.double().cpu(), _float64_grad(logits.cpu(), labels.cpu(), coef.cpu(), 0),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("offset", [1e8, 1e6, -3e7])
def test_large_common_offset_keeps_precision(backend, device, offset):
    """nll = lse - (target - m) never adds lse to m: at offset 1e8 (float32 ulp 8) seven equal logits
    still give log 7, and random logits around 1e6 match float64 to float32 rounding of the
    differences (F.cross_entropy's own float32 error is the bound)."""
    logits = torch.full((2, 7), offset, device=device)
    logits[1, 3] += 2 * abs(offset) * 2**-23 * 4  # a few ulps above the rest
    labels = torch.tensor([2, 3], device=device)
    m, lse, target = _check_forward(backend, logits, labels)
    nll = (lse - (target - m)).double().cpu()
    torch.testing.assert_close(nll, ref.token_nll(logits.cpu(), labels.cpu()), rtol=1e-6, atol=1e-6)
    x = torch.randn(16, 1001, device=device) * 3 + offset
    y = torch.randint(0, 1001, (16,), device=device)
    m, lse, target = _impl(backend).ce_forward(x, y, 0, IGNORE)
    ours = (lse - (target - m)).double().cpu()
    truth = ref.token_nll(x.cpu(), y.cpu())
    theirs = torch.nn.functional.cross_entropy(x.cpu(), y.cpu(), reduction="none").double()
    assert (ours - truth).abs().max() <= max(float((theirs - truth).abs().max()), 1e-5)
    coef = torch.rand(16, device=device) + 0.5
    out = torch.empty_like(x)
    _impl(backend).ce_backward(x, y, m, lse, coef, 0, IGNORE, out)
    torch.testing.assert_close(out.double().cpu(), _float64_grad(x.cpu(), y.cpu(), coef.cpu(), 0),
                               rtol=1e-4, atol=1e-6)


def test_rows_of_minus_inf(backend, device):
    """A row of -inf only (a vocabulary shard that is all padding) has m = 0 and lse = -inf, so a
    combine weighs it as nothing; a single -inf column is an ordinary zero probability."""
    logits = torch.randn(3, 300, device=device) * 50 + 100
    logits[0] = float("-inf")
    logits[1, :150] = float("-inf")
    labels = torch.tensor([4, 200, 17], device=device)
    m, lse, _ = _check_forward(backend, logits, labels)
    assert m[0] == 0 and lse[0] == float("-inf")


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
    stats = _float32_stats(x64, device)
    expected = _float64_grad(x64, labels.cpu(), coef.cpu(), 0, stats=stats)
    if inplace:
        out = logits.clone()
        logits_in = out
    else:
        out = torch.full_like(logits, float("nan"))  # every element must be written
        logits_in = logits
    _impl(backend).ce_backward(logits_in, labels, *stats, coef, 0, IGNORE, out)
    assert not torch.isnan(out).any()
    assert (out[2] == 0).all() and (out[5] == 0).all()
    torch.testing.assert_close(out.double().cpu(), expected, **ref.grad_tolerances(dtype))


def test_dead_rows_are_not_read(backend, device):
    n, v = 4, 300
    logits = torch.randn(n, v, device=device)
    labels = torch.randint(0, v, (n,), device=device)
    logits[1] = float("nan")
    coef = torch.tensor([1.0, 0.0, 2.0, 1.0], device=device)
    stats = _float32_stats(logits.double().cpu(), device)
    out = torch.empty_like(logits)
    _impl(backend).ce_backward(logits, labels, *stats, coef, 0, IGNORE, out)
    assert (out[1] == 0).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("shards", [2, 3])
def test_vocabulary_shards_combine_to_full_row(backend, device, shards):
    """Each shard's (m, lse, target) partials combine (merge_stats) into the full row's, as under
    tensor parallelism, with logits around 100 and rows whose whole shard is -inf."""
    n, v = 6, 301
    logits = torch.randn(n, v, device=device) * 3 + 100
    labels = torch.randint(0, v, (n,), device=device)
    labels[0] = IGNORE
    bounds = [round(i * v / shards) for i in range(shards + 1)]
    logits[2, bounds[1]:bounds[2]] = float("-inf")  # row 2: its second shard is all padding
    logits[3, :bounds[1]] = float("-inf")  # row 3: its first shard
    labels[2], labels[3] = bounds[0], bounds[1]  # labels outside the -inf shards
    parts = [_impl(backend).ce_forward(logits[:, a:b], labels, a, IGNORE) for a, b in zip(bounds[:-1], bounds[1:])]
    m, lse = merge_stats(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    target = torch.stack([p[2] for p in parts]).sum(0)
    nll = torch.where(labels == IGNORE, 0.0, lse - (target - m))
    torch.testing.assert_close(nll.double().cpu(), ref.token_nll(logits.cpu(), labels.cpu()), rtol=1e-5, atol=1e-5)
    coef = torch.rand(n, device=device) + 0.5
    grads = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out = torch.empty(n, b - a, device=device)
        _impl(backend).ce_backward(logits[:, a:b].contiguous(), labels, m, lse, coef, a, IGNORE, out)
        grads.append(out)
    expected = _float64_grad(logits.cpu(), labels.cpu(), coef.cpu(), 0)
    torch.testing.assert_close(torch.cat(grads, 1).double().cpu(), expected, rtol=1e-5, atol=1e-6)


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
    m, lse, target = _impl(backend).ce_forward(logits, labels, 0, IGNORE)
    dense = logits.clone()
    expected = torch.logsumexp(dense.float(), 1) - dense.float()[[0, 1], [3, 90]]
    torch.testing.assert_close(lse - (target - m), expected, rtol=1e-5, atol=1e-5)
    coef = torch.ones(2, device=device)
    _impl(backend).ce_backward(logits, labels, m, lse, coef, 0, IGNORE, logits)  # in place, both rows
    expected = _float64_grad(dense.cpu(), labels.cpu(), coef.cpu(), 0)
    torch.testing.assert_close(logits.double().cpu(), expected, **ref.grad_tolerances(torch.bfloat16))
