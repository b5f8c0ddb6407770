"""Bad input: a clear ValueError / TypeError / IndexError naming the argument, raised before any
kernel runs (the backends are replaced by a tripwire to prove it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import steerlm_kernels as sk
from steerlm_kernels import registry


def _tripwire(*args, **kwargs):
    raise AssertionError("a kernel ran before the input was rejected")


@pytest.fixture
def no_kernels(monkeypatch):
    """Every backend's kernels raise if called."""
    fake = SimpleNamespace(ce_forward=_tripwire, ce_backward=_tripwire, segment_sum=_tripwire)
    monkeypatch.setattr(registry, "backend_kernels", lambda name: fake)


def _good(b: int = 2, s: int = 5, v: int = 11):
    return (torch.randn(b, s, v), torch.randint(0, v, (b, s)), torch.ones(b, s), torch.ones(b), torch.ones(b))


def _normalizer(bad: float, form: str):
    """``bad`` as a float, in a ``[B]`` tensor beside a good value, or as a 0-d tensor."""
    return bad if form == "float" else torch.tensor([2.0, bad]) if form == "vector" else torch.tensor(bad)


CASES = {
    "logits_int": (TypeError, "logits", lambda L, y, m, w, n: sk.sequence_nll(L.long(), y, m)),
    "logits_float64": (TypeError, "logits", lambda L, y, m, w, n: sk.sequence_nll(L.double(), y, m)),
    "logits_1d": (ValueError, "logits", lambda L, y, m, w, n: sk.token_nll(L[0, 0], y[0, 0])),
    "logits_not_tensor": (TypeError, "logits", lambda L, y, m, w, n: sk.token_nll(L.tolist(), y)),
    "labels_float": (TypeError, "labels", lambda L, y, m, w, n: sk.token_nll(L, y.float())),
    "labels_int16": (TypeError, "labels", lambda L, y, m, w, n: sk.token_nll(L, y.short())),
    "labels_shape": (ValueError, "labels", lambda L, y, m, w, n: sk.sequence_nll(L, y[:, :4], m)),
    "mask_shape": (ValueError, "loss_mask", lambda L, y, m, w, n: sk.sequence_nll(L, y, m[:, :3])),
    "mask_complex": (TypeError, "loss_mask", lambda L, y, m, w, n: sk.sequence_nll(L, y, m.to(torch.complex64))),
    "ignore_index_float": (TypeError, "ignore_index", lambda L, y, m, w, n: sk.token_nll(L, y, ignore_index=-1.5)),
    "backend_name": (ValueError, "backend", lambda L, y, m, w, n: sk.token_nll(L, y, backend="cuda")),
    "labels_1d_no_cu": (ValueError, "cu_seqlens", lambda L, y, m, w, n: sk.sequence_nll(L[0], y[0], m[0])),
    "cu_float": (TypeError, "cu_seqlens",
                 lambda L, y, m, w, n: sk.sequence_nll(L[0], y[0], m[0], cu_seqlens=torch.tensor([0.0, 5.0]))),
    "cu_sum": (ValueError, "cu_seqlens",
               lambda L, y, m, w, n: sk.sequence_nll(L[0], y[0], m[0], cu_seqlens=torch.tensor([0, 2, 4]))),
    "cu_decreasing": (ValueError, "cu_seqlens",
                      lambda L, y, m, w, n: sk.sequence_nll(L[0], y[0], m[0], cu_seqlens=torch.tensor([0, 4, 2, 5]))),
    "cu_start": (ValueError, "cu_seqlens",
                 lambda L, y, m, w, n: sk.sequence_nll(L[0], y[0], m[0], cu_seqlens=torch.tensor([1, 5]))),
    "cu_2d_labels": (ValueError, "labels",
                     lambda L, y, m, w, n: sk.sequence_nll(L, y, m, cu_seqlens=torch.tensor([0, 10]))),
    "weight_shape": (ValueError, "weight", lambda L, y, m, w, n: sk.weighted_sequence_loss(L, y, m, w[:1], n)),
    "weight_int": (TypeError, "weight", lambda L, y, m, w, n: sk.weighted_sequence_loss(L, y, m, w.long(), n)),
    "normalizer_shape": (ValueError, "normalizer",
                         lambda L, y, m, w, n: sk.weighted_sequence_loss(L, y, m, w, torch.ones(3))),
    "normalizer_zero_where_weight": (
        ValueError, "normalizer",
        lambda L, y, m, w, n: sk.weighted_sequence_loss(L, y, m, w, torch.tensor([1.0, 0.0]))),
    "normalizer_float_zero": (
        ValueError, "normalizer", lambda L, y, m, w, n: sk.weighted_sequence_loss(L, y, m, w, 0.0)),
    "normalizer_bool": (TypeError, "normalizer", lambda L, y, m, w, n: sk.weighted_sequence_loss(L, y, m, w, True)),
    # floats and tensors are checked the same way: finite and positive where the weight is non-zero
    **{f"normalizer_{kind}_{form}": (
        ValueError, "normalizer",
        lambda L, y, m, w, n, bad=bad, form=form: sk.weighted_sequence_loss(L, y, m, w, _normalizer(bad, form)))
       for kind, bad in (("nan", float("nan")), ("negative", -2.0), ("inf", float("inf")), ("neg_inf", float("-inf")))
       for form in ("float", "vector", "scalar_tensor")},
    "weight_cu_mismatch": (
        ValueError, "weight",
        lambda L, y, m, w, n: sk.weighted_sequence_loss(L[0], y[0], m[0], w, 1.0, cu_seqlens=torch.tensor([0, 5]))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_before_any_kernel(no_kernels, case):
    exc, name, call = CASES[case]
    with pytest.raises(exc, match=name):
        call(*_good())


@pytest.mark.parametrize("backend_name", ["torch", "triton", "cpp"])
def test_bad_labels_raise_index_error_before_the_kernel(no_kernels, device, backend_name):
    from tests.conftest import backend_usable

    if not backend_usable(backend_name, device)[0] or device.type != "cpu":
        pytest.skip("backend unavailable here / CUDA uses a device-side assert")
    logits, labels, mask, _, _ = _good()
    labels[0, 1] = 11
    with pytest.raises(IndexError, match="labels"):
        sk.sequence_nll(logits, labels, mask, backend=backend_name)


@pytest.mark.parametrize("bad", [0.0, float("nan"), -1.0, float("inf")])
def test_any_normalizer_allowed_where_weight_is_zero(bad):
    """Where the weight is 0 the sequence contributes exactly 0, whatever its normalizer."""
    logits, labels, mask, _, _ = _good()
    weight = torch.tensor([0.0, 1.0])
    out = sk.weighted_sequence_loss(logits, labels, mask, weight, torch.tensor([bad, 2.0]), backend="torch")
    expected = sk.weighted_sequence_loss(logits, labels, mask, weight, torch.tensor([1.0, 2.0]), backend="torch")
    assert torch.isfinite(out) and torch.equal(out, expected)


def test_groups_without_torch_distributed(no_kernels):
    logits, labels, mask, _, _ = _good()
    with pytest.raises(ValueError, match="process_group"):
        sk.token_nll(logits, labels, process_group=object())
    with pytest.raises(ValueError, match="cp_group"):
        sk.sequence_nll(logits, labels, mask, cp_group=object())


# the logit transforms: validated by every function of both families before any kernel runs
_TRANSFORM_CALLS = {
    "token_nll": lambda L, y, m, w, n, **kw: sk.token_nll(L, y, **kw),
    "sequence_nll": lambda L, y, m, w, n, **kw: sk.sequence_nll(L, y, m, **kw),
    "weighted_sequence_loss": lambda L, y, m, w, n, **kw: sk.weighted_sequence_loss(L, y, m, w, n, **kw),
    "linear_sequence_nll": lambda L, y, m, w, n, **kw: sk.linear_sequence_nll(L, torch.randn(7, L.shape[-1]),
                                                                              y % 7, m, **kw),
    "linear_weighted_sequence_loss": lambda L, y, m, w, n, **kw: sk.linear_weighted_sequence_loss(
        L, torch.randn(7, L.shape[-1]), y % 7, m, w, n, **kw),
}
_BAD_TRANSFORMS = [
    ("softcap", 0.0, ValueError), ("softcap", -5.0, ValueError), ("softcap", float("nan"), ValueError),
    ("softcap", float("inf"), ValueError), ("softcap", True, TypeError), ("softcap", "30", TypeError),
    ("softcap", torch.tensor(30.0), TypeError),
    ("logit_scale", 0.0, ValueError), ("logit_scale", -0.5, ValueError), ("logit_scale", float("nan"), ValueError),
    ("logit_scale", float("-inf"), ValueError), ("logit_scale", False, TypeError), ("logit_scale", [2.0], TypeError),
]


@pytest.mark.parametrize("fn", sorted(_TRANSFORM_CALLS))
@pytest.mark.parametrize(("name", "value", "exc"), _BAD_TRANSFORMS, ids=lambda x: repr(x)[:12])
def test_bad_logit_transform_raises_before_any_kernel(no_kernels, fn, name, value, exc):
    with pytest.raises(exc, match=name):
        _TRANSFORM_CALLS[fn](*_good(), **{name: value})


def test_logit_transform_accepts_ints_and_numpy_floats():
    np = pytest.importorskip("numpy")
    from steerlm_kernels.validation import check_logit_transform

    assert check_logit_transform(30, np.float32(0.5)) == (30.0, 0.5)
    assert check_logit_transform(None, 1.0) == (None, None)  # a scale of 1 is the identity
    assert check_logit_transform(None, None) == (None, None)
