"""segment_softmax and steerlm2_weights on every backend against a float64 loop written from
SPEC's formulas; the three forms of num_responses; unequal groups, groups of one, groups larger
than a SIMD vector (and than a kernel's block), many groups (several OpenMP threads and blocks
in the cpp kernels); extreme values, NaN and inf propagation; input dtypes; bad group
structures."""

from __future__ import annotations

import math

import pytest
import torch

import steerlm_kernels as sk
from tests.conftest import require_backend


def _groups_ref(sizes: list[int]) -> list[range]:
    out, start = [], 0
    for n in sizes:
        out.append(range(start, start + n))
        start += n
    return out


def _steerlm2_ref_groups(nll, log_q, ws, sizes):
    """Phase 1 of SteerLM 2.0, element by element in float64: (weight, baseline, kl per group).
    Special values follow IEEE: a NaN, a +inf logit or a group of -inf logits makes the group NaN."""
    nll, log_q, ws = nll.double().tolist(), log_q.double().tolist(), ws.double().tolist()
    weight, baseline, kls = [0.0] * len(nll), [0.0] * len(nll), []
    for g in _groups_ref(sizes):
        z = [-nll[i] - log_q[i] for i in g]
        m = math.nan if any(math.isnan(t) for t in z) else max(z)
        e = [math.exp(t - m) for t in z]
        for i, ei in zip(g, e):
            baseline[i] = ei / sum(e)
            weight[i] = ws[i] - baseline[i]
        kls.append(sum((ws[i] + 1e-8) * math.log((ws[i] + 1e-8) / (baseline[i] + 1e-8)) for i in g))
    f64 = torch.float64
    return torch.tensor(weight, dtype=f64), torch.tensor(baseline, dtype=f64), torch.tensor(kls, dtype=f64)


def _steerlm2_ref(nll, log_q, ws, sizes):
    """Phase 1 of SteerLM 2.0 in float64: (weight, baseline, distance = mean KL)."""
    weight, baseline, kl = _steerlm2_ref_groups(nll, log_q, ws, sizes)
    return weight, baseline, kl.mean()


def _assert_weights_match_float64(out, nll, log_q, ws, sizes) -> None:
    """``out`` (a SteerLM2Weights) equals :func:`_steerlm2_ref_groups` of the inputs (float32 tolerances)."""
    weight, baseline, kl = _steerlm2_ref_groups(nll.cpu(), log_q.cpu(), ws.cpu(), sizes)
    torch.testing.assert_close(out.weight.double().cpu(), weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.baseline.double().cpu(), baseline, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.distance.double().cpu(), kl.mean(), rtol=1e-5, atol=1e-6)


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


# --------------------------------------------------------------------------------------------
# sizes around SIMD widths, large and many groups, extreme and special values, dtypes
# --------------------------------------------------------------------------------------------

# Around the cpp kernels' vector widths (8 lanes under AVX2, 16 under AVX-512: a group up to one
# vector is reduced as one masked vector, a larger one as whole vectors plus a masked tail).
VECTOR_EDGE_SIZES = [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 1, 2]


@pytest.mark.parametrize("sizes", [VECTOR_EDGE_SIZES, [1000], [1000, 1, 1500, 3]],
                         ids=["vector_edges", "one_1000", "large_and_small"])
def test_steerlm2_weights_sizes_vs_float64(backend, device, sizes):
    nll, log_q, ws = _random_case(sizes, device)
    out = sk.steerlm2_weights(nll, log_q, ws, torch.tensor(sizes), backend=backend)
    _assert_weights_match_float64(out, nll, log_q, ws, sizes)
    x = (torch.randn(sum(sizes)) * 30).to(device)
    y = sk.segment_softmax(x, torch.tensor(sizes), backend=backend)
    want = torch.cat([torch.softmax(x.cpu().double()[list(g)], 0) for g in _groups_ref(sizes)])
    torch.testing.assert_close(y.double().cpu(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend_name", ["cpp", "torch"])
def test_many_groups_vs_float64(backend_name, device):
    """~40k items in ~9k groups of sizes 1..9 in a shuffled order (several OpenMP threads and
    several blocks per thread in the cpp kernels; the Triton interpreter would take minutes)."""
    require_backend(backend_name, device)
    gen = torch.Generator().manual_seed(11)
    sizes = torch.randint(1, 10, (9000,), generator=gen).tolist()
    nll, log_q, ws = _random_case(sizes, device)
    out = sk.steerlm2_weights(nll, log_q, ws, torch.tensor(sizes), backend=backend_name)
    _assert_weights_match_float64(out, nll, log_q, ws, sizes)
    y = sk.segment_softmax(-nll - log_q, torch.tensor(sizes), backend=backend_name)
    torch.testing.assert_close(y, out.baseline, rtol=0, atol=0)  # the same softmax



def test_extreme_values(backend, device):
    """Logits spread over 1e4 nats and +-1e30 (baselines that underflow to 0, KL terms with
    log(ws / 1e-8)), ws of exactly 0 and 1: finite, and equal to float64 math."""
    sizes = [4, 3, 5, 1]
    nll = torch.tensor([0.0, 1e4, 5e3, 2.5,  -1e30, 1e30, 0.0,  7e3, 7e3 + 1, 7e3 + 2, 9e3, 1e4,  3e4])
    log_q = torch.zeros_like(nll)
    ws = torch.tensor([0.0, 0.5, 0.5, 0.0,  1.0, 0.0, 0.0,  0.2, 0.2, 0.2, 0.2, 0.2,  1.0])
    out = sk.steerlm2_weights(nll.to(device), log_q.to(device), ws.to(device), torch.tensor(sizes), backend=backend)
    for got in out:
        assert torch.isfinite(got).all()
    _assert_weights_match_float64(out, nll, log_q, ws, sizes)


def test_nan_and_inf_propagate(backend, device):
    """No silent masking: a NaN seq_nll / log_q makes its whole group NaN (baseline, weight, KL,
    hence the distance); a NaN ws makes its item's weight and its group's KL NaN. seq_nll = +inf
    (logit -inf) just gets baseline 0; seq_nll = -inf (logit +inf), or a group whose logits are
    all -inf, is NaN (inf - inf), as in the torch reference. Other groups are untouched."""
    sizes = [3, 3, 3, 3, 2, 3, 2]
    nll, log_q, ws = _random_case(sizes, "cpu")
    nan, inf = float("nan"), float("inf")
    nll[1] = nan          # group 0
    log_q[5] = nan        # group 1
    ws[6] = nan           # group 2: weight[6] and kl NaN, baseline fine
    nll[9] = inf          # group 3: baseline[9] = 0, finite
    nll[12] = -inf        # group 4: NaN
    nll[14:17] = inf      # group 5: all logits -inf: NaN
    weight, baseline, kl = _steerlm2_ref_groups(nll, log_q, ws, sizes)
    out = sk.steerlm2_weights(nll.to(device), log_q.to(device), ws.to(device), torch.tensor(sizes), backend=backend)
    got_w, got_b = out.weight.double().cpu(), out.baseline.double().cpu()
    torch.testing.assert_close(got_w, weight, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(got_b, baseline, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(got_b[0:6]).all() and torch.isnan(got_w[0:6]).all()
    assert torch.isfinite(got_b[6:9]).all() and torch.isnan(got_w[6]) and torch.isfinite(got_w[7:9]).all()
    assert got_b[9] == 0 and torch.isfinite(got_b[9:12]).all() and torch.isfinite(got_w[9:12]).all()
    assert torch.isnan(got_b[12:17]).all()
    assert torch.isfinite(got_b[17:]).all() and torch.isfinite(got_w[17:]).all()
    assert torch.isnan(out.distance)
    # the KL of each group: through the op directly (the API only returns the mean)
    from steerlm_kernels.ops.group import steerlm2_weights_op
    from steerlm_kernels.validation import group_offsets

    cu, max_group = group_offsets(torch.tensor(sizes), len(nll), torch.device(device), "num_responses")
    _, _, got_kl = steerlm2_weights_op(nll.to(device), log_q.to(device), ws.to(device), cu, max_group, backend)
    torch.testing.assert_close(got_kl.double().cpu(), kl, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(got_kl[[0, 1, 2, 4, 5]]).all() and torch.isfinite(got_kl[[3, 6]]).all()
    # segment_softmax: the same rules
    x = (torch.randn(9) * 3)
    x[1], x[3], x[6:9] = nan, inf, -inf
    y = sk.segment_softmax(x.to(device), 3, backend=backend).cpu()
    assert torch.isnan(y).all()
    x[1], x[3] = 0.0, -inf
    y = sk.segment_softmax(x.to(device), 3, backend=backend).cpu()
    assert torch.isfinite(y[:6]).all() and y[3] == 0 and torch.isnan(y[6:]).all()


@pytest.mark.parametrize("in_dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_input_dtypes_are_read_as_float32(backend, device, in_dtype):
    """Any floating dtype is accepted and read as float32 (as the torch reference's .float())."""
    sizes = [3, 1, 5, 9]
    nll, log_q, ws = (t.to(in_dtype) for t in _random_case(sizes, device))
    groups = torch.tensor(sizes)
    out = sk.steerlm2_weights(nll, log_q, ws, groups, backend=backend)
    ref = sk.steerlm2_weights(nll.float(), log_q.float(), ws.float(), groups, backend=backend)
    for got, want in zip(out, ref):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    y = sk.segment_softmax(nll, groups, backend=backend)
    torch.testing.assert_close(y, sk.segment_softmax(nll.float(), groups, backend=backend), rtol=0, atol=0)


@pytest.mark.parametrize("per_item, expected", [
    ([2, 2, 3, 3, 3, 1], [0, 2, 5, 6]),
    ([2, 2, 2, 2], [0, 2, 4]),  # adjacent groups of the same size
    ([3, 3, 3, 3, 3, 3, 2, 2, 1], [0, 3, 6, 8, 9]),
])
def test_per_item_num_responses_parse_into_groups(per_item: list[int], expected: list[int]) -> None:
    from steerlm_kernels.validation import group_offsets

    cu, max_group = group_offsets(torch.tensor(per_item), len(per_item), torch.device("cpu"), "num_responses",
                                  per_item=True)
    assert cu.tolist() == expected and max_group == max(per_item)


@pytest.mark.parametrize("per_item, bad_item", [([2, 2, 2], 2), ([2, 3, 3, 3], 0), ([1, 2, 1], 1), ([3, 3, 3, 3], 3)])
def test_per_item_num_responses_name_the_breaking_item(per_item: list[int], bad_item: int) -> None:
    from steerlm_kernels.validation import group_offsets

    with pytest.raises(ValueError, match=f"num_responses in per-item form .* item {bad_item} breaks that"):
        group_offsets(torch.tensor(per_item), len(per_item), torch.device("cpu"), "num_responses", per_item=True)


def test_steerlm2_weights_of_no_responses(backend, device):
    """B = 0 (no groups): empty weights and a distance of exactly 0, not the NaN of an empty mean."""
    empty = torch.empty(0, device=device)
    for num_responses in (torch.empty(0, dtype=torch.long, device=device), 3):
        out = sk.steerlm2_weights(empty, empty, empty, num_responses, backend=backend)
        assert out.weight.shape == out.baseline.shape == (0,)
        assert out.distance.shape == () and out.distance.item() == 0.0


# --------------------------------------------------------------------------------------------
# torch.func: segment_softmax composes with grad / vmap; steerlm2_weights runs under vmap; the
# cross-entropy ops raise PyTorch's setup_context error (pinned: documented in README)
# --------------------------------------------------------------------------------------------


def _seg_softmax_ref(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    return torch.cat([torch.softmax(x[..., list(g)], -1) for g in _groups_ref(sizes)], -1)


@pytest.mark.parametrize("form", ["int", "sizes"])
def test_segment_softmax_under_torch_func(backend, device, form):
    sizes = [4, 4, 4] if form == "int" else [2, 5, 1, 4]
    structure = 4 if form == "int" else torch.tensor(sizes)
    b = sum(sizes)
    x = (torch.randn(3, b) * 3).to(device)
    coef = torch.randn(b, device=device)

    def f(z):
        return (sk.segment_softmax(z, structure, backend=backend) * coef).sum()

    xd = x.double().requires_grad_()
    (_seg_softmax_ref(xd, sizes) * coef.double()).sum().backward()
    # grad, vmap, vmap of grad
    g0 = torch.func.grad(f)(x[0])
    torch.testing.assert_close(g0.double(), xd.grad[0], rtol=1e-5, atol=1e-6)
    ys = torch.func.vmap(lambda z: sk.segment_softmax(z, structure, backend=backend))(x)
    torch.testing.assert_close(ys.double(), _seg_softmax_ref(x.double(), sizes), rtol=1e-5, atol=1e-7)
    gs = torch.func.vmap(torch.func.grad(f))(x)
    torch.testing.assert_close(gs.double(), xd.grad, rtol=1e-5, atol=1e-6)
    if form == "sizes":  # one structure per row (a batched sizes tensor): one call per row
        rows = torch.func.vmap(lambda z, s: sk.segment_softmax(z, s, backend=backend))(x, structure.expand(3, -1))
        torch.testing.assert_close(rows, ys, rtol=0, atol=0)
    # and the same gradient through ordinary autograd
    xa = x.clone().requires_grad_()
    (sk.segment_softmax(xa[1], structure, backend=backend) * coef).sum().backward()
    torch.testing.assert_close(xa.grad[1].double(), xd.grad[1], rtol=1e-5, atol=1e-6)


def test_steerlm2_weights_under_vmap(backend, device):
    sizes = [3, 1, 4]
    per_item = torch.tensor([n for n in sizes for _ in range(n)], device=device)
    cases = [_random_case(sizes, device) for _ in range(2)]
    nll, log_q, ws = (torch.stack(t) for t in zip(*cases))
    out = torch.func.vmap(lambda a, b, c: tuple(sk.steerlm2_weights(a, b, c, per_item, backend=backend)))(
        nll, log_q, ws)
    for k in range(2):
        _assert_weights_match_float64(sk.SteerLM2Weights(*(o[k] for o in out)), nll[k], log_q[k], ws[k], sizes)


def test_bad_tensor_structure_still_raises_named_errors_from_inside_the_op():
    nll, log_q, ws = _random_case([3, 3], "cpu")
    with pytest.raises(ValueError, match="num_responses"):
        sk.steerlm2_weights(nll, log_q, ws, torch.tensor([2, 2]))
    with pytest.raises(TypeError, match="group_sizes"):
        sk.segment_softmax(nll, [3, 3])
    with pytest.raises(TypeError, match="num_responses"):
        sk.steerlm2_weights(nll, log_q, ws, True)
