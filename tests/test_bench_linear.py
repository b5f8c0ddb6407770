"""Section "linear" (fused linear losses): a wrong gradient is flagged; the tile-kernel variant."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from steerlm_kernels import registry
from steerlm_kernels.bench import ce, harness, linear


def test_linear_check_flags_a_wrong_gradient(device: torch.device) -> None:
    w = linear.make_linear_workload(32, 50, 16, 8, torch.float32, device)
    ref = linear.linear_reference(w, "train")
    eager = linear.build_linear_impl("eager", device)
    assert eager.seq_nll is not None
    seq = eager.seq_nll

    def skewed(w: linear.LinearWorkload, h: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        return seq(w, h, W) + 0.01 * (h.sum(-1) ** 2).sum(-1)  # right-ish value, wrong gradient

    wrong = linear.LinearImpl("wrong", "wrong", skewed, lambda w, h, W: (w.seq_weight * skewed(w, h, W)
                                                                               / w.normalizer).sum())
    row = linear.run_linear_case(wrong, "train", w, harness.Timer(device), 1, 0, ref)
    assert row.error is None and row.agrees is False and row.grad_rel_err > 1e-3


def test_linear_tiles_variant_runs_the_tile_kernels(device: torch.device, monkeypatch) -> None:
    """``triton-tiles`` (a CUDA row of the linear section) times the tile kernels, agrees with the
    reference, and leaves $STEERLM_KERNELS_LINEAR as it found it."""
    if ce.available_backends(device)["triton"]:
        pytest.skip("triton cannot run here")
    monkeypatch.delenv(registry.LINEAR_ENV_VAR, raising=False)
    calls = []
    real_kernels = registry.backend_kernels

    def spied_kernels(name: str) -> registry.BackendKernels:
        k = real_kernels(name)
        if k.linear_tiles_backward is None:
            return k
        real = k.linear_tiles_backward
        return dataclasses.replace(k, linear_tiles_backward=lambda *a, **kw: calls.append(1) or real(*a, **kw))

    monkeypatch.setattr(registry, "backend_kernels", spied_kernels)
    w = linear.make_linear_workload(32, 50, 16, 8, torch.float32, device)
    impl = linear.build_linear_impl("triton-tiles", device)
    row = linear.run_linear_case(impl, "train", w, harness.Timer(device), 1, 0,
                                       linear.linear_reference(w, "train"))
    assert row.error is None and row.agrees is True, row
    assert calls, "the tile backward did not run"
    assert registry.LINEAR_ENV_VAR not in os.environ
