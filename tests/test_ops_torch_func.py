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


# --------------------------------------------------------------------------------------------
# drop-in ops: sk.cross_entropy, sk.linear_cross_entropy, sk.linear_token_logprobs
# --------------------------------------------------------------------------------------------

N_TOK = B * S


def _autograd_grad(f, *xs):
    """``torch.autograd.grad`` of ``f`` at ``xs`` (ordinary autograd, fresh leaves)."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    return torch.autograd.grad(f(*leaves), leaves)


def _ce64(z: torch.Tensor, labels: torch.Tensor, reduction: str, label_smoothing: float, z_loss: float):
    """Float64 drop-in loss of logits ``z [N, V]``: ``(1-e)(lse - z_y) + e (lse - mean z) + z_loss lse^2``,
    0 at ignored tokens; mean over the non-ignored ones."""
    keep = labels != -100
    lse = torch.logsumexp(z, dim=1)
    z_y = z.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    tok = (1 - label_smoothing) * (lse - z_y) + label_smoothing * (lse - z.mean(dim=1)) + z_loss * lse * lse
    tok = torch.where(keep, tok, 0.0)
    return tok.sum() / keep.sum() if reduction == "mean" else tok


def _dropin_case(device):
    torch.manual_seed(0)
    labels = torch.randint(0, V, (N_TOK,), device=device)
    labels[[1, 7]] = -100
    hidden = torch.randn(N_TOK, H, device=device)
    weight = torch.randn(V, H, device=device) * 0.5
    bias = torch.randn(V, device=device) * 0.1
    return labels, hidden, weight, bias


OPTIONS = [("mean", 0.0, 0.0), ("mean", 0.1, 0.0), ("mean", 0.0, 1e-2), ("none", 0.1, 1e-2)]


@pytest.mark.parametrize(("reduction", "label_smoothing", "z_loss"), OPTIONS)
def test_grad_of_dropin_cross_entropy_equals_autograd_and_float64(backend, device, reduction, label_smoothing,
                                                                   z_loss):
    labels, hidden, weight, _ = _dropin_case(device)
    logits = (hidden @ weight.t()) * 3
    up = torch.linspace(-1.0, 2.0, N_TOK, device=device)  # a non-uniform upstream for reduction="none"

    def f(x):
        out = sk.cross_entropy(x, labels, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                               backend=backend)
        return out if reduction == "mean" else (out * up).sum()

    got = grad(f)(logits)
    (expected,) = _autograd_grad(f, logits)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    x64 = logits.double().requires_grad_()
    loss64 = _ce64(x64, labels, reduction, label_smoothing, z_loss)
    (ref,) = torch.autograd.grad(loss64 if reduction == "mean" else (loss64 * up.double()).sum(), x64)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert got[1].abs().max() == 0 and got.abs().max() > 0  # ignored row: no gradient; the rest: a real one


@pytest.mark.parametrize(("reduction", "label_smoothing", "z_loss"), OPTIONS)
def test_grad_of_dropin_linear_cross_entropy_equals_autograd_and_float64(backend, device, reduction,
                                                                          label_smoothing, z_loss):
    labels, hidden, weight, bias = _dropin_case(device)
    up = torch.linspace(-1.0, 2.0, N_TOK, device=device)

    def f(h, w, b):
        out = sk.linear_cross_entropy(h, w, labels, bias=b, reduction=reduction, label_smoothing=label_smoothing,
                                      z_loss=z_loss, backend=backend)
        return out if reduction == "mean" else (out * up).sum()

    got = grad(f, argnums=(0, 1, 2))(hidden, weight, bias)
    expected = _autograd_grad(f, hidden, weight, bias)
    xs64 = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    loss64 = _ce64(xs64[0] @ xs64[1].t() + xs64[2], labels, reduction, label_smoothing, z_loss)
    refs = torch.autograd.grad(loss64 if reduction == "mean" else (loss64 * up.double()).sum(), xs64)
    for g, e, r in zip(got, expected, refs, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)
        assert g.abs().max() > 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_grad_of_linear_token_logprobs_with_entropy_equals_autograd_and_float64(device, temperature):
    labels, hidden, weight, bias = _dropin_case(device)
    a, c = torch.linspace(-1.0, 1.0, N_TOK, device=device), torch.linspace(0.5, -0.3, N_TOK, device=device)

    def f(h, w, b):
        lp, ent = sk.linear_token_logprobs(h, w, labels, bias=b, temperature=temperature, return_entropy=True)
        return (lp * a + ent * c).sum()

    got = grad(f, argnums=(0, 1, 2))(hidden, weight, bias)
    expected = _autograd_grad(f, hidden, weight, bias)
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    u = (h64 @ w64.t() + b64) / temperature
    logp = torch.log_softmax(u, dim=1)
    keep = labels != -100
    lp64 = torch.where(keep, logp.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    ent64 = torch.where(keep, -(logp.exp() * logp).sum(dim=1), 0.0)
    refs = torch.autograd.grad((lp64 * a.double() + ent64 * c.double()).sum(), (h64, w64, b64))
    for g, e, r in zip(got, expected, refs, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)  # same kernels: (nearly) bit for bit
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)
        assert g.abs().max() > 0
    assert got[0][[1, 7]].abs().max() == 0  # ignored tokens: no gradient w.r.t. their hidden rows


def test_vmap_of_grad_of_dropin_losses_equals_a_loop(backend, device):
    labels, hidden, weight, _ = _dropin_case(device)
    logits = hidden @ weight.t()
    batch = torch.stack([logits, logits * 0.5 + 1, -logits])

    def ce(x):
        return sk.cross_entropy(x, labels, label_smoothing=0.1, z_loss=1e-2, backend=backend)

    def lin(h):
        return sk.linear_cross_entropy(h, weight, labels, label_smoothing=0.1, backend=backend)

    def logprobs(h):
        lp, ent = sk.linear_token_logprobs(h, weight, labels, return_entropy=True)
        return lp.sum() + 0.5 * ent.sum()

    for f, xs in ((ce, batch), (lin, torch.stack([hidden, hidden * 2, -hidden])),
                  (logprobs, torch.stack([hidden, -hidden]))):
        got = vmap(grad(f))(xs)
        expected = torch.stack([_autograd_grad(f, x)[0] for x in xs])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_forward_mode_of_dropin_ops_raises(device):
    labels, hidden, weight, _ = _dropin_case(device)
    logits = hidden @ weight.t()
    with pytest.raises(NotImplementedError, match="jvp"):
        jvp(lambda x: sk.cross_entropy(x, labels, backend="torch"), (logits,), (torch.randn_like(logits),))
    with pytest.raises(NotImplementedError, match="jvp"):
        jvp(lambda h: sk.linear_cross_entropy(h, weight, labels, backend="torch"), (hidden,),
            (torch.randn_like(hidden),))
    with pytest.raises(NotImplementedError, match="jvp"):
        jvp(lambda h: sk.linear_token_logprobs(h, weight, labels), (hidden,), (torch.randn_like(hidden),))
