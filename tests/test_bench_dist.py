"""The communication benchmark: the collectives really issued per call, counted on 2 gloo processes.

Ours must issue exactly one data collective in the forward (an all-gather of 3N float32), after the
fixed-size shape check (an all-reduce of 4 int64), and none in the backward; megatron-core's (when
installed) three all-reduces of N float32. No timing assertions."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from steerlm_kernels.bench import dist as bench_dist
from steerlm_kernels.bench import summary


def test_counter_wraps_and_restores_and_models_ring_bytes() -> None:
    originals = {name: getattr(dist, name) for name in bench_dist.COLLECTIVES if hasattr(dist, name)}
    with bench_dist.CollectiveCounter(tp=4) as counter:
        assert all(getattr(dist, name) is not fn for name, fn in originals.items())
    assert counter.calls == [] and counter.payload_bytes == 0
    assert all(getattr(dist, name) is fn for name, fn in originals.items())
    assert bench_dist.COLLECTIVES["all_reduce"](1000, 4) == 1500.0
    assert bench_dist.COLLECTIVES["all_gather_into_tensor"](1000, 4) == 3000.0


def test_ours_one_collective_forward_none_backward_and_matches_megatron() -> None:
    s, b, v = 8, 2, 74
    result = bench_dist.run_dist(tps=(2,), s=s, b=b, v=v, repeats=1)
    rows = {r["impl"]: r for r in result["rows"]}
    ours = rows["ours"]
    n = s * b
    # one data collective on [N]-sized tensors (an all-gather of (m, lse, target): 3N float32), preceded by
    # the fixed-size shape check (an all-reduce of 4 int64: rows and shard width, and their negations)
    fwd = ours["fwd_collectives"]
    assert len(fwd) == 2 and fwd[0] == "all_reduce" and fwd[1].startswith("all_gather"), fwd
    assert ours["bwd_collectives"] == []
    check_bytes = 4 * 8
    assert ours["payload_bytes"] == 3 * n * 4 + check_bytes
    assert ours["ring_bytes_sent"] == (2 - 1) * 3 * n * 4 + 2 * (2 - 1) / 2 * check_bytes
    head = summary.dist_headline({"dist": result})  # the gpu-check summary reads this result
    assert head is not None and head.shape == f"tp=2 N={n} V={v}" and head.headline.startswith("ours 2 collectives")
    assert head.check == "agrees"
    if result["megatron"]:
        pytest.skip(f"megatron-core not run: {result['megatron']}")
    meg = rows["megatron"]
    assert meg["fwd_collectives"] == ["all_reduce"] * 3 and meg["bwd_collectives"] == []
    assert meg["payload_bytes"] == 3 * n * 4
    assert ours["loss_rel_err_vs_megatron"] < 1e-5
    table = "\n".join(bench_dist.markdown(result))
    assert "| 2 | ours |" in table and "| 2 | megatron |" in table


def test_markdown_reports_errors() -> None:
    assert any("**ERROR** boom" in line for line in bench_dist.markdown({"error": "boom"}))
