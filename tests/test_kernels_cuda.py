"""The ``cuda`` backend (:mod:`steerlm_kernels.kernels.cuda`: the hand-written kernels of
``csrc/*.cu`` through the extension).

Here, without a GPU:

* the wrappers hand the extension's functions the right arguments in the contract's order
  (recording fakes in place of ``_C``), and refuse tensors that are not on a CUDA device;
* :func:`cuda.status` for each way the extension can be provided;
* the bench's ``ce`` section times ``cuda`` beside ``triton`` on a GPU (row ``sk backend=cuda``)
  and lists it as skipped on CPU;
* ``csrc/cuda_bindings.cpp`` and ``csrc/bindings.cpp`` (with ``SK_WITH_CUDA``) compile against a
  CUDA build of torch (skipped with a CPU torch, whose CUDA headers are incomplete; runs on the
  GPU machines' stack, ``make test-gpu-stack``); the ``.cu`` files themselves are compiled with
  nvcc by ``tests/test_kernels_cpp.py``.

On a GPU (``STEERLM_TEST_DEVICE=cuda``, as ``make gpu-check`` runs it) the kernels run against
float64: forward statistics, backward out of place and in place, segment sums, NaN rows, a
bit-identical second run, and the public API with ``STEERLM_KERNELS_BACKEND=cuda``. The ``cuda``
backend is also one of the ``backend`` fixture's parameters there (``tests/conftest.py``), so every
backend-parametrised test of the ops and the API runs on it.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import steerlm_kernels as sk
from steerlm_kernels import registry
from steerlm_kernels.bench import ce as bench_ce
from steerlm_kernels.kernels import cpp, cuda, reference
from tests import reference as ref
from tests.conftest import DEVICE, DEVICE_BACKENDS, require_backend

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100


# --------------------------------------------------------------------------------------------
# The wrappers, with a recording fake of the extension
# --------------------------------------------------------------------------------------------


class RecordingExtension:
    """Stands in for ``steerlm_kernels._C``: records each call's arguments, returns marker tensors."""

    with_cuda = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.result = (torch.zeros(1), torch.ones(1), torch.full((1,), 2.0))

    def ce_forward(self, logits, labels, vocab_start, ignore_index):
        self.calls.append(("ce_forward", (logits, labels, vocab_start, ignore_index)))
        return self.result

    def ce_backward(self, logits, labels, m, lse, coef, vocab_start, ignore_index, out):
        self.calls.append(("ce_backward", (logits, labels, m, lse, coef, vocab_start, ignore_index, out)))

    def segment_sum(self, x, cu_seqlens):
        self.calls.append(("segment_sum", (x, cu_seqlens)))
        return self.result[2]


@pytest.fixture
def fake_ext(monkeypatch) -> RecordingExtension:
    ext = RecordingExtension()
    monkeypatch.setattr(cpp, "extension", lambda: ext)
    monkeypatch.setattr(cuda, "check_cuda", lambda *tensors: None)  # CPU tensors stand in for CUDA ones
    return ext


def test_wrappers_call_the_extension_in_contract_order(fake_ext):
    logits, labels = torch.randn(3, 5), torch.tensor([0, 4, IGNORE])
    m, lse, coef, out = torch.randn(3), torch.randn(3), torch.randn(3), torch.empty(3, 5)
    got = cuda.ce_forward(logits, labels, torch.tensor(7), IGNORE)
    assert got == fake_ext.result  # passed through unchanged (m, lse, target), in that order
    cuda.ce_backward(logits, labels, m, lse, coef, 7, IGNORE, out)
    x, cu = torch.randn(4), torch.tensor([0, 1, 4])
    assert cuda.segment_sum(x, cu) is fake_ext.result[2]
    (name_f, args_f), (name_b, args_b), (name_s, args_s) = fake_ext.calls
    assert name_f == "ce_forward" and args_f[0] is logits and args_f[1] is labels
    assert args_f[2:] == (7, IGNORE) and all(type(a) is int for a in args_f[2:])  # ints, not tensors
    assert name_b == "ce_backward"
    assert [a is b for a, b in zip(args_b, (logits, labels, m, lse, coef), strict=False)] == [True] * 5
    assert args_b[5:7] == (7, IGNORE) and args_b[7] is out
    assert name_s == "segment_sum" and args_s[0] is x and args_s[1] is cu


def test_backend_kernels_of_cuda(fake_ext):
    """The registry maps the cuda backend to these wrappers; the group ops are the reference's."""
    k = registry.backend_kernels("cuda")
    assert (k.ce_forward, k.ce_backward, k.segment_sum) == (cuda.ce_forward, cuda.ce_backward, cuda.segment_sum)
    assert k.linear_tiles_forward is None and k.linear_tiles_backward is None
    x = torch.randn(7)
    cu = torch.tensor([0, 3, 7])
    torch.testing.assert_close(k.group_softmax(x, cu, 4), reference.group_softmax(x, cu, 4), rtol=0, atol=0)
    got = k.steerlm2_weights(x, torch.randn(7), torch.rand(7), cu, 4)
    assert len(got) == 3 and got[2].shape == (2,)
    assert fake_ext.calls == []  # no extension call for the group ops


def test_wrappers_refuse_cpu_tensors():
    logits, labels = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda.ce_forward(logits, labels, 0, IGNORE)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda.ce_backward(logits, labels, torch.zeros(2), torch.zeros(2), torch.ones(2), 0, IGNORE, logits)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda.segment_sum(torch.randn(3), torch.tensor([0, 3]))


@pytest.mark.parametrize("kind, with_cuda, available, words", [
    (cpp.PREBUILT, True, True, "hand-written CUDA kernels"),
    (cpp.PREBUILT, False, False, "extension built without CUDA"),
    (cpp.BUILT, True, False, "extension built without CUDA"),  # the first-use build is CPU-only
    (cpp.BUILDABLE, True, False, "extension built without CUDA"),
    (cpp.UNAVAILABLE, True, False, "extension unavailable: no compiler"),
])
def test_status(monkeypatch, kind, with_cuda, available, words):
    monkeypatch.setattr(cpp, "status", lambda: (kind, "no compiler"))
    monkeypatch.setattr(cpp, "extension", lambda: SimpleNamespace(with_cuda=with_cuda))
    ok, reason = cuda.status()
    assert ok is available and words in reason


def test_status_of_this_install():
    """This CPU torch builds the extension without CUDA: the backend says so."""
    ok, reason = cuda.status()
    if torch.version.cuda is None:
        assert not ok and ("without CUDA" in reason or "unavailable" in reason)
    assert sk.backends()["cuda"].available == (ok and torch.cuda.is_available())


# --------------------------------------------------------------------------------------------
# The bench's ce section
# --------------------------------------------------------------------------------------------


def test_bench_ce_times_cuda_beside_triton_on_a_gpu(monkeypatch):
    monkeypatch.setitem(registry._CUDA, "error", None)
    monkeypatch.setitem(registry._TRITON, "error", None)
    names, skipped = bench_ce.default_impls(torch.device("cuda"), quick=False)
    assert "cuda" in names and "triton" in names and "cuda" not in skipped
    impl = bench_ce.build_impl("cuda", torch.device("cuda"))
    assert impl.ours and impl.title == "sk backend=cuda" and impl.inplace is not None


def test_bench_ce_lists_cuda_as_skipped_on_cpu(monkeypatch):
    monkeypatch.setitem(registry._CUDA, "error", None)  # even when the kernels were built
    names, skipped = bench_ce.default_impls(torch.device("cpu"), quick=False)
    assert "cuda" not in names and "CUDA tensors" in skipped["cuda"]
    monkeypatch.setitem(registry._CUDA, "error", cuda.WITHOUT_CUDA)
    names, skipped = bench_ce.default_impls(torch.device("cuda"), quick=False)
    assert "cuda" not in names and "without CUDA" in skipped["cuda"]


# --------------------------------------------------------------------------------------------
# The bindings compile against a CUDA torch (no GPU needed)
# --------------------------------------------------------------------------------------------


def _cuda_include() -> Path | None:
    from torch.utils import cpp_extension

    for home in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "include"
    return None


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU build of torch: its CUDA headers are incomplete")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_cuda_bindings_compile_against_a_cuda_torch(tmp_path):
    from torch.utils import cpp_extension

    include = _cuda_include()
    if include is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime.h)")
    flags = ["-std=c++17", "-fsyntax-only", "-DSK_WITH_CUDA", f"-I{include}",
             f"-I{sysconfig.get_paths()['include']}", *(f"-I{p}" for p in cpp_extension.include_paths())]
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    procs = [subprocess.Popen([cxx, *flags, str(ROOT / "csrc" / name)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for name in ("cuda_bindings.cpp", "bindings.cpp")]  # in parallel: ~20 s each
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-4000:]


# --------------------------------------------------------------------------------------------
# On a GPU: the kernels against float64
# --------------------------------------------------------------------------------------------

on_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="runs with STEERLM_TEST_DEVICE=cuda on a GPU")


@pytest.fixture
def gpu() -> torch.device:
    device = torch.device("cuda")
    require_backend("cuda", device)
    return device


def _expected_stats(x: torch.Tensor, labels: torch.Tensor, vocab_start: int):
    x64 = x.double().cpu()
    m = x64.amax(1)
    m = torch.where(m == float("-inf"), 0.0, m)
    lse = torch.logsumexp(x64 - m[:, None], 1)
    lab = labels.cpu().long()
    local = lab - vocab_start
    inside = (local >= 0) & (local < x.shape[1]) & (lab != IGNORE)
    target = torch.where(inside, x64.gather(1, local.clamp(0, x.shape[1] - 1)[:, None])[:, 0], 0.0)
    active = lab != IGNORE
    return torch.where(active, m, 0.0), torch.where(active, lse, 0.0), target


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("v", [1, 7, 1000, 32003])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=str)
def test_forward_against_float64(gpu, dtype, v, label_dtype):
    n = 13
    storage = (torch.randn(n, v + 5, device=gpu) * 3).to(dtype)
    logits = storage[:, 2:v + 2]  # a row stride other than V
    labels = torch.randint(0, v, (n,), device=gpu, dtype=label_dtype)
    labels[3] = IGNORE
    storage[3] = float("nan")  # ignored: never read
    m, lse, target = cuda.ce_forward(logits, labels, 0, IGNORE)
    em, else_, et = _expected_stats(torch.where(logits.isnan(), 0, logits), labels, 0)
    torch.testing.assert_close(m.double().cpu(), em, rtol=0, atol=0)
    torch.testing.assert_close(target.double().cpu(), et, rtol=0, atol=0)
    torch.testing.assert_close(lse.double().cpu(), else_, rtol=1e-5, atol=1e-5)


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_against_float64(gpu, dtype, inplace):
    n, v, vocab_start = 9, 5003, 100
    logits = (torch.randn(n, v, device=gpu) * 3).to(dtype)
    labels = torch.randint(0, v + 2 * vocab_start, (n,), device=gpu)  # some outside this shard
    labels[1] = IGNORE
    coef = torch.randn(n, device=gpu)
    coef[4] = 0.0
    m, lse, _ = cuda.ce_forward(logits, labels, vocab_start, IGNORE)
    x64 = logits.double().cpu()
    p = torch.exp((x64 - m.double().cpu()[:, None]) - lse.double().cpu()[:, None])
    local = labels.cpu() - vocab_start
    hit = (local >= 0) & (local < v) & (labels.cpu() != IGNORE)
    p[hit.nonzero().squeeze(1), local[hit]] -= 1.0
    expected = p * torch.where(labels.cpu() == IGNORE, 0.0, coef.double().cpu())[:, None]
    out = logits.clone() if inplace else torch.full_like(logits, float("nan"))
    cuda.ce_backward(out if inplace else logits, labels, m, lse, coef, vocab_start, IGNORE, out)
    assert not out.isnan().any() and (out[1] == 0).all() and (out[4] == 0).all()
    torch.testing.assert_close(out.double().cpu(), expected, **ref.grad_tolerances(dtype))


@on_gpu
@pytest.mark.parametrize("cu_dtype", [torch.int64, torch.int32], ids=str)
def test_segment_sum_against_float64(gpu, cu_dtype):
    x = torch.randn(5000, device=gpu)
    cu = torch.tensor([0, 0, 1, 300, 4999, 5000], device=gpu, dtype=cu_dtype)
    y = cuda.segment_sum(x, cu)
    c = cu.cpu().long()
    expected = torch.stack([x.double().cpu()[c[i]:c[i + 1]].sum() for i in range(len(c) - 1)])
    torch.testing.assert_close(y.double().cpu(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(cuda.segment_sum(x, cu), y)  # a fixed reduction order: bit-identical


@on_gpu
def test_nan_row_and_determinism(gpu):
    logits = torch.randn(4, 70000, device=gpu)
    logits[2, 12345] = float("nan")
    labels = torch.tensor([1, 2, 3, 4], device=gpu)
    m, lse, target = cuda.ce_forward(logits, labels, 0, IGNORE)
    assert lse[2].isnan() and not lse[[0, 1, 3]].isnan().any()
    m2, lse2, target2 = cuda.ce_forward(logits, labels, 0, IGNORE)
    assert torch.equal(m, m2) and torch.equal(lse[[0, 1, 3]], lse2[[0, 1, 3]]) and torch.equal(target, target2)


@on_gpu
def test_public_api_through_the_environment_variable(gpu, monkeypatch):
    calls = []
    real = registry.backend_kernels
    monkeypatch.setattr(registry, "backend_kernels", lambda name: calls.append(name) or real(name))
    monkeypatch.setenv(registry.ENV_VAR, "cuda")
    logits = torch.randn(2, 6, 300, device=gpu, requires_grad=True)
    labels = torch.randint(0, 300, (2, 6), device=gpu)
    mask = (torch.rand(2, 6, device=gpu) > 0.3).float()
    weight, norm = torch.randn(2, device=gpu), torch.tensor([3.0, 4.0], device=gpu)
    loss = sk.weighted_sequence_loss(logits, labels, mask, weight, norm)
    loss.backward()
    assert set(calls) == {"cuda"}
    x = logits.detach().double().cpu().requires_grad_(True)
    expected = ref.weighted_sequence_loss(x, labels.cpu(), mask.cpu(), weight.cpu(), norm.cpu())
    expected.backward()
    torch.testing.assert_close(loss.double().cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad.double().cpu(), x.grad, rtol=1e-4, atol=1e-6)


def test_gpu_tests_are_selected_on_a_gpu():
    """The GPU tests above run exactly when the suite runs on CUDA tensors: each test that takes the
    ``gpu`` fixture carries ``on_gpu`` and each ``on_gpu`` test takes it (one without the mark would
    be skipped by ``require_backend`` on CPU; one without the fixture would run unchecked)."""
    assert (on_gpu.args[0] is False) == (DEVICE == "cuda")
    assert ("cuda" in DEVICE_BACKENDS) == (DEVICE == "cuda")
    tests = {name: fn for name, fn in globals().items() if name.startswith("test_") and callable(fn)}
    marked = {name for name, fn in tests.items() if on_gpu.mark in getattr(fn, "pytestmark", [])}
    with_fixture = {name for name, fn in tests.items() if "gpu" in inspect.signature(fn).parameters}
    assert marked == with_fixture and len(marked) >= 5, (sorted(marked), sorted(with_fixture))
