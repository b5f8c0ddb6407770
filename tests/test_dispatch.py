"""Backend selection: auto, forced by argument, forced by environment variable, and reports."""

from __future__ import annotations

import pytest
import torch

import steerlm_kernels as sk
from steerlm_kernels import _dispatch


def test_backends_report_every_backend_with_a_reason():
    report = sk.backends()
    assert set(report) == set(sk.BACKENDS) == {"triton", "cpp", "torch"}
    for name, status in report.items():
        assert status.name == name and isinstance(status.reason, str) and status.reason
        assert bool(status) == status.available
        assert name in str(status)
    assert report["torch"].available


def test_cpp_unavailable_reason_names_the_extension(monkeypatch):
    monkeypatch.setattr(_dispatch, "_cpp_import_error", lambda: "extension not built (ImportError: no _C)")
    status = sk.backends()["cpp"]
    assert not status and "extension not built" in status.reason
    with pytest.raises(ValueError, match="cpp"):
        _dispatch.resolve("cpp", torch.device("cpu"))
    assert _dispatch.resolve("auto", torch.device("cpu")) == "torch"


def test_auto_prefers_cpp_on_cpu_when_built(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(_dispatch, "_cpp_import_error", lambda: None)
    assert _dispatch.resolve("auto", torch.device("cpu")) == "cpp"
    assert _dispatch.resolve("auto", torch.device("cuda")) == "triton"


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    assert _dispatch.resolve("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv(_dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=_dispatch.ENV_VAR):
        _dispatch.resolve("auto", torch.device("cpu"))
    # an explicit argument wins over the variable
    assert _dispatch.resolve("torch", torch.device("cpu")) == "torch"


def test_forced_backend_on_the_wrong_device(monkeypatch):
    with pytest.raises(ValueError, match="cpp"):
        _dispatch.resolve("cpp", torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="triton"):
            _dispatch.resolve("triton", torch.device("cpu"))


def test_environment_variable_reaches_the_public_api(monkeypatch):
    calls = []
    real = _dispatch.get

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(_dispatch, "get", spy)
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    sk.token_nll(torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3)))
    assert calls == ["torch"]


def test_linear_strategy(monkeypatch):
    monkeypatch.delenv(_dispatch.LINEAR_ENV_VAR, raising=False)
    assert [_dispatch.linear_strategy(b) for b in _dispatch.BACKENDS] == ["chunks"] * 3
    monkeypatch.setenv(_dispatch.LINEAR_ENV_VAR, "tiles")
    assert _dispatch.linear_strategy("triton") == "tiles"
    assert _dispatch.linear_strategy("cpp") == _dispatch.linear_strategy("torch") == "chunks"
    monkeypatch.setenv(_dispatch.LINEAR_ENV_VAR, "tile")
    with pytest.raises(ValueError, match=_dispatch.LINEAR_ENV_VAR):
        _dispatch.linear_strategy("triton")
    with pytest.raises(ValueError, match=_dispatch.LINEAR_ENV_VAR):  # reaches the public API
        sk.linear_sequence_nll(torch.randn(2, 3, 4), torch.randn(5, 4), torch.randint(0, 5, (2, 3)))
