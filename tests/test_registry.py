"""Backend selection: auto, forced by argument, forced by environment variable, and reports."""

from __future__ import annotations

import pytest
import torch

import steerlm_kernels as sk
from steerlm_kernels import registry
from steerlm_kernels.kernels import cpp, cpp_build


def test_backends_report_every_backend_with_a_reason():
    report = sk.backends()
    assert set(report) == set(sk.BACKENDS) == {"triton", "cpp", "torch"}
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
    assert [registry.linear_strategy(b) for b in registry.BACKENDS] == ["chunks"] * 3
    monkeypatch.setenv(registry.LINEAR_ENV_VAR, "tiles")
    assert registry.linear_strategy("triton") == "tiles"
    assert registry.linear_strategy("cpp") == registry.linear_strategy("torch") == "chunks"
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
