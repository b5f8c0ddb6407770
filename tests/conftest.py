"""Test configuration.

The suite runs on CPU tensors by default; ``STEERLM_TEST_DEVICE=cuda`` runs it on a GPU (the
GPU check script does that). On CPU the Triton kernels run in Triton's interpreter, which must be
switched on before ``triton`` is first imported - hence the environment variable is set here,
at the top of the first module pytest imports.
"""

from __future__ import annotations

import os
import zlib

DEVICE = os.environ.get("STEERLM_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import steerlm_kernels as sk  # noqa: E402

ALL_BACKENDS = ("torch", "cpp", "triton", "cuda")
#: The backends the ``backend`` fixture runs on this device: the ``cuda`` backend (hand-written CUDA
#: kernels) takes CUDA tensors only and the ``cpp`` backend CPU tensors only, so neither is
#: parametrised where it could only skip.
DEVICE_BACKENDS = ("torch", "triton", "cuda") if DEVICE == "cuda" else ("torch", "cpp", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="session")
def device() -> torch.device:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.exit("STEERLM_TEST_DEVICE=cuda but no CUDA device is available", returncode=2)
    return torch.device(DEVICE)


def backend_usable(name: str, device: torch.device) -> tuple[bool, str]:
    """Can backend ``name`` run on tensors of ``device`` here? (and why not)."""
    try:
        sk.registry.resolve(name, device)
    except ValueError as exc:
        return False, str(exc)
    return True, ""


def require_backend(name: str, device: torch.device) -> str:
    """``name`` when it can run on ``device``; else skip the test (fail it for ``cpp`` in CI, where
    the extension must have been built, and for ``cuda`` on a GPU when ``$STEERLM_TEST_REQUIRE_CUDA_EXT``
    is set, as the GPU check does: there the CUDA kernels must have been built)."""
    ok, why = backend_usable(name, device)
    if not ok:
        if name == "cpp" and os.environ.get("CI") and device.type == "cpu":
            pytest.fail(f"the cpp extension must be built in CI: {why}")
        if name == "cuda" and device.type == "cuda" and os.environ.get("STEERLM_TEST_REQUIRE_CUDA_EXT"):
            pytest.fail(f"the CUDA kernels of the extension must be built here: {why}")
        pytest.skip(why)
    return name


@pytest.fixture(params=DEVICE_BACKENDS)
def backend(request, device) -> str:
    return require_backend(request.param, device)


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test (fresh inputs for each check), reproducible across runs (crc32, not
    # Python's per-process randomised hash): a failure seen in CI can be replayed. Set
    # STEERLM_TEST_SEED to draw another set of inputs for every test.
    extra = int(os.environ.get("STEERLM_TEST_SEED", "0"))
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + extra * 1_000_003) % (2**31))
