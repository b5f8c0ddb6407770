"""segment_softmax and steerlm2_weights on every backend against a float64 loop written from
SPEC's formulas; the three forms of num_responses; unequal groups; bad group structures."""

from __future__ import annotations

import math

import pytest
import torch

import steerlm_kernels as sk


def _groups_ref(sizes: list[int]) -> list[range]:
    out, start = [], 0
    for n in sizes:
        out.append(range(start, start + n))
        start += n
    return out


def _steerlm2_ref(nll, log_q, ws, sizes):
    """Phase 1 of SteerLM 2.0, element by element in float64."""
    nll, log_q, ws = nll.double().tolist(), log_q.double().tolist(), ws.double().tolist()
    weight, baseline, kls = [0.0] * len(nll), [0.0] * len(nll), []
    for g in _groups_ref(sizes):
        z = [-nll[i] - log_q[i] for i in g]
        m = max(z)
        e = [math.exp(t - m) for t in z]
        for i, ei in zip(g, e):
            baseline[i] = ei / sum(e)
            weight[i] = ws[i] - baseline[i]
        kls.append(sum((ws[i] + 1e-8) * math.log((ws[i] + 1e-8) / (baseline[i] + 1e-8)) for i in g))
    f64 = torch.float64
    distance = torch.tensor(sum(kls) / len(kls), dtype=f64)
    return torch.tensor(weight, dtype=f64), torch.tensor(baseline, dtype=f64), distance


def _random_case(sizes, device):
    b = sum(sizes)
    nll = torch.rand(b) * 80 + 5
    log_q = -torch.rand(b) * 80
    ws = torch.cat([torch.softmax(torch.randn(n) * 2, 0) for n in sizes])
    return nll.to(device), log_q.to(device), ws.to(device)


@pytest.mark.parametrize("sizes", [[4, 4, 4], [1, 7, 3, 8], [33], [2]])
def test_steerlm2_weights_matches_float64(backend, device, sizes):
    nll, log_q, ws = _random_case(sizes, device)
    forms = [torch.tensor(sizes, device=device),
             torch.tensor([n for n in sizes for _ in range(n)], device=device)]
    if len(set(sizes)) == 1:
        forms.append(sizes[0])
    expected = _steerlm2_ref(nll.cpu(), log_q.cpu(), ws.cpu(), sizes)
    for form in forms:
        out = sk.steerlm2_weights(nll, log_q, ws, form, backend=backend)
        assert isinstance(out, sk.SteerLM2Weights)
        assert out.weight.dtype == out.baseline.dtype == out.distance.dtype == torch.float32
        assert out.distance.shape == ()
        for got, want in zip(out, expected):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)


def test_baseline_sums_to_one_per_group(backend, device):
    sizes = [3, 5, 1, 6]
    nll, log_q, ws = _random_case(sizes, device)
    out = sk.steerlm2_weights(nll, log_q, ws, torch.tensor(sizes), backend=backend)
    for g in _groups_ref(sizes):
        assert abs(out.baseline[list(g)].sum().item() - 1.0) < 1e-5
        assert abs(out.weight[list(g)].sum().item()) < 1e-5  # ws and baseline both sum to 1


@pytest.mark.parametrize("sizes", [[2, 5, 1], [4, 4]])
def test_segment_softmax_value_and_grad(backend, device, sizes):
    x = (torch.randn(sum(sizes)) * 5).to(device).requires_grad_()
    y = sk.segment_softmax(x, torch.tensor(sizes), backend=backend)
    xd = x.detach().double().requires_grad_()
    yd = torch.cat([torch.softmax(xd[list(g)], 0) for g in _groups_ref(sizes)])
    torch.testing.assert_close(y.double(), yd.detach(), rtol=1e-5, atol=1e-7)
    up = torch.randn(sum(sizes), device=device)
    y.backward(up)
    yd.backward(up.double())
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)
    if len(set(sizes)) == 1:
        torch.testing.assert_close(sk.segment_softmax(x.detach(), sizes[0], backend=backend), y.detach())


BAD_GROUPS = {
    "sum": (ValueError, torch.tensor([2, 2])),
    "zero": (ValueError, torch.tensor([0, 6])),
    "negative": (ValueError, torch.tensor([-2, 8])),
    "float": (TypeError, torch.tensor([3.0, 3.0])),
    "int_not_dividing": (ValueError, 4),
    "int_zero": (ValueError, 0),
    "per_item_inconsistent": (ValueError, torch.tensor([2, 2, 3, 3, 3, 2])),
    "2d": (ValueError, torch.tensor([[3, 3]])),
}


@pytest.mark.parametrize("case", sorted(BAD_GROUPS))
def test_bad_group_structures(case):
    exc, groups = BAD_GROUPS[case]
    nll, log_q, ws = _random_case([3, 3], "cpu")
    with pytest.raises(exc, match="num_responses"):
        sk.steerlm2_weights(nll, log_q, ws, groups)
    if case != "per_item_inconsistent":
        with pytest.raises(exc, match="group_sizes"):
            sk.segment_softmax(nll, groups)


def test_bad_vectors():
    nll, log_q, ws = _random_case([3, 3], "cpu")
    with pytest.raises(ValueError, match="log_q"):
        sk.steerlm2_weights(nll, log_q[:5], ws, 3)
    with pytest.raises(TypeError, match="ws"):
        sk.steerlm2_weights(nll, log_q, ws.long(), 3)
    with pytest.raises(ValueError, match="seq_nll"):
        sk.steerlm2_weights(nll.view(2, 3), log_q, ws, 3)
