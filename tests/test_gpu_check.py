"""The one-command GPU check (benchmarks/gpu_check.sh) cannot run its steps here (no GPU), but it
must not rot: the script parses, its options and modes exist, what it passes to `steerlm-kernels
bench` and pytest exists (a renamed flag or test file would otherwise only surface on the rare
machine with a GPU), its time limits fit the 4 / 9 minutes, and on a machine without a CUDA torch
it fails at once with the summary table."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from steerlm_kernels import registry
from steerlm_kernels.bench import ce, config, linear, suite

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="no bash")


def _text() -> str:
    return SCRIPT.read_text().replace("\\\n", " ")


def _mode_block(mode: str) -> str:
    """The lines of the ``if [ "$MODE" = quick ] / elif app / else`` branch for ``mode``."""
    text = _text().split('if [ "$MODE" = quick ]; then', 1)[1].split("\nfi\n", 1)[0]
    quick, rest = text.split('\nelif [ "$MODE" = app ]; then\n', 1)
    app, full = rest.split("\nelse\n", 1)
    return {"quick": quick, "app": app, "full": full}[mode]


def _bench_sections(mode: str) -> list[str]:
    block = _mode_block(mode).replace('"$KERNEL_SECTIONS"', re.search(r"KERNEL_SECTIONS=(\S+)", _text()).group(1))
    args = _array(block, "BENCH_ARGS")
    return args[args.index("--sections") + 1].split(",")


def _setting(block: str, name: str) -> int:
    return int(re.search(rf'{name}="\$\{{GPU_CHECK_{name}:-(\d+)\}}"', block).group(1))


def _array(block: str, name: str) -> list[str]:
    body = re.search(rf"{name}=\((.*?)\)(?:\n|$)", block, re.S).group(1)
    return shlex.split(body.replace("\n", " "))


@needs_bash
def test_script_parses() -> None:
    subprocess.run([BASH, "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize("mode", ["quick", "full", "app"])
def test_bench_invocation_uses_existing_options(mode: str) -> None:
    lines = [ln for ln in _text().splitlines() if "steerlm_kernels bench" in ln and not ln.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    cmd = lines[0].split("steerlm_kernels bench", 1)[1].split("2>&1")[0]
    block = _mode_block(mode)
    timeout, margin = _setting(block, "BENCH_TIMEOUT"), int(re.search(r"BENCH_MARGIN=(\d+)", block).group(1))
    cmd = cmd.replace("$(( BENCH_TIMEOUT - BENCH_MARGIN ))", str(timeout - margin)).replace('"$OUT_DIR"', "out")
    block = block.replace('"$KERNEL_SECTIONS"', re.search(r"KERNEL_SECTIONS=(\S+)", _text()).group(1))
    argv = shlex.split(cmd.replace('"${BENCH_ARGS[@]}"', ""), posix=True) + _array(block, "BENCH_ARGS")
    parser = argparse.ArgumentParser(exit_on_error=False)
    suite.add_arguments(parser)
    ns = parser.parse_args(argv)  # raises on an unknown option or a bad choice
    assert ns.device == "cuda" and ns.output == "out" and 0 < ns.budget < timeout - 30
    if ns.impls:
        known = ce.COMPARATORS + linear.COMPARATORS + registry.BACKENDS + linear.VARIANTS
        assert set(ns.impls.split(",")) <= set(known)
        assert {"triton", "cuda"} <= set(ns.impls.split(","))  # cuda timed beside triton
    if mode == "quick":
        assert ns.grid == "main" and "score" in ns.sections.split(",")
    else:
        assert ns.grid is None and not ns.quick  # the device's default grid (the sections' GPU sizes)


def test_the_modes_bench_every_section_once_between_them() -> None:
    kernel, app = _bench_sections("full"), _bench_sections("app")
    assert _bench_sections("quick") == kernel
    assert sorted(kernel + app) == sorted(config.SECTIONS) and not set(kernel) & set(app)
    assert set(app) == {"train", "dropin"}


@pytest.mark.parametrize("mode, minutes", [("quick", 4), ("full", 9), ("app", 9)])
def test_time_limits_fit(mode: str, minutes: int) -> None:
    block = _mode_block(mode)
    deadline = _setting(block, "DEADLINE")
    assert deadline <= minutes * 60 - 10
    assert _setting(block, "TEST_TIMEOUT") + _setting(block, "BENCH_TIMEOUT") <= deadline


@pytest.mark.parametrize("mode", ["quick", "full", "app"])
def test_pytest_targets_exist(mode: str) -> None:
    args = _array(_mode_block(mode), "TESTS")
    paths = [a for a in args if a.startswith("tests")]
    assert paths and all((ROOT / p).exists() for p in paths)
    if mode == "quick":  # the CUDA tests of the core ops, the cuda backend's own among them
        assert {"tests/test_kernels_cuda.py", "tests/test_ops_cross_entropy.py", "tests/test_api.py"} <= set(paths)
    assert "STEERLM_TEST_DEVICE=cuda" in _text()


def test_installs_without_network_into_the_machines_python() -> None:
    text = _text()
    assert "pip install --no-build-isolation --no-deps --no-index -e ." in text
    assert "venv" not in re.sub(r"\.venv/bin/python", "", "\n".join(
        ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))  # no venv is created
    assert "--no-index --no-deps .whl/*.whl" in text


def test_make_target_passes_quick() -> None:
    if shutil.which("make") is None:
        pytest.skip("no make")
    quick = subprocess.run(["make", "-n", "gpu-check", "QUICK=1"], cwd=ROOT, capture_output=True, text=True)
    full = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True)
    app = subprocess.run(["make", "-n", "gpu-check", "APP=1"], cwd=ROOT, capture_output=True, text=True)
    assert "benchmarks/gpu_check.sh --quick" in quick.stdout and "--app" not in quick.stdout
    assert "benchmarks/gpu_check.sh --app" in app.stdout and "--quick" not in app.stdout
    assert "gpu_check.sh" in full.stdout and "--quick" not in full.stdout and "--app" not in full.stdout


@needs_bash
def test_unknown_option_is_refused(tmp_path: Path) -> None:
    res = subprocess.run([BASH, str(SCRIPT), "--quik", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown option --quik" in res.stderr


@needs_bash
@pytest.mark.skipif(sys.platform != "linux", reason="linux only")
def test_without_a_gpu_it_fails_at_once_with_the_summary(tmp_path: Path) -> None:
    # a directory of its own on PATH whose python3 is this interpreter: no torch here sees a GPU
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GPU_CHECK_PYTHON": sys.executable}
    env.pop("QUICK", None)
    res = subprocess.run([BASH, str(SCRIPT), "--quick", str(tmp_path / "out")], capture_output=True, text=True,
                         env=env, timeout=120)
    if "cuda" in res.stdout and "passed" in res.stdout:  # pragma: no cover - a GPU after all
        pytest.skip("this machine has a GPU")
    assert res.returncode == 1
    assert "needs a GPU" in res.stdout and "summary" in res.stdout and "FAILED" in res.stdout
    steps = (tmp_path / "out" / "steps.tsv").read_text().splitlines()
    assert steps[0].split("\t")[:2] == ["install", "1"]
    assert (tmp_path / "out" / "summary.txt").read_text().strip()
