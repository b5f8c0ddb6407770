"""Peak extra memory of one call, on CUDA and on CPU (used by ``steerlm-kernels demo`` and the benchmarks).

CUDA: ``max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus ``memory_allocated()``
before. CPU: the process's resident-set high-water mark: ``VmHWM`` is reset to the current RSS by
writing ``5`` to ``/proc/self/clear_refs``, read after the call, minus ``VmRSS`` before. For that
to be honest, glibc's malloc must give freed buffers back to the OS: its dynamic mmap threshold is
pinned at 64 KiB (``mallopt(M_MMAP_THRESHOLD, 65536)``, plus ``malloc_trim(0)``) around every
measurement, and set back to the values glibc settles at in a long-running process afterwards
(:func:`malloc_steady_state`). :func:`memory_method_check` checks the method: a 256 MiB float32
tensor must read as ~256 MiB.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from typing import Any

import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters
M_TRIM_THRESHOLD = -1
MIB = 2.0**20


_LIBC: Any = None
_LIBC_LOADED = False


def _glibc() -> Any:
    """glibc through ctypes, or None (another libc, or not Linux)."""
    global _LIBC, _LIBC_LOADED
    if not _LIBC_LOADED:
        _LIBC_LOADED = True
        try:
            libc = ctypes.CDLL(None)
            if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
                _LIBC = libc
        except OSError:
            _LIBC = None
    return _LIBC


def pin_malloc_mmap_threshold(threshold: int = 65536) -> bool:
    """Pin glibc's mmap threshold low (disabling its dynamic growth) so freed buffers leave RSS.

    Every allocation of ``threshold`` bytes or more is then its own ``mmap``, given back to the
    OS when freed; free heap memory is returned too (``malloc_trim(0)``). Returns True when glibc
    accepted it. Used for the memory measurements (and the whole run starts pinned).
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024))
    libc.malloc_trim(0)
    return ok


def malloc_steady_state() -> None:
    """Set glibc's thresholds to the values its dynamic adjustment reaches in a long-running process
    (mmap threshold at its 32 MiB maximum, trim threshold twice that), so timed runs recycle
    mid-sized buffers the way a training loop does instead of paying fresh page faults for each.
    Buffers above 32 MiB (every ``[N, V]`` one) are ``mmap``-ed in either mode."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)


def _proc_status_bytes(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes (None where unreadable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (False where ``clear_refs`` is not writable)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_extra_memory(fn: Callable[[], Any], device: torch.device) -> tuple[float | None, Any]:
    """Run ``fn()`` once and return ``(peak extra MiB beyond what was allocated before, result)``.

    CUDA: the caching allocator's peak. CPU: the RSS high-water mark (see the module docstring);
    ``None`` where ``/proc/self/clear_refs`` cannot be written.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB, out
    pin_malloc_mmap_threshold()
    before = _proc_status_bytes("VmRSS")
    ok = _reset_rss_peak()
    out = fn()
    peak = _proc_status_bytes("VmHWM")
    malloc_steady_state()
    if not ok or before is None or peak is None:
        return None, out
    return (peak - before) / MIB, out


def memory_method_check(device: torch.device | str = "cpu", mib: int = 256) -> float | None:
    """Measured extra MiB of allocating a ``mib`` MiB float32 tensor (should read ~``mib``)."""
    device = torch.device(device)
    extra, out = measure_extra_memory(
        lambda: torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device), device
    )
    del out
    return extra
