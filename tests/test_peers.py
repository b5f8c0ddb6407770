"""The peers (Liger-Kernel, Cut Cross-Entropy) agree with us and with a float64 reference.

On CPU the peers run in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1`` before anything
imports them); tests of a peer that is not installed skip with the reason.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from steerlm_kernels import peers


@pytest.fixture(scope="module")
def rows(device) -> list[dict]:
    """One run of the full check, shared by the per-peer tests (the interpreter is slow)."""
    return peers.check(device)


@pytest.mark.parametrize("peer", peers.PEERS)
def test_peer_agrees(peer, rows, device):
    why = peers.available(device)[peer]
    if why:
        pytest.skip(f"{peer}: {why}")
    mine = [r for r in rows if r["peer"] == peer]
    assert mine, f"no rows for available peer {peer}"
    expected_ops = {"liger": {"token_nll", "linear_token_nll"}, "cce": {"linear_token_nll"}}[peer]
    assert {r["op"] for r in mine} == expected_ops
    print("\n" + peers.markdown(mine))
    for r in mine:
        assert not r["error"], r
        assert r["agrees"], r
        for key in ("value_rel_err", "value_rel_err_ours"):
            assert r[key] is not None and math.isfinite(r[key]) and r[key] <= r["tol"], r
        if not (peer == "cce" and r["dtype"] == "float32"):  # CCE: no float32 backward
            for key in ("grad_rel_err", "grad_rel_err_ours"):
                assert r[key] is not None and math.isfinite(r[key]) and r[key] <= r["tol"], r


def _small_inputs(device, n=5, v=11, h=4):
    labels = torch.tensor([1, -100, 10, 0, 3], device=device)
    return torch.randn(n, v, device=device), torch.randn(n, h, device=device), torch.randn(v, h, device=device), labels


def test_adapter_contract(device):
    """float32 [N], exactly 0 at ignored tokens; the linear adapters never modify their inputs."""
    logits, hidden, weight, labels = _small_inputs(device)
    why = peers.available(device)
    if why["liger"]:
        pytest.skip(f"liger: {why['liger']}")
    out = peers.token_nll("liger", logits.clone(), labels)
    assert out.dtype == torch.float32 and out.shape == (5,) and out[1].item() == 0.0
    h0, w0 = hidden.clone(), weight.clone()
    for peer in peers.PEERS:
        if why[peer]:
            continue
        with torch.no_grad():
            out = peers.linear_token_nll(peer, hidden, weight, labels)
        assert out.dtype == torch.float32 and out.shape == (5,) and out[1].item() == 0.0
        assert torch.equal(hidden, h0) and torch.equal(weight, w0)


def test_adapter_refusals(device):
    logits, hidden, weight, labels = _small_inputs(device)
    with pytest.raises(ValueError, match="peer must be one of"):
        peers.token_nll("nope", logits, labels)
    with pytest.raises(ValueError, match="no cross entropy on precomputed logits"):
        peers.token_nll("cce", logits, labels)
    with pytest.raises(ValueError, match="takes no bias"):
        peers.linear_token_nll("cce", hidden, weight, labels, torch.zeros(11, device=device))
    with pytest.raises(ValueError, match="bfloat16/float16"):
        peers.linear_token_nll("cce", hidden, weight.requires_grad_(), labels)
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        peers.linear_token_nll("liger", hidden, weight[:, :3], labels)


def test_check_reports_disagreement_and_errors(monkeypatch, device):
    """The comparison itself: a perturbed peer disagrees, a raising peer gets an error row."""
    if peers.available(device)["liger"]:
        pytest.skip("liger unavailable")
    real = peers.token_nll
    monkeypatch.setattr(peers, "token_nll", lambda *a, **k: real(*a, **k) * 1.001)

    def boom(*args, **kwargs):
        raise RuntimeError("line 1\nthe reason")

    monkeypatch.setattr(peers, "linear_token_nll", boom)
    rows = peers.check(device, peers=["liger"])
    token = [r for r in rows if r["op"] == "token_nll" and r["dtype"] == "float32"]
    assert token and not token[0]["agrees"] and not token[0]["error"]
    assert 5e-4 < token[0]["value_rel_err"] < 2e-3
    linear = [r for r in rows if r["op"] == "linear_token_nll"]
    assert linear and all(r["error"] == "RuntimeError: the reason" and not r["agrees"] for r in linear)
    assert "**NO**" in peers.markdown(rows)


def test_available_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = peers.available("cpu")
    assert set(why) == set(peers.PEERS)
    for peer, reason in why.items():
        assert reason, f"{peer} cannot run on CPU tensors without the interpreter"
        assert "not installed" in reason or "TRITON_INTERPRET=1" in reason


def test_cli_writes_json(tmp_path, device):
    """The CLI as the benchmark calls it. On CPU the child starts WITHOUT TRITON_INTERPRET, so this
    also covers its re-run of itself under the interpreter."""
    out = tmp_path / "peers.json"
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "steerlm_kernels.peers", "--device", device.type, "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["device"] == device.type and set(data["available"]) == set(peers.PEERS)
    assert "liger-kernel" in data["versions"]
    usable = [p for p, why in data["available"].items() if not why]
    assert {r["peer"] for r in data["rows"]} == set(usable)
    assert all(r["agrees"] for r in data["rows"])
    if usable:
        assert "| peer | op |" in proc.stdout
    else:
        assert "nothing compared" in proc.stdout
