"""SteerLM2Trainer / train: the baseline phase's per-response NLLs are dropout-free (checked where the
group softmax is sensitive to them), and a resume keeps exactly the metrics lines up to the checkpoint
(save at step 3, stop at 5, resume: steps exactly 1..6), cuts a torn last line and keeps the file's mode."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from steerlm_kernels.steerlm2.models.hf_models import build_tiny  # noqa: E402
from steerlm_kernels.steerlm2.training import train  # noqa: E402
from steerlm_kernels.steerlm2.training.data import LOG_Q, SteerLM2Dataset, sample_data_path  # noqa: E402
from steerlm_kernels.steerlm2.training.metrics import MetricsLog, read_metrics  # noqa: E402
from steerlm_kernels.steerlm2.training.trainer import SteerLM2Collator, SteerLM2Trainer  # noqa: E402

FAST = ["--groups-per-step", "2", "--backend", "torch"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def eval_nll64(model, batch) -> torch.Tensor:
    """Per-response NLL of the scored span, float64, dropout off: the reference of the baseline phase."""
    m = __import__("copy").deepcopy(model).double().eval()
    with torch.no_grad():
        logits = m(input_ids=batch["tokens"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    return -(logp * batch["loss_mask"].double()).sum(-1)


def test_baseline_phase_nlls_are_dropout_free(tmp_path):
    """log Q'(y) is set to -NLL of each response under the dropout-free model, so the baseline
    softmax_group(-NLL - log Q') is exactly uniform within each group when the phase runs without
    dropout, and far from it with dropout on (per-response NLLs move by nats: the test model's NLLs
    are 80-200, where a plain softmax over -NLL is one-hot whatever dropout does)."""
    import transformers

    model, tok = build_tiny(0, attention_dropout=0.5)
    ds = SteerLM2Dataset(sample_data_path(), tokenizer=tok, max_seq_length=4096)
    batch = SteerLM2Collator.for_dataset(ds)([ds[i] for i in (1, 2)])
    nll = eval_nll64(model, batch)
    assert float(nll.min()) > 20  # the regime where the planted bug survived
    batch[LOG_Q] = (-nll).float()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = SteerLM2Trainer(model=model.train(), args=args, train_dataset=ds,
                              steerlm2={"forward_micro_batch_size": 3, "micro_batch_size": 5, "backend": "torch"})
    model.train()
    w = trainer.baseline_weights(model, batch)
    assert model.training  # the mode is restored
    sizes = batch["num_responses"].double()
    torch.testing.assert_close(w.baseline.double(), 1.0 / sizes, rtol=0, atol=1e-3)
    torch.testing.assert_close(w.weight, batch["ws"] - w.baseline)
    # the control: with dropout on, the per-response NLLs move by far more than the check allows
    with torch.no_grad():
        logits = model.train()(input_ids=batch["tokens"], attention_mask=batch["attention_mask"]).logits.double()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    noisy = -(logp * batch["loss_mask"].double()).sum(-1)
    assert float((noisy - nll).abs().max()) > 0.1


def steps(out) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_resume_cut_keeps_exactly_the_steps_up_to_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*FAST, "--steps", "5", "--save-every", "3", "--output", str(out)]) == 0
    assert steps(out) == [1, 2, 3, 4, 5]
    import shutil

    shutil.rmtree(out / "checkpoint-5")  # killed after step 5's line, before its checkpoint: resume from 3
    os.chmod(out / "metrics.jsonl", 0o640)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.1, "dist')  # and a line torn by the kill
    capsys.readouterr()
    assert train.main([*FAST, "--steps", "6", "--save-every", "3", "--resume", "auto", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert steps(out) == [1, 2, 3, 4, 5, 6]  # the lines after step 3 cut, rewritten once each
    assert stat.S_IMODE((out / "metrics.jsonl").stat().st_mode) == 0o640  # its mode kept
    assert "cut 1 torn line" in captured.err
    assert "done: 3 steps (steps 4-6, resumed from step 3)" in captured.out  # only the steps this process ran
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["steps"] == 6 and summary["steps_this_run"] == 3


def test_metrics_log_cut_is_by_step(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    os.chmod(p, 0o600)
    MetricsLog(p).truncate_after(3)
    assert [r["step"] for r in read_metrics(p)] == [1, 2, 3]
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    MetricsLog(p).truncate_after(0)
    assert read_metrics(p) == []
