"""The benchmark machinery end to end at a tiny shape: every available backend appears in the table,
values agree with eager PyTorch, and the memory method reads a known allocation correctly.
No timing assertions (tests never time)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from steerlm_kernels import _dispatch, bench


def _usable_backends(device: torch.device) -> list[str]:
    return [name for name, why in bench.available_backends(device).items() if not why]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_memory_method_reads_a_known_allocation(device: torch.device) -> None:
    extra = bench.memory_method_check(device, mib=256)
    if extra is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert 256 * 0.85 <= extra <= 256 * 1.15, f"a 256 MiB tensor measured as {extra:.1f} MiB"


def test_run_quick_lists_every_backend_and_agrees(device: torch.device, tmp_path, capsys) -> None:
    backends = _usable_backends(device)
    impls = ",".join(["eager", *backends])  # torch.compile is left to the benchmark suite (slow to compile)
    ns = _parse(["--quick", "--device", str(device), "--n", "64", "--v", "300", "--s", "16",
                 "--repeats", "1", "--impls", impls, "--output", str(tmp_path)])
    assert bench.run(ns) == 0
    out = capsys.readouterr().out
    assert "memory method check" in out and "| phase | implementation |" in out
    assert "MISMATCH" not in out and "ERROR" not in out

    result = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.md").read_text().startswith("**")
    rows = result["rows"]
    for phase in bench.PHASES:
        names = {r["impl"] for r in rows if r["phase"] == phase}
        expected = set(backends) | ({"eager"} if phase != "inplace" else set())
        assert names == expected, (phase, names)
    for r in rows:
        assert r["error"] is None, r
        assert r["agrees"] is True, r
        assert r["value_rel_err"] <= bench.VALUE_TOL
        assert r["median_ms"] is not None and r["bytes_per_elem"] == bench.ACCESSES_PER_ELEM[r["phase"]] * 2
        if r["phase"] != "baseline":
            assert r["grad_rel_err"] is not None
    table = (tmp_path / "bench.md").read_text()
    for name in backends:
        assert bench.IMPL_TITLES[name] in table
    auto = _dispatch.resolve("auto", device)
    assert f"{bench.IMPL_TITLES[auto]} (auto)" in table
    assert result["meta"]["memory_method_check_mib_of_256"] is None or (
        abs(result["meta"]["memory_method_check_mib_of_256"] - 256) < 0.15 * 256
    )


def test_value_check_flags_a_disagreement(device: torch.device) -> None:
    w = bench.make_workload(32, 50, 8, torch.bfloat16, device)
    ref = bench.eager_reference(w, "baseline")
    wrong = bench.Impl("wrong", "wrong", seq_nll=lambda w, x: bench.naive_sequence_nll(x, w.labels, w.loss_mask) * 1.01,
                       loss=None)
    row = bench.run_case(wrong, "baseline", w, bench.Timer(device), 1, 0, ref)
    assert row.agrees is False and row.value_rel_err > 1e-3
    assert "MISMATCH" in bench.markdown_table([row])


def test_workload_shape_and_mask(device: torch.device) -> None:
    w = bench.make_workload(256, 40, 32, torch.bfloat16, device)
    assert w.logits.shape == (256, 40) and w.labels.shape == (8, 32)
    assert abs((w.loss_mask == 0).float().mean().item() - 0.25) < 0.03
    # prompt-like prefix: once a sequence's mask turns on, it stays on
    assert bool((w.loss_mask.diff(dim=1) >= 0).all())


def test_demo_runs(capsys) -> None:
    assert bench.demo(n=64, v=300, s=16, repeats=1) == 0
    out = capsys.readouterr().out
    assert "agree with eager" in out and "faster" in out
