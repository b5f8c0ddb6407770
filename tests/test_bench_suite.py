"""``steerlm-kernels bench`` end to end at tiny shapes: every available backend appears in each
section's table, values agree with the references, the FLOP / byte models and ratios are filled
in, and plots are written. No timing assertions (tests never time)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from steerlm_kernels import registry
from steerlm_kernels.bench import ce, group, harness, linear, suite, summary


def _usable_backends(device: torch.device) -> list[str]:
    return [name for name, why in ce.available_backends(device).items() if not why]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    return parser.parse_args(argv)


def test_ce_section_lists_every_backend_and_agrees(device: torch.device, tmp_path, capsys) -> None:
    backends = _usable_backends(device)
    impls = ",".join(["eager", *backends])  # torch.compile is left to the benchmark suite (slow to compile)
    ns = _parse(["--quick", "--sections", "ce", "--device", str(device), "--n", "64", "--v", "300", "--s", "16",
                 "--repeats", "1", "--impls", impls, "--output", str(tmp_path), "--no-plots"])
    assert suite.run(ns) == 0
    out = capsys.readouterr().out
    assert "memory method check" in out and "| phase | implementation |" in out
    assert "MISMATCH" not in out and "ERROR" not in out and "ETA" in out

    result = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.md").read_text().startswith("**")
    rows = result["rows"]
    assert {r["section"] for r in rows} == {"ce"}
    for phase in ce.PHASES:
        names = {r["impl"] for r in rows if r["phase"] == phase}
        expected = set(backends) | ({"eager"} if phase != "inplace" else set())
        assert names == expected, (phase, names)
    for r in rows:
        assert r["error"] is None, r
        assert r["agrees"] is True, r
        assert r["value_rel_err"] <= harness.VALUE_TOL
        assert r["median_ms"] is not None and r["bytes_per_elem"] == ce.ACCESSES_PER_ELEM[r["phase"]] * 2
        assert (r["n"], r["v"], r["dtype"]) == (64, 300, "bfloat16")
        assert r["gbps"] > 0
        if r["phase"] != "baseline":
            assert r["grad_rel_err"] is not None
    table = (tmp_path / "bench.md").read_text()
    for name in backends:
        assert harness.IMPL_TITLES[name] in table
    auto = registry.resolve("auto", device)
    assert f"{harness.IMPL_TITLES[auto]} (auto)" in table
    assert result["meta"]["memory_method_check_mib_of_256"] is None or (
        abs(result["meta"]["memory_method_check_mib_of_256"] - 256) < 0.15 * 256
    )
    # the gpu-check summary reads this run's bench.json (its own tests use hand-built samples)
    (head,) = summary.headlines(result)
    assert (head.section, head.shape, head.check) == ("ce", "train N=64 V=300 bfloat16", "agrees")
    assert head.headline.startswith(f"{auto} (auto) ") and "n/a" not in head.headline
    assert all(f"{name} " in head.headline for name in backends)


def test_linear_and_group_sections(device: torch.device, tmp_path) -> None:
    backends = _usable_backends(device)
    ns = _parse(["--quick", "--sections", "linear,group", "--device", str(device), "--n", "64", "--v", "300",
                 "--h", "32", "--s", "16", "--dtype", "fp32", "--repeats", "1", "--output", str(tmp_path),
                 "--no-plots", "--impls", ",".join(["eager", "lce", *backends])])
    assert suite.run(ns) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["rows"]
    linear_rows = [r for r in rows if r["section"] == "linear"]
    group_rows = [r for r in rows if r["section"] == "group"]
    lin_backends = {b for b in backends if b != "triton" or device.type == "cuda"}  # not interpreted here
    for phase in linear.PHASES:
        names = {r["impl"] for r in linear_rows if r["phase"] == phase}
        assert names == {"matmuls", "eager", "lce"} | lin_backends, (phase, names)
    for r in linear_rows:
        assert r["error"] is None, r
        assert (r["n"], r["v"], r["h"]) == (64, 300, 32)
        assert r["flops"] == linear.MATMULS[r["phase"]] * 2 * 64 * 300 * 32
        assert r["tflops"] > 0 and r["frac_matmul"] > 0 and r["vs_floor"] > 0
        if r["impl"] != "matmuls":
            assert r["agrees"] is True, r
            assert r["vs_eager"] > 0 and r["vs_lce"] > 0
            if r["phase"] == "train":
                assert r["grad_rel_err"] <= 1e-4
    for op in group.OPS:
        names = {r["impl"] for r in group_rows if r["phase"] == op}
        assert names == {"eager"} | set(backends), (op, names)
    for r in group_rows:
        assert r["error"] is None and r["agrees"] is True, r
        assert r["bytes_per_elem"] == 4 * group.ACCESSES[r["phase"]] and r["gbps"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert "### Hidden states in" in table and "### SteerLM 2.0 group ops" in table
    assert "% matmul rate" in table and "bare matmuls (floor)" in table
    heads = {h.section: h for h in summary.headlines(result)}
    assert set(heads) == {"linear", "group"} and all(h.check == "agrees" for h in heads.values())
    assert heads["linear"].shape == "train N=64 V=300 H=32 float32" and "n/a" not in heads["linear"].headline
    assert heads["group"].shape.startswith("steerlm2_weights") and "n/a" not in heads["group"].headline


def test_grid_writes_plots(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    ns = _parse(["--quick", "--sections", "ce", "--device", "cpu", "--n", "64", "--v", "300", "--s", "16",
                 "--ns", "32,64", "--vs", "200,300,400", "--repeats", "1", "--impls", "eager,torch",
                 "--output", str(tmp_path)])
    assert suite.run(ns) == 0
    meta = json.loads((tmp_path / "bench.json").read_text())["meta"]
    assert [tuple(s) for s in meta["ce_shapes"]] == [(64, 300), (32, 300), (64, 200), (64, 400)]
    for name in ("ce_vs_v.png", "ce_vs_n.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = (tmp_path / "bench.md").read_text()
    assert "| N=64 V=300 | N=32 V=300 | N=64 V=200 | N=64 V=400 |" in table
