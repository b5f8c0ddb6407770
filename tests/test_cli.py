"""The command line's `info`: it names every backend and whether it is available."""

from __future__ import annotations

import os
import subprocess
import sys

import steerlm_kernels as sk


def test_info_lists_backends():
    env = {k: v for k, v in os.environ.items() if k != sk.registry.LINEAR_ENV_VAR}
    out = subprocess.run([sys.executable, "-m", "steerlm_kernels", "info"], capture_output=True, text=True,
                         check=True, timeout=300, env=env).stdout
    assert "torch " in out and "steerlm_kernels" in out
    assert "fused linear on triton: chunks" in out
    for name, status in sk.backends().items():
        if name != "triton":  # triton's status depends on TRITON_INTERPRET, which differs in the child
            assert str(status).split(" (")[0] in out
