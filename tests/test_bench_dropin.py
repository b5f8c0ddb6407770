"""bench --sections dropin at tiny sizes: every row agrees (trainer rows with the unpatched model, op rows with
the float64 reference), the peers that cannot run here say why, the targets and agreement logic, the
subprocess entry point and the section's registration. No timing assertions."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from steerlm_kernels.bench import config, dropin  # noqa: E402

TINY = {"v": 300, "h": 16, "layers": 1, "dtype": "fp32", "b": 2, "s": 8, "repeats": 1}


@pytest.fixture(scope="module")
def result():
    return dropin.run_dropin(torch.device("cpu"), shape=TINY, isolate=False, log=lambda _: None)


def test_every_row_is_there_and_agrees(result):
    rows = {(r["part"], r["impl"]): r for r in result["rows"]}
    assert set(rows) == {("trainer", i) for i in dropin.TRAINER_IMPLS} | {("op", i) for i in dropin.OP_IMPLS}
    assert result["agrees"] is True and result["tolerance"] == 1e-4
    ran = [r for r in result["rows"] if "loss" in r]
    for part, impl in (("trainer", "HF unpatched"), ("trainer", "sk patch"), ("trainer", "torch lce"),
                       ("op", "eager"), ("op", "ours"), ("op", "torch lce")):
        assert "loss" in rows[part, impl], rows[part, impl]
    for r in ran:
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert r["loss_rel_diff"] <= 1e-4 and r["grad_rel_diff"] <= 1e-4, r
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["cpu_ms"] >= 0
    assert "skipped" in rows["trainer", "liger"] and "CUDA" in rows["trainer", "liger"]["skipped"]
    for r in result["rows"]:
        assert "error" not in r, r


def test_op_reference_is_the_float64_loss_and_gradient():
    cfg = dict(TINY)
    ref = dropin.reference_loss_grads(cfg, seed=3, chunk=5)
    gen = torch.Generator().manual_seed(3 + 11)
    n, h = cfg["b"] * cfg["s"], cfg["h"]
    hidden = torch.randn(n, h, generator=gen).double().requires_grad_(True)
    weight = (torch.randn(cfg["v"], h, generator=gen) / h ** 0.5).double().requires_grad_(True)
    target = dropin.make_tokens(cfg, torch.device("cpu"), 3)[1].reshape(-1)
    loss = torch.nn.functional.cross_entropy(hidden @ weight.T, target)
    loss.backward()
    assert ref["loss"] == pytest.approx(loss.item(), rel=1e-12)
    g = torch.cat([hidden.grad.flatten(), weight.grad.flatten()])
    assert ref["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-9)


def test_the_trainer_rows_see_the_same_loss_as_the_model():
    """The loss the Trainer row reports is the unpatched model's mean next-token NLL on the batch."""
    row = dropin.run_row("trainer", "sk patch", TINY, torch.device("cpu"))
    base = dropin.run_row("trainer", "HF unpatched", TINY, torch.device("cpu"))
    assert row["loss"] == pytest.approx(base["loss"], rel=1e-5)
    assert row["grad_proj"] == pytest.approx(base["grad_proj"], rel=1e-4, abs=1e-4 * base["grad_norm"])


def _row(part, impl, tps, mib, loss=1.0, proj=0.5):
    return {"part": part, "impl": impl, "tokens_per_s": tps, "extra_mib": mib, "step_ms": 1.0, "loss": loss,
            "grad_proj": proj, "grad_norm": 1.0}


def test_targets_need_the_least_memory_and_1_2x_the_fastest_peer():
    rows = [_row("op", "eager", 10, 100), _row("op", "ours", 60, 5), _row("op", "torch lce", 40, 8),
            _row("op", "cce", 50, 6)]
    t = dropin.evaluate_targets(rows, "op")
    assert t["met"] is True and t["best_peer"] == "cce" and t["speed_vs_best_peer"] == pytest.approx(1.2)
    rows[1]["tokens_per_s"] = 59
    assert dropin.evaluate_targets(rows, "op")["met"] is False  # 1.18x
    rows[1]["tokens_per_s"], rows[1]["extra_mib"] = 60, 6.5
    t = dropin.evaluate_targets(rows, "op")
    assert t["met"] is False and t["memory_vs_least_peer"] == pytest.approx(6.5 / 6)
    assert dropin.evaluate_targets([_row("op", "ours", 1, 1), _row("op", "eager", 1, 1)], "op")["met"] is None


def test_agreement_flags_a_disagreeing_or_failed_row():
    rows = [_row("trainer", "HF unpatched", 1, 1), _row("trainer", "sk patch", 1, 1, loss=1.00001)]
    assert dropin.fill_agreement(rows, "trainer", None, 1e-4) is True
    assert rows[1]["loss_rel_diff"] == pytest.approx(1e-5)
    rows[1]["grad_proj"] = 0.51  # a gradient 1 % off (projection / norm)
    assert dropin.fill_agreement(rows, "trainer", None, 1e-4) is False
    rows[1]["grad_proj"] = 0.5
    rows.append({"part": "trainer", "impl": "cce", "error": "boom"})
    assert dropin.fill_agreement(rows, "trainer", None, 1e-4) is False
    ref = {"loss": 2.0, "grad_proj": 0.5, "grad_norm": 1.0}
    assert dropin.fill_agreement([_row("op", "ours", 1, 1, loss=2.0)], "op", ref, 1e-4) is True
    assert dropin.fill_agreement([_row("op", "ours", 1, 1, loss=2.01)], "op", ref, 1e-4) is False


def test_markdown_has_both_tables_and_the_skips(result):
    text = "\n".join(dropin.markdown(result))
    assert "Trainer SFT step" in text and "loss op" in text and ": yes" in text and "CPU ms" in text
    assert "| sk patch |" in text and "| ours |" in text and "not run:" in text
    assert "Failed: x" in "\n".join(dropin.markdown({"error": "x"}))


def test_the_subprocess_entry_point_prints_one_json_row():
    spec = json.dumps({"part": "op", "impl": "ours", "cfg": TINY, "device": "cpu", "seed": 0})
    run = subprocess.run([sys.executable, "-m", "steerlm_kernels.bench.dropin", spec], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads([x for x in run.stdout.splitlines() if x.startswith("{")][-1])
    ref = dropin.reference_loss_grads(TINY)
    assert row["impl"] == "ours" and row["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_registered_as_a_bench_section():
    import argparse

    assert "dropin" in config.SECTIONS
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    cfg = config.resolve_config(parser.parse_args(["--sections", "dropin", "--device", "cpu", "--quick"]))
    assert cfg.sections == ["dropin"]
    with pytest.raises(ValueError, match="impl"):
        dropin.peer_loss("nope", torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.long))


def test_a_spent_budget_skips_the_rows_left():
    import time

    late = dropin.run_dropin(torch.device("cpu"), shape=TINY, parts=("op",), isolate=False,
                             deadline=time.perf_counter() - 1, log=lambda _: None)
    assert [r.get("skipped") for r in late["rows"]] == ["--budget spent"] * len(dropin.OP_IMPLS)
    assert all("step_ms" not in r for r in late["rows"])
    assert "not run: --budget spent" in "\n".join(dropin.markdown(late))
