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
