"""``SteerLM2Trainer``: NeMo's objective through the Trainer, dropout-free baseline, one sync per step,
resume equality, atomic checkpoints, stop requests, non-finite losses, strict metrics."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from steerlm_kernels.steerlm2.models.hf_models import build_tiny  # noqa: E402
from steerlm_kernels.steerlm2.models.model import GPTSteerLMModel  # noqa: E402
from steerlm_kernels.steerlm2.training.data import SteerLM2Dataset, sample_data_path  # noqa: E402
from steerlm_kernels.steerlm2.training.metrics import read_metrics  # noqa: E402
from steerlm_kernels.steerlm2.training.trainer import SteerLM2Collator, SteerLM2Trainer  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: fast and deterministic on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset():
    _, tok = build_tiny(0)
    return SteerLM2Dataset(sample_data_path(), tokenizer=tok, max_seq_length=4096)


def make_trainer(out: Path, ds, *, steps: int = 4, schedule: str = "cosine_with_min_lr", mbs: int = 5,
                 seed: int = 0, model=None, eval_dataset=None, **kw) -> SteerLM2Trainer:
    if model is None:
        model, _ = build_tiny(seed)
    extra = {"lr_scheduler_kwargs": {"min_lr": 1e-4}} if schedule == "cosine_with_min_lr" else {}
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=3e-3,
        lr_scheduler_type=schedule, warmup_steps=1, weight_decay=0.01, logging_steps=1, save_steps=kw.pop("save", 3),
        save_total_limit=kw.pop("limit", None), report_to=[], use_cpu=True, disable_tqdm=True, seed=seed,
        data_seed=0, dataloader_drop_last=True, **extra, **kw)
    return SteerLM2Trainer(model=model.train(), args=args, train_dataset=ds, eval_dataset=eval_dataset,
                           steerlm2={"forward_micro_batch_size": 7, "micro_batch_size": mbs, "backend": "torch"})


def comparable(records: list[dict]) -> list[dict]:
    keys = ("step", "loss", "distance", "lr", "grad_norm", "tokens")
    return [{k: r[k] for k in keys} for r in records if "loss" in r]


def test_step_is_gptsteerlm_objective(dataset, tmp_path):
    """One training_step accumulates the gradient of GPTSteerLMModel.get_loss_and_metrics (the
    closed-form objective, tested in test_steerlm2_model) and reports its loss and distance."""
    trainer = make_trainer(tmp_path, dataset)
    batch = SteerLM2Collator.for_dataset(dataset)([dataset[i] for i in (3, 0, 7)])
    model = trainer.model
    model.zero_grad()
    trainer.training_step(model, dict(batch))
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    record = trainer._since_log[-1]
    model.zero_grad()
    model.eval()  # the reference: dropout-free throughout (the tiny model has none anyway)
    wrapper = GPTSteerLMModel(model, {"steerlm2": {"forward_micro_batch_size": 3, "micro_batch_size": 4}},
                              backend="torch")
    loss, metrics = wrapper.get_loss_and_metrics(batch)
    assert record["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert record["distance"] == pytest.approx(metrics["distance"], rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_baseline_phase_runs_without_dropout(dataset, tmp_path):
    model, _ = build_tiny(0, attention_dropout=0.5)
    trainer = make_trainer(tmp_path, dataset, model=model)
    batch = SteerLM2Collator.for_dataset(dataset)([dataset[i] for i in (1, 2)])
    model.train()
    with torch.no_grad():  # dropout is really on in train mode: two forwards differ
        a = model(input_ids=batch["tokens"], attention_mask=batch["attention_mask"]).logits
        b = model(input_ids=batch["tokens"], attention_mask=batch["attention_mask"]).logits
    assert not torch.equal(a, b)
    w1 = trainer.baseline_weights(model, batch)
    w2 = trainer.baseline_weights(model, batch)
    assert model.training  # mode restored
    model.eval()
    ref = GPTSteerLMModel(model, {"steerlm2": {"forward_micro_batch_size": 7, "micro_batch_size": 5}},
                          backend="torch").compute_baseline_weights(batch)
    for w in (w1, w2):
        torch.testing.assert_close(w.weight, ref.weight)
        torch.testing.assert_close(w.distance, ref.distance)


def test_one_gradient_sync_per_step(dataset, tmp_path, monkeypatch):
    """All micro-batches but the last run under accelerator.no_sync: one all-reduce per step."""
    trainer = make_trainer(tmp_path, dataset, mbs=3)
    batch = SteerLM2Collator.for_dataset(dataset)([dataset[i] for i in (0, 1, 2)])
    entered, backwards = [], []

    @contextlib.contextmanager
    def no_sync(model):
        entered.append(len(backwards))
        yield

    monkeypatch.setattr(trainer.accelerator, "no_sync", no_sync)
    real_backward = trainer.accelerator.backward
    monkeypatch.setattr(trainer.accelerator, "backward", lambda loss, **kw: (backwards.append(1),
                                                                            real_backward(loss, **kw)))
    trainer.training_step(trainer.model, dict(batch))
    m = -(-batch["tokens"].shape[0] // 3)
    assert m >= 3 and len(backwards) == m
    assert entered == list(range(m - 1))  # every micro-batch but the last


def test_resume_equals_uninterrupted_run(dataset, tmp_path):
    """A 6-step run stopped after step 3 (as a signal does) and resumed equals the 6-step run:
    same metrics lines for steps 4-6 (cosine schedule with warm-up) and the same final weights."""
    full = make_trainer(tmp_path / "full", dataset, steps=6)
    full.train()
    stopped = make_trainer(tmp_path / "cut", dataset, steps=6)

    class StopAt3(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                stopped.request_stop()

    stopped.add_callback(StopAt3())
    stopped.train()
    assert stopped.state.global_step == 3 and stopped.stop_signal is not None
    assert (tmp_path / "cut" / "checkpoint-3" / "trainer_state.json").is_file()
    resumed = make_trainer(tmp_path / "cut", dataset, steps=6, seed=5)  # a different init: the checkpoint wins
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    a = comparable(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    b = comparable(read_metrics(tmp_path / "cut" / "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-6), (x, y)
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpoints_rotate_and_leave_no_staging(dataset, tmp_path):
    trainer = make_trainer(tmp_path, dataset, steps=4, save=1, limit=2)
    trainer.train()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-3", "checkpoint-4", "metrics.jsonl"], names
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "model.safetensors"):
        assert (tmp_path / "checkpoint-4" / name).is_file(), name


def test_a_broken_save_leaves_the_newest_checkpoint_intact(dataset, tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, dataset, steps=2, save=1)
    calls = []
    real = trainer._save_optimizer_and_scheduler

    def dies_on_second(output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise OSError("disk full")
        real(output_dir)

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", dies_on_second)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert ".staging" in calls[1]  # written under a temporary name ...
    assert transformers.trainer_utils.get_last_checkpoint(str(tmp_path)).endswith("checkpoint-1")
    assert not (tmp_path / "checkpoint-2").exists()  # ... never as a broken checkpoint-2


def test_non_finite_loss_stops_without_saving(dataset, tmp_path):
    model, _ = build_tiny(0)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    trainer = make_trainer(tmp_path, dataset, steps=4, save=1, model=model)
    trainer.train()
    assert trainer.failure is not None and "step 1" in trainer.failure
    assert trainer.state.global_step == 1
    assert not list(tmp_path.glob("checkpoint-*"))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert record["loss"] is None and record["step"] == 1


def test_evaluate_reports_val_loss_and_distance(dataset, tmp_path):
    val = torch.utils.data.Subset(dataset, [5, 6, 7])
    trainer = make_trainer(tmp_path, dataset, steps=2, eval_strategy="steps", eval_steps=2,
                           per_device_eval_batch_size=2, eval_dataset=val)
    trainer.train()
    vals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in vals] == [2]
    # the reference: GPTSteerLMModel forward-only on the two eval batches (groups 5,6 and 7)
    collate = SteerLM2Collator.for_dataset(dataset)
    trainer.model.eval()
    wrapper = GPTSteerLMModel(trainer.model, {"steerlm2": {"forward_micro_batch_size": 7, "micro_batch_size": 5}},
                              backend="torch")
    refs = [wrapper.get_loss_and_metrics(collate([dataset[i] for i in g]), forward_only=True) for g in ((5, 6), (7,))]
    # a mean over the 3 groups (the last batch is not dropped, its one group counts once)
    assert vals[0]["val_loss"] == pytest.approx((2 * refs[0][0] + refs[1][0]) / 3, rel=1e-5, abs=1e-6)
    assert vals[0]["val_distance"] == pytest.approx((2 * refs[0][1]["distance"] + refs[1][1]["distance"]) / 3,
                                                    rel=1e-5)
    assert all(math.isfinite(r["val_loss"]) for r in vals)
