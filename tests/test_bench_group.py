"""Section "group" (SteerLM 2.0 group ops): the workload's groups."""

from __future__ import annotations

import torch

from steerlm_kernels.bench import group


def test_group_workload_has_unequal_groups(device: torch.device) -> None:
    w = group.make_group_workload(100, 5, device)
    assert w.sizes.tolist()[:5] == [1, 2, 3, 4, 5] and int(w.sizes.sum()) == w.b
    sums = torch.zeros(w.sizes.shape[0], dtype=torch.float64, device=device).index_add_(0, w.group_id, w.ws.double())
    torch.testing.assert_close(sums, torch.ones_like(sums))
