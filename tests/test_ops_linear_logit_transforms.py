"""The logit transforms (``softcap`` / ``logit_scale``) in the fused linear losses, on every backend
and both strategies (chunks: the backends' CE kernels on each logits chunk; tiles: the Triton tile
kernels), forward and backward against float64. Each case also checks that the transform changed
the result well beyond the tolerance (a transform silently ignored fails)."""

from __future__ import annotations

import pytest
import torch

from steerlm_kernels import api_linear, nn, registry
from tests import reference as ref
from tests.conftest import require_backend
from tests.test_ops_linear_cross_entropy import (
    _skip_interpreted_half,
    assert_close,
    assert_grad_close,
    grad_rel_tol,
    leaves,
    make_inputs,
    ref_grads,
    ref_logits,
    value_tol,
)


@pytest.fixture(params=["torch", "cpp", "triton", "triton-tiles"])
def backend(request, device, monkeypatch) -> str:
    """As in test_ops_linear_cross_entropy: ``triton-tiles`` passes ``"triton"`` with the tile kernels."""
    name, _, strategy = request.param.partition("-")
    require_backend(name, device)
    monkeypatch.setenv(registry.LINEAR_ENV_VAR, strategy or "chunks")
    return name


TRANSFORMS = {"softcap": (3.0, None), "scale": (None, 0.45), "both": (5.0, 1.7)}


@pytest.fixture(params=list(TRANSFORMS))
def transform(request) -> tuple[float | None, float | None]:
    return TRANSFORMS[request.param]


def _cpu(t):
    return None if t is None else t.cpu()


@pytest.mark.parametrize("shape", [(2, 7, 24, 77), (3, 5, 40, 300)], ids=lambda s: "x".join(map(str, s)))
def test_linear_sequence_nll_transformed(backend, dtype, device, transform, shape):
    _skip_interpreted_half(backend, dtype, device)
    softcap, scale = transform
    hidden, weight, bias, labels, loss_mask = make_inputs(*shape, dtype, device, mask="float")
    hidden = hidden * 2  # logits ~ N(0, 16): the cap bites
    h, w, b = leaves(hidden, weight, bias)
    out = api_linear.linear_sequence_nll(h, w, labels, loss_mask, bias=b, softcap=softcap, logit_scale=scale,
                                         backend=backend, chunk_size=4)
    upstream = torch.randn(shape[0], dtype=torch.float64)
    exp_val, gh, gw, gb = ref_grads(
        lambda x: (ref.sequence_nll(x, labels.cpu(), loss_mask.cpu(), softcap=softcap, logit_scale=scale)
                   * upstream).sum(), hidden.cpu(), weight.cpu(), bias.cpu())
    expected = ref.sequence_nll(ref_logits(hidden.cpu(), weight.cpu(), bias.cpu()), labels.cpu(), loss_mask.cpu(),
                                softcap=softcap, logit_scale=scale)
    assert_close(out, expected, **value_tol(dtype, backend))
    plain = ref.sequence_nll(ref_logits(hidden.cpu(), weight.cpu(), bias.cpu()), labels.cpu(), loss_mask.cpu())
    assert (plain - expected).abs().max() > 0.5
    (out.double().cpu() * upstream).sum().backward()
    assert_grad_close(h.grad, gh, grad_rel_tol(dtype))
    assert_grad_close(w.grad, gw, grad_rel_tol(dtype))
    assert_grad_close(b.grad, gb, grad_rel_tol(dtype))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_linear_weighted_sequence_loss_transformed(backend, dtype, device, transform, with_bias):
    _skip_interpreted_half(backend, dtype, device)
    softcap, scale = transform
    hidden, weight, bias, labels, loss_mask = make_inputs(3, 6, 32, 150, dtype, device, bias=with_bias)
    hidden = hidden * 2
    weight_seq = torch.tensor([0.8, -0.4, 1.3], device=device)
    normalizer = torch.tensor([2.0, 3.0, 5.0], device=device)
    h, w, b = leaves(hidden, weight, bias)
    loss = api_linear.linear_weighted_sequence_loss(h, w, labels, loss_mask, weight_seq, normalizer, bias=b,
                                                    softcap=softcap, logit_scale=scale, backend=backend,
                                                    chunk_size=5)
    args = (labels.cpu(), loss_mask.cpu(), weight_seq.cpu(), normalizer.cpu())
    exp_val, gh, gw, gb = ref_grads(
        lambda x: ref.weighted_sequence_loss(x, *args, softcap=softcap, logit_scale=scale),
        hidden.cpu(), weight.cpu(), _cpu(bias))
    assert_close(loss, exp_val, **value_tol(dtype, backend))
    plain = ref.weighted_sequence_loss(ref_logits(hidden.cpu(), weight.cpu(), _cpu(bias)), *args)
    assert abs(float(plain - exp_val)) > 0.1
    loss.backward()
    assert_grad_close(h.grad, gh, grad_rel_tol(dtype))
    assert_grad_close(w.grad, gw, grad_rel_tol(dtype))
    if with_bias:
        assert_grad_close(b.grad, gb, grad_rel_tol(dtype))


def test_linear_softcap_saturates(backend, device):
    """Logits of magnitude ~1e3 under a cap of 10: finite, equal to float64, gradients ~0 where
    tanh saturates (float32 operands, so the tile kernels run under the interpreter too)."""
    hidden, weight, bias, labels, _ = make_inputs(2, 5, 16, 200, torch.float32, device, mask=None)
    hidden = hidden * 400
    h, w = leaves(hidden, weight)
    out = api_linear.linear_sequence_nll(h, w, labels, softcap=10.0, backend=backend)
    exp_val, gh, gw, _ = ref_grads(lambda x: ref.sequence_nll(x, labels.cpu(), softcap=10.0).sum(),
                                   hidden.cpu(), weight.cpu(), None)
    assert torch.isfinite(out).all()
    assert_close(out, ref.sequence_nll(ref_logits(hidden.cpu(), weight.cpu(), None), labels.cpu(), softcap=10.0),
                 rtol=1e-5, atol=1e-4)
    out.sum().backward()
    assert_grad_close(h.grad, gh, 1e-4)
    assert_grad_close(w.grad, gw, 1e-4)


def test_linear_modules_carry_the_transform(device):
    hidden, weight, bias, labels, loss_mask = make_inputs(2, 4, 8, 30, torch.float32, device)
    expected = ref.sequence_nll(ref_logits(hidden.cpu(), weight.cpu(), bias.cpu()), labels.cpu(), loss_mask.cpu(),
                                softcap=2.0, logit_scale=3.0)
    mod = nn.LinearSequenceNLL(softcap=2.0, logit_scale=3.0, backend="torch")
    assert "softcap=2.0" in repr(mod)
    assert_close(mod(hidden, weight, labels, loss_mask, bias=bias), expected, rtol=1e-5, atol=1e-5)
    loss = nn.LinearWeightedSequenceLoss(softcap=2.0, logit_scale=3.0, backend="torch")(
        hidden, weight, labels, loss_mask, torch.tensor([1.0, 0.5]), 2.0, bias=bias)
    assert_close(loss, (expected * torch.tensor([0.5, 0.25], dtype=torch.float64)).sum(), rtol=1e-5, atol=1e-5)
