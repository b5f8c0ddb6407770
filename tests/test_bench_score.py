"""bench.score: the ``score`` section (our scoring engine vs the plain Hugging Face loop), small sizes.

No timing assertion: the rows must exist, agree with each other and with a float64 computation,
and report memory; the speed and memory ratios are for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse

import pytest
import torch

pytest.importorskip("transformers")

from steerlm_kernels.bench import score as B  # noqa: E402
from steerlm_kernels.bench import suite, summary  # noqa: E402


def test_plain_loop_and_ours_equal_float64() -> None:
    w = B.make_score_workload(1000, 32, 5, 4, 7, 40, torch.device("cpu"), torch.float32, seed=1)
    m64 = B.make_score_workload(1000, 32, 5, 4, 7, 40, torch.device("cpu"), torch.float64, seed=1).model
    want = []
    for ids, start in w.seqs:
        with torch.no_grad():
            lp = torch.log_softmax(m64(input_ids=torch.tensor([ids])).logits[0], -1)
        want.append(float(sum(lp[t - 1, ids[t]] for t in range(start, len(ids)))))
    plain = B.plain_hf_batch(w.model, w.seqs)
    assert plain == pytest.approx(want, rel=2e-5, abs=2e-4)


def test_run_score_quick_rows_and_table() -> None:
    lines = []
    result = B.run_score(torch.device("cpu"), quick=True, log=lines.append)
    assert [r["impl"] for r in result["rows"]] == ["plain HF loop", "ours (score)"]
    assert all("error" not in r for r in result["rows"]), result["rows"]
    assert result["agrees"] and result["max_abs_diff"] < 1e-3
    for r in result["rows"]:
        assert r["median_s"] > 0 and r["tokens_per_s"] == pytest.approx(result["tokens"] / r["median_s"])
        assert r["extra_mib"] is None or r["extra_mib"] >= 0
    table = "\n".join(B.markdown(result))
    assert "| ours (score) |" in table and "MISMATCH" not in table
    assert result["shape"]["v"] == B.QUICK["v"] and B.CPU["v"] >= 32000  # the real CPU shape: V >= 32k
    head = summary.score_headline({"score": result})  # the gpu-check summary reads this result
    assert head is not None and head.check == "agrees" and head.shape == f"V={B.QUICK['v']} H={B.QUICK['h']} fp32"
    assert f"ours {result['rows'][1]['speedup']:.2f}x the plain HF loop's tokens/s" in head.headline


def test_mismatch_and_error_are_shown() -> None:
    result = B.run_score(torch.device("cpu"), quick=True, shape={"responses": 2}, log=lambda _: None)
    result["agrees"] = False
    assert "**MISMATCH**" in "\n".join(B.markdown(result))
    assert "Failed: boom" in "\n".join(B.markdown({"error": "boom"}))


def test_section_is_registered_in_the_suite(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    ns = parser.parse_args(["--quick", "--sections", "score", "--device", "cpu", "--output", str(tmp_path)])
    out = suite.benchmark(suite.resolve_config(ns), log=lambda _: None)
    assert out["score"]["rows"][1]["impl"] == "ours (score)"
    assert "#### Scoring (`steerlm-kernels score`)" in out["table"]


@pytest.mark.parametrize("broken", [{"error": "boom"}, "disagrees"])
def test_a_failed_or_disagreeing_score_section_fails_the_run(broken, tmp_path, monkeypatch, capsys) -> None:
    real = B.run_score

    def fake(device, **kwargs):
        if broken == "disagrees":
            result = real(device, **{**kwargs, "shape": {"responses": 2}})
            result["agrees"] = False
            return result
        return broken

    monkeypatch.setattr(B, "run_score", fake)
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    ns = parser.parse_args(["--quick", "--sections", "score", "--device", "cpu", "--output", str(tmp_path),
                            "--no-plots"])
    assert suite.run(ns) == 1
    assert "!! score: " in capsys.readouterr().out
