"""``torch.compile(fullgraph=True)`` traces the public functions without graph breaks, and the
compiled results (values and gradients) equal the eager ones."""

from __future__ import annotations

import pytest
import torch

import steerlm_kernels as sk
from tests import reference as ref


def _inputs(device):
    logits = torch.randn(3, 7, 64, device=device)
    labels = torch.randint(0, 64, (3, 7), device=device)
    labels[0, 2] = -100
    mask = (torch.rand(3, 7, device=device) > 0.3).float()
    return logits, labels, mask


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_weighted_loss_compiles_fullgraph(backend, device, compiler):
    if compiler == "inductor" and backend == "triton" and device.type == "cpu":
        pytest.skip("inductor's CPU codegen of the interpreted-Triton path adds nothing over aot_eager")
    torch._dynamo.reset()
    logits, labels, mask = _inputs(device)
    weight, normalizer = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5

    @torch.compile(fullgraph=True, backend=compiler)
    def step(x):
        loss = sk.weighted_sequence_loss(x, labels, mask, weight, normalizer, backend=backend)
        seq = sk.sequence_nll(x, labels, mask, backend=backend)
        tok = sk.token_nll(x, labels, backend=backend)
        return loss, seq, tok

    x = logits.clone().requires_grad_()
    loss, seq, tok = step(x)
    loss.backward()
    xd = logits.double().requires_grad_()
    expected = ref.weighted_sequence_loss(xd, labels, mask, weight, normalizer)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(seq.double(), ref.sequence_nll(logits, labels, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tok.double(), ref.token_nll(logits, labels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-7)


def test_packed_sequence_nll_compiles_fullgraph(backend, device):
    torch._dynamo.reset()
    logits, labels, mask = _inputs(device)
    cu = torch.tensor([0, 5, 5, 21], device=device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return sk.sequence_nll(x, labels.view(-1), mask.view(-1), cu_seqlens=cu, backend=backend)

    x = logits.view(21, 64).clone().requires_grad_()
    out = f(x)
    out.sum().backward()
    expected = ref.sequence_nll(logits.view(21, 64), labels.view(-1), mask.view(-1), cu_seqlens=cu)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    xd = logits.view(21, 64).double().requires_grad_()
    ref.sequence_nll(xd, labels.view(-1), mask.view(-1), cu_seqlens=cu).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-7)


def test_inplace_backward_compiles_fullgraph(backend, device):
    torch._dynamo.reset()
    logits, labels, mask = _inputs(device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return sk.sequence_nll(x * 1, labels, mask, inplace_backward=True, backend=backend).sum()

    x = logits.clone().requires_grad_()
    f(x).backward()
    xd = logits.double().requires_grad_()
    ref.sequence_nll(xd, labels, mask).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-7)
