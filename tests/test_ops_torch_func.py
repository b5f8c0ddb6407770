"""``torch.func`` transforms over the losses (issue 19 item 4): ``grad`` / ``vjp`` / ``jacrev`` and
``vmap`` of ``grad`` give the eager autograd gradients, on every backend here, for both families
(logits-in: dense, packed, in place, with a logit transform; fused linear); forward mode (``jvp``,
``torch.autograd.forward_ad``) raises PyTorch's clear ``NotImplementedError`` instead of a
silently zero tangent."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import grad, jacrev, jvp, vjp, vmap

import steerlm_kernels as sk

B, S, V, H = 2, 5, 23, 8


@pytest.fixture(autouse=True)
def _quiet_batching_fallback():
    # vmap runs the custom ops through PyTorch's per-example batching fallback, which warns
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        yield


def _eager_grad(f, *xs):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    f(*leaves).backward()
    return [x.grad for x in leaves]


def _case(device):
    logits = torch.randn(B, S, V, device=device) * 3
    labels = torch.randint(0, V, (B, S), device=device)
    labels[0, 1] = -100
    mask = (torch.rand(B, S, device=device) > 0.3).float()
    return logits, labels, mask


@pytest.mark.parametrize("kind", ["token", "sequence", "packed", "weighted", "weighted_inplace", "softcap"])
def test_grad_equals_eager(backend, device, kind):
    logits, labels, mask = _case(device)
    weight, normalizer = torch.tensor([0.7, -1.2], device=device), 3.0
    cu = torch.tensor([0, 4, B * S], device=device)
    fns = {
        "token": lambda x: (sk.token_nll(x, labels, backend=backend) * torch.arange(S, device=device)).sum(),
        "sequence": lambda x: sk.sequence_nll(x, labels, mask, backend=backend).sum(),
        "packed": lambda x: (sk.sequence_nll(x.view(B * S, V), labels.view(-1), mask.view(-1), cu_seqlens=cu,
                                             backend=backend) * torch.tensor([1.0, -2.0], device=device)).sum(),
        "weighted": lambda x: sk.weighted_sequence_loss(x, labels, mask, weight, normalizer, backend=backend),
        "weighted_inplace": lambda x: sk.weighted_sequence_loss(x * 1, labels, mask, weight, normalizer,
                                                                inplace_backward=True, backend=backend),
        "softcap": lambda x: sk.weighted_sequence_loss(x, labels, mask, weight, normalizer, softcap=4.0,
                                                       logit_scale=1.5, backend=backend),
    }
    f = fns[kind]
    (expected,) = _eager_grad(f, logits)
    got = grad(f)(logits)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert got.abs().max() > 0  # a real gradient, not a vacuous zero
    out, pullback = vjp(f, logits)
    torch.testing.assert_close(pullback(torch.ones_like(out))[0], expected, rtol=1e-6, atol=1e-7)


def test_vmap_of_grad_equals_a_loop(backend, device):
    logits, labels, mask = _case(device)
    batch = torch.stack([logits, logits * 0.5 + 1, -logits])

    def f(x):
        return sk.weighted_sequence_loss(x, labels, mask, torch.tensor([1.0, 0.5], device=device), 2.0,
                                         inplace_backward=True, backend=backend)

    got = vmap(grad(f))(batch)
    expected = torch.stack([_eager_grad(f, x)[0] for x in batch])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_jacrev_of_token_nll(backend, device):
    logits, labels, _ = _case(device)
    x = logits[0, :3]
    jac = jacrev(lambda t: sk.token_nll(t, labels[0, :3], backend=backend))(x)  # [3, 3, V]
    expected = torch.stack([_eager_grad(lambda t, i=i: sk.token_nll(t, labels[0, :3], backend=backend)[i], x)[0]
                            for i in range(3)])
    torch.testing.assert_close(jac, expected, rtol=1e-6, atol=1e-7)


def test_grad_of_fused_linear(backend, device):
    logits, labels, mask = _case(device)
    hidden = torch.randn(B, S, H, device=device)
    weight = torch.randn(V, H, device=device) * 0.5
    bias = torch.randn(V, device=device) * 0.1

    def seq(h, w, b):
        return (sk.linear_sequence_nll(h, w, labels, mask, bias=b, softcap=6.0, backend=backend)
                * torch.tensor([1.0, -0.5], device=device)).sum()

    def weighted(h, w, b):
        return sk.linear_weighted_sequence_loss(h, w, labels, mask, torch.tensor([0.3, 1.1], device=device), 2.0,
                                                bias=b, backend=backend)

    for f in (seq, weighted):
        expected = _eager_grad(f, hidden, weight, bias)
        got = grad(f, argnums=(0, 1, 2))(hidden, weight, bias)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_forward_mode_raises_instead_of_a_zero_tangent(device):
    logits, labels, mask = _case(device)
    tangent = torch.randn_like(logits)
    with pytest.raises(NotImplementedError, match="jvp"):
        jvp(lambda x: sk.token_nll(x, labels, backend="torch"), (logits,), (tangent,))
    with pytest.raises(NotImplementedError, match="jvp"):
        jvp(lambda x: sk.sequence_nll(x, labels, mask, backend="torch"), (logits,), (tangent,))
    hidden, w = torch.randn(B, S, H, device=device), torch.randn(V, H, device=device)
    with pytest.raises(NotImplementedError, match="jvp"):
        jvp(lambda h: sk.linear_sequence_nll(h, w, labels, backend="torch"), (hidden,), (torch.randn_like(hidden),))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="jvp"):
        sk.token_nll(fwAD.make_dual(logits, tangent), labels, backend="torch")
