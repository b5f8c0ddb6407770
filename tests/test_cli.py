"""The command line: `info` names every backend and whether it is available; the application commands
say what to install when the `app` extra is missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

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


def test_info_says_no_cuda_device_without_a_gpu(monkeypatch, capsys):
    from steerlm_kernels import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["info"]) == 0
    lines = [x.strip() for x in capsys.readouterr().out.splitlines()]
    assert "cuda: unavailable (no CUDA device)" in lines  # the reason it cannot run here, as the README says
    assert not any(x.startswith("cuda:") and "built without CUDA" in x for x in lines)


@pytest.mark.parametrize("command", [[], ["train"], ["score"], ["sample"], ["pipeline"]])
def test_help_is_plain_text(command, capsys):
    from steerlm_kernels import cli

    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and ":mod:" not in text  # no reST markup


def test_train_help_gives_defaults_and_explains(capsys):
    from steerlm_kernels import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: 3e-05 for a model directory, 0.003 for the built-in models" in text  # --lr, both presets
    assert "default: 10 for a model directory, 0 for the built-in models" in text  # --warmup-steps
    assert "small (larger; slower on CPU)" in text and "tiny (the default" in text
    assert "steps between validations; needs validation data" in text
    for option in ("--overwrite", "--allow-changed", "--allow-partial-checkpoint"):
        assert option in text

