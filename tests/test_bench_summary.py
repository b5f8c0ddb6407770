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
                 "sections": ["ce", "linear", "group", "dist", "peers", "score", "train", "dropin"]},
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
        "train": train_sample(),
        "dropin": dropin_sample(),
    }


#: train: per micro-batch size, (tokens/s, peak extra MiB) of eager, ours logits and ours fused. Fused over eager:
#: 2.5/3/3.5/4x the tokens/s, 0.25/0.20/0.15/0.20x the memory; fused mbs 8 (1600 MiB) no longer fits in eager's
#: mbs-1 memory (1000 MiB), mbs 4 (600 MiB) does. The logits rows differ, so that picking them shows.
TRAIN = {1: ((1000, 1000), (9000, 10), (2500, 250)), 2: ((1000, 2000), (9000, 10), (3000, 400)),
         4: ((1000, 4000), (9000, 10), (3500, 600)), 8: ((1000, 8000), (9000, 10), (4000, 1600))}
TRAIN_HEADLINE = ("ours fused / eager at mbs 1/2/4/8: 2.50x/3.00x/3.50x/4.00x tokens/s, 0.25x/0.20x/0.15x/0.20x "
                  "peak memory; fused mbs 4 in eager's mbs-1 memory")


def train_sample() -> dict:
    """``run_train``'s result layout (train_step.py): rows per (mbs, impl), eager's row first at each size."""
    rows = []
    for mbs, impls in TRAIN.items():
        for impl, (tps, mib) in zip(("NeMo-style eager", "ours logits", "ours fused"), impls, strict=True):
            rows.append({"impl": impl, "mbs": mbs, "step_ms": 8 * 4096 / tps * 1e3, "tokens_per_s": tps,
                         "cpu_s": 1.0, "extra_mib": mib, "loss": 0.01, "distance": 0.2, "loss_rel_diff": 1e-3,
                         "distance_rel_diff": 2e-3, "speed_vs_eager": tps / 1000, "memory_vs_eager": mib / impls[0][1]})
    return {"shape": {"v": 128256, "h": 4096, "layers": 1, "dtype": "bf16", "s": 4096, "groups": 2, "responses": 4,
                      "mbs": [1, 2, 4, 8]},
            "device": "NVIDIA H200", "rows": rows, "agrees": True, "tolerance": 3e-2, "targets_met": None}


#: dropin: (part, impl) -> (tokens/s, peak extra MiB), or the reason it was skipped.
DROPIN = {("trainer", "HF unpatched"): (1000, 4000), ("trainer", "sk patch"): (2000, 1000),
          ("trainer", "liger"): (1600, 1250), ("trainer", "cce patch"): "no cut_cross_entropy.transformers",
          ("trainer", "torch lce"): (1200, 2000), ("trainer", "cce"): (1000, 500),
          ("op", "eager"): (500, 3000), ("op", "ours"): (1500, 300), ("op", "torch lce"): "torch 2.11",
          ("op", "liger"): (1000, 400), ("op", "cce"): (750, 600)}
DROPIN_TRAINER = ("sk patch vs HF unpatched: 2.00x tokens/s, 0.25x memory; vs liger (fastest peer): 1.25x tokens/s; "
                  "vs cce (least-memory peer): 2.00x memory")
DROPIN_OP = "ours vs eager: 3.00x tokens/s, 0.10x memory; vs liger (best peer): 1.50x tokens/s, 0.75x memory"


def dropin_rows() -> list[dict]:
    """Rows as ``dropin.run_row`` writes them (before ``fill_agreement``)."""
    rows = []
    for (part, impl), value in DROPIN.items():
        if isinstance(value, str):
            rows.append({"part": part, "impl": impl, "skipped": value})
            continue
        tps, mib = value
        rows.append({"part": part, "impl": impl, "step_ms": 4 * 4096 / tps * 1e3, "tokens_per_s": tps,
                     "cpu_ms": 1.0, "extra_mib": mib, "loss": 11.8, "grad_proj": 0.5, "grad_norm": 1.0})
    return rows


def dropin_sample() -> dict:
    rows = dropin_rows()
    for r in rows:
        if "loss" in r:
            r.update(loss_rel_diff=1e-3, grad_rel_diff=2e-3)
    return {"shape": {"v": 128256, "h": 4096, "layers": 1, "dtype": "bf16", "b": 4, "s": 4096, "repeats": 3},
            "device": "NVIDIA H200", "rows": rows, "agrees": True, "tolerance": 3e-2}


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
        if which == "bench.json":
            assert TRAIN_HEADLINE in res.stdout and DROPIN_TRAINER in res.stdout and DROPIN_OP in res.stdout
        assert ("PARTIAL" in res.stdout) == (which == "partial")


def _lines(bench: dict, section: str) -> list[summary.Headline]:
    return [h for h in summary.headlines(bench) if h.section == section]


def test_train_headline_fused_over_eager_at_every_micro_batch():
    (h,) = _lines(sample(), "train")
    assert h.shape == "step B=8 S=4096 V=128256 H=4096 bf16"
    assert h.headline == TRAIN_HEADLINE  # speed-ups > 1 and memory < 1: neither ratio inverted
    assert h.check == "agrees"


def test_train_headline_one_micro_batch_and_eager_failing():
    bench = sample()
    rows = bench["train"]["rows"]
    eager8 = next(r for r in rows if r["impl"] == "NeMo-style eager" and r["mbs"] == 8)
    eager8.clear()
    eager8.update(impl="NeMo-style eager", mbs=8, error="CUDA out of memory")
    h = summary.train_headline(bench)
    assert h.headline.startswith("ours fused / eager at mbs 1/2/4/8: 2.50x/3.00x/3.50x/n/a tokens/s, "
                                 "0.25x/0.20x/0.15x/n/a peak memory")
    assert h.check == "1 of 12 rows FAILED/MISMATCH"
    bench["train"]["rows"] = [r for r in rows if r["mbs"] == 2]
    h = summary.train_headline(bench)
    assert h.headline == "ours fused / eager at mbs 2: 3.00x tokens/s, 0.20x peak memory; fused mbs 2 in eager's " \
                         "mbs-2 memory"
    assert h.check == "agrees"
    next(r for r in bench["train"]["rows"] if r["impl"] == "ours fused")["extra_mib"] = 3000
    assert summary.train_headline(bench).headline == (
        "ours fused / eager at mbs 2: 3.00x tokens/s, 1.50x peak memory; no fused micro-batch in eager's mbs-2 memory")


def test_train_check_counts_failed_and_disagreeing_rows():
    bench = sample()
    rows = bench["train"]["rows"]
    rows[1]["loss_rel_diff"] = 0.5  # ours logits, mbs 1: beyond the bf16 tolerance 3e-2
    rows[2]["distance_rel_diff"] = float("nan")  # ours fused, mbs 1: NaN never agrees
    rows[4] = {"impl": "ours logits", "mbs": 2, "error": "exit 1: RuntimeError"}
    bench["train"]["agrees"] = False
    assert summary.train_headline(bench).check == "3 of 12 rows FAILED/MISMATCH"
    for r in rows:
        if r["impl"] == "ours fused":
            r.clear()
            r.update(impl="ours fused", mbs=1, error="boom")
    h = summary.train_headline(bench)
    assert h.headline == "ours fused did not run" and h.check == "6 of 12 rows FAILED/MISMATCH"
    bench["train"] = {"error": "RuntimeError: no GPU"}
    (h,) = _lines(bench, "train")
    assert h.check == "FAILED: RuntimeError: no GPU"


def test_dropin_headlines_trainer_and_op_vs_eager_and_the_best_peer():
    lines = _lines(sample(), "dropin")
    assert [h.shape for h in lines] == ["trainer B=4 S=4096 V=128256 H=4096 bf16", "op B=4 S=4096 V=128256 H=4096 bf16"]
    assert lines[0].headline == DROPIN_TRAINER  # fastest peer liger, least-memory peer cce (skipped rows ignored)
    assert lines[1].headline == DROPIN_OP  # one peer both fastest and least memory
    assert [h.check for h in lines] == ["agrees", "agrees"]


def test_dropin_headline_matches_the_sections_own_ratios():
    """The row layout and the ratios agree with dropin.fill_agreement / evaluate_targets (the section's writer)."""
    dropin = pytest.importorskip("steerlm_kernels.bench.dropin")
    rows = dropin_rows()
    for part in ("trainer", "op"):
        assert dropin.fill_agreement(rows, part, None, 3e-2)
    bench = {"dropin": {"shape": {"b": 4, "s": 4096, "v": 128256, "h": 4096, "dtype": "bf16"}, "rows": rows,
                        "agrees": True, "tolerance": 3e-2}}
    for part in ("trainer", "op"):
        h = summary.dropin_headline(bench, part)
        t = dropin.evaluate_targets(rows, part)
        ours = next(r for r in rows if r["part"] == part and r["impl"] == dropin.OURS[part])
        assert f"vs {dropin.BASE[part]}: {ours['speed_vs_base']:.2f}x tokens/s, {ours['memory_vs_base']:.2f}x" \
            in h.headline
        assert f"vs {t['best_peer']} (" in h.headline and f"{t['speed_vs_best_peer']:.2f}x tokens/s" in h.headline
        assert f"{t['memory_vs_least_peer']:.2f}x memory" in h.headline


def test_dropin_check_counts_failed_and_disagreeing_rows_per_part():
    bench = sample()
    rows = bench["dropin"]["rows"]
    by = {(r["part"], r["impl"]): r for r in rows}
    by["trainer", "sk patch"]["grad_rel_diff"] = float("nan")
    by["trainer", "torch lce"].clear()
    by["trainer", "torch lce"].update(part="trainer", impl="torch lce", error="exit 1: OOM")
    bench["dropin"]["agrees"] = False
    trainer, op = _lines(bench, "dropin")
    assert trainer.check == "2 of 5 rows FAILED/MISMATCH"  # the skipped cce patch row is not counted
    assert trainer.headline == DROPIN_TRAINER  # torch lce failed; it was not the best peer anyway
    assert op.check == "agrees"  # the other part's rows are not this line's
    by["op", "eager"]["loss_rel_diff"] = 0.1
    by["op", "liger"].clear()
    by["op", "liger"].update(part="op", impl="liger", skipped="not installed")
    by["op", "cce"].update(skipped="not installed")
    del by["op", "cce"]["tokens_per_s"]
    _, op = _lines(bench, "dropin")
    assert op.headline == "ours vs eager: 3.00x tokens/s, 0.10x memory; no peer ran"
    assert op.check == "1 of 2 rows FAILED/MISMATCH"
    bench["dropin"] = {"error": "RuntimeError: boom"}
    (h,) = _lines(bench, "dropin")
    assert h.check == "FAILED: RuntimeError: boom"


def test_no_train_or_dropin_section_no_headline():
    bench = sample()
    del bench["train"], bench["dropin"]
    bench["meta"]["sections"] = ["ce", "linear", "group", "dist", "peers", "score"]
    assert not _lines(bench, "train") and not _lines(bench, "dropin")
    assert summary.train_headline(bench) is None and summary.dropin_headline(bench) is None
    bench["meta"]["sections"] += ["train", "dropin"]
    bench["train"] = bench["dropin"] = None  # listed, not run (out of --budget): the payload holds None
    assert [h.check for h in _lines(bench, "train") + _lines(bench, "dropin")] == ["not run", "not run"]
