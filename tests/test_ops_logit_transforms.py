"""The logit transforms (``softcap``: ``c * tanh(z / c)``; ``logit_scale``: ``s * z``; both:
``c * tanh(s * z / c)``) on every backend of the logits-in family, against float64.

Checked at three levels: the Triton device function ``tanh_sech2`` itself (written from ``tl.exp``),
the backend contract (``ce_forward`` / ``ce_backward`` with ``softcap`` / ``scale``: statistics of the
TRANSFORMED logits, gradient through ``dz'/dz``), and the public functions (forward and backward,
in place, masks, packed sequences, saturation, NaN). Each case also asserts that the transform
changes the result by far more than the tolerance, so a transform silently ignored fails.
"""

from __future__ import annotations

import math

import pytest
import torch

import steerlm_kernels as sk
from steerlm_kernels import registry
from steerlm_kernels.kernels._triton import HAS_TRITON, tl, triton
from tests import reference as ref
from tests.conftest import require_backend

IGNORE = -100
#: (softcap, logit_scale): Gemma-like cap, Cohere-like scale, both, Granite-like 1 / logits_scaling.
TRANSFORMS = {"softcap": (4.0, None), "scale": (None, 0.37), "both": (6.0, 2.5), "granite": (None, 1 / 8)}


@pytest.fixture(params=list(TRANSFORMS))
def transform(request) -> tuple[float | None, float | None]:
    return TRANSFORMS[request.param]


def _slope64(x64: torch.Tensor, softcap: float | None, scale: float | None) -> torch.Tensor:
    """``dz'/dz`` in float64."""
    s = 1.0 if scale is None else scale
    if softcap is None:
        return torch.full_like(x64, s)
    return s * (1 - torch.tanh(s * x64 / softcap) ** 2)


def _max_slope(softcap: float | None, scale: float | None) -> float:
    return 1.0 if scale is None else scale


# --------------------------------------------------------------------------------------------
# tanh from tl.exp (the Triton kernels' own tanh)
# --------------------------------------------------------------------------------------------

if HAS_TRITON:
    from steerlm_kernels.kernels.cross_entropy import tanh_sech2

    @triton.jit
    def _tanh_probe_kernel(y_ptr, t_ptr, s_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        ok = offs < n
        y = tl.load(y_ptr + offs, mask=ok, other=0.0)
        t, s = tanh_sech2(y)
        tl.store(t_ptr + offs, t, mask=ok)
        tl.store(s_ptr + offs, s, mask=ok)


def test_triton_tanh_sech2_accuracy(device):
    require_backend("triton", device)
    mags = torch.cat([torch.logspace(-9, 1.6, 400, dtype=torch.float64), torch.tensor([0.0, 0.19999, 0.2, 0.20001,
                                                                                       100.0, 1e30])])
    y64 = torch.cat([mags, -mags]).float().double()  # float32-representable inputs
    y = y64.float().to(device)
    t, s = torch.empty_like(y), torch.empty_like(y)
    _tanh_probe_kernel[(1,)](y, t, s, y.numel(), BLOCK=triton.next_power_of_2(y.numel()))
    t_ref, s_ref = torch.tanh(y64), 1 / torch.cosh(y64) ** 2
    # tanh within 4 float32 ulps relative (no cancellation near 0: the series), sech^2 within
    # 4 ulps relative down to tiny values (no 1 - t^2 cancellation near saturation)
    torch.testing.assert_close(t.double().cpu(), t_ref, rtol=4 * 2.0**-24, atol=1e-45)
    torch.testing.assert_close(s.double().cpu(), s_ref, rtol=8 * 2.0**-24, atol=1e-38)
    specials = torch.tensor([float("inf"), float("-inf"), float("nan")], device=device)
    t, s = torch.empty_like(specials), torch.empty_like(specials)
    _tanh_probe_kernel[(1,)](specials, t, s, 3, BLOCK=4)
    assert t[:2].tolist() == [1.0, -1.0] and s[:2].tolist() == [0.0, 0.0]
    assert t[2].isnan() and s[2].isnan()


# --------------------------------------------------------------------------------------------
# the backend contract with a transform
# --------------------------------------------------------------------------------------------


def _rows(n: int, v: int, dtype: torch.dtype, device, spread: float = 6.0):
    logits = (torch.randn(n, v) * spread).to(dtype).to(device)
    labels = torch.randint(0, v, (n,), device=device)
    labels[1] = IGNORE
    logits[1] = float("nan")  # an ignored row is never read
    return logits, labels


@pytest.mark.parametrize("v", [5, 1000, 8193])
def test_forward_contract_transformed(backend, dtype, device, transform, v):
    softcap, scale = transform
    logits, labels = _rows(7, v, dtype, device)
    m, lse, target = registry.backend_kernels(backend).ce_forward(logits, labels, 0, IGNORE, softcap, scale)
    z = ref.transform(logits.cpu(), softcap, scale)
    active = labels.cpu() != IGNORE
    z = torch.where(active[:, None], z, 0.0)
    zmax = float(z.abs().max()) + 1.0
    row_max = z.amax(1)
    tol = {"rtol": 0.0, "atol": 4 * 2.0**-24 * zmax}
    torch.testing.assert_close(m.double().cpu(), torch.where(active, row_max, 0.0), **tol)
    picked = z.gather(1, labels.cpu().clamp(min=0).long()[:, None])[:, 0]
    torch.testing.assert_close(target.double().cpu(), torch.where(active, picked, 0.0), **tol)
    # lse relative to the kernel's own max, so that the max's rounding is not counted twice
    expected_lse = torch.logsumexp(z - m.double().cpu()[:, None], 1)
    torch.testing.assert_close(lse.double().cpu(), torch.where(active, expected_lse, 0.0), rtol=1e-5, atol=1e-5)
    # the token NLL of the contract against the float64 NLL of the transformed logits
    nll = torch.where(active, lse.double().cpu() - (target.double().cpu() - m.double().cpu()), 0.0)
    nll64 = ref.token_nll(logits.cpu(), labels.cpu(), IGNORE, softcap, scale)
    torch.testing.assert_close(nll, torch.where(active, nll64, 0.0), rtol=1e-5, atol=8 * 2.0**-24 * zmax)
    plain = ref.token_nll(logits.cpu(), labels.cpu(), IGNORE)
    assert (torch.where(active, plain - nll64, 0.0)).abs().max() > 0.05  # the transform matters here


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("v", [5, 1000, 8193])
def test_backward_contract_transformed(backend, dtype, device, transform, v, inplace):
    softcap, scale = transform
    logits, labels = _rows(6, v, dtype, device)
    coef = torch.tensor([0.5, 3.0, -1.25, 0.0, 2.0, 1.0], device=device)
    x64 = torch.where(logits.isnan(), 0.0, logits.double()).cpu()
    z = ref.transform(x64, softcap, scale)
    m64 = z.amax(1)
    lse64 = torch.logsumexp(z - m64[:, None], 1)
    m, lse = m64.float().to(device), lse64.float().to(device)
    out = logits.clone() if inplace else torch.empty_like(logits)
    src = out if inplace else logits
    registry.backend_kernels(backend).ce_backward(src, labels, m, lse, coef, 0, IGNORE, out, softcap, scale)
    p = torch.exp((z - m.double().cpu()[:, None]) - lse.double().cpu()[:, None])
    lab = labels.cpu().long()
    hit = lab != IGNORE
    p[hit.nonzero().squeeze(1), lab[hit]] -= 1.0
    c = torch.where(lab == IGNORE, 0.0, coef.double().cpu())
    expected = p * c[:, None] * _slope64(x64, softcap, scale)
    expected[~hit] = 0.0
    tol = ref.grad_tolerances(dtype, z, coef_max=3.0 * _max_slope(softcap, scale))
    torch.testing.assert_close(out.double().cpu(), expected, **tol)
    plain = (torch.softmax(x64, 1) - torch.nn.functional.one_hot(lab.clamp(min=0), v)) * c[:, None]
    assert (plain - expected)[hit].abs().max() > 0.01  # the transform matters here


# --------------------------------------------------------------------------------------------
# the public functions
# --------------------------------------------------------------------------------------------


def _case(b: int, s: int, v: int, dtype: torch.dtype, device, spread: float = 6.0):
    logits = (torch.randn(b, s, v) * spread).to(dtype).to(device)
    labels = torch.randint(0, v, (b, s), device=device)
    labels[0, 1] = IGNORE
    mask = (torch.rand(b, s, device=device) > 0.25).float() * torch.rand(b, s, device=device).add(0.5)
    mask[1] = 0.0  # an all-masked sequence
    return logits, labels, mask


def _grad64(fn, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.detach().cpu().double().requires_grad_()
    out = fn(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_token_nll_transformed(backend, dtype, device, transform, inplace):
    softcap, scale = transform
    logits, labels, _ = _case(3, 7, 1000, dtype, device)
    x = logits.clone().requires_grad_()
    nll = sk.token_nll(x.clone() if inplace else x, labels, softcap=softcap, logit_scale=scale,
                       inplace_backward=inplace, backend=backend)
    upstream = torch.randn(nll.shape, device=device)
    nll.backward(upstream)
    exp_nll, exp_grad = _grad64(lambda t: ref.token_nll(t, labels.cpu(), IGNORE, softcap, scale)
                                * upstream.double().cpu(), logits)
    torch.testing.assert_close(nll.double().cpu(), exp_nll / upstream.double().cpu(), rtol=1e-5, atol=1e-5)
    coef_max = float(upstream.abs().max()) * _max_slope(softcap, scale)
    torch.testing.assert_close(x.grad.double().cpu(), exp_grad,
                               **ref.grad_tolerances(dtype, ref.transform(logits.cpu(), softcap, scale), coef_max))
    plain = ref.token_nll(logits.cpu(), labels.cpu(), IGNORE)
    assert (plain - nll.double().cpu()).abs().max() > 0.05


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_sequence_nll_transformed(backend, dtype, device, transform, packed):
    softcap, scale = transform
    logits, labels, mask = _case(3, 9, 333, dtype, device)
    x = logits.clone().requires_grad_()
    if packed:
        cu = torch.tensor([0, 5, 9, 27], device=device)
        args = (x.view(27, 333), labels.view(27), mask.view(27))
        seq = sk.sequence_nll(*args, cu_seqlens=cu, softcap=softcap, logit_scale=scale, backend=backend)
        fn = lambda t: ref.sequence_nll(t.view(27, 333), labels.view(27).cpu(), mask.view(27).cpu(), IGNORE,  # noqa: E731
                                        cu.cpu(), softcap, scale)
    else:
        seq = sk.sequence_nll(x, labels, mask, softcap=softcap, logit_scale=scale, backend=backend)
        fn = lambda t: ref.sequence_nll(t, labels.cpu(), mask.cpu(), IGNORE, None, softcap, scale)  # noqa: E731
    seq.sum().backward()
    exp_seq, exp_grad = _grad64(fn, logits)
    torch.testing.assert_close(seq.double().cpu(), exp_seq, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.double().cpu(), exp_grad,
                               **ref.grad_tolerances(dtype, ref.transform(logits.cpu(), softcap, scale),
                                                     1.5 * _max_slope(softcap, scale)))


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_weighted_sequence_loss_transformed(backend, dtype, device, transform, inplace):
    softcap, scale = transform
    logits, labels, mask = _case(4, 5, 2051, dtype, device)
    weight = torch.tensor([0.7, -0.3, 0.0, 1.2], device=device)
    normalizer = torch.tensor([3.0, 2.0, 0.0, 4.0], device=device)
    x = logits.clone().requires_grad_()
    loss = sk.weighted_sequence_loss(x.clone() if inplace else x, labels, mask, weight, normalizer,
                                     softcap=softcap, logit_scale=scale, inplace_backward=inplace, backend=backend)
    loss.backward()
    exp_loss, exp_grad = _grad64(lambda t: ref.weighted_sequence_loss(t, labels.cpu(), mask.cpu(), weight.cpu(),
                                                                      normalizer.cpu(), IGNORE, None, softcap, scale),
                                 logits)
    torch.testing.assert_close(loss.double().cpu(), exp_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), exp_grad,
                               **ref.grad_tolerances(dtype, ref.transform(logits.cpu(), softcap, scale),
                                                     0.5 * _max_slope(softcap, scale)))
    plain = ref.weighted_sequence_loss(logits.cpu(), labels.cpu(), mask.cpu(), weight.cpu(), normalizer.cpu())
    assert abs(float(plain - exp_loss)) > 0.05


@pytest.mark.parametrize("offset", [0.0, 1e6], ids=["centred", "offset"])
def test_softcap_saturates(backend, device, offset):
    """Logits far beyond the cap (|z| ~ 1e4, or a common offset of 1e6): tanh saturates, the
    capped logits are all within float32 rounding of +-c; NLL and gradient stay finite and match
    float64 (the gradient of saturated logits vanishes, sech^2 ~ 0)."""
    c = 30.0
    logits = (torch.randn(4, 777, dtype=torch.float64) * 1e4 + offset).float().to(device)
    labels = torch.randint(0, 777, (4,), device=device)
    x = logits.clone().requires_grad_()
    nll = sk.token_nll(x, labels, softcap=c, backend=backend)
    nll.sum().backward()
    exp_nll, exp_grad = _grad64(lambda t: ref.token_nll(t, labels.cpu(), IGNORE, c), logits)
    assert torch.isfinite(nll).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(nll.double().cpu(), exp_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), exp_grad, rtol=1e-4, atol=1e-6)
    if offset:  # every logit capped to c: uniform
        torch.testing.assert_close(nll.double().cpu(), torch.full((4,), math.log(777), dtype=torch.float64))


def test_transform_nan_propagates(backend, device):
    logits = torch.randn(3, 50, device=device)
    logits[0, 7] = float("nan")
    labels = torch.tensor([1, 2, 3], device=device)
    nll = sk.token_nll(logits, labels, softcap=5.0, logit_scale=2.0, backend=backend)
    assert nll[0].isnan() and torch.isfinite(nll[1:]).all()


def test_scale_of_one_is_the_plain_loss(backend, device):
    logits = torch.randn(4, 300, device=device) * 5
    labels = torch.randint(0, 300, (4,), device=device)
    torch.testing.assert_close(sk.token_nll(logits, labels, logit_scale=1.0, backend=backend),
                               sk.token_nll(logits, labels, backend=backend), rtol=0, atol=0)


def test_modules_and_megatron_carry_the_transform(device):
    logits = torch.randn(2, 3, 40, device=device) * 4
    labels = torch.randint(0, 40, (2, 3), device=device)
    expected = ref.token_nll(logits.cpu(), labels.cpu(), IGNORE, 3.0, 0.5)
    mod = sk.nn.TokenNLL(softcap=3.0, logit_scale=0.5, backend="torch")
    assert "softcap=3.0" in repr(mod) and "logit_scale=0.5" in repr(mod)
    torch.testing.assert_close(mod(logits, labels).double().cpu(), expected, rtol=1e-5, atol=1e-5)
    seq = sk.nn.SequenceNLL(softcap=3.0, logit_scale=0.5, backend="torch")(logits, labels)
    torch.testing.assert_close(seq.double().cpu(), expected.sum(-1), rtol=1e-5, atol=1e-5)
    loss = sk.nn.WeightedSequenceLoss(softcap=3.0, logit_scale=0.5, backend="torch")(
        logits, labels, None, torch.tensor([1.0, 2.0], device=device), 2.0)
    torch.testing.assert_close(loss.double().cpu(), (expected.sum(-1) * torch.tensor([0.5, 1.0]).double()).sum(),
                               rtol=1e-5, atol=1e-5)
    from steerlm_kernels.megatron import vocab_parallel_cross_entropy

    out = vocab_parallel_cross_entropy(logits.transpose(0, 1), labels.t(), softcap=3.0, logit_scale=0.5,
                                       backend="torch")
    torch.testing.assert_close(out.t().double().cpu(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="softcap"):
        sk.nn.TokenNLL(softcap=0.0)
    with pytest.raises(TypeError, match="logit_scale"):
        sk.nn.LinearSequenceNLL(logit_scale="2")


def test_softcap_of_infinite_logits(backend, device):
    """``c * tanh(+-inf / c) = +-c``: infinite logits (a vocabulary padded with -inf, an overflowed
    +inf) are capped like any other under a softcap, on every backend, as the float64 formula says
    (without a softcap +inf gives NaN and -inf weighs nothing, as before)."""
    logits = torch.randn(3, 300) * 3
    logits[0, 250:] = float("-inf")
    logits[1, 7] = float("inf")
    labels = torch.tensor([3, 7, 299])
    x = logits.to(device).requires_grad_()
    nll = sk.token_nll(x, labels.to(device), softcap=5.0, backend=backend)
    nll.sum().backward()
    exp_nll, exp_grad = _grad64(lambda t: ref.token_nll(t, labels, IGNORE, 5.0), logits)
    assert torch.isfinite(nll).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(nll.double().cpu(), exp_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), exp_grad, rtol=1e-5, atol=1e-6)
