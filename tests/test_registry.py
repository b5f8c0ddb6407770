"""Backend selection: auto, forced by argument, forced by environment variable, and reports."""

from __future__ import annotations

import pytest
import torch

import steerlm_kernels as sk
from steerlm_kernels import registry
from steerlm_kernels.kernels import cpp, cpp_build, cuda


def test_backends_report_every_backend_with_a_reason():
    report = sk.backends()
    assert set(report) == set(sk.BACKENDS) == {"triton", "cpp", "torch", "cuda"}
    for name, status in report.items():
        assert status.name == name and isinstance(status.reason, str) and status.reason
        assert bool(status) == status.available
        assert name in str(status)
    assert report["torch"].available


def test_cpp_unavailable_reason_names_the_extension(monkeypatch):
    monkeypatch.setitem(registry._CPP, "kind", cpp.UNAVAILABLE)
    monkeypatch.setitem(registry._CPP, "reason", "extension not built (ImportError: no _C) and no C++ compiler")
    status = sk.backends()["cpp"]
    assert not status and "extension not built" in status.reason
    with pytest.raises(ValueError, match="cpp"):
        registry.resolve("cpp", torch.device("cpu"))
    assert registry.resolve("auto", torch.device("cpu")) == "torch"


def test_auto_prefers_cpp_on_cpu_when_built(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    monkeypatch.setitem(registry._CPP, "kind", cpp.PREBUILT)
    assert registry.resolve("auto", torch.device("cpu")) == "cpp"
    assert registry.resolve("auto", torch.device("cuda")) == "triton"


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    assert registry.resolve("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv(registry.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=registry.ENV_VAR):
        registry.resolve("auto", torch.device("cpu"))
    # an explicit argument wins over the variable
    assert registry.resolve("torch", torch.device("cpu")) == "torch"


def test_forced_backend_on_the_wrong_device(monkeypatch):
    with pytest.raises(ValueError, match="cpp"):
        registry.resolve("cpp", torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="triton"):
            registry.resolve("triton", torch.device("cpu"))


def test_environment_variable_reaches_the_public_api(monkeypatch):
    calls = []
    real = registry.backend_kernels

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(registry, "backend_kernels", spy)
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    sk.token_nll(torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3)))
    assert calls == ["torch"]


def test_linear_strategy(monkeypatch):
    monkeypatch.delenv(registry.LINEAR_ENV_VAR, raising=False)
    assert [registry.linear_strategy(b) for b in registry.BACKENDS] == ["chunks"] * len(registry.BACKENDS)
    monkeypatch.setenv(registry.LINEAR_ENV_VAR, "tiles")
    assert registry.linear_strategy("triton") == "tiles"
    assert registry.linear_strategy("cpp") == registry.linear_strategy("torch") == "chunks"
    assert registry.linear_strategy("cuda") == "chunks"  # the cuda backend has no tile kernels
    monkeypatch.setenv(registry.LINEAR_ENV_VAR, "tile")
    with pytest.raises(ValueError, match=registry.LINEAR_ENV_VAR):
        registry.linear_strategy("triton")
    with pytest.raises(ValueError, match=registry.LINEAR_ENV_VAR):  # reaches the public API
        sk.linear_sequence_nll(torch.randn(2, 3, 4), torch.randn(5, 4), torch.randint(0, 5, (2, 3)))


def test_cpp_status_says_how_the_extension_is_provided():
    kind, reason = cpp.status()
    assert kind in (cpp.PREBUILT, cpp.BUILT, cpp.BUILDABLE, cpp.UNAVAILABLE)
    words = {cpp.PREBUILT: "prebuilt", cpp.BUILT: "built on first use", cpp.BUILDABLE: "built on first use",
             cpp.UNAVAILABLE: "not built"}
    assert words[kind] in reason
    assert sk.backends()["cpp"].available == (kind != cpp.UNAVAILABLE)


def test_first_use_build_needs_sources_compiler_and_ninja(monkeypatch):
    assert cpp_build.source_dir() is not None  # the sources ship with the package (or the checkout)
    assert cpp_build.jit_problem() is None or "ninja" in cpp_build.jit_problem()
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "no C++ compiler" in cpp_build.jit_problem()
    monkeypatch.setattr(cpp_build, "source_dir", lambda: None)
    assert "sources" in cpp_build.jit_problem()


def test_cache_dir_is_per_torch_and_python_version(monkeypatch, tmp_path):
    monkeypatch.setenv(cpp_build.CACHE_ENV, str(tmp_path))
    path = cpp_build.cache_dir()
    assert path.parent == tmp_path and torch.__version__.split("+")[0] in path.name and "py3" in path.name
    assert cpp_build.cached_library() is None


def test_simd_override(monkeypatch):
    monkeypatch.setenv(cpp_build.SIMD_ENV, "none")
    assert cpp_build.simd_level() == "none" and "-DCPU_CAPABILITY=DEFAULT" in cpp_build.cflags("none")
    monkeypatch.setenv(cpp_build.SIMD_ENV, "sse9")
    with pytest.raises(ValueError, match=cpp_build.SIMD_ENV):
        cpp_build.simd_level()


# --------------------------------------------------------------------------------------------
# The cuda backend (hand-written CUDA kernels): selection with a faked availability
# --------------------------------------------------------------------------------------------


def test_cuda_is_reported_with_the_reason(monkeypatch):
    monkeypatch.setitem(registry._CUDA, "error", cuda.WITHOUT_CUDA)
    status = sk.backends()["cuda"]
    assert not status and "extension built without CUDA" in status.reason
    assert "cuda: unavailable (extension built without CUDA" in str(status)
    monkeypatch.setitem(registry._CUDA, "error", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status = sk.backends()["cuda"]
    assert not status and status.reason == "no CUDA device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setitem(registry._CUDA, "reason", "hand-written CUDA kernels")
    status = sk.backends()["cuda"]
    assert status and "NVIDIA H200" in status.reason


def test_cuda_forced_by_argument_or_environment(monkeypatch):
    monkeypatch.setitem(registry._CUDA, "error", None)
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    gpu = torch.device("cuda")
    assert registry.resolve("cuda", gpu) == "cuda"
    assert registry.resolve("auto", gpu) == "triton"  # auto never picks it
    monkeypatch.setenv(registry.ENV_VAR, "cuda")
    assert registry.resolve("auto", gpu) == "cuda"
    assert registry.resolve("triton", gpu) == "triton"  # the argument wins over the variable


def test_cuda_on_cpu_tensors_or_without_the_kernels_raises(monkeypatch):
    monkeypatch.setitem(registry._CUDA, "error", None)
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors only; got tensors on cpu"):
        registry.resolve("cuda", torch.device("cpu"))
    monkeypatch.setenv(registry.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=r"\$STEERLM_KERNELS_BACKEND='cuda' runs on CUDA tensors"):
        registry.resolve("auto", torch.device("cpu"))
    monkeypatch.setitem(registry._CUDA, "error", cuda.WITHOUT_CUDA)
    with pytest.raises(ValueError, match="'cuda' is unavailable: extension built without CUDA"):
        registry.resolve("auto", torch.device("cuda"))


@pytest.mark.parametrize("call", ["token_nll", "sequence_nll", "weighted_sequence_loss", "segment_softmax"])
def test_cuda_backend_on_cpu_tensors_fails_before_any_kernel(monkeypatch, call):
    """The public API raises a ValueError naming the backend; no kernel of any backend runs."""
    monkeypatch.setattr(registry, "backend_kernels", lambda name: pytest.fail(f"kernels of {name} reached"))
    logits, labels = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    args = {"token_nll": (logits, labels), "sequence_nll": (logits, labels),
            "weighted_sequence_loss": (logits, labels, None, torch.ones(2), 3.0),
            "segment_softmax": (torch.randn(4), torch.tensor([2, 2]))}[call]
    with pytest.raises(ValueError, match="cuda"):
        getattr(sk, call)(*args, backend="cuda")
