"""``steerlm-kernels demo``: our fused loss beside eager PyTorch on a small random batch."""

from __future__ import annotations

from steerlm_kernels.demo import demo


def test_demo_runs(capsys) -> None:
    assert demo(n=64, v=300, s=16, repeats=1) == 0
    out = capsys.readouterr().out
    assert "agree with eager" in out and "faster" in out

