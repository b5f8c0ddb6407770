"""The benchmark machinery end to end at tiny shapes: every available backend appears in each
section's table, values agree with the references, the FLOP / byte models and ratios are filled
in, plots are written, and the memory method reads a known allocation correctly.
No timing assertions (tests never time)."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from steerlm_kernels import bench, bench_group, bench_linear, bench_suite, registry


def _usable_backends(device: torch.device) -> list[str]:
    return [name for name, why in bench.available_backends(device).items() if not why]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_suite.add_arguments(parser)
    return parser.parse_args(argv)


def test_memory_method_reads_a_known_allocation(device: torch.device) -> None:
    extra = bench.memory_method_check(device, mib=256)
    if extra is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert 256 * 0.85 <= extra <= 256 * 1.15, f"a 256 MiB tensor measured as {extra:.1f} MiB"


def test_ce_section_lists_every_backend_and_agrees(device: torch.device, tmp_path, capsys) -> None:
    backends = _usable_backends(device)
    impls = ",".join(["eager", *backends])  # torch.compile is left to the benchmark suite (slow to compile)
    ns = _parse(["--quick", "--sections", "ce", "--device", str(device), "--n", "64", "--v", "300", "--s", "16",
                 "--repeats", "1", "--impls", impls, "--output", str(tmp_path), "--no-plots"])
    assert bench_suite.run(ns) == 0
    out = capsys.readouterr().out
    assert "memory method check" in out and "| phase | implementation |" in out
    assert "MISMATCH" not in out and "ERROR" not in out and "ETA" in out

    result = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.md").read_text().startswith("**")
    rows = result["rows"]
    assert {r["section"] for r in rows} == {"ce"}
    for phase in bench.PHASES:
        names = {r["impl"] for r in rows if r["phase"] == phase}
        expected = set(backends) | ({"eager"} if phase != "inplace" else set())
        assert names == expected, (phase, names)
    for r in rows:
        assert r["error"] is None, r
        assert r["agrees"] is True, r
        assert r["value_rel_err"] <= bench.VALUE_TOL
        assert r["median_ms"] is not None and r["bytes_per_elem"] == bench.ACCESSES_PER_ELEM[r["phase"]] * 2
        assert (r["n"], r["v"], r["dtype"]) == (64, 300, "bfloat16")
        assert r["gbps"] > 0
        if r["phase"] != "baseline":
            assert r["grad_rel_err"] is not None
    table = (tmp_path / "bench.md").read_text()
    for name in backends:
        assert bench.IMPL_TITLES[name] in table
    auto = registry.resolve("auto", device)
    assert f"{bench.IMPL_TITLES[auto]} (auto)" in table
    assert result["meta"]["memory_method_check_mib_of_256"] is None or (
        abs(result["meta"]["memory_method_check_mib_of_256"] - 256) < 0.15 * 256
    )


def test_linear_and_group_sections(device: torch.device, tmp_path) -> None:
    backends = _usable_backends(device)
    ns = _parse(["--quick", "--sections", "linear,group", "--device", str(device), "--n", "64", "--v", "300",
                 "--h", "32", "--s", "16", "--dtype", "fp32", "--repeats", "1", "--output", str(tmp_path),
                 "--no-plots", "--impls", ",".join(["eager", "lce", *backends])])
    assert bench_suite.run(ns) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["rows"]
    linear = [r for r in rows if r["section"] == "linear"]
    group = [r for r in rows if r["section"] == "group"]
    lin_backends = {b for b in backends if b != "triton" or device.type == "cuda"}  # not interpreted here
    for phase in bench_linear.PHASES:
        names = {r["impl"] for r in linear if r["phase"] == phase}
        assert names == {"matmuls", "eager", "lce"} | lin_backends, (phase, names)
    for r in linear:
        assert r["error"] is None, r
        assert (r["n"], r["v"], r["h"]) == (64, 300, 32)
        assert r["flops"] == bench_linear.MATMULS[r["phase"]] * 2 * 64 * 300 * 32
        assert r["tflops"] > 0 and r["frac_matmul"] > 0 and r["vs_floor"] > 0
        if r["impl"] != "matmuls":
            assert r["agrees"] is True, r
            assert r["vs_eager"] > 0 and r["vs_lce"] > 0
            if r["phase"] == "train":
                assert r["grad_rel_err"] <= 1e-4
    for op in bench_group.OPS:
        names = {r["impl"] for r in group if r["phase"] == op}
        assert names == {"eager"} | set(backends), (op, names)
    for r in group:
        assert r["error"] is None and r["agrees"] is True, r
        assert r["bytes_per_elem"] == 4 * bench_group.ACCESSES[r["phase"]] and r["gbps"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert "### Hidden states in" in table and "### SteerLM 2.0 group ops" in table
    assert "% matmul rate" in table and "bare matmuls (floor)" in table


def test_grid_writes_plots(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    ns = _parse(["--quick", "--sections", "ce", "--device", "cpu", "--n", "64", "--v", "300", "--s", "16",
                 "--ns", "32,64", "--vs", "200,300,400", "--repeats", "1", "--impls", "eager,torch",
                 "--output", str(tmp_path)])
    assert bench_suite.run(ns) == 0
    meta = json.loads((tmp_path / "bench.json").read_text())["meta"]
    assert [tuple(s) for s in meta["ce_shapes"]] == [(64, 300), (32, 300), (64, 200), (64, 400)]
    for name in ("ce_vs_v.png", "ce_vs_n.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = (tmp_path / "bench.md").read_text()
    assert "| N=64 V=300 | N=32 V=300 | N=64 V=200 | N=64 V=400 |" in table


def test_value_check_flags_a_disagreement(device: torch.device) -> None:
    w = bench.make_workload(32, 50, 8, torch.bfloat16, device)
    ref = bench.eager_reference(w, "baseline")
    wrong = bench.Impl("wrong", "wrong", seq_nll=lambda w, x: bench.naive_sequence_nll(x, w.labels, w.loss_mask) * 1.01,
                       loss=None)
    row = bench.run_case(wrong, "baseline", w, bench.Timer(device), 1, 0, ref)
    assert row.agrees is False and row.value_rel_err > 1e-3
    assert "MISMATCH" in bench.markdown_table([row])


def test_linear_check_flags_a_wrong_gradient(device: torch.device) -> None:
    w = bench_linear.make_linear_workload(32, 50, 16, 8, torch.float32, device)
    ref = bench_linear.linear_reference(w, "train")
    eager = bench_linear.build_linear_impl("eager", device)
    assert eager.seq_nll is not None
    seq = eager.seq_nll

    def skewed(w: bench_linear.LinearWorkload, h: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        return seq(w, h, W) + 0.01 * (h.sum(-1) ** 2).sum(-1)  # right-ish value, wrong gradient

    wrong = bench_linear.LinearImpl("wrong", "wrong", skewed, lambda w, h, W: (w.seq_weight * skewed(w, h, W)
                                                                               / w.normalizer).sum())
    row = bench_linear.run_linear_case(wrong, "train", w, bench.Timer(device), 1, 0, ref)
    assert row.error is None and row.agrees is False and row.grad_rel_err > 1e-3


def test_linear_tiles_variant_runs_the_tile_kernels(device: torch.device, monkeypatch) -> None:
    """``triton-tiles`` (a CUDA row of the linear section) times the tile kernels, agrees with the
    reference, and leaves $STEERLM_KERNELS_LINEAR as it found it."""
    if "triton" not in _usable_backends(device):
        pytest.skip("triton cannot run here")
    from steerlm_kernels.ops import linear_cross_entropy as lce

    monkeypatch.delenv(registry.LINEAR_ENV_VAR, raising=False)
    calls = []
    real = lce.triton_linear_ce_backward
    monkeypatch.setattr(lce, "triton_linear_ce_backward", lambda *a: calls.append(1) or real(*a))
    w = bench_linear.make_linear_workload(32, 50, 16, 8, torch.float32, device)
    impl = bench_linear.build_linear_impl("triton-tiles", device)
    row = bench_linear.run_linear_case(impl, "train", w, bench.Timer(device), 1, 0,
                                       bench_linear.linear_reference(w, "train"))
    assert row.error is None and row.agrees is True, row
    assert calls, "the tile backward did not run"
    assert registry.LINEAR_ENV_VAR not in os.environ


def test_group_workload_has_unequal_groups(device: torch.device) -> None:
    w = bench_group.make_group_workload(100, 5, device)
    assert w.sizes.tolist()[:5] == [1, 2, 3, 4, 5] and int(w.sizes.sum()) == w.b
    sums = torch.zeros(w.sizes.shape[0], dtype=torch.float64, device=device).index_add_(0, w.group_id, w.ws.double())
    torch.testing.assert_close(sums, torch.ones_like(sums))


@pytest.mark.parametrize("argv, message", [
    (["--sections", "ce,nope"], "--sections"),
    (["--impls", "eager,nope"], "--impls"),
    (["--n", "64", "--s", "7"], "--s"),
    (["--vs", "10,x"], "--vs"),
])
def test_bad_options_name_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        bench_suite.resolve_config(_parse(["--device", "cpu", *argv]))


def test_peers_table_is_loud_about_failures() -> None:
    err = "\n".join(bench_suite._peers_table({"mode": "interpreter", "error": "exit 1: boom"}))
    assert "**ERROR** exit 1: boom" in err
    rows = [{"peer": "liger", "op": "token_nll", "n": 3, "v": 5, "h": None, "dtype": "float32",
             "value_rel_err": 0.5, "grad_rel_err": None, "value_rel_err_ours": 0.5, "grad_rel_err_ours": None,
             "tol": 1e-4, "agrees": False, "error": None}]
    table = "\n".join(bench_suite._peers_table({"mode": "interpreter", "rows": rows, "available": {"cce": "x"}}))
    assert "**NO**" in table and "`cce` not checked: x" in table and "interpreter" in table


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
