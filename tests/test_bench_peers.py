"""The peers' adapters (Liger-Kernel, Cut Cross-Entropy): their contract, refusals and availability.

On CPU the peers run in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1`` before anything
imports them); tests of a peer that is not installed skip with the reason.
"""

from __future__ import annotations

import pytest
import torch

from steerlm_kernels.bench import peers


def _small_inputs(device, n=5, v=11, h=4):
    labels = torch.tensor([1, -100, 10, 0, 3], device=device)
    return torch.randn(n, v, device=device), torch.randn(n, h, device=device), torch.randn(v, h, device=device), labels


def test_adapter_contract(device):
    """float32 [N], exactly 0 at ignored tokens; the linear adapters never modify their inputs."""
    logits, hidden, weight, labels = _small_inputs(device)
    why = peers.available(device)
    if why["liger"]:
        pytest.skip(f"liger: {why['liger']}")
    out = peers.liger_token_nll(logits.clone(), labels)
    assert out.dtype == torch.float32 and out.shape == (5,) and out[1].item() == 0.0
    h0, w0 = hidden.clone(), weight.clone()
    for peer in peers.PEERS:
        if why[peer]:
            continue
        with torch.no_grad():
            out = peers.linear_token_nll_adapter(peer)(hidden, weight, labels)
        assert out.dtype == torch.float32 and out.shape == (5,) and out[1].item() == 0.0
        assert torch.equal(hidden, h0) and torch.equal(weight, w0)


def test_adapter_refusals(device):
    _, hidden, weight, labels = _small_inputs(device)
    with pytest.raises(ValueError, match="peer must be one of"):
        peers.token_nll_adapter("nope")
    with pytest.raises(ValueError, match="no cross entropy on precomputed logits"):
        peers.token_nll_adapter("cce")
    with pytest.raises(ValueError, match="takes no bias"):
        peers.cce_linear_token_nll(hidden, weight, labels, torch.zeros(11, device=device))
    with pytest.raises(ValueError, match="bfloat16/float16"):
        peers.cce_linear_token_nll(hidden, weight.requires_grad_(), labels)
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        peers.liger_linear_token_nll(hidden, weight[:, :3], labels)


def test_available_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = peers.available("cpu")
    assert set(why) == set(peers.PEERS)
    for peer, reason in why.items():
        assert reason, f"{peer} cannot run on CPU tensors without the interpreter"
        assert "not installed" in reason or "TRITON_INTERPRET=1" in reason
