"""bench.train_step: the ``train`` section (one SteerLM 2.0 step: ours fused / ours logits / NeMo-style eager),
tiny sizes. No timing assertion: the rows exist, agree with each other (loss, distance, weights after the
step), report memory; the suite runs it (each row in its own process) and fails on a disagreeing row."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("transformers")

from steerlm_kernels.bench import suite  # noqa: E402
from steerlm_kernels.bench import train_step as B  # noqa: E402
from steerlm_kernels.steerlm2.models.model import GPTSteerLMModel  # noqa: E402

CPU = torch.device("cpu")


def test_eager_step_in_float64_equals_our_wrapper() -> None:
    """The NeMo-style eager step (the comparator), in float64, gives the fused and logits wrapper's loss,
    distance and gradient (float32)."""
    cfg = dict(B.QUICK, dtype="fp32")
    model = B.make_model(cfg, CPU).double()
    batch = B.make_batch(cfg, CPU)
    want = B.eager_step(model, batch, 1)
    want_grads = {n: p.grad.float() for n, p in model.named_parameters()}
    assert want[1] > 0
    for path in ("fused", "logits"):
        model = B.make_model(cfg, CPU)
        w = GPTSteerLMModel.from_hf(model, {"steerlm2": {"forward_micro_batch_size": 3, "micro_batch_size": 2}},
                                    path, backend="torch")
        loss, metrics = w.get_loss_and_metrics(batch)
        assert (loss, metrics["distance"]) == pytest.approx(want, rel=1e-5, abs=1e-6), path
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-3, atol=1e-6, msg=f"{path} {n}")


def test_rows_agree_and_report_memory() -> None:
    lines: list[str] = []
    result = B.run_train(CPU, quick=True, isolate=False, memory_budget=1e6, log=lines.append)
    rows = result["rows"]
    assert [(r["mbs"], r["impl"]) for r in rows] == [(m, i) for m in B.QUICK["mbs"] for i in B.IMPLS]
    assert all("error" not in r for r in rows), rows
    assert result["agrees"]
    for r in rows:
        assert r["loss_rel_diff"] <= 1e-4 and r["distance_rel_diff"] <= 1e-4, r
        assert r["step_ms"] > 0 and r["extra_mib"] is None or r["extra_mib"] >= 0
        assert r["distance"] > 0 and torch.isfinite(torch.tensor(r["loss"]))
    assert result["fits"] == {i: max(B.QUICK["mbs"]) for i in B.IMPLS}
    table = "\n".join(B.markdown(result))
    assert "ours fused" in table and "Largest micro-batch within" in table and "**NO**" not in table


def test_largest_fitting_and_a_disagreeing_row_is_shown() -> None:
    rows = [{"impl": "ours fused", "mbs": m, "extra_mib": 100.0 * m} for m in (1, 2, 4, 8)]
    assert B.largest_fitting(rows, "ours fused", 450) == 4
    assert B.largest_fitting(rows, "ours fused", 50) is None
    result = B.run_train(CPU, quick=True, isolate=False, shape={"mbs": [2]}, log=lambda _: None)
    result["agrees"] = False
    assert "**NO**" in "\n".join(B.markdown(result))
    assert "Failed: boom" in "\n".join(B.markdown({"error": "boom"}))


def test_section_runs_in_the_suite_one_process_per_row(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    ns = parser.parse_args(["--quick", "--sections", "train", "--device", "cpu", "--output", str(tmp_path),
                            "--no-plots", "--memory-budget", "4096"])
    assert suite.run(ns) == 0
    saved = json.loads((tmp_path / "bench.json").read_text())["train"]
    assert saved["agrees"] and len(saved["rows"]) == len(B.IMPLS) * len(B.QUICK["mbs"])
    assert all("error" not in r for r in saved["rows"]), saved["rows"]
    assert "#### SteerLM 2.0 training step" in (tmp_path / "bench.md").read_text()


def test_a_failed_train_section_fails_the_run(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(B, "run_train", lambda device, **kw: {"error": "boom"})
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    ns = parser.parse_args(["--quick", "--sections", "train", "--device", "cpu", "--output", str(tmp_path),
                            "--no-plots"])
    assert suite.run(ns) == 1
    assert "!! train: boom" in capsys.readouterr().out


def test_a_spent_budget_skips_the_rows_left_and_they_do_not_count_against_agreement() -> None:
    import time

    from steerlm_kernels.bench import summary

    done = B.run_train(CPU, quick=True, isolate=False, shape={"mbs": [1]}, log=lambda _: None)
    late = B.run_train(CPU, quick=True, isolate=False, shape={"mbs": [1]}, deadline=time.perf_counter() - 1,
                       log=lambda _: None)
    assert [r.get("skipped") for r in late["rows"]] == ["not run: --budget spent"] * len(B.IMPLS)
    assert late["agrees"] and "not run: --budget spent" in "\n".join(B.markdown(late))
    # rows run before the deadline keep their figures; the skipped ones stay out of the summary's check
    rows = done["rows"][:2] + late["rows"][2:]
    mixed = dict(done, rows=rows)
    assert all("step_ms" in r for r in rows[:2]) and "skipped" in rows[2]
    assert summary.train_headline({"train": mixed}).check == "agrees"
    assert summary.train_headline({"train": late}).check == "not run"


def test_a_deadline_caps_each_rows_process_time(monkeypatch) -> None:
    import time

    seen: list[float] = []
    monkeypatch.setattr(B, "_in_subprocess", lambda impl, mbs, cfg, device, seed, timeout: seen.append(timeout)
                        or {"impl": impl, "mbs": mbs, "error": "stub"})
    B.run_train(CPU, quick=True, shape={"mbs": [1]}, deadline=time.perf_counter() + 100, log=lambda _: None)
    assert len(seen) == len(B.IMPLS) and all(30 <= t <= 100 for t in seen)
    seen.clear()
    B.run_train(CPU, quick=True, shape={"mbs": [1]}, log=lambda _: None)
    assert seen == [1800.0] * len(B.IMPLS)


def test_rows_after_the_deadline_are_skipped_once_eager_has_run(monkeypatch) -> None:
    clock = iter([0.0] + [10.0] * 50)  # the first row starts before the deadline (5.0), the rest after it
    monkeypatch.setattr(B.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(B, "run_variant", lambda impl, mbs, cfg, device, seed: {
        "impl": impl, "mbs": mbs, "step_ms": 1.0, "tokens_per_s": 1.0, "cpu_s": 1.0, "extra_mib": 1.0, "loss": 0.5,
        "distance": 1.0})
    result = B.run_train(CPU, quick=True, isolate=False, shape={"mbs": [1]}, deadline=5.0, log=lambda _: None)
    rows = result["rows"]
    assert rows[0]["impl"] == "NeMo-style eager" and "step_ms" in rows[0]
    assert [r.get("skipped") for r in rows[1:]] == ["not run: --budget spent"] * (len(B.IMPLS) - 1)
    assert result["agrees"] and "speed_vs_eager" not in rows[1]
