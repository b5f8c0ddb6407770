"""Section "ce" (logits in): the workload's mask, and a wrong implementation is flagged."""

from __future__ import annotations

import torch

from steerlm_kernels.bench import ce, harness


def test_workload_shape_and_mask(device: torch.device) -> None:
    w = ce.make_workload(256, 40, 32, torch.bfloat16, device)
    assert w.logits.shape == (256, 40) and w.labels.shape == (8, 32)
    assert abs((w.loss_mask == 0).float().mean().item() - 0.25) < 0.03
    # prompt-like prefix: once a sequence's mask turns on, it stays on
    assert bool((w.loss_mask.diff(dim=1) >= 0).all())


def test_value_check_flags_a_disagreement(device: torch.device) -> None:
    w = ce.make_workload(32, 50, 8, torch.bfloat16, device)
    ref = ce.eager_reference(w, "baseline")
    wrong = ce.Impl("wrong", "wrong", seq_nll=lambda w, x: ce.naive_sequence_nll(x, w.labels, w.loss_mask) * 1.01,
                       loss=None)
    row = ce.run_case(wrong, "baseline", w, harness.Timer(device), 1, 0, ref)
    assert row.agrees is False and row.value_rel_err > 1e-3
    assert "MISMATCH" in ce.markdown_table([row])
