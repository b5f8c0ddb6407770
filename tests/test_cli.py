"""The command line's `info`: it names every backend and whether it is available."""

from __future__ import annotations

import subprocess
import sys

import steerlm_kernels as sk


def test_info_lists_backends():
    out = subprocess.run([sys.executable, "-m", "steerlm_kernels", "info"], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert "torch " in out and "steerlm_kernels" in out
    for name, status in sk.backends().items():
        if name != "triton":  # triton's status depends on TRITON_INTERPRET, which differs in the child
            assert str(status).split(" (")[0] in out
