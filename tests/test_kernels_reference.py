"""kernels.reference: the ``torch`` backend's chunk loop (``CHUNK_ELEMENTS`` logits per chunk) covers
every row: with the chunk shrunk to a few rows, several full chunks and a partial last one are checked
forward and backward against the float64 reference (no test otherwise crosses a chunk boundary:
4,096 rows at V = 1,024)."""

from __future__ import annotations

import pytest
import torch

import steerlm_kernels as sk
from steerlm_kernels.kernels import reference as kref
from tests import reference as ref

V = 37


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 4])
def test_ce_primitives_cover_every_row_of_every_chunk(monkeypatch, rows_per_chunk) -> None:
    monkeypatch.setattr(kref, "CHUNK_ELEMENTS", rows_per_chunk * V)
    n = 3 * rows_per_chunk + 2  # three full chunks and a partial last one (2 rows; 1 row for a chunk of 1)
    sizes = [s.stop - s.start for s in kref._row_chunks(n, V)]
    assert len(sizes) >= 4 and sum(sizes) == n  # several chunks; the last one partial when rows_per_chunk > 2
    logits = torch.randn(n, V) * 3
    labels = torch.randint(0, V, (n,))
    labels[1] = -100
    m, lse, target = kref.ce_forward(logits, labels, 0, -100)
    nll = m + lse - target
    want = ref.token_nll(logits, labels)
    torch.testing.assert_close(nll.double(), want, rtol=1e-5, atol=1e-5)
    assert bool((m != 0).sum() >= n - 1)  # every active row, the last of each chunk included, was written
    coef = torch.rand(n) + 0.5
    out = torch.full_like(logits, float("nan"))  # a row the loop skips stays NaN
    kref.ce_backward(logits, labels, m, lse, coef, 0, -100, out)
    x = logits.double().requires_grad_()
    (ref.token_nll(x, labels) * coef.double()).sum().backward()
    torch.testing.assert_close(out.double(), x.grad, rtol=1e-5, atol=1e-6)


def test_torch_backend_crosses_chunk_boundaries(monkeypatch) -> None:
    monkeypatch.setattr(kref, "CHUNK_ELEMENTS", 4 * V)
    n = 4 * 5 + 3
    logits = (torch.randn(n, V) * 2).requires_grad_()
    labels = torch.randint(0, V, (n,))
    labels[[4, 7]] = -100
    loss = sk.cross_entropy(logits, labels, reduction="none", backend="torch")
    x = logits.detach().double().requires_grad_()
    want = ref.token_nll(x, labels)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    w = torch.rand(n)
    (loss * w).sum().backward()
    (want * w.double()).sum().backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())
    torch.testing.assert_close(logits.grad.double(), x.grad, rtol=1e-5, atol=1e-6)
