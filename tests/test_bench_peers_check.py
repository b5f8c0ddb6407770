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

from steerlm_kernels.bench import peers, peers_check


@pytest.fixture(scope="module")
def rows(device) -> list[dict]:
    """One run of the full check, shared by the per-peer tests (the interpreter is slow)."""
    return peers_check.check(device)


@pytest.mark.parametrize("peer", peers.PEERS)
def test_peer_agrees(peer, rows, device):
    why = peers.available(device)[peer]
    if why:
        pytest.skip(f"{peer}: {why}")
    mine = [r for r in rows if r["peer"] == peer]
    assert mine, f"no rows for available peer {peer}"
    expected_ops = {"liger": {"token_nll", "linear_token_nll"}, "cce": {"linear_token_nll"}}[peer]
    assert {r["op"] for r in mine} == expected_ops
    print("\n" + peers_check.markdown(mine))
    for r in mine:
        assert not r["error"], r
        assert r["agrees"], r
        for key in ("value_rel_err", "value_rel_err_ours"):
            assert r[key] is not None and math.isfinite(r[key]) and r[key] <= r["tol"], r
        if not (peer == "cce" and r["dtype"] == "float32"):  # CCE: no float32 backward
            for key in ("grad_rel_err", "grad_rel_err_ours"):
                assert r[key] is not None and math.isfinite(r[key]) and r[key] <= r["tol"], r


def test_check_reports_disagreement_and_errors(monkeypatch, device):
    """The comparison itself: a perturbed peer disagrees, a raising peer gets an error row."""
    if peers.available(device)["liger"]:
        pytest.skip("liger unavailable")
    real = peers.liger_token_nll
    monkeypatch.setattr(peers, "liger_token_nll", lambda *a, **k: real(*a, **k) * 1.001)

    def boom(*args, **kwargs):
        raise RuntimeError("line 1\nthe reason")

    monkeypatch.setattr(peers, "liger_linear_token_nll", boom)
    rows = peers_check.check(device, peers=["liger"])
    token = [r for r in rows if r["op"] == "token_nll" and r["dtype"] == "float32"]
    assert token and not token[0]["agrees"] and not token[0]["error"]
    assert 5e-4 < token[0]["value_rel_err"] < 2e-3
    linear = [r for r in rows if r["op"] == "linear_token_nll"]
    assert linear and all(r["error"] == "RuntimeError: the reason" and not r["agrees"] for r in linear)
    assert "**NO**" in peers_check.markdown(rows)


def test_cli_writes_json(tmp_path, device):
    """The CLI as the benchmark calls it. On CPU the child starts WITHOUT TRITON_INTERPRET, so this
    also covers its re-run of itself under the interpreter."""
    out = tmp_path / "peers.json"
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "steerlm_kernels.bench.peers_check", "--device", device.type, "--json", str(out)],
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
