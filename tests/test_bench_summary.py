"""The summary table of `make gpu-check` (steerlm_kernels.bench.summary) on sample bench.json data:
each step passed/failed with its time, each section's headline ratio at the main shape, failed or
disagreeing rows counted, a partial file, a missing file; and the module runs by path with the
standard library only (the GPU check calls it that way)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from steerlm_kernels.bench import summary


def _row(section, phase, impl, n, v, h=0, ours=False, **kw):
    return {"section": section, "phase": phase, "impl": impl, "n": n, "v": v, "h": h, "ours": ours,
            "dtype": "bfloat16", "agrees": True, "error": None, **kw}


def sample() -> dict:
    rows = [
        _row("ce", "train", "eager", 16384, 128256, vs_eager=1.0),
        _row("ce", "train", "cuda", 16384, 128256, ours=True, vs_eager=2.5),
        _row("ce", "train", "triton", 16384, 128256, ours=True, vs_eager=3.0),
        _row("ce", "baseline", "triton", 16384, 128256, ours=True, vs_eager=9.0),
        _row("ce", "train", "triton", 4096, 32000, ours=True, vs_eager=7.0),  # a grid point: not the headline
        _row("linear", "train", "matmuls", 16384, 128256, 4096, vs_floor=1.0, agrees=None),
        _row("linear", "train", "triton", 16384, 128256, 4096, ours=True, vs_floor=1.15, vs_eager=1.8),
        _row("linear", "train", "triton", 4096, 128256, 4096, ours=True, vs_floor=3.0, vs_eager=0.5),
        _row("group", "steerlm2_weights", "triton", 1 << 20, 8, ours=True, vs_eager=4.0),
        _row("group", "segment_softmax", "triton", 1 << 20, 8, ours=True, vs_eager=5.0),
    ]
    return {
        "meta": {"n": 16384, "v": 128256, "linear_main": [16384, 128256, 4096], "auto_backend": "triton",
                 "sections": ["ce", "linear", "group", "dist", "peers", "score"]},
        "rows": rows,
        "dist": {"rows": [
            {"impl": "ours", "tp": 2, "n": 2048, "v": 128256, "fwd_collectives": ["a"], "median_ms": 4.0,
             "loss_rel_err_vs_megatron": 1e-7},
            {"impl": "ours", "tp": 4, "n": 2048, "v": 128256, "fwd_collectives": ["a", "b"], "median_ms": 2.0,
             "loss_rel_err_vs_megatron": 1e-7},
            {"impl": "megatron", "tp": 4, "n": 2048, "v": 128256, "fwd_collectives": ["a", "a", "a"],
             "median_ms": 3.0, "loss_rel_err_vs_megatron": 0.0}]},
        "peers": {"device": "cuda", "rows": [{"peer": "liger", "agrees": True}, {"peer": "cce", "agrees": False}]},
        "score": {"shape": {"v": 128256, "h": 4096, "dtype": "bf16"}, "agrees": True, "rows": [
            {"impl": "plain HF loop", "speedup": 1.0},
            {"impl": "ours (score)", "speedup": 2.31, "memory_ratio": 0.05}]},
    }


def _by_section(bench: dict) -> dict[str, summary.Headline]:
    return {h.section: h for h in summary.headlines(bench)}


def test_headlines_at_the_main_shape():
    h = _by_section(sample())
    assert h["ce"].headline == "triton (auto) 3.00x | cuda 2.50x vs eager"
    assert h["ce"].shape == "train N=16384 V=128256 bfloat16" and h["ce"].check == "agrees"
    assert h["linear"].headline == "triton (auto) 1.15x the matmuls, 1.80x eager"
    assert h["group"].headline == "triton (auto) 4.00x eager"
    assert h["dist"].shape.startswith("tp=4") and "megatron's time / ours 1.50x" in h["dist"].headline
    assert h["peers"].headline.startswith("1/2 checks agree") and h["peers"].check == "1 DISAGREE"
    assert "ours 2.31x the plain HF loop's tokens/s" in h["score"].headline and "0.05" in h["score"].headline


def test_failed_and_disagreeing_rows_are_counted():
    bench = sample()
    bench["rows"][1]["agrees"] = False
    bench["rows"][2]["error"] = "CUDA error"
    bench["rows"][2]["vs_eager"] = None
    h = _by_section(bench)
    assert h["ce"].check == "2 of 4 rows FAILED/MISMATCH"  # the main shape's rows, every phase
    assert "triton (auto) n/a" in h["ce"].headline
    bench["dist"]["rows"][0]["loss_rel_err_vs_megatron"] = 1e-3
    bench["score"] = {"error": "OOM"}
    h = _by_section(bench)
    assert h["dist"].check.startswith("MISMATCH") and h["score"].check == "FAILED: OOM"


def test_sections_without_rows_say_not_run():
    bench = sample()
    bench["rows"] = [r for r in bench["rows"] if r["section"] != "linear"]
    del bench["score"]
    h = _by_section(bench)
    assert h["linear"].check == "not run" and h["score"].check == "not run"


def test_render_steps_and_overall(tmp_path: Path):
    steps_file = tmp_path / "steps.tsv"
    steps_file.write_text("install\t0\t48.2\tcuda: available\ntests on CUDA (quick)\t1\t75\t3 failed, 90 passed\n"
                          "not a step line\nbench (quick)\t124\t100\ttimed out\n")
    steps = summary.read_steps(steps_file)
    assert [(s.name, s.rc, s.passed) for s in steps] == [
        ("install", 0, True), ("tests on CUDA (quick)", 1, False), ("bench (quick)", 124, False)]
    text = summary.render(steps, sample())
    lines = text.splitlines()
    assert any(ln.startswith("install") and "passed" in ln and " 48 " in ln for ln in lines)
    assert any(ln.startswith("bench (quick)") and "FAILED (rc=124)" in ln and "timed out" in ln for ln in lines)
    assert "overall: FAILED: tests on CUDA (quick), bench (quick)" in text
    assert any(ln.startswith("ce ") and "3.00x" in ln for ln in lines)
    ok = summary.render([summary.Step("install", 0, 1.0)], None, "bench.json not found")
    assert "bench: no results (bench.json not found)" in ok and "overall: every step passed" in ok


def test_partial_file_stands_in(tmp_path: Path):
    partial = tmp_path / "bench.partial.json"
    partial.write_text(json.dumps(sample()["rows"][:3]))
    bench = summary.load_bench(partial)
    assert bench["partial"]
    h = _by_section(bench)
    assert h["ce"].shape.startswith("train N=16384 V=128256") and "triton 3.00x" in h["ce"].headline


@pytest.mark.parametrize("which", ["bench.json", "partial", "missing"])
def test_runs_by_path_with_the_standard_library(tmp_path: Path, which: str):
    """``python steerlm_kernels/bench/summary.py`` imports nothing of the package (nor torch)."""
    if which == "bench.json":
        (tmp_path / "bench.json").write_text(json.dumps(sample()))
    elif which == "partial":
        (tmp_path / "bench.partial.json").write_text(json.dumps(sample()["rows"]))
    (tmp_path / "steps.tsv").write_text("install\t0\t3\n")
    code = ("import runpy, sys; sys.argv = ['summary', sys.argv[1], '--steps', sys.argv[2]]; "
            f"runpy.run_path({summary.__file__!r}, run_name='__main__')")
    res = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path / "bench.json"), str(tmp_path / "steps.tsv")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "install" in res.stdout and "passed" in res.stdout
    if which == "missing":
        assert "bench: no results" in res.stdout
    else:
        assert "triton (auto) 3.00x" in res.stdout or "triton 3.00x" in res.stdout
        assert ("PARTIAL" in res.stdout) == (which == "partial")
