"""Fused linear losses (hidden states + LM head) on every backend against a float64 reference.

The reference applies ``hidden @ W.T + bias`` in float64 and then the formulas of
tests/reference.py. Backends: ``torch``, ``cpp`` and ``triton`` with chunks (every dtype; the
Triton CE kernels run on each chunk), and ``triton-tiles`` (the Triton tile kernels,
``$STEERLM_KERNELS_LINEAR=tiles``): through the interpreter on CPU with float32 operands only (the
interpreter's bf16 is raw 16-bit integers; the bf16/fp16 tile kernels are checked by the AOT
compile test) or compiled on CUDA.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from steerlm_kernels import api_linear, nn, registry
from steerlm_kernels.ops import linear_chunks
from steerlm_kernels.ops import linear_cross_entropy as lce
from tests import reference as ref
from tests.conftest import backend_usable, require_backend

IGNORE = -100
linear_sequence_nll = api_linear.linear_sequence_nll
linear_weighted_sequence_loss = api_linear.linear_weighted_sequence_loss


@pytest.fixture(params=["torch", "cpp", "triton", "triton-tiles"])
def backend(request, device, monkeypatch) -> str:
    """The backend name to pass; ``triton-tiles`` passes ``"triton"`` with the tile kernels selected
    (``$STEERLM_KERNELS_LINEAR=tiles``), every other case runs chunks."""
    name, _, strategy = request.param.partition("-")
    require_backend(name, device)
    monkeypatch.setenv(registry.LINEAR_ENV_VAR, strategy or "chunks")
    return name


def _tiles(backend: str) -> bool:
    return registry.linear_strategy(backend) == "tiles"


def _skip_interpreted_half(backend: str, dtype: torch.dtype, device: torch.device) -> None:
    if _tiles(backend) and dtype != torch.float32 and device.type == "cpu":
        pytest.skip("the Triton interpreter computes bf16/fp16 tl.dot wrongly; the tile kernels are AOT-compiled")


def make_inputs(b: int, s: int, h: int, v: int, dtype: torch.dtype, device: torch.device, *, bias: bool = True,
                mask: str | None = "float", ignore_frac: float = 0.1):
    """hidden [B, S, H], weight [V, H], bias [V], labels [B, S], loss_mask [B, S] (logits ~ N(0, 4))."""
    hidden = torch.randn(b, s, h).to(dtype).to(device)
    weight = (torch.randn(v, h) * (2.0 / h**0.5)).to(dtype).to(device)
    b_ = (torch.randn(v) * 0.5).to(dtype).to(device) if bias else None
    labels = torch.randint(0, v, (b, s))
    labels[torch.rand(b, s) < ignore_frac] = IGNORE
    keep = torch.rand(b, s) > 0.3
    if mask is None:
        loss_mask = None
    elif mask == "bool":
        loss_mask = keep
    else:
        loss_mask = keep.float() * (0.5 + torch.rand(b, s))
    return hidden, weight, b_, labels.to(device), None if loss_mask is None else loss_mask.to(device)


def ref_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = hidden.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def value_tol(dtype: torch.dtype, backend: str) -> dict[str, float]:
    # Chunks multiply bf16 in bf16 (logits rounded to bf16, as `hidden @ W.T` itself); the tile
    # kernels keep float32 logits.
    if dtype == torch.bfloat16 and not _tiles(backend):
        return {"rtol": 2e-2, "atol": 0.1}
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 2e-5}
    return {"rtol": 1e-4, "atol": 1e-4}


def grad_rel_tol(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **tol) -> None:
    assert not torch.isnan(actual).any(), "NaN in result"
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **tol)


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Relative error in norm (rounding to bf16 makes elementwise tolerances meaningless)."""
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "non-finite gradient"
    err = (actual.double().cpu() - expected.double().cpu()).norm() / expected.double().cpu().norm().clamp_min(1e-30)
    assert err <= rel, f"relative gradient error {err:.2e} > {rel:.1e}"


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def ref_grads(fn, hidden, weight, bias):
    """Gradients of ``fn(logits64)`` w.r.t. float64 copies of the inputs."""
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    out = fn(ref_logits(h64, w64, b64))
    out.backward()
    return out.detach(), h64.grad, w64.grad, None if b64 is None else b64.grad


# ------------------------------------------------------------------------------------------------
# values and gradients
# ------------------------------------------------------------------------------------------------

SHAPES = [(2, 7, 24, 77), (3, 5, 40, 300), (1, 9, 16, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", ["float", "bool", None])
def test_linear_sequence_nll_value_and_grads(backend, dtype, device, shape, mask):
    _skip_interpreted_half(backend, dtype, device)
    hidden, weight, bias, labels, loss_mask = make_inputs(*shape, dtype, device, mask=mask, bias=mask != "bool")
    h, w, b = leaves(hidden, weight, bias)
    out = linear_sequence_nll(h, w, labels, loss_mask, bias=b, backend=backend, chunk_size=4)
    assert out.shape == (shape[0],) and out.dtype == torch.float32
    upstream = torch.randn(shape[0], dtype=torch.float64)
    exp_val, gh, gw, gb = ref_grads(
        lambda x: (ref.sequence_nll(x, labels.cpu(), None if loss_mask is None else loss_mask.cpu()) * upstream).sum(),
        hidden.cpu(), weight.cpu(), None if bias is None else bias.cpu(),
    )
    expected = ref.sequence_nll(ref_logits(hidden.cpu(), weight.cpu(), None if bias is None else bias.cpu()),
                                labels.cpu(), None if loss_mask is None else loss_mask.cpu())
    assert_close(out, expected, **value_tol(dtype, backend))
    (out.double().cpu() * upstream).sum().backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert_grad_close(h.grad, gh, grad_rel_tol(dtype))
    assert_grad_close(w.grad, gw, grad_rel_tol(dtype))
    if b is not None:
        assert_grad_close(b.grad, gb, grad_rel_tol(dtype))


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_linear_weighted_loss_value_and_grads(backend, dtype, device, shape):
    _skip_interpreted_half(backend, dtype, device)
    hidden, weight, bias, labels, loss_mask = make_inputs(*shape, dtype, device)
    wt = torch.randn(shape[0], device=device)
    wt[0] = 0.0
    normalizer = torch.rand(shape[0], device=device) + 0.5
    normalizer[0] = 0.0  # allowed where weight is 0
    h, w, b = leaves(hidden, weight, bias)
    out = linear_weighted_sequence_loss(h, w, labels, loss_mask, wt, normalizer, bias=b, backend=backend,
                                        chunk_size=5)
    assert out.shape == () and out.dtype == torch.float32
    exp_val, gh, gw, gb = ref_grads(
        lambda x: 0.3 * ref.weighted_sequence_loss(x, labels.cpu(), loss_mask.cpu(), wt.cpu(), normalizer.cpu()),
        hidden.cpu(), weight.cpu(), bias.cpu(),
    )
    assert_close(out * 0.3, exp_val, **value_tol(dtype, backend))
    (out * 0.3).backward()
    assert_grad_close(h.grad, gh, grad_rel_tol(dtype))
    assert_grad_close(w.grad, gw, grad_rel_tol(dtype))
    assert_grad_close(b.grad, gb, grad_rel_tol(dtype))


def test_weighted_loss_matches_sequence_nll_composition(backend, device):
    """Both public functions agree with each other and give grads for weight / float mask too."""
    hidden, weight, bias, labels, loss_mask = make_inputs(3, 6, 24, 90, torch.float32, device)
    wt = torch.randn(3, device=device, requires_grad=True)
    mask = loss_mask.clone().requires_grad_()
    normalizer = torch.rand(3, device=device) + 0.5
    h1, w1, b1 = leaves(hidden, weight, bias)
    loss1 = linear_weighted_sequence_loss(h1, w1, labels, mask, wt, normalizer, bias=b1, backend=backend)
    loss1.backward()
    g_wt, g_mask = wt.grad.clone(), mask.grad.clone()
    wt.grad = None
    mask.grad = None
    h2, w2, b2 = leaves(hidden, weight, bias)
    seq = linear_sequence_nll(h2, w2, labels, mask, bias=b2, backend=backend)
    loss2 = (wt / normalizer * seq).sum()
    loss2.backward()
    assert_close(loss1, loss2.detach(), rtol=1e-5, atol=1e-5)
    for a, e in [(h1.grad, h2.grad), (w1.grad, w2.grad), (b1.grad, b2.grad), (g_wt, wt.grad), (g_mask, mask.grad)]:
        assert_grad_close(a, e, 1e-5)


@pytest.mark.parametrize("cu", [[0, 5, 5, 19, 40], [0, 40], [0, 0, 40, 40]])
def test_packed(backend, device, cu):
    hidden, weight, bias, labels, loss_mask = make_inputs(1, 40, 24, 130, torch.float32, device)
    hidden, labels, loss_mask = hidden[0], labels[0], loss_mask[0]
    cu_seqlens = torch.tensor(cu, device=device, dtype=torch.int32)
    h, w, b = leaves(hidden, weight, bias)
    out = linear_sequence_nll(h, w, labels, loss_mask, bias=b, cu_seqlens=cu_seqlens, backend=backend)
    assert out.shape == (len(cu) - 1,)
    exp_val, gh, gw, gb = ref_grads(
        lambda x: ref.sequence_nll(x, labels.cpu(), loss_mask.cpu(), cu_seqlens=cu_seqlens.cpu()).sum(),
        hidden.cpu(), weight.cpu(), bias.cpu(),
    )
    assert_close(out.sum(), exp_val, rtol=1e-5, atol=1e-4)
    out.sum().backward()
    for a, e in [(h.grad, gh), (w.grad, gw), (b.grad, gb)]:
        assert_grad_close(a, e, 1e-5)
    # the weighted loss on packed input
    wt = torch.randn(len(cu) - 1, device=device)
    h, w, b = leaves(hidden, weight, bias)
    loss = linear_weighted_sequence_loss(h, w, labels, loss_mask, wt, 2.5, bias=b, cu_seqlens=cu_seqlens,
                                         backend=backend)
    exp_val, gh, gw, gb = ref_grads(
        lambda x: ref.weighted_sequence_loss(x, labels.cpu(), loss_mask.cpu(), wt.cpu(), 2.5,
                                             cu_seqlens=cu_seqlens.cpu()),
        hidden.cpu(), weight.cpu(), bias.cpu(),
    )
    assert_close(loss, exp_val, rtol=1e-5, atol=1e-4)
    loss.backward()
    for a, e in [(h.grad, gh), (w.grad, gw), (b.grad, gb)]:
        assert_grad_close(a, e, 1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000, None])
def test_chunk_size_does_not_change_results(backend, device, chunk_size):
    hidden, weight, bias, labels, loss_mask = make_inputs(2, 9, 16, 70, torch.float32, device)
    wt, normalizer = torch.randn(2, device=device), torch.rand(2, device=device) + 1
    h, w, b = leaves(hidden, weight, bias)
    loss = linear_weighted_sequence_loss(h, w, labels, loss_mask, wt, normalizer, bias=b, chunk_size=chunk_size,
                                         backend=backend)
    loss.backward()
    exp_val, gh, gw, gb = ref_grads(
        lambda x: ref.weighted_sequence_loss(x, labels.cpu(), loss_mask.cpu(), wt.cpu(), normalizer.cpu()),
        hidden.cpu(), weight.cpu(), bias.cpu(),
    )
    assert_close(loss, exp_val, rtol=1e-5, atol=1e-5)
    for a, e in [(h.grad, gh), (w.grad, gw), (b.grad, gb)]:
        assert_grad_close(a, e, 1e-5)


def test_strategy_selects_the_kernels(backend, device, monkeypatch):
    """Chunks run one chunked function per mode with the backend's CE kernels; tiles run only the
    tile kernels."""
    calls: dict[str, int] = {}

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)

        return wrapper

    for name in ("linear_stats", "linear_grads", "linear_stats_and_grads"):
        monkeypatch.setattr(lce, name, counted(name, getattr(lce, name)))
    real_kernels = registry.backend_kernels

    def spied_kernels(name):
        k = real_kernels(name)
        if k.linear_tiles_forward is None:
            return k
        return dataclasses.replace(k, linear_tiles_forward=counted("tiles_forward", k.linear_tiles_forward),
                                   linear_tiles_backward=counted("tiles_backward", k.linear_tiles_backward))

    monkeypatch.setattr(registry, "backend_kernels", spied_kernels)
    hidden, weight, bias, labels, loss_mask = make_inputs(2, 5, 16, 40, torch.float32, device)
    h, w, b = leaves(hidden, weight, bias)
    linear_sequence_nll(h, w, labels, loss_mask, bias=b, backend=backend).sum().backward()
    linear_weighted_sequence_loss(h, w, labels, loss_mask, torch.ones(2, device=device), 1.0, bias=b,
                                  backend=backend).backward()
    if _tiles(backend):
        assert calls == {"tiles_forward": 2, "tiles_backward": 2}, calls
    else:  # forward, recomputing backward, fused
        assert calls == {"linear_stats": 1, "linear_grads": 1, "linear_stats_and_grads": 1}, calls


def test_chunks_are_bitwise_deterministic(backend, device):
    if _tiles(backend):
        pytest.skip("the tile kernels accumulate gradients with float32 atomics (documented)")
    hidden, weight, bias, labels, loss_mask = make_inputs(3, 40, 16, 300, torch.bfloat16, device)
    wt = torch.randn(3, device=device)
    runs = []
    for _ in range(2):
        h, w, b = leaves(hidden, weight, bias)
        loss = linear_weighted_sequence_loss(h, w, labels, loss_mask, wt, 3.0, bias=b, chunk_size=7, backend=backend)
        loss.backward()
        runs.append((loss, h.grad, w.grad, b.grad))
    for a, e in zip(*runs):
        assert torch.equal(a, e)


def test_default_chunk_rows():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert linear_chunks.default_chunk_rows(32000, cpu) == (1 << 26) // 32000
    assert linear_chunks.default_chunk_rows(1 << 30, cpu) == 1
    assert linear_chunks.default_chunk_rows(32000, cuda) == linear_chunks.CUDA_MIN_CHUNK_ROWS
    assert linear_chunks.default_chunk_rows(1000, cuda) == (1 << 26) // 1000  # more rows when V is small


def test_chunks_are_near_equal_and_cover_every_row():
    for n in range(0, 50):
        for step in range(1, 12):
            bounds = linear_chunks.even_bounds(n, step)
            assert len(bounds) == -(-n // step)
            assert [a for a, _ in bounds[1:]] == [b for _, b in bounds[:-1]]
            assert not bounds or (bounds[0][0] == 0 and bounds[-1][1] == n)
            sizes = [b - a for a, b in bounds]
            assert all(0 < x <= step for x in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)
    assert linear_chunks.even_bounds(4097, 4096) == [(0, 2048), (2048, 4097)]


def test_tile_marker_is_refused_by_cpu_backends():
    hidden, weight, bias, labels, _ = make_inputs(1, 4, 8, 11, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="tile kernels"):
        lce.linear_ce_forward_op(hidden[0], weight, bias, labels[0].clamp_min(0), IGNORE, False, "tiles", 0, "torch")


def test_flattened_hidden_and_int32_labels(backend, device):
    hidden, weight, bias, labels, loss_mask = make_inputs(3, 4, 16, 50, torch.float32, device)
    out = linear_sequence_nll(hidden.view(12, 16), weight, labels.int(), loss_mask, bias=bias, backend=backend)
    expected = ref.sequence_nll(ref_logits(hidden, weight, bias).cpu(), labels.cpu(), loss_mask.cpu())
    assert_close(out, expected, rtol=1e-5, atol=2e-5)


def test_all_masked_and_custom_ignore_index(backend, device):
    hidden, weight, bias, labels, loss_mask = make_inputs(3, 6, 16, 40, torch.float32, device)
    loss_mask[1] = 0
    labels[labels == IGNORE] = 7
    labels[2] = 7
    out = linear_sequence_nll(hidden, weight, labels, loss_mask, bias=bias, ignore_index=7, backend=backend)
    assert out[1].item() == 0.0 and out[2].item() == 0.0
    expected = ref.sequence_nll(ref_logits(hidden, weight, bias).cpu(), labels.cpu(), loss_mask.cpu(), ignore_index=7)
    assert_close(out, expected, rtol=1e-5, atol=2e-5)


def test_minus_inf_bias_columns(backend, device):
    """A vocabulary split whose logits are all -inf (masked-out tokens) must not poison the LSE."""
    hidden, weight, bias, labels, loss_mask = make_inputs(2, 5, 16, 200, torch.float32, device, ignore_frac=0.0)
    bias[:80] = float("-inf")
    labels = labels.clamp(min=80)
    h, w = leaves(hidden, weight)
    out = linear_sequence_nll(h, w, labels, loss_mask, bias=bias, backend=backend)
    expected = ref.sequence_nll(ref_logits(hidden, weight, bias).cpu(), labels.cpu(), loss_mask.cpu())
    assert_close(out, expected, rtol=1e-5, atol=2e-5)
    out.sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert (w.grad[:80] == 0).all()


def test_nan_hidden_propagates_unless_masked(backend, device):
    hidden, weight, bias, labels, _ = make_inputs(2, 4, 16, 30, torch.float32, device, ignore_frac=0.0)
    loss_mask = torch.ones(2, 4, device=device)
    hidden[0, 1, 3] = float("nan")
    hidden[1, 2, :] = float("nan")
    loss_mask[1, 2] = 0
    out = linear_sequence_nll(hidden, weight, labels, loss_mask, bias=bias, backend=backend)
    assert torch.isnan(out[0]) and torch.isfinite(out[1])


def test_inputs_not_modified(backend, device):
    hidden, weight, bias, labels, loss_mask = make_inputs(2, 6, 16, 45, torch.float32, device)
    copies = [t.clone() for t in (hidden, weight, bias, labels, loss_mask)]
    h, w, b = (t.requires_grad_() for t in (hidden, weight, bias))
    linear_sequence_nll(h, w, labels, loss_mask, bias=b, backend=backend).sum().backward()
    linear_weighted_sequence_loss(h, w, labels, loss_mask, torch.ones(2, device=device), 3.0, bias=b,
                                  backend=backend).backward()
    for t, c in zip((hidden, weight, bias, labels, loss_mask), copies, strict=True):
        assert torch.equal(t.detach(), c)


def test_weighted_loss_backward_scales_in_place_once(backend, device):
    # The carrier's backward scales the head-sized gradient it saved in the forward in place: the
    # gradients must still be those of upstream * loss (float64 reference, upstream -2.5), and a second
    # backward through the same graph must raise instead of reusing the already-scaled buffers.
    hidden, weight, bias, labels, loss_mask = make_inputs(2, 6, 16, 45, torch.float32, device)
    wt = torch.tensor([0.7, -1.3], device=device)
    normalizer = torch.tensor([2.0, 3.0], device=device)
    h, w, b = leaves(hidden, weight, bias)
    out = linear_weighted_sequence_loss(h, w, labels, loss_mask, wt, normalizer, bias=b, backend=backend,
                                        chunk_size=4)
    _, gh, gw, gb = ref_grads(
        lambda x: -2.5 * ref.weighted_sequence_loss(x, labels.cpu(), loss_mask.cpu(), wt.cpu(), normalizer.cpu()),
        hidden.cpu(), weight.cpu(), bias.cpu(),
    )
    (out * -2.5).backward(retain_graph=True)
    for got, exp in ((h.grad, gh), (w.grad, gw), (b.grad, gb)):
        assert_grad_close(got, exp, grad_rel_tol(torch.float32))
    with pytest.raises(RuntimeError, match="second backward"):
        (out * -2.5).backward()


def test_no_grad_saves_nothing(backend, device):
    hidden, weight, bias, labels, loss_mask = make_inputs(2, 6, 16, 45, torch.float32, device)
    h, w = leaves(hidden, weight)
    with torch.no_grad():
        out = linear_sequence_nll(h, w, labels, loss_mask, bias=bias, backend=backend)
        loss = linear_weighted_sequence_loss(h, w, labels, loss_mask, torch.ones(2, device=device), 1.0,
                                             backend=backend)
    assert out.grad_fn is None and loss.grad_fn is None


def test_non_contiguous_inputs(backend, device):
    hidden, weight, bias, labels, loss_mask = make_inputs(5, 2, 16, 33, torch.float32, device)
    h_t = hidden.transpose(0, 1)  # [2, 5, 16], leading dims not flattenable
    w_t = weight.t().contiguous().t()  # [V, H] with unit stride along V
    out = linear_sequence_nll(h_t, w_t, labels.t(), loss_mask.t(), bias=bias, backend=backend)
    expected = ref.sequence_nll(ref_logits(h_t, weight, bias).cpu(), labels.t().cpu(), loss_mask.t().cpu())
    assert_close(out, expected, rtol=1e-5, atol=2e-5)


def test_nn_modules(backend, device):
    hidden, weight, bias, labels, loss_mask = make_inputs(2, 5, 16, 30, torch.float32, device)
    seq = nn.LinearSequenceNLL(backend=backend, chunk_size=3)(hidden, weight, labels, loss_mask, bias=bias)
    expected = linear_sequence_nll(hidden, weight, labels, loss_mask, bias=bias, backend=backend)
    assert_close(seq, expected, rtol=1e-6, atol=1e-6)
    wt = torch.randn(2, device=device)
    loss = nn.LinearWeightedSequenceLoss(backend=backend)(hidden, weight, labels, loss_mask, wt, 2.0,
                                                                bias=bias)
    assert_close(loss, (wt * expected / 2.0).sum(), rtol=1e-5, atol=1e-5)
    assert "chunk_size=3" in repr(nn.LinearSequenceNLL(chunk_size=3))


# ------------------------------------------------------------------------------------------------
# bad input: named errors before any kernel runs
# ------------------------------------------------------------------------------------------------


def _tripwire(*args, **kwargs):
    raise AssertionError("a kernel ran before the input was rejected")


@pytest.fixture
def no_kernels(monkeypatch):
    for name in ("linear_stats", "linear_grads", "linear_stats_and_grads"):
        monkeypatch.setattr(lce, name, _tripwire)
    monkeypatch.setattr(registry, "backend_kernels", _tripwire)


def _good():
    h, w, b, y, m = make_inputs(2, 5, 8, 11, torch.float32, torch.device("cpu"))
    return h, w, b, y, m


SEQ = linear_sequence_nll
WSL = linear_weighted_sequence_loss
BAD = {
    "hidden_int": (TypeError, "hidden", lambda h, w, b, y, m: SEQ(h.long(), w, y, m)),
    "hidden_float64": (TypeError, "hidden", lambda h, w, b, y, m: SEQ(h.double(), w.double(), y, m)),
    "hidden_1d": (ValueError, "hidden", lambda h, w, b, y, m: SEQ(h[0, 0], w, y, m)),
    "hidden_list": (TypeError, "hidden", lambda h, w, b, y, m: SEQ(h.tolist(), w, y, m)),
    "weight_dtype": (TypeError, "lm_head_weight", lambda h, w, b, y, m: SEQ(h, w.bfloat16(), y, m)),
    "weight_h": (ValueError, "lm_head_weight", lambda h, w, b, y, m: SEQ(h, w[:, :7], y, m)),
    "weight_1d": (ValueError, "lm_head_weight", lambda h, w, b, y, m: SEQ(h, w[0], y, m)),
    "weight_3d": (ValueError, "lm_head_weight", lambda h, w, b, y, m: SEQ(h, w[None], y, m)),
    "weight_none": (TypeError, "lm_head_weight", lambda h, w, b, y, m: SEQ(h, None, y, m)),
    "bias_shape": (ValueError, "bias", lambda h, w, b, y, m: SEQ(h, w, y, m, bias=b[:5])),
    "bias_2d": (ValueError, "bias", lambda h, w, b, y, m: SEQ(h, w, y, m, bias=b[None])),
    "bias_dtype": (TypeError, "bias", lambda h, w, b, y, m: SEQ(h, w, y, m, bias=b.half())),
    "labels_float": (TypeError, "labels", lambda h, w, b, y, m: SEQ(h, w, y.float(), m)),
    "labels_shape": (ValueError, "labels", lambda h, w, b, y, m: SEQ(h, w, y[:, :4], m)),
    "mask_shape": (ValueError, "loss_mask", lambda h, w, b, y, m: SEQ(h, w, y, m[:, :3])),
    "chunk_zero": (ValueError, "chunk_size", lambda h, w, b, y, m: SEQ(h, w, y, m, chunk_size=0)),
    "chunk_float": (TypeError, "chunk_size", lambda h, w, b, y, m: SEQ(h, w, y, m, chunk_size=2.0)),
    "ignore_index_float": (TypeError, "ignore_index", lambda h, w, b, y, m: SEQ(h, w, y, m, ignore_index=-1.5)),
    "backend_name": (ValueError, "backend", lambda h, w, b, y, m: SEQ(h, w, y, m, backend="gpu")),
    "packed_no_cu": (ValueError, "cu_seqlens", lambda h, w, b, y, m: SEQ(h[0], w, y[0], m[0])),
    "cu_sum": (ValueError, "cu_seqlens",
               lambda h, w, b, y, m: SEQ(h[0], w, y[0], m[0], cu_seqlens=torch.tensor([0, 2, 4]))),
    "weight_len": (ValueError, "weight", lambda h, w, b, y, m: WSL(h, w, y, m, torch.ones(3), 1.0)),
    "weight_int": (TypeError, "weight", lambda h, w, b, y, m: WSL(h, w, y, m, torch.ones(2, dtype=torch.long), 1.0)),
    "normalizer_zero": (ValueError, "normalizer", lambda h, w, b, y, m: WSL(h, w, y, m, torch.ones(2),
                                                                            torch.tensor([1.0, 0.0]))),
    "normalizer_shape": (ValueError, "normalizer", lambda h, w, b, y, m: WSL(h, w, y, m, torch.ones(2),
                                                                             torch.ones(3))),
    "wsl_weight_dtype": (TypeError, "lm_head_weight",
                         lambda h, w, b, y, m: WSL(h, w.half(), y, m, torch.ones(2), 1.0)),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_before_any_kernel(no_kernels, case):
    exc, name, call = BAD[case]
    with pytest.raises(exc, match=name):
        call(*_good())


@pytest.mark.parametrize("group", ["process_group", "cp_group"])
def test_groups_without_torch_distributed_raise_before_any_kernel(no_kernels, group):
    """Groups are supported (tests/test_distributed_linear.py); without an initialised
    torch.distributed they are a clear ValueError naming the argument, before any kernel."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    h, w, b, y, m = _good()
    with pytest.raises(ValueError, match=group):
        SEQ(h, w, y, m, **{group: object()})
    with pytest.raises(ValueError, match=group):
        WSL(h, w, y, m, torch.ones(2), 1.0, **{group: object()})


@pytest.mark.parametrize("bad", [11, -1, 1000])
def test_out_of_range_labels_raise_index_error(backend, device, bad):
    hidden, weight, bias, labels, loss_mask = make_inputs(2, 5, 8, 11, torch.float32, device)
    labels[1, 2] = bad
    loss_mask[1, 2] = 1.0
    if device.type != "cpu":
        pytest.skip("device-side assert on CUDA")
    with pytest.raises(IndexError, match="labels"):
        linear_sequence_nll(hidden, weight, labels, loss_mask, bias=bias, backend=backend)
    # check_labels=False: nothing is read out of bounds; the value is unspecified
    linear_sequence_nll(hidden, weight, labels, loss_mask, bias=bias, backend=backend, check_labels=False)


# ------------------------------------------------------------------------------------------------
# memory: the CPU path never holds [N, V]
# ------------------------------------------------------------------------------------------------


def test_cpu_peak_memory_bounded_by_chunk_not_n_times_v():
    """cpp backend where built (the chunk driver is shared with torch, which is ~4x slower here)."""
    from steerlm_kernels import memory as bench

    backend_name = "cpp" if backend_usable("cpp", torch.device("cpu"))[0] else "torch"
    if bench.memory_method_check("cpu", 64) is None:
        pytest.skip("cannot measure the RSS high-water mark here")
    n, v, h = 4096, 128000, 64  # full float32 logits: 2000 MiB
    hidden = torch.randn(n, h) * 0.1
    weight = torch.randn(v, h) * 0.1
    labels = torch.randint(0, v, (n,))

    def peak(rows: int, chunk: int | None, grad: bool) -> float:
        hh = hidden[:rows]
        cc = torch.tensor([0, rows // 2, rows])
        if not grad:
            def call():
                with torch.no_grad():
                    return linear_sequence_nll(hh, weight, labels[:rows], cu_seqlens=cc, chunk_size=chunk,
                                               backend=backend_name)
        else:
            w = weight.clone().requires_grad_()  # gradient buffers: [V, H] float32 (32 MiB) each

            def call():
                return linear_weighted_sequence_loss(hh, w, labels[:rows], None, torch.ones(2), 1.0,
                                                     cu_seqlens=cc, chunk_size=chunk, backend=backend_name)
        extra, out = bench.measure_extra_memory(call, torch.device("cpu"))
        del out
        return extra

    peak(64, 16, grad=True)  # warm-up: first-call allocations of the libraries
    small = peak(n, 256, grad=False)  # chunk: 256 x V float32 = 125 MiB
    auto = peak(n, None, grad=False)  # default: 256 MiB
    half_n = peak(n // 2, None, grad=False)
    trained = peak(n, 256, grad=True)
    print(f"extra MiB: chunk 256 {small:.0f}, auto {auto:.0f}, auto N/2 {half_n:.0f}, train chunk 256 {trained:.0f}")
    assert small < 250, small
    assert auto < 450, auto
    assert small < auto - 60, (small, auto)  # grows with the chunk ...
    assert abs(auto - half_n) < 100, (auto, half_n)  # ... not with N (N x V would double)
    assert trained < 400, trained  # chunk + grad_W (fp32 acc + result) + O(N)


def test_torch_compile_fullgraph(backend, device):
    """The custom ops and autograd functions trace without graph breaks."""
    hidden, weight, bias, labels, loss_mask = make_inputs(2, 5, 16, 40, torch.float32, device)
    wt = torch.randn(2, device=device)

    def fn(h, w, b):
        seq = linear_sequence_nll(h, w, labels, loss_mask, bias=b, backend=backend)
        loss = linear_weighted_sequence_loss(h, w, labels, loss_mask, wt, 2.0, bias=b, backend=backend)
        return seq.sum() + loss

    h1, w1, b1 = leaves(hidden, weight, bias)
    fn(h1, w1, b1).backward()  # eager first (also warms the backend probes)
    h2, w2, b2 = leaves(hidden, weight, bias)
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True)(h2, w2, b2)
    out.backward()
    for a, e in [(h2.grad, h1.grad), (w2.grad, w1.grad), (b2.grad, b1.grad)]:
        assert_grad_close(a, e, 1e-5)
