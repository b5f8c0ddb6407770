"""The command line: `info` names every backend and whether it is available; the application commands
say what to install when the `app` extra is missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("command", ["train", "sample", "score", "pipeline"])
def test_application_commands_without_the_app_extra_say_what_to_install(command, monkeypatch, capsys):
    from steerlm_kernels import cli

    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if `pip install steerlm-kernels` without [app]
    assert cli.missing_app_dependencies() == ["accelerate"]
    assert cli.main([command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"steerlm-kernels {command}: error:" in err[0]
    assert "accelerate" in err[0] and "steerlm-kernels[app]" in err[0]
