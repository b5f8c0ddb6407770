"""The drop-in cross entropies ``sk.linear_cross_entropy`` / ``sk.cross_entropy`` against a float64
reference written from their documented formula (and against PyTorch's ``F.cross_entropy`` where
it has the option): every option and the combinations that matter, values and gradients, every
backend; reductions, ``num_items``, all-ignored batches, ``shift``, ``return_lse``; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import steerlm_kernels as sk
from tests.reference import grad_tolerances

IGNORE = -100


def ref_loss(z: torch.Tensor, y: torch.Tensor, *, eps=0.0, z_loss=0.0, w=None, reduction="mean", shift=False,
             softcap=None, scale=None, num_items=None, ignore_index=IGNORE, return_lse=False):
    """The documented per-token loss and reduction, float64, from the logits ``z [..., V]``."""
    z = z.double()
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if shift:
        z, y = z[..., :-1, :], y[..., 1:]
        w = None if w is None else w[..., 1:]
    lse = torch.logsumexp(z, -1)
    valid = y != ignore_index
    nll = lse - z.gather(-1, y.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    loss = (1 - eps) * nll + eps * (lse - z.mean(-1)) + z_loss * lse**2
    if w is not None:
        loss = loss * w.double()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        out = loss
    elif reduction == "sum":
        out = loss.sum()
    else:
        den = valid.sum() if num_items is None else torch.as_tensor(num_items, dtype=torch.float64)
        out = loss.sum() / (den if float(den) != 0 else 1.0)
    return (out, torch.where(valid, lse, torch.zeros_like(lse))) if return_lse else out


def _case(device, dtype=torch.float32, b=2, s=6, h=16, v=37, bias=True):
    hidden = torch.randn(b, s, h, device=device).to(dtype)
    weight = (torch.randn(v, h, device=device) * (2.0 / h**0.5)).to(dtype)
    bias_t = (torch.randn(v, device=device) * 0.5).to(dtype) if bias else None
    target = torch.randint(0, v, (b, s), device=device)
    target[0, 1] = IGNORE
    target[1, 3] = IGNORE
    w_tok = torch.rand(b, s, device=device) * 2
    return hidden, weight, bias_t, target, w_tok


# (label_smoothing, z_loss, per-token weights, reduction, shift)
COMBOS = {
    "plain_mean": (0.0, 0.0, False, "mean", False),
    "plain_none": (0.0, 0.0, False, "none", False),
    "sum_weights": (0.0, 0.0, True, "sum", False),
    "smoothing_mean": (0.1, 0.0, False, "mean", False),
    "zloss_none": (0.0, 1e-2, False, "none", False),
    "shift_none_weights": (0.0, 0.0, True, "none", True),
    "all_mean_shift": (0.2, 1e-3, True, "mean", True),
    "all_none": (0.3, 5e-2, True, "none", False),
}


def _grads(ts):
    return [None if t is None else t.grad for t in ts]


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_linear_cross_entropy_matches_float64(backend, device, combo):
    eps, zl, use_w, reduction, shift = COMBOS[combo]
    hidden, weight, bias, target, w_tok = _case(device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias, w_tok)]
    got = sk.linear_cross_entropy(leaves[0], leaves[1], target, leaves[2], label_smoothing=eps, z_loss=zl,
                                  weight_per_token=leaves[3] if use_w else None, reduction=reduction, shift=shift,
                                  backend=backend, chunk_size=5)
    refs = [t.detach().double().requires_grad_() for t in (hidden, weight, bias, w_tok)]
    want = ref_loss(refs[0] @ refs[1].T + refs[2], target, eps=eps, z_loss=zl, w=refs[3] if use_w else None,
                    reduction=reduction, shift=shift)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    up = torch.randn(want.shape, dtype=torch.float64, device=device)
    (got * up.float()).sum().backward()
    (want * up).sum().backward()
    for name, g, r in zip(("hidden", "weight", "bias", "weight_per_token"), _grads(leaves), _grads(refs)):
        if name == "weight_per_token" and not use_w:
            assert g is None
            continue
        assert g is not None and torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_cross_entropy_matches_float64(backend, device, combo):
    eps, zl, use_w, reduction, shift = COMBOS[combo]
    logits = torch.randn(2, 6, 37, device=device) * 3
    target = _case(device)[3]
    w_tok = torch.rand(2, 6, device=device).requires_grad_() if use_w else None
    x = logits.clone().requires_grad_()
    got = sk.cross_entropy(x, target, label_smoothing=eps, z_loss=zl, weight_per_token=w_tok, reduction=reduction,
                           shift=shift, backend=backend)
    xd = logits.double().requires_grad_()
    wd = None if w_tok is None else w_tok.detach().double().requires_grad_()
    want = ref_loss(xd, target, eps=eps, z_loss=zl, w=wd, reduction=reduction, shift=shift)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    up = torch.randn(want.shape, dtype=torch.float64, device=device)
    (got * up.float()).sum().backward()
    (want * up).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, **grad_tolerances(torch.float32, logits, 4.0))
    if use_w:
        torch.testing.assert_close(w_tok.grad.double(), wd.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(logits, x.detach())  # never modified


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_cross_entropy_equals_torch(backend, device, reduction, eps):
    """Same value and gradient as ``F.cross_entropy`` (ignore_index, label_smoothing, reductions)."""
    logits = torch.randn(13, 29, device=device) * 2
    target = torch.randint(0, 29, (13,), device=device)
    target[[2, 7]] = IGNORE
    x, xt = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = sk.cross_entropy(x, target, reduction=reduction, label_smoothing=eps, backend=backend)
    want = F.cross_entropy(xt, target, reduction=reduction, label_smoothing=eps, ignore_index=IGNORE)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    up = torch.randn(want.shape, device=device)
    (got * up).sum().backward()
    (want * up).sum().backward()
    torch.testing.assert_close(x.grad, xt.grad, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_equals_torch_functional(device):
    """``F.linear_cross_entropy`` (PyTorch >= 2.13) gives the same mean / none / sum."""
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("this torch has no F.linear_cross_entropy")
    hidden, weight, bias, target, _ = _case(device)
    hidden, target = hidden.view(-1, 16), target.view(-1)  # F.linear_cross_entropy takes [N, H]
    for reduction in ("mean", "sum", "none"):
        got = sk.linear_cross_entropy(hidden, weight, target, bias, reduction=reduction, label_smoothing=0.1)
        want = F.linear_cross_entropy(hidden, weight, target, linear_bias=bias, reduction=reduction,
                                      ignore_index=IGNORE, label_smoothing=0.1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2], ids=["fused", "recomputing"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_linear_cross_entropy_low_precision(backend, device, dtype, z_loss):
    hidden, weight, bias, target, w_tok = _case(device, dtype)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    got = sk.linear_cross_entropy(*leaves[:2], target, leaves[2], label_smoothing=0.1, z_loss=z_loss,
                                  weight_per_token=w_tok, reduction="sum", backend=backend, chunk_size=5)
    refs = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    want = ref_loss(refs[0] @ refs[1].T + refs[2], target, eps=0.1, z_loss=z_loss, w=w_tok, reduction="sum")
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-3, atol=2e-3)
    got.backward()
    want.backward()
    for g, r in zip(_grads(leaves), _grads(refs)):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r, rtol=3e-2, atol=3e-2 * float(r.abs().max()))


def test_mean_divides_by_count_or_num_items(device):
    hidden, weight, bias, target, _ = _case(device)
    per_token = sk.linear_cross_entropy(hidden, weight, target, bias, reduction="none")
    count = int((target != IGNORE).sum())
    mean = sk.linear_cross_entropy(hidden, weight, target, bias)
    torch.testing.assert_close(mean, per_token.sum() / count)
    for num in (7, 7.0, torch.tensor(7, device=device), torch.tensor([7.0], device=device)):
        got = sk.linear_cross_entropy(hidden, weight, target, bias, num_items=num)
        torch.testing.assert_close(got, per_token.sum() / 7)
    # gradient accumulation: two halves with the global count give the gradient of the whole mean
    h = hidden.clone().requires_grad_()
    sk.linear_cross_entropy(h, weight, target, bias).backward()
    h2 = hidden.clone().requires_grad_()
    for rows in (slice(0, 1), slice(1, 2)):
        sk.linear_cross_entropy(h2[rows], weight, target[rows], bias, num_items=torch.tensor(count)).backward()
    torch.testing.assert_close(h2.grad, h.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fn", ["linear", "logits"])
def test_all_ignored_mean_is_zero_not_nan(backend, device, fn):
    hidden, weight, bias, target, _ = _case(device)
    target = torch.full_like(target, IGNORE)
    h = hidden.clone().requires_grad_()
    x = (hidden @ weight.T).detach().requires_grad_()
    for num_items in (None, 0, torch.tensor(0, device=device)):
        if fn == "linear":
            loss = sk.linear_cross_entropy(h, weight, target, bias, num_items=num_items, label_smoothing=0.1,
                                           z_loss=1e-3, backend=backend)
        else:
            loss = sk.cross_entropy(x, target, num_items=num_items, label_smoothing=0.1, z_loss=1e-3,
                                    backend=backend)
        assert loss.item() == 0.0
        loss.backward()
    grad = h.grad if fn == "linear" else x.grad
    assert torch.equal(grad, torch.zeros_like(grad))


def test_return_lse_value_and_gradient(backend, device):
    hidden, weight, bias, target, _ = _case(device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, lse = sk.linear_cross_entropy(*leaves[:2], target, leaves[2], reduction="none", return_lse=True,
                                        shift=True, backend=backend)
    refs = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    want, want_lse = ref_loss(refs[0] @ refs[1].T + refs[2], target, reduction="none", shift=True, return_lse=True)
    assert lse.shape == loss.shape == (2, 5) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), want_lse.detach(), rtol=1e-5, atol=1e-5)
    (loss.sum() + (lse * lse).sum()).backward()
    (want.sum() + (want_lse * want_lse).sum()).backward()
    for g, r in zip(_grads(leaves), _grads(refs)):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)
    x = (hidden @ weight.T + bias).detach().requires_grad_()
    _, lse2 = sk.cross_entropy(x, target, return_lse=True, reduction="sum", backend=backend)
    torch.testing.assert_close(lse2.double(), torch.where(target != IGNORE, torch.logsumexp(x.double(), -1), 0.0)
                               .detach())


def test_shift_equals_presliced_inputs(device):
    """``shift=True`` equals slicing by hand (hidden[..., :-1, :], target[..., 1:])."""
    hidden, weight, bias, target, w_tok = _case(device)
    for reduction in ("none", "mean", "sum"):
        got = sk.linear_cross_entropy(hidden, weight, target, bias, shift=True, reduction=reduction,
                                      weight_per_token=w_tok)
        want = sk.linear_cross_entropy(hidden[:, :-1].contiguous(), weight, target[:, 1:].contiguous(), bias,
                                       reduction=reduction, weight_per_token=w_tok[:, 1:].contiguous())
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_flat_inputs_and_one_row(device):
    hidden, weight, bias, target, _ = _case(device)
    flat = sk.linear_cross_entropy(hidden.view(-1, 16), weight, target.view(-1), bias, reduction="none")
    torch.testing.assert_close(flat.view(2, 6), sk.linear_cross_entropy(hidden, weight, target, bias,
                                                                        reduction="none"))
    one = sk.linear_cross_entropy(hidden[0, :1], weight, target[0, :1], bias, shift=True, reduction="none")
    assert one.shape == (0,)


BAD = {
    "reduction": (ValueError, {"reduction": "avg"}),
    "label_smoothing": (ValueError, {"label_smoothing": 1.5}),
    "z_loss": (ValueError, {"z_loss": -1.0}),
    "softcap": (ValueError, {"softcap": 0.0}),
    "logit_scale": (TypeError, {"logit_scale": "2"}),
    "num_items": (ValueError, {"num_items": 3, "reduction": "sum"}),
    "shift": (TypeError, {"shift": 1}),
    "ignore_index": (TypeError, {"ignore_index": 1.0}),
    "weight_per_token": (ValueError, {"weight_per_token": torch.ones(3)}),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_options_name_the_argument(case):
    exc, kwargs = BAD[case]
    hidden, weight, bias, target, _ = _case("cpu")
    with pytest.raises(exc, match=case):
        sk.linear_cross_entropy(hidden, weight, target, bias, **kwargs)
    with pytest.raises(exc, match=case):
        sk.cross_entropy(hidden @ weight.T, target, **kwargs)


def test_bad_tensors_name_the_argument():
    hidden, weight, bias, target, _ = _case("cpu")
    with pytest.raises(ValueError, match="weight"):
        sk.linear_cross_entropy(hidden, weight[:, :5], target)
    with pytest.raises(TypeError, match="weight"):
        sk.linear_cross_entropy(hidden, weight.double(), target)
    with pytest.raises(ValueError, match="bias"):
        sk.linear_cross_entropy(hidden, weight, target, bias[:3])
    with pytest.raises(TypeError, match="target"):
        sk.linear_cross_entropy(hidden, weight, target.float())
    with pytest.raises(ValueError, match="target"):
        sk.cross_entropy(hidden @ weight.T, target[:, :2])
    with pytest.raises(IndexError):
        sk.linear_cross_entropy(hidden, weight, torch.full_like(target, 37))
    with pytest.raises(TypeError, match="hidden"):
        sk.linear_cross_entropy(hidden.long(), weight, target)


# --------------------------------------------------------------------------------------------
# logit transforms: softcap, logit_scale (z' = softcap * tanh(logit_scale * z / softcap))
# --------------------------------------------------------------------------------------------

# (softcap, logit_scale, label_smoothing, z_loss)
TRANSFORMS = {
    "softcap": (5.0, None, 0.0, 0.0),
    "scale_smoothing_zloss": (None, 0.5, 0.1, 1e-2),
    "softcap_scale_zloss": (3.0, 1.5, 0.0, 1e-2),
}


@pytest.mark.parametrize("case", sorted(TRANSFORMS))
def test_linear_cross_entropy_logit_transforms(backend, device, case):
    cap, scale, eps, zl = TRANSFORMS[case]
    hidden, weight, bias, target, w_tok = _case(device)
    weight = weight * 3
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, lse = sk.linear_cross_entropy(
        leaves[0], leaves[1], target, leaves[2], softcap=cap, logit_scale=scale, label_smoothing=eps, z_loss=zl,
        weight_per_token=w_tok, reduction="none", return_lse=True, backend=backend)
    refs = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    want, want_lse = ref_loss(refs[0] @ refs[1].T + refs[2], target, softcap=cap, scale=scale, eps=eps, z_loss=zl,
                              w=w_tok, reduction="none", return_lse=True)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse.detach(), rtol=1e-5, atol=1e-5)
    up = torch.randn(want.shape, dtype=torch.float64, device=device)
    ((loss * up.float()).sum() + lse.sum()).backward()
    ((want * up).sum() + want_lse.sum()).backward()
    for name, g, r in zip(("hidden", "weight", "bias"), leaves, refs):
        torch.testing.assert_close(g.grad.double(), r.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", [*sorted(TRANSFORMS), "softcap_smoothing"])
def test_cross_entropy_logit_transforms(backend, device, case):
    cap, scale, eps, zl = TRANSFORMS.get(case, (4.0, 1.3, 0.2, 1e-3))
    logits = torch.randn(2, 6, 37, device=device) * 4
    target = _case(device)[3]
    x = logits.clone().requires_grad_()
    got = sk.cross_entropy(x, target, softcap=cap, logit_scale=scale, label_smoothing=eps, z_loss=zl, reduction="sum",
                           shift=True, backend=backend)
    xd = logits.double().requires_grad_()
    want = ref_loss(xd, target, softcap=cap, scale=scale, eps=eps, z_loss=zl, reduction="sum", shift=True)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    got.backward()
    want.backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, **grad_tolerances(torch.float32, logits * 2, 1.0))


def test_linear_softcap_with_label_smoothing_is_refused():
    hidden, weight, bias, target, _ = _case("cpu")
    with pytest.raises(ValueError, match="label_smoothing with softcap"):
        sk.linear_cross_entropy(hidden, weight, target, softcap=30.0, label_smoothing=0.1)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_fused_forward_gradient_equals_recomputing_path(backend, device, eps):
    """``sum`` / ``mean`` without z-loss compute the gradient in the forward (three matmuls per
    chunk) and scale it by the upstream gradient; it equals the recomputing path's (``none``)."""
    hidden, weight, bias, target, w_tok = _case(device)
    a = [t.clone().requires_grad_() for t in (hidden, weight, bias, w_tok)]
    fused = sk.linear_cross_entropy(a[0], a[1], target, a[2], label_smoothing=eps, weight_per_token=a[3],
                                    backend=backend, chunk_size=4)
    (0.37 * fused).backward()
    b = [t.clone().requires_grad_() for t in (hidden, weight, bias, w_tok)]
    per = sk.linear_cross_entropy(b[0], b[1], target, b[2], label_smoothing=eps, weight_per_token=b[3],
                                  reduction="none", backend=backend, chunk_size=4)
    recomputed = per.sum() / (target != IGNORE).sum()
    (0.37 * recomputed).backward()
    torch.testing.assert_close(fused, recomputed, rtol=1e-6, atol=1e-6)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # no gradient wanted: nothing computed for one
        torch.testing.assert_close(sk.linear_cross_entropy(hidden, weight, target, bias, label_smoothing=eps,
                                                           weight_per_token=w_tok, backend=backend), fused.detach())


def test_fused_forward_gradient_serves_one_backward(backend, device):
    """The gradient computed in the forward is scaled in place by the backward (no second
    weight-sized buffer): a second backward through the same loss raises instead of returning
    the already-scaled values."""
    hidden, weight, bias, target, _ = _case(device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = sk.linear_cross_entropy(h, w, target, bias, backend=backend, chunk_size=4)
    (2.5 * loss).backward(retain_graph=True)
    r = [t.clone().requires_grad_() for t in (hidden, weight)]
    per = sk.linear_cross_entropy(r[0], r[1], target, bias, reduction="none", backend=backend, chunk_size=4)
    (2.5 * per.sum() / (target != IGNORE).sum()).backward()
    torch.testing.assert_close(h.grad, r[0].grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, r[1].grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


# --------------------------------------------------------------------------------------------
# README: d loss / d loss_mask is 0 where the mask is 0, the token's NLL (times the chain) elsewhere
# --------------------------------------------------------------------------------------------


def test_loss_mask_gradient_is_zero_where_masked_and_nll_elsewhere(backend, device):
    from tests import reference as ref

    logits = torch.randn(2, 5, 19, device=device) * 2
    labels = torch.randint(0, 19, (2, 5), device=device)
    mask = torch.tensor([[0.0, 1.0, 0.5, 0.0, 2.0], [1.0, 0.0, 0.0, 0.3, 1.0]], device=device).requires_grad_()
    weight, normalizer = torch.tensor([0.7, -1.3], device=device), torch.tensor([3.0, 2.0], device=device)
    nll = ref.token_nll(logits, labels).float()
    masked = mask.detach() == 0
    sk.sequence_nll(logits, labels, mask, backend=backend).sum().backward()
    torch.testing.assert_close(mask.grad, torch.where(masked, 0.0, nll), rtol=1e-5, atol=1e-6)
    assert torch.equal(mask.grad[masked], torch.zeros_like(mask.grad[masked]))
    mask.grad = None
    sk.weighted_sequence_loss(logits, labels, mask, weight, normalizer, backend=backend).backward()
    torch.testing.assert_close(mask.grad, torch.where(masked, 0.0, nll * (weight / normalizer)[:, None]),
                               rtol=1e-5, atol=1e-6)
    hidden, w_lm = torch.randn(2, 5, 8, device=device), torch.randn(19, 8, device=device)
    mask.grad = None
    sk.linear_weighted_sequence_loss(hidden, w_lm, labels, mask, weight, normalizer, backend=backend).backward()
    nll_lin = ref.token_nll(hidden @ w_lm.T, labels).float()
    torch.testing.assert_close(mask.grad, torch.where(masked, 0.0, nll_lin * (weight / normalizer)[:, None]),
                               rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_triton_tiles_strategy(device, monkeypatch):
    """The Triton tile kernels (``STEERLM_KERNELS_LINEAR=tiles``) under the drop-in options."""
    from tests.conftest import require_backend

    require_backend("triton", device)
    monkeypatch.setenv(sk.registry.LINEAR_ENV_VAR, "tiles")
    hidden, weight, bias, target, w_tok = _case(device)
    for eps, zl, reduction in ((0.1, 0.0, "mean"), (0.1, 1e-2, "none")):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        got = sk.linear_cross_entropy(*leaves[:2], target, leaves[2], label_smoothing=eps, z_loss=zl,
                                      weight_per_token=w_tok, reduction=reduction, backend="triton")
        refs = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
        want = ref_loss(refs[0] @ refs[1].T + refs[2], target, eps=eps, z_loss=zl, w=w_tok, reduction=reduction)
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
        got.sum().backward()
        want.sum().backward()
        for g, r in zip(leaves, refs):
            torch.testing.assert_close(g.grad.double(), r.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cross_entropy_low_precision(backend, device, dtype):
    logits = (torch.randn(3, 5, 37, device=device) * 3).to(dtype)
    target = torch.randint(0, 37, (3, 5), device=device)
    x = logits.clone().requires_grad_()
    got = sk.cross_entropy(x, target, label_smoothing=0.1, z_loss=1e-2, reduction="sum", backend=backend)
    xd = logits.double().requires_grad_()
    want = ref_loss(xd, target, eps=0.1, z_loss=1e-2, reduction="sum")
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-4)
    got.backward()
    want.backward()
    assert x.grad.dtype == dtype
    # the kernel's rounded gradient plus the label-column / uniform terms: two roundings at most
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=2 * grad_tolerances(dtype)["rtol"], atol=2e-3)


def test_weights_and_values_at_ignored_tokens_are_never_read(device):
    """A NaN / inf per-token weight (or hidden row) at an ignored token changes nothing."""
    hidden, weight, bias, target, w_tok = _case(device)
    h_bad, w_bad = hidden.clone(), w_tok.clone()
    h_bad[0, 1], w_bad[0, 1], w_bad[1, 3] = float("nan"), float("nan"), float("inf")  # both ignored
    for reduction, zl in (("mean", 0.0), ("none", 1e-2)):  # the fused and the recomputing paths
        a = [t.clone().requires_grad_() for t in (hidden, w_tok, weight)]
        b = [t.clone().requires_grad_() for t in (h_bad, w_bad, weight)]
        good = sk.linear_cross_entropy(a[0], a[2], target, bias, weight_per_token=a[1], reduction=reduction,
                                       label_smoothing=0.1, z_loss=zl)
        bad = sk.linear_cross_entropy(b[0], b[2], target, bias, weight_per_token=b[1], reduction=reduction,
                                      label_smoothing=0.1, z_loss=zl)
        assert torch.equal(good, bad)
        good.sum().backward()
        bad.sum().backward()
        for x, y in zip(a, b):
            assert torch.isfinite(y.grad).all()
            torch.testing.assert_close(y.grad, x.grad.masked_fill(~torch.isfinite(y), 0.0), rtol=1e-6, atol=1e-7)


def test_logits_nan_rows_at_ignored_tokens_stay_out(backend, device):
    logits = torch.randn(2, 6, 37, device=device) * 3
    target = _case(device)[3]
    bad = logits.clone()
    bad[0, 1] = float("nan")  # target[0, 1] is ignored
    outs = []
    for x0 in (logits, bad):
        x = x0.clone().requires_grad_()
        loss = sk.cross_entropy(x, target, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, backend=backend)
        loss.backward()
        outs.append((loss.detach(), x.grad))
    assert torch.isfinite(outs[1][1]).all()
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=0, atol=0)


def test_int32_target_custom_ignore_index_and_strided_views(backend, device):
    """int32 targets, another ignore_index, a non-contiguous hidden / weight: the same as the
    contiguous int64 call with the default ignore_index."""
    hidden, weight, bias, target, w_tok = _case(device)
    base = target.masked_fill(target == IGNORE, 5)
    ignored = target == IGNORE
    t32 = base.masked_fill(ignored, -1).to(torch.int32)
    h_t = hidden.transpose(0, 1).contiguous().transpose(0, 1)  # [2, 6, 16] with a non-flattenable layout
    w_t = weight.T.contiguous().T  # column-major [V, H]
    assert not h_t.is_contiguous() and not w_t.is_contiguous()
    for reduction in ("none", "mean"):
        got = sk.linear_cross_entropy(h_t, w_t, t32, bias, ignore_index=-1, reduction=reduction, label_smoothing=0.1,
                                      backend=backend)
        want = sk.linear_cross_entropy(hidden, weight, base.masked_fill(ignored, IGNORE), bias, reduction=reduction,
                                       label_smoothing=0.1, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        x = (hidden @ weight.T + bias).transpose(0, 1).contiguous().transpose(0, 1)
        got_l = sk.cross_entropy(x, t32, ignore_index=-1, reduction=reduction, label_smoothing=0.1, backend=backend)
        torch.testing.assert_close(got_l, want, rtol=1e-5, atol=1e-5)
