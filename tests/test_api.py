"""The public functions on every backend against the float64 reference (tests/reference.py).

Backends: ``torch`` and ``cpp`` natively, ``triton`` through the interpreter on CPU (compiled on
CUDA with STEERLM_TEST_DEVICE=cuda). The interpreter is slow (~5 ms per 32k-wide row), so the
shapes stay small; the wide-vocabulary cases use few rows.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import steerlm_kernels as sk
from tests import reference as ref

IGNORE = -100


def make_batch(b: int, s: int, v: int, dtype: torch.dtype, device: torch.device, *, scale: float = 3.0,
               ignore_frac: float = 0.1, mask: str | None = "float"):
    """Random logits / labels / loss_mask. Labels use the whole vocabulary; a fraction is ignored."""
    logits = (torch.randn(b, s, v, dtype=torch.float32) * scale).to(dtype).to(device)
    labels = torch.randint(0, v, (b, s))
    labels[torch.rand(b, s) < ignore_frac] = IGNORE
    keep = torch.rand(b, s) > 0.3
    if mask is None:
        loss_mask = None
    elif mask == "bool":
        loss_mask = keep
    elif mask == "int":
        loss_mask = keep.to(torch.int64)
    else:  # float, with non-binary weights
        loss_mask = keep.float() * (0.5 + torch.rand(b, s))
    return logits, labels.to(device), None if loss_mask is None else loss_mask.to(device)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **tol) -> None:
    assert not torch.isnan(actual).any(), "NaN in result"
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **tol)


# ------------------------------------------------------------------------------------------------
# values
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [1, 7, 1000, 32771])
def test_token_nll_matches_float64(backend, dtype, device, v):
    b, s = (2, 3) if v > 10000 else (3, 11)
    logits, labels, _ = make_batch(b, s, v, dtype, device)
    out = sk.token_nll(logits, labels, backend=backend)
    assert out.shape == labels.shape and out.dtype == torch.float32
    assert_close(out, ref.token_nll(logits, labels), **ref.tolerances(dtype))
    assert (out[labels == IGNORE] == 0).all()


@pytest.mark.parametrize("mask", ["float", "bool", "int", None])
def test_sequence_nll_dense(backend, dtype, device, mask):
    logits, labels, loss_mask = make_batch(4, 13, 517, dtype, device, mask=mask)
    out = sk.sequence_nll(logits, labels, loss_mask, backend=backend)
    assert out.shape == (4,) and out.dtype == torch.float32
    assert_close(out, ref.sequence_nll(logits, labels, loss_mask), **ref.tolerances(dtype))


def test_sequence_nll_flattened_logits(backend, device):
    logits, labels, loss_mask = make_batch(3, 9, 301, torch.float32, device)
    out = sk.sequence_nll(logits.view(27, 301), labels, loss_mask, backend=backend)
    assert_close(out, ref.sequence_nll(logits, labels, loss_mask), **ref.tolerances(torch.float32))


@pytest.mark.parametrize("cu", [[0, 5, 5, 19, 40], [0, 40], [0, 0, 40, 40]])
def test_sequence_nll_packed(backend, dtype, device, cu):
    logits, labels, loss_mask = make_batch(1, 40, 263, dtype, device)
    logits, labels, loss_mask = logits[0], labels[0], loss_mask[0]
    cu_seqlens = torch.tensor(cu, device=device, dtype=torch.int32)
    out = sk.sequence_nll(logits, labels, loss_mask, cu_seqlens=cu_seqlens, backend=backend)
    assert out.shape == (len(cu) - 1,)
    expected = ref.sequence_nll(logits, labels, loss_mask, cu_seqlens=cu_seqlens)
    assert_close(out, expected, **ref.tolerances(dtype))
    empty = torch.tensor([b == a for a, b in zip(cu[:-1], cu[1:])])
    assert (out.cpu()[empty] == 0).all()


def test_all_masked_sequences_are_exactly_zero(backend, dtype, device):
    logits, labels, loss_mask = make_batch(3, 8, 97, dtype, device)
    loss_mask[1] = 0
    labels[2] = IGNORE
    out = sk.sequence_nll(logits, labels, loss_mask, backend=backend)
    assert out[1].item() == 0.0 and out[2].item() == 0.0
    assert torch.isfinite(out).all()


def test_int32_labels(backend, device):
    logits, labels, loss_mask = make_batch(2, 7, 129, torch.float32, device)
    out = sk.sequence_nll(logits, labels.int(), loss_mask, backend=backend)
    assert_close(out, ref.sequence_nll(logits, labels, loss_mask), **ref.tolerances(torch.float32))


def test_non_contiguous_inputs(backend, dtype, device):
    # [S, B, V] transposed to [B, S, V]: leading dims do not flatten into one stride (copied once).
    base, labels, loss_mask = make_batch(6, 2, 211, dtype, device)
    logits = base.transpose(0, 1)
    labels_t, mask_t = labels.t(), loss_mask.t()
    out = sk.sequence_nll(logits, labels_t, mask_t, backend=backend)
    assert_close(out, ref.sequence_nll(logits, labels_t, mask_t), **ref.tolerances(dtype))
    # row-strided view: a vocabulary slice of a wider buffer (used in place, no copy)
    wide, labels, loss_mask = make_batch(2, 5, 300, dtype, device)
    sliced = wide[..., :211]
    labels = labels.clamp(max=210).masked_fill(labels == IGNORE, IGNORE)
    out = sk.sequence_nll(sliced, labels, loss_mask, backend=backend)
    assert_close(out, ref.sequence_nll(sliced, labels, loss_mask), **ref.tolerances(dtype))
    # vocabulary dimension not unit-stride
    vt = wide.transpose(1, 2).contiguous().transpose(1, 2)
    out = sk.token_nll(vt, labels.clamp(min=0), backend=backend)
    assert_close(out, ref.token_nll(vt, labels.clamp(min=0)), **ref.tolerances(dtype))


def test_large_magnitude_logits(backend, device):
    logits, labels, loss_mask = make_batch(2, 6, 403, torch.float32, device, scale=1e4)
    out = sk.sequence_nll(logits, labels, loss_mask, backend=backend)
    expected = ref.sequence_nll(logits, labels, loss_mask)
    assert torch.isfinite(out).all()
    # float32 resolution at 1e4 is ~1e-3: compare relative to the magnitude of the logits.
    assert_close(out, expected, rtol=1e-5, atol=0.05)


def test_nan_logits_propagate_unless_masked(backend, device):
    logits, labels, _ = make_batch(3, 4, 50, torch.float32, device, ignore_frac=0.0)
    loss_mask = torch.ones(3, 4, device=device)
    logits[0, 1, 7] = float("nan")
    logits[1, 2, 3] = float("inf")
    logits[2, 0, :] = float("nan")
    loss_mask[2, 0] = 0  # masked tokens are never read: they contribute exactly 0
    out = sk.sequence_nll(logits, labels, loss_mask, backend=backend)
    assert torch.isnan(out[0]) and torch.isnan(out[1])
    assert torch.isfinite(out[2])
    tok = sk.token_nll(logits, labels, backend=backend)
    assert torch.isnan(tok[0, 1]) and torch.isnan(tok[1, 2]) and torch.isfinite(tok[0, 0])


def test_weighted_sequence_loss_value(backend, dtype, device):
    logits, labels, loss_mask = make_batch(4, 9, 333, dtype, device)
    weight = torch.randn(4, device=device)
    normalizer = torch.rand(4, device=device) + 0.5
    out = sk.weighted_sequence_loss(logits, labels, loss_mask, weight, normalizer, backend=backend)
    assert out.shape == () and out.dtype == torch.float32
    expected = ref.weighted_sequence_loss(logits, labels, loss_mask, weight, normalizer)
    assert_close(out, expected, rtol=1e-5, atol=1e-4)
    out_f = sk.weighted_sequence_loss(logits, labels, loss_mask, weight, 2.5, backend=backend)
    assert_close(out_f, ref.weighted_sequence_loss(logits, labels, loss_mask, weight, 2.5), rtol=1e-5, atol=1e-4)


def test_zero_weight_with_zero_normalizer_contributes_nothing(backend, device):
    logits, labels, loss_mask = make_batch(3, 5, 64, torch.float32, device)
    logits.requires_grad_()
    weight = torch.tensor([0.0, 1.5, -0.5], device=device, requires_grad=True)
    normalizer = torch.tensor([0.0, 2.0, 3.0], device=device)
    out = sk.weighted_sequence_loss(logits, labels, loss_mask, weight, normalizer, backend=backend)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(logits.grad).all() and torch.isfinite(weight.grad).all()
    assert (logits.grad[0] == 0).all()
    expected = ref.weighted_sequence_loss(logits.detach(), labels, loss_mask, weight.detach(), normalizer)
    assert_close(out.detach(), expected, rtol=1e-5, atol=1e-4)


def test_no_grad_stores_nothing(backend, device):
    logits, labels, loss_mask = make_batch(2, 5, 64, torch.bfloat16, device)
    logits.requires_grad_()
    with torch.no_grad():
        out = sk.sequence_nll(logits, labels, loss_mask, backend=backend)
    assert out.grad_fn is None and not out.requires_grad
    out2 = sk.sequence_nll(logits.detach(), labels, loss_mask, backend=backend)
    assert out2.grad_fn is None


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------


def _reference_grad(fn, logits: torch.Tensor) -> torch.Tensor:
    x = logits.detach().double().requires_grad_()
    fn(x).backward()
    return x.grad


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "in_place"])
def test_token_nll_grad_with_upstream(backend, dtype, device, inplace):
    logits, labels, _ = make_batch(3, 7, 1003, dtype, device)
    upstream = torch.randn(3, 7, device=device)
    expected = _reference_grad(lambda x: (ref.token_nll(x, labels) * upstream.double()).sum(), logits)
    x = logits.clone().requires_grad_()
    work = x * 1  # a non-leaf, as from an LM head: the in-place gradient overwrites it
    out = sk.token_nll(work, labels, inplace_backward=inplace, backend=backend)
    out.backward(upstream)
    assert x.grad.dtype == dtype
    assert_close(x.grad, expected, **ref.grad_tolerances(dtype))
    if inplace:
        assert_close(work.detach(), expected, **ref.grad_tolerances(dtype))  # grad lives in the logits' storage
    assert torch.equal(x.detach(), logits)  # the leaf is untouched


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "in_place"])
def test_weighted_loss_grad(backend, dtype, device, inplace):
    logits, labels, loss_mask = make_batch(4, 6, 517, dtype, device)
    weight = torch.randn(4, device=device)
    normalizer = torch.rand(4, device=device) + 0.5
    expected = _reference_grad(
        lambda x: ref.weighted_sequence_loss(x, labels, loss_mask, weight, normalizer), logits
    )
    x = logits.clone().requires_grad_()
    loss = sk.weighted_sequence_loss(x * 1, labels, loss_mask, weight, normalizer,
                                     inplace_backward=inplace, backend=backend)
    (loss * 0.25).backward()  # the 1/M of a micro-batch schedule: a non-trivial upstream gradient
    assert_close(x.grad, expected * 0.25, **ref.grad_tolerances(dtype))


def test_packed_grad(backend, device):
    logits, labels, loss_mask = make_batch(1, 30, 129, torch.float32, device)
    logits, labels, loss_mask = logits[0], labels[0], loss_mask[0]
    cu = torch.tensor([0, 4, 4, 30], device=device)
    weight = torch.randn(3, device=device)
    expected = _reference_grad(
        lambda x: ref.weighted_sequence_loss(x, labels, loss_mask, weight, 3.0, cu_seqlens=cu), logits
    )
    x = logits.clone().requires_grad_()
    sk.weighted_sequence_loss(x, labels, loss_mask, weight, 3.0, cu_seqlens=cu, backend=backend).backward()
    assert_close(x.grad, expected, **ref.grad_tolerances(torch.float32))


def test_grad_of_leaf_logits_in_place(backend, device):
    # A leaf with inplace_backward: the gradient is written over the leaf's own storage.
    logits, labels, loss_mask = make_batch(2, 4, 77, torch.float32, device)
    expected = _reference_grad(lambda x: ref.sequence_nll(x, labels, loss_mask).sum(), logits)
    x = logits.clone().requires_grad_()
    sk.sequence_nll(x, labels, loss_mask, inplace_backward=True, backend=backend).sum().backward()
    assert_close(x.grad, expected, **ref.grad_tolerances(torch.float32))


def test_inputs_not_modified_without_inplace(backend, device):
    logits, labels, loss_mask = make_batch(2, 4, 77, torch.bfloat16, device)
    x = logits.clone().requires_grad_()
    labels_before, mask_before = labels.clone(), loss_mask.clone()
    sk.weighted_sequence_loss(x, labels, loss_mask, torch.ones(2, device=device), 1.0, backend=backend).backward()
    assert torch.equal(x.detach(), logits)
    assert torch.equal(labels, labels_before) and torch.equal(loss_mask, mask_before)


# ------------------------------------------------------------------------------------------------
# properties over random shapes
# ------------------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 4), s=st.integers(1, 9), v=st.integers(1, 700),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    ignore_frac=st.floats(0.0, 1.0), scale=st.sampled_from([0.1, 3.0, 30.0]),
)
def test_property_random_shapes(backend, device, b, s, v, dtype, ignore_frac, scale):
    logits, labels, loss_mask = make_batch(b, s, v, dtype, device, scale=scale, ignore_frac=ignore_frac)
    weight = torch.randn(b, device=device)
    x = logits.clone().requires_grad_()
    loss = sk.weighted_sequence_loss(x, labels, loss_mask, weight, 2.0, backend=backend)
    loss.backward()
    expected = _reference_grad(lambda t: ref.weighted_sequence_loss(t, labels, loss_mask, weight, 2.0), logits)
    assert_close(loss.detach(), ref.weighted_sequence_loss(logits, labels, loss_mask, weight, 2.0),
                 rtol=1e-5, atol=1e-4)
    coef_max = float(weight.abs().max()) * 1.5 / 2.0  # |weight| * mask (< 1.5) / normalizer (2.0)
    assert_close(x.grad, expected, **ref.grad_tolerances(dtype, logits=logits, coef_max=coef_max))


# ------------------------------------------------------------------------------------------------
# labels
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 64, 10**6])
def test_out_of_range_labels_raise_index_error(backend, device, bad):
    if device.type != "cpu":
        pytest.skip("on CUDA the check is a device-side assert (no host sync)")
    logits, labels, _ = make_batch(2, 3, 64, torch.float32, device, ignore_frac=0.0)
    labels[1, 2] = bad
    with pytest.raises(IndexError, match="labels"):
        sk.token_nll(logits, labels, backend=backend)
    # masked-out positions are not checked (their labels are never used)
    mask = torch.ones(2, 3, device=device)
    mask[1, 2] = 0
    out = sk.sequence_nll(logits, labels, mask, backend=backend)
    assert torch.isfinite(out).all()
    # the escape hatch: no check, no crash, nothing read out of bounds; every valid token's value
    # is still right (only the bad token's is unspecified)
    out = sk.token_nll(logits, labels, check_labels=False, backend=backend)
    good = torch.ones_like(labels, dtype=torch.bool)
    good[1, 2] = False
    expected = ref.token_nll(logits, labels.masked_fill(~good, IGNORE))
    assert_close(out[good], expected[good], **ref.tolerances(torch.float32))


def test_custom_ignore_index(backend, device):
    logits, labels, _ = make_batch(2, 5, 40, torch.float32, device, ignore_frac=0.0)
    labels[0, 1] = 7
    out = sk.token_nll(logits, labels, ignore_index=7, backend=backend)
    assert_close(out, ref.token_nll(logits, labels, ignore_index=7), **ref.tolerances(torch.float32))
    assert out[0, 1].item() == 0.0


# ------------------------------------------------------------------------------------------------
# precision with a large common offset (the NLL is formed relative to the row max)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [1e8, -1e8, 3e5])
def test_equal_logits_at_a_large_offset(backend, device, offset):
    """Seven equal logits give log 7 at any offset (a float32 ulp of 1e8 is 8: m + lse rounds lse away)."""
    out = sk.token_nll(torch.full((1, 7), offset, device=device), torch.tensor([2], device=device), backend=backend)
    assert abs(out.item() - math.log(7)) < 1e-6


@pytest.mark.parametrize("offset", [1e6, 1e4])
def test_offset_error_no_worse_than_f_cross_entropy(backend, device, offset):
    logits = torch.randn(3, 16, 1003, device=device) * 2 + offset
    labels = torch.randint(0, 1003, (3, 16), device=device)
    truth = ref.token_nll(logits, labels).cpu()
    theirs = torch.nn.functional.cross_entropy(logits.view(-1, 1003).cpu(), labels.view(-1).cpu(),
                                               reduction="none").double().view(3, 16)
    x = logits.clone().requires_grad_()
    ours = sk.token_nll(x, labels, backend=backend)
    assert (ours.double().cpu() - truth).abs().max() <= max(float((theirs - truth).abs().max()), 2e-6)
    upstream = torch.randn(3, 16, device=device)
    ours.backward(upstream)
    expected = _reference_grad(lambda t: (ref.token_nll(t, labels) * upstream.double()).sum(), logits)
    assert_close(x.grad, expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# inplace_backward on logits whose rows overlap in memory: the out-of-place backward instead
# ------------------------------------------------------------------------------------------------


def _aliasing_views(device):
    """(name, leaf, view builder) of views whose rows share memory: expanded (stride 0 over the
    batch, over the sequence, over both) and an overlapping as_strided (row stride 3 < V = 7)."""
    yield "expand_all", torch.randn(1, 1, 7, device=device), lambda t: t.expand(2, 3, 7)
    yield "expand_batch", torch.randn(1, 3, 7, device=device), lambda t: t.expand(2, 3, 7)
    yield "expand_seq", torch.randn(2, 1, 7, device=device), lambda t: t.expand(2, 3, 7)
    yield "overlapping", torch.randn(40, device=device), lambda t: t.as_strided((2, 3, 7), (9, 3, 1))


@pytest.mark.parametrize("api", ["token", "sequence", "weighted"])
def test_inplace_backward_on_aliasing_rows_falls_back(backend, device, api):
    labels = torch.tensor([[2, 0, 6], [5, -100, 1]], device=device)
    mask = torch.tensor([[1.0, 0.5, 1.0], [1.0, 1.0, 0.0]], device=device)
    weight, upstream = torch.tensor([0.7, -1.3], device=device), torch.randn(2, 3, device=device)

    def loss_of(x, fn):
        if api == "token":
            return (fn(x, labels) * upstream.to(x.dtype)).sum()
        if api == "sequence":
            return (fn(x, labels, mask) * weight.to(x.dtype)).sum()
        return fn(x, labels, mask, weight, 2.0)

    ours = {"token": sk.token_nll, "sequence": sk.sequence_nll, "weighted": sk.weighted_sequence_loss}[api]
    theirs = {"token": ref.token_nll, "sequence": ref.sequence_nll, "weighted": ref.weighted_sequence_loss}[api]
    for name, base, view in _aliasing_views(device):
        leaf = base.clone().requires_grad_()
        before = leaf.detach().clone()
        loss_of(view(leaf), lambda *a: ours(*a, inplace_backward=True, backend=backend)).backward()
        b64 = base.double().requires_grad_()
        loss_of(view(b64), theirs).backward()
        assert_close(leaf.grad, b64.grad, rtol=1e-5, atol=1e-6)
        assert torch.equal(leaf.detach(), before), name  # the shared storage was not written


def test_rows_may_overlap_reads_only_strides():
    from steerlm_kernels.validation import rows_may_overlap

    x = torch.randn(4, 8)
    assert not rows_may_overlap(x) and not rows_may_overlap(x[:, :5]) and not rows_may_overlap(x[:1])
    assert rows_may_overlap(x[:1].expand(4, 8)) and rows_may_overlap(x.view(-1).as_strided((3, 8), (7, 1)))
    assert not rows_may_overlap(torch.randn(1, 8).expand(1, 8))


# ------------------------------------------------------------------------------------------------
# packed segments longer than the kernels' blocks; every segment boundary carries a token
# ------------------------------------------------------------------------------------------------


def test_packed_segments_longer_than_a_block(backend, device):
    """Segments of more than 1024 tokens (the Triton segment kernel's BLOCK) and a segment of one
    token, every boundary token unmasked, per-sequence weights: values and gradients vs float64."""
    v = 3
    cu = torch.tensor([0, 1100, 1101, 1101, 3300], device=device)
    t = int(cu[-1])
    logits = torch.randn(t, v, device=device) * 2
    labels = torch.randint(0, v, (t,), device=device)
    mask = (torch.rand(t, device=device) > 0.2).float()
    edges = torch.cat([cu[:-1], cu[1:] - 1]).clamp(0, t - 1)
    mask[edges], labels[edges] = 1.0, labels[edges].clamp(min=0)  # first and last token of each segment count
    seq = sk.sequence_nll(logits, labels, mask, cu_seqlens=cu, backend=backend)
    assert_close(seq, ref.sequence_nll(logits, labels, mask, cu_seqlens=cu), rtol=1e-5, atol=1e-3)
    weight = torch.tensor([0.5, -2.0, 3.0, 1.5], device=device)
    x = logits.clone().requires_grad_()
    sk.weighted_sequence_loss(x, labels, mask, weight, 7.0, cu_seqlens=cu, backend=backend).backward()
    expected = _reference_grad(lambda y: ref.weighted_sequence_loss(y, labels, mask, weight, 7.0, cu_seqlens=cu),
                               logits)
    assert_close(x.grad, expected, **ref.grad_tolerances(torch.float32))


def test_packed_grad_boundaries(backend, device):
    """Each segment's first and last token is unmasked and segments have distinct weights, so a
    token attributed to its neighbour segment changes the gradient (any seed)."""
    lengths = [3, 1, 5, 2, 4]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    t = int(cu[-1])
    logits, labels, _ = make_batch(1, t, 37, torch.float32, device, ignore_frac=0.0)
    logits, labels = logits[0], labels[0]
    mask = torch.ones(t, device=device)
    mask[[1, 6]] = 0.0  # interior tokens only
    weight = torch.tensor([1.0, -3.0, 0.5, 2.0, -1.0], device=device)
    x = logits.clone().requires_grad_()
    sk.weighted_sequence_loss(x, labels, mask, weight, 1.0, cu_seqlens=cu, backend=backend).backward()
    expected = _reference_grad(lambda y: ref.weighted_sequence_loss(y, labels, mask, weight, 1.0, cu_seqlens=cu),
                               logits)
    assert_close(x.grad, expected, **ref.grad_tolerances(torch.float32))


# ------------------------------------------------------------------------------------------------
# double backward: a clear error, first-order create_graph works
# ------------------------------------------------------------------------------------------------


def test_double_backward_raises_a_clear_error(backend, device):
    logits, labels, mask = make_batch(2, 4, 11, torch.float32, device)
    x = logits.clone().requires_grad_()
    w = torch.randn(2, device=device, requires_grad=True)
    loss = (sk.sequence_nll(x, labels, mask, backend=backend) * w).sum()
    (g,) = torch.autograd.grad(loss, x, create_graph=True)  # first order with a graph: fine
    expected = _reference_grad(lambda y: (ref.sequence_nll(y, labels, mask) * w.detach().double()).sum(), logits)
    assert_close(g.detach(), expected, **ref.grad_tolerances(torch.float32))
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.pow(2).sum().backward()


def test_loss_mask_gradient_is_zero_where_the_mask_is_zero(backend, device):
    """Documented: tokens with mask 0 are never read, so a float mask's gradient there is 0 (not the
    token's NLL); elsewhere it is the token's NLL (float64)."""
    logits = torch.randn(2, 4, 9, device=device)
    labels = torch.randint(0, 9, (2, 4), device=device)
    mask = torch.tensor([[1.0, 0.0, 0.5, 1.0], [0.0, 1.0, 1.0, 0.0]], device=device, requires_grad=True)
    sk.sequence_nll(logits, labels, mask, backend=backend).sum().backward()
    nll = ref.token_nll(logits.cpu(), labels.cpu())
    expected = torch.where(mask.detach().cpu() == 0, 0.0, nll)
    torch.testing.assert_close(mask.grad.double().cpu(), expected, rtol=1e-5, atol=1e-6)
