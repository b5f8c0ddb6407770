"""The nn.Module forms give the functional results and carry their options."""

from __future__ import annotations

import torch

import steerlm_kernels as sk
from tests import reference as ref


def test_modules_match_functions(backend, device):
    logits = torch.randn(3, 6, 50, device=device)
    labels = torch.randint(0, 50, (3, 6), device=device)
    labels[0, 0] = 4
    mask = (torch.rand(3, 6, device=device) > 0.2).float()
    weight, normalizer = torch.randn(3, device=device), torch.rand(3, device=device) + 1

    tok = sk.nn.TokenNLL(ignore_index=4, backend=backend)(logits, labels)
    torch.testing.assert_close(tok.double().cpu(), ref.token_nll(logits, labels, 4).cpu(), rtol=1e-5, atol=1e-5)
    seq = sk.nn.SequenceNLL(backend=backend)(logits, labels, mask)
    torch.testing.assert_close(seq.double().cpu(), ref.sequence_nll(logits, labels, mask).cpu(), rtol=1e-5, atol=1e-5)

    module = sk.nn.WeightedSequenceLoss(inplace_backward=True, backend=backend)
    assert "inplace_backward=True" in repr(module)
    x = logits.clone().requires_grad_()
    loss = module(x * 1, labels, mask, weight, normalizer)
    loss.backward()
    expected = ref.weighted_sequence_loss(logits, labels, mask, weight, normalizer)
    torch.testing.assert_close(loss.double().cpu(), expected.cpu(), rtol=1e-5, atol=1e-4)
    xd = logits.double().requires_grad_()
    ref.weighted_sequence_loss(xd, labels, mask, weight, normalizer).backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-7)


def test_linear_modules_match_float64(backend, device):
    """The fused-linear modules against float64 math on ``hidden @ W.T + bias`` (values and the
    gradients of hidden, W and bias), not only against our own functions."""
    g = torch.Generator().manual_seed(5)
    hidden, w, bias = torch.randn(2, 5, 8, generator=g), torch.randn(40, 8, generator=g), torch.randn(40, generator=g)
    labels = torch.randint(0, 40, (2, 5), generator=g)
    labels[0, 1] = -100
    mask = (torch.rand(2, 5, generator=g) > 0.3).float()
    weight, normalizer = torch.tensor([0.8, -1.2]), torch.tensor([2.0, 3.0])
    modules = {
        "seq": (sk.nn.LinearSequenceNLL(backend=backend, chunk_size=3),
                lambda m, *a: (m(*a[:4], bias=a[4]) * torch.tensor([1.5, -0.5], dtype=a[0].dtype)).sum(),
                lambda x: (ref.sequence_nll(x, labels, mask) * torch.tensor([1.5, -0.5], dtype=x.dtype)).sum()),
        "weighted": (sk.nn.LinearWeightedSequenceLoss(backend=backend),
                     lambda m, *a: m(*a[:4], weight.to(device), normalizer.to(device), bias=a[4]),
                     lambda x: ref.weighted_sequence_loss(x, labels, mask, weight, normalizer)),
    }
    for name, (module, ours, theirs) in modules.items():
        leaves = [t.clone().to(device).requires_grad_() for t in (hidden, w, bias)]
        out = ours(module, leaves[0], leaves[1], labels.to(device), mask.to(device), leaves[2])
        out.backward()
        leaves64 = [t.double().requires_grad_() for t in (hidden, w, bias)]
        want = theirs(leaves64[0] @ leaves64[1].T + leaves64[2])
        want.backward()
        torch.testing.assert_close(out.double().cpu(), want.detach(), rtol=1e-5, atol=1e-5, msg=name)
        for got, exp in zip(leaves, leaves64, strict=True):
            torch.testing.assert_close(got.grad.double().cpu(), exp.grad, rtol=1e-4, atol=1e-5, msg=name)
