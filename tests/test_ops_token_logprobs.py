"""``sk.linear_token_logprobs`` (:mod:`steerlm_kernels.ops.token_logprobs`) against float64
log-softmax / entropy: temperature, softcap, bias, chunking, low precision, ignored labels; the
backward through both outputs; bit-identical log-probabilities between a no-grad scoring pass and
a training pass; packed sequences; memory of chunks, never ``[N, V]``; bad input."""

from __future__ import annotations

import pytest
import torch

import steerlm_kernels as sk
from steerlm_kernels import memory
from steerlm_kernels.ops.token_logprobs import TokenLogprobsFunction

IGNORE = -100


def ref_logprobs(hidden, weight, bias, labels, temperature=1.0, softcap=None, scale=None):
    """float64 ``(logprob, entropy)``, 0 where ignored."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, dim=-1)
    valid = labels != IGNORE
    lp = logp.gather(-1, labels.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    zero = torch.zeros_like(lp)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero)


def _case(device, dtype=torch.float32, shape=(2, 7), h=16, v=41):
    hidden = torch.randn(*shape, h, device=device).to(dtype)
    weight = (torch.randn(v, h, device=device) * (3.0 / h**0.5)).to(dtype)
    bias = (torch.randn(v, device=device) * 0.5).to(dtype)
    labels = torch.randint(0, v, shape, device=device)
    labels.view(-1)[1] = IGNORE
    return hidden, weight, bias, labels


OPTIONS = {  # temperature, softcap, bias, chunk_size, logit_scale
    "plain": (1.0, None, False, 0, None),
    "temperature": (0.6, None, True, 3, None),
    "softcap": (1.0, 2.5, True, 0, None),
    "softcap_temperature_bias": (1.7, 4.0, True, 5, None),
    "hot": (0.25, None, True, 1, None),
    "scale": (1.0, None, False, 4, 0.4),
    "scale_softcap_temperature": (0.8, 3.0, True, 6, 1.7),
}


@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_logprobs_and_entropy_match_float64(device, case):
    temperature, softcap, use_bias, chunk, scale = OPTIONS[case]
    hidden, weight, bias, labels = _case(device)
    bias = bias if use_bias else None
    leaves = [None if t is None else t.clone().requires_grad_() for t in (hidden, weight, bias)]
    lp, ent = sk.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], temperature=temperature,
                                       softcap=softcap, logit_scale=scale, return_entropy=True,
                                       chunk_size=chunk or None)
    refs = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    want_lp, want_ent = ref_logprobs(*refs, labels, temperature, softcap, scale)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == labels.shape
    assert (lp <= 0).all() and (ent >= -1e-6).all()
    torch.testing.assert_close(lp.double(), want_lp.detach(), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(ent.double(), want_ent.detach(), rtol=1e-5, atol=2e-6)
    u1, u2 = torch.randn_like(want_lp), torch.randn_like(want_ent)
    (lp * u1.float() + ent * u2.float()).sum().backward()
    (want_lp * u1 + want_ent * u2).sum().backward()
    for name, g, r in zip(("hidden", "weight", "bias"), leaves, refs):
        if r is None:
            continue
        assert g.grad is not None and torch.isfinite(g.grad).all(), name
        torch.testing.assert_close(g.grad.double(), r.grad, rtol=1e-4, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("which", ["logprob", "entropy"])
def test_gradient_of_each_output_alone(device, which):
    """An unused output contributes nothing (its upstream gradient is zero, not garbage)."""
    hidden, weight, bias, labels = _case(device)
    h = hidden.clone().requires_grad_()
    lp, ent = sk.linear_token_logprobs(h, weight, labels, return_entropy=True, temperature=0.8)
    (lp if which == "logprob" else ent).sum().backward()
    hd = hidden.double().requires_grad_()
    want_lp, want_ent = ref_logprobs(hd, weight, None, labels, 0.8)
    (want_lp if which == "logprob" else want_ent).sum().backward()
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision(device, dtype):
    hidden, weight, bias, labels = _case(device, dtype)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    lp, ent = sk.linear_token_logprobs(*leaves, labels, return_entropy=True, softcap=5.0)
    refs = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    want_lp, want_ent = ref_logprobs(*refs, None, labels, 1.0, 5.0)
    # the logits chunk is rounded to the inputs' dtype, as the model's LM head would
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    torch.testing.assert_close(lp.double(), want_lp.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(ent.double(), want_ent.detach(), rtol=tol, atol=tol)
    (lp.sum() + ent.sum()).backward()
    (want_lp.sum() + want_ent.sum()).backward()
    for g, r in zip(leaves, refs):
        assert g.grad.dtype == dtype
        torch.testing.assert_close(g.grad.double(), r.grad, rtol=5e-2, atol=5e-2 * float(r.grad.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scoring_and_training_passes_are_bit_identical(device, dtype):
    """verl #2656: the log-probabilities of a no-grad scoring pass and of a training pass must be
    the same bits (the forward is the same code whatever the grad mode)."""
    hidden, weight, bias, labels = _case(device, dtype, shape=(3, 33), v=301)
    kwargs = {"bias": bias, "temperature": 0.9, "softcap": 30.0, "return_entropy": True, "chunk_size": 17}
    with torch.no_grad():
        score_lp, score_ent = sk.linear_token_logprobs(hidden, weight, labels, **kwargs)
    with torch.inference_mode():
        inf_lp, _ = sk.linear_token_logprobs(hidden, weight, labels, **kwargs)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    train_lp, train_ent = sk.linear_token_logprobs(h, w, labels, **kwargs)
    assert train_lp.requires_grad
    assert torch.equal(score_lp, train_lp.detach()) and torch.equal(score_ent, train_ent.detach())
    assert torch.equal(inf_lp, score_lp)


def test_ignored_labels_give_zero_and_no_gradient(device):
    hidden, weight, bias, labels = _case(device)
    labels[1] = IGNORE
    h = hidden.clone().requires_grad_()
    lp, ent = sk.linear_token_logprobs(h, weight, labels, return_entropy=True)
    assert (lp[1] == 0).all() and (ent[1] == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert torch.equal(h.grad[1], torch.zeros_like(h.grad[1]))
    assert (h.grad[0].abs().sum(-1) > 0).sum() == 6  # row 0 has one ignored label


def test_packed_sequences_equal_per_sequence_results(device):
    hidden, weight, bias, labels = _case(device, shape=(12,))
    cu = torch.tensor([0, 5, 5, 12], device=device)
    packed = sk.linear_token_logprobs(hidden, weight, labels, cu_seqlens=cu)
    per_seq = torch.cat([sk.linear_token_logprobs(hidden[a:b], weight, labels[a:b]) for a, b in ((0, 5), (5, 12))])
    torch.testing.assert_close(packed, per_seq, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        sk.linear_token_logprobs(hidden, weight, labels, cu_seqlens=torch.tensor([0, 5, 11], device=device))
    with pytest.raises(ValueError, match="cu_seqlens"):
        sk.linear_token_logprobs(hidden.view(3, 4, -1), weight, labels.view(3, 4), cu_seqlens=cu)


def test_function_called_directly(device):
    """The autograd Function itself, on flat inputs (what the API calls)."""
    hidden, weight, _, labels = _case(device, shape=(9,))
    h = hidden.clone().requires_grad_()
    lp, ent = TokenLogprobsFunction.apply(h, weight, None, labels, IGNORE, 1.0, None, None, 4, None)[:2]
    want_lp, want_ent = ref_logprobs(hidden, weight, None, labels)
    torch.testing.assert_close(lp.double(), want_lp, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=2e-6)


def test_memory_is_chunks_not_n_by_v():
    """N x V float32 logits would be 64 MiB; chunks of 64 rows are 2 MiB. Forward + backward stay
    far below the full logits."""
    n, v, h = 2048, 8192, 32
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) / h**0.5).requires_grad_()
    labels = torch.randint(0, v, (n,))

    def step():
        lp, ent = sk.linear_token_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=64)
        (lp.sum() + ent.sum()).backward()

    step()  # warm-up: allocator, first-call imports
    hidden.grad = weight.grad = None
    extra, _ = memory.measure_extra_memory(step, torch.device("cpu"))
    if extra is None:
        pytest.skip("peak memory cannot be read on this platform")
    full = n * v * 4 / 2**20
    assert extra < 0.35 * full, f"{extra:.1f} MiB extra vs {full:.0f} MiB of full logits"


BAD = {
    "temperature": (ValueError, {"temperature": 0.0}),
    "logit_scale": (ValueError, {"logit_scale": float("inf")}),
    "softcap": (ValueError, {"softcap": -1.0}),
    "return_entropy": (TypeError, {"return_entropy": "yes"}),
    "ignore_index": (TypeError, {"ignore_index": None}),
    "chunk_size": (ValueError, {"chunk_size": 0}),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_options_name_the_argument(case):
    exc, kwargs = BAD[case]
    hidden, weight, _, labels = _case("cpu")
    with pytest.raises(exc, match=case):
        sk.linear_token_logprobs(hidden, weight, labels, **kwargs)


def test_bad_tensors_name_the_argument():
    hidden, weight, bias, labels = _case("cpu")
    with pytest.raises(ValueError, match="labels"):
        sk.linear_token_logprobs(hidden, weight, labels[:, :3])
    with pytest.raises(TypeError, match="labels"):
        sk.linear_token_logprobs(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="weight"):
        sk.linear_token_logprobs(hidden, weight.T, labels)
    with pytest.raises(ValueError, match="bias"):
        sk.linear_token_logprobs(hidden, weight, labels, bias=bias[:4])
    with pytest.raises(IndexError):
        sk.linear_token_logprobs(hidden, weight, torch.full_like(labels, 41))


def test_nan_rows_at_ignored_labels_stay_out():
    """A NaN hidden row whose label is ignored changes no other value or gradient."""
    hidden, weight, bias, labels = _case("cpu")
    labels[0, 3] = IGNORE
    bad = hidden.clone()
    bad[0, 3] = float("nan")
    outs = []
    for h0 in (hidden, bad):
        h, w = h0.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = sk.linear_token_logprobs(h, w, labels, return_entropy=True, softcap=3.0)
        (lp.sum() + ent.sum()).backward()
        outs.append((lp.detach(), ent.detach(), h.grad, w.grad))
    for x, y in zip(*outs):
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, x, rtol=0, atol=0)
