"""kernels.cpp_build: loading the cached CPU extension prints no ``No CUDA runtime is found, using
CUDA_HOME=...`` warning (a CUDA build of torch on a machine without a GPU logs it when
``torch.utils.cpp_extension`` is imported; every CPU process showed it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# torch as a CUDA build without a GPU, with a CUDA_HOME: what makes cpp_extension warn at import
FAKE_CUDA_BUILD = """
import sys, torch
torch.cuda._is_compiled = lambda: True
torch.version.cuda = "12.4"
torch.cuda.is_available = lambda: False
if sys.argv[1] == "package":
    from steerlm_kernels.kernels.cpp_build import import_cpp_extension
    import_cpp_extension()
else:
    from torch.utils import cpp_extension
"""


@pytest.mark.parametrize("how", ["plain", "package"])
def test_cpp_extension_import_is_quiet(tmp_path, how) -> None:
    env = {**os.environ, "CUDA_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", FAKE_CUDA_BUILD, how], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    warned = "No CUDA runtime is found" in done.stderr
    assert warned == (how == "plain"), done.stderr  # torch's own import warns here; the package's does not
