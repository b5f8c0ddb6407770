"""The one-command GPU check cannot run here (no GPU), but it must not rot: the script parses, and
the options it passes to `steerlm-kernels bench` and pytest exist (a renamed flag would otherwise
only surface on the rare machine with a GPU)."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from steerlm_kernels.bench import suite

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_script_parses() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(SCRIPT)], check=True)


def test_bench_invocation_uses_existing_options() -> None:
    text = SCRIPT.read_text().replace("\\\n", " ")
    lines = [ln for ln in text.splitlines() if "steerlm_kernels bench" in ln and not ln.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    cmd = lines[0].split("steerlm_kernels bench", 1)[1].split("2>&1")[0]
    cmd = re.sub(r"\$\(\(.*?\)\)", "230", cmd)  # $(( BENCH_TIMEOUT - 40 ))
    cmd = cmd.replace('"$OUT_DIR"', "out")
    argv = shlex.split(cmd)
    parser = argparse.ArgumentParser(exit_on_error=False)
    suite.add_arguments(parser)
    ns = parser.parse_args(argv)  # raises on an unknown option
    assert ns.device == "cuda" and ns.budget is not None and ns.output == "out"
    assert ns.budget < int(re.search(r'BENCH_TIMEOUT="\$\{GPU_CHECK_BENCH_TIMEOUT:-(\d+)\}"', text).group(1))


def test_deadline_fits_nine_minutes() -> None:
    text = SCRIPT.read_text()
    deadline = int(re.search(r'DEADLINE="\$\{GPU_CHECK_DEADLINE:-(\d+)\}"', text).group(1))
    assert deadline <= 9 * 60 - 10
    assert "STEERLM_TEST_DEVICE=cuda" in text
