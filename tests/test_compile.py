"""``torch.compile(fullgraph=True)`` traces the public functions without graph breaks, and the
compiled results (values and gradients) equal the eager ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import steerlm_kernels as sk
from tests import reference as ref


def _inputs(device):
    logits = torch.randn(3, 7, 64, device=device)
    labels = torch.randint(0, 64, (3, 7), device=device)
    labels[0, 2] = -100
    mask = (torch.rand(3, 7, device=device) > 0.3).float()
    return logits, labels, mask


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_weighted_loss_compiles_fullgraph(backend, device, compiler):
    if compiler == "inductor" and backend == "triton" and device.type == "cpu":
        pytest.skip("inductor's CPU codegen of the interpreted-Triton path adds nothing over aot_eager")
    torch._dynamo.reset()
    logits, labels, mask = _inputs(device)
    weight, normalizer = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5

    @torch.compile(fullgraph=True, backend=compiler)
    def step(x):
        loss = sk.weighted_sequence_loss(x, labels, mask, weight, normalizer, backend=backend)
        seq = sk.sequence_nll(x, labels, mask, backend=backend)
        tok = sk.token_nll(x, labels, backend=backend)
        return loss, seq, tok

    x = logits.clone().requires_grad_()
    loss, seq, tok = step(x)
    loss.backward()
    xd = logits.double().requires_grad_()
    expected = ref.weighted_sequence_loss(xd, labels, mask, weight, normalizer)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(seq.double(), ref.sequence_nll(logits, labels, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tok.double(), ref.token_nll(logits, labels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-7)


def test_packed_sequence_nll_compiles_fullgraph(backend, device):
    torch._dynamo.reset()
    logits, labels, mask = _inputs(device)
    cu = torch.tensor([0, 5, 5, 21], device=device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return sk.sequence_nll(x, labels.view(-1), mask.view(-1), cu_seqlens=cu, backend=backend)

    x = logits.view(21, 64).clone().requires_grad_()
    out = f(x)
    out.sum().backward()
    expected = ref.sequence_nll(logits.view(21, 64), labels.view(-1), mask.view(-1), cu_seqlens=cu)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    xd = logits.view(21, 64).double().requires_grad_()
    ref.sequence_nll(xd, labels.view(-1), mask.view(-1), cu_seqlens=cu).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-7)


def test_inplace_backward_compiles_fullgraph(backend, device):
    torch._dynamo.reset()
    logits, labels, mask = _inputs(device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return sk.sequence_nll(x * 1, labels, mask, inplace_backward=True, backend=backend).sum()

    x = logits.clone().requires_grad_()
    f(x).backward()
    xd = logits.double().requires_grad_()
    ref.sequence_nll(xd, labels, mask).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-7)


# --- torch.compile holding the FIRST call of an op in the process -----------------------------------
# The registry must answer resolve() without importing anything while dynamo traces it (an import
# inside a fullgraph trace is "Attempted to call function marked as skipped"); after one eager call
# that was hidden, so each case runs in a fresh interpreter whose very first call is the compiled one.
FAMILIES = ("token_nll", "sequence_nll", "weighted_sequence_loss", "linear", "group", "group_tensor",
            "dropin_linear", "dropin_logits", "token_logprobs")

CHILD = r'''
import sys
import torch
import steerlm_kernels as sk
from tests import reference as ref

family, backend = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
close = dict(rtol=1e-5, atol=1e-5)
logits = torch.randn(3, 7, 64)
labels = torch.randint(0, 64, (3, 7))
labels[0, 2] = -100
mask = (torch.rand(3, 7) > 0.3).float()
mask[1, 0] = 1.0
weight, normalizer = torch.randn(3), torch.rand(3) + 0.5


def grad_of(fn, x):
    x = x.clone().requires_grad_()
    out = fn(x)
    out.backward()
    return out.detach().double(), x.grad.double()


def check(fn, expected_fn, x):
    """fn compiled (fullgraph), its first call; values and gradients against float64."""
    got, got_grad = grad_of(torch.compile(fn, fullgraph=True, backend="aot_eager"), x)
    xd = x.double().requires_grad_()
    want = expected_fn(xd)
    want.backward()
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want.detach(), **close)
    torch.testing.assert_close(got_grad, xd.grad, rtol=1e-5, atol=1e-7)


w3 = torch.randn(3, 7).double()
if family == "token_nll":
    check(lambda x: (sk.token_nll(x, labels, backend=backend) * w3.float()).sum(),
          lambda x: (ref.token_nll(x, labels) * w3).sum(), logits)
elif family == "sequence_nll":
    cu = torch.tensor([0, 5, 5, 21])
    check(lambda x: (sk.sequence_nll(x, labels, mask, backend=backend) * weight).sum()
          + sk.sequence_nll(x.view(21, 64), labels.view(-1), mask.view(-1), cu_seqlens=cu, backend=backend).sum(),
          lambda x: (ref.sequence_nll(x, labels, mask) * weight.double()).sum()
          + ref.sequence_nll(x.view(21, 64), labels.view(-1), mask.view(-1), cu_seqlens=cu).sum(), logits)
elif family == "weighted_sequence_loss":
    check(lambda x: sk.weighted_sequence_loss(x, labels, mask, weight, normalizer, backend=backend)
          + sk.weighted_sequence_loss(x * 1, labels, mask, weight, normalizer, inplace_backward=True,
                                      backend=backend),
          lambda x: 2 * ref.weighted_sequence_loss(x, labels, mask, weight, normalizer), logits)
elif family == "linear":
    hidden, w_lm = torch.randn(3, 7, 16), torch.randn(64, 16) / 4
    check(lambda h: sk.linear_sequence_nll(h, w_lm, labels, mask, backend=backend).sum()
          + sk.linear_weighted_sequence_loss(h, w_lm, labels, mask, weight, normalizer, backend=backend),
          lambda h: ref.sequence_nll(h @ w_lm.double().T, labels, mask).sum()
          + ref.weighted_sequence_loss(h @ w_lm.double().T, labels, mask, weight, normalizer), hidden)
elif family == "group":
    x, log_q, ws = torch.randn(12), torch.randn(12), torch.rand(12)
    coef = torch.randn(12).double()

    def seg_ref(z):
        return torch.cat([torch.softmax(g, 0) for g in z.split(4)])

    check(lambda z: (sk.segment_softmax(z, 4, backend=backend) * coef.float()).sum(),
          lambda z: (seg_ref(z) * coef).sum(), x)
    out = torch.compile(lambda a, b, c: sk.steerlm2_weights(a, b, c, 4, backend=backend), fullgraph=True,
                        backend="aot_eager")(x, log_q, ws)
    base = seg_ref(-x.double() - log_q.double())
    wsd = ws.double()
    kl = ((wsd + 1e-8) * torch.log((wsd + 1e-8) / (base + 1e-8))).view(3, 4).sum(1).mean()
    torch.testing.assert_close(out.baseline.double(), base, **close)
    torch.testing.assert_close(out.weight.double(), wsd - base, **close)
    torch.testing.assert_close(out.distance.double(), kl, **close)
elif family == "group_tensor":
    # NeMo's per-item num_responses and a tensor of group sizes (unequal groups): the group
    # structure is read inside the op, so the trace has no data-dependent branch
    x, log_q, ws = torch.randn(9), torch.randn(9), torch.rand(9)
    sizes, per_item = torch.tensor([2, 4, 3]), torch.tensor([2, 2, 4, 4, 4, 4, 3, 3, 3])
    coef = torch.randn(9).double()

    def seg_ref(z):
        return torch.cat([torch.softmax(g, 0) for g in z.split([2, 4, 3])])

    check(lambda z: (sk.segment_softmax(z, sizes, backend=backend) * coef.float()).sum(),
          lambda z: (seg_ref(z) * coef).sum(), x)
    for form in (per_item, sizes):
        out = torch.compile(lambda a, b, c, n: sk.steerlm2_weights(a, b, c, n, backend=backend), fullgraph=True,
                            backend="aot_eager")(x, log_q, ws, form)
        base = seg_ref(-x.double() - log_q.double())
        wsd = ws.double()
        kl = torch.stack([t.sum() for t in ((wsd + 1e-8) * torch.log((wsd + 1e-8) / (base + 1e-8))).split([2, 4, 3])])
        torch.testing.assert_close(out.baseline.double(), base, **close)
        torch.testing.assert_close(out.weight.double(), wsd - base, **close)
        torch.testing.assert_close(out.distance.double(), kl.mean(), **close)
elif family in ("dropin_linear", "dropin_logits"):
    hidden, w_lm, b_lm = torch.randn(3, 7, 16), torch.randn(64, 16) / 4, torch.randn(64) / 4
    w_tok = torch.rand(3, 7)
    opts = dict(label_smoothing=0.1, z_loss=1e-2, weight_per_token=w_tok, shift=True)

    def ref_ce(z, reduction, num_items=None, zl=1e-2):
        z, y, w = z[:, :-1].double(), labels[:, 1:], w_tok[:, 1:].double()
        lse = torch.logsumexp(z, -1)
        nll = lse - z.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        per = (0.9 * nll + 0.1 * (lse - z.mean(-1)) + zl * lse**2) * w
        per = torch.where(y != -100, per, 0.0)
        return per.sum() / (num_items if num_items is not None else (y != -100).sum()) if reduction == "mean" \
            else per

    n_items = torch.tensor(11)
    if family == "dropin_linear":  # mean + z_loss and none: recomputing backward; mean without: fused
        no_z = {**opts, "z_loss": 0.0}
        check(lambda h: sk.linear_cross_entropy(h, w_lm, labels, b_lm, num_items=n_items, backend=backend, **opts)
              + (sk.linear_cross_entropy(h, w_lm, labels, b_lm, reduction="none", backend=backend, **opts)
                 * w3[:, 1:].float()).sum()
              + 0.5 * sk.linear_cross_entropy(h, w_lm, labels, b_lm, num_items=n_items, backend=backend, **no_z),
              lambda h: ref_ce(h @ w_lm.double().T + b_lm.double(), "mean", 11)
              + (ref_ce(h @ w_lm.double().T + b_lm.double(), "none") * w3[:, 1:]).sum()
              + 0.5 * ref_ce(h @ w_lm.double().T + b_lm.double(), "mean", 11, zl=0.0), hidden)
    else:
        check(lambda x: sk.cross_entropy(x, labels, backend=backend, **opts)
              + (sk.cross_entropy(x, labels, reduction="none", backend=backend, **opts) * w3[:, 1:].float()).sum(),
              lambda x: ref_ce(x, "mean") + (ref_ce(x, "none") * w3[:, 1:]).sum(), logits)
elif family == "token_logprobs":
    hidden, w_lm = torch.randn(3, 7, 16), torch.randn(64, 16) / 4

    def ref_lp(h):
        logp = torch.log_softmax((h @ w_lm.double().T) / 0.7, -1)
        lp = torch.where(labels != -100, logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
        ent = torch.where(labels != -100, -(logp.exp() * logp).sum(-1), 0.0)
        return (lp * w3).sum() + ent.sum()

    def f(h):
        lp, ent = sk.linear_token_logprobs(h, w_lm, labels, temperature=0.7, return_entropy=True)
        return (lp * w3.float()).sum() + ent.sum()

    check(f, ref_lp, hidden)
print("COMPILED-FIRST-OK")
'''


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_holds_the_first_call_in_a_fresh_process(family, backend, device):
    if device.type != "cpu":
        pytest.skip("the fresh-process check runs on CPU tensors")
    if family == "token_logprobs" and backend != "torch":
        pytest.skip("linear_token_logprobs has no backend choice: checked once")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD, family, backend], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "COMPILED-FIRST-OK" in proc.stdout, proc.stderr[-4000:]


def test_logit_transforms_compile_fullgraph(backend, device):
    """softcap / logit_scale (floats in the custom ops' schemas) trace without graph breaks, in the
    logits-in and the fused-linear families, values and gradients equal to float64."""
    torch._dynamo.reset()
    logits, labels, mask = _inputs(device)
    logits = logits * 6
    weight, normalizer = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    hidden = torch.randn(3, 7, 16, device=device)
    lm_head = torch.randn(64, 16, device=device) * 0.5

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, h, w):
        loss = sk.weighted_sequence_loss(x, labels, mask, weight, normalizer, softcap=5.0, logit_scale=1.5,
                                         backend=backend)
        lin = sk.linear_sequence_nll(h, w, labels, mask, softcap=5.0, logit_scale=1.5, backend=backend)
        return loss, lin

    x, h, w = (t.clone().requires_grad_() for t in (logits, hidden, lm_head))
    loss, lin = step(x, h, w)
    (loss + lin.sum()).backward()
    xd, hd, wd = (t.double().requires_grad_() for t in (logits, hidden, lm_head))
    exp_loss = ref.weighted_sequence_loss(xd, labels, mask, weight, normalizer, softcap=5.0, logit_scale=1.5)
    exp_lin = ref.sequence_nll(hd @ wd.T, labels, mask, softcap=5.0, logit_scale=1.5)
    (exp_loss + exp_lin.sum()).backward()
    torch.testing.assert_close(loss.double(), exp_loss.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lin.double(), exp_lin.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-4, atol=1e-5)
