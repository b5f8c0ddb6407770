"""steerlm_kernels.memory: the peak-extra-memory measurement behind the demo and the benchmarks."""

from __future__ import annotations

import pytest
import torch

from steerlm_kernels import memory


def test_memory_method_reads_a_known_allocation(device: torch.device) -> None:
    extra = memory.memory_method_check(device, mib=256)
    if extra is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert 256 * 0.85 <= extra <= 256 * 1.15, f"a 256 MiB tensor measured as {extra:.1f} MiB"
