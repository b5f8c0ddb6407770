"""``steerlm-kernels train``: outputs (checkpoints, final/ that from_pretrained loads, strict
metrics.jsonl), resume equality, signals, several processes, and one-line failures."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from steerlm_kernels.steerlm2.training import train  # noqa: E402
from steerlm_kernels.steerlm2.training.data import sample_data_path  # noqa: E402

FAST = ["--groups-per-step", "2", "--backend", "torch", "--max-seq-length", "4096"]
KEYS = ("step", "loss", "distance", "lr", "grad_norm", "tokens")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def env() -> dict[str, str]:
    """The children's environment: one thread each, no Triton interpreter (a CPU run has no triton)."""
    return {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def cli(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steerlm_kernels", "train", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env())


def strict_lines(path: Path) -> list[dict]:
    def reject(constant: str) -> None:
        raise AssertionError(f"{path}: non-strict JSON constant {constant}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def steps_of(out: Path) -> list[dict]:
    return [{k: r[k] for k in KEYS} for r in strict_lines(out / "metrics.jsonl") if "loss" in r]


def test_options_have_nemo_defaults_for_model_directories():
    parse = train.add_arguments(argparse.ArgumentParser()).parse_args
    nemo = train._settings(parse(["--model", "some/dir"]))
    assert nemo["lr"] == 3e-5 and nemo["min_lr"] == 9e-7 and nemo["warmup_steps"] == 10
    assert nemo["lr_schedule"] == "cosine" and nemo["weight_decay"] == 0.01 and nemo["adam_betas"] == (0.9, 0.98)
    assert nemo["grad_clip"] == 1.0 and nemo["save_every"] == 100 and nemo["save_total_limit"] == 5
    tiny = train._settings(parse(["--lr", "1e-3"]))
    assert tiny["lr"] == 1e-3 and tiny["steps"] == 120 and tiny["lr_schedule"] == "constant"
    assert parse([]).max_seq_length >= 4096 and parse([]).template == "nemo"


def test_run_writes_checkpoints_final_and_strict_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    val = tmp_path / "val.jsonl"
    val.write_text("".join(sample_data_path().read_text().splitlines(keepends=True)[:3]))
    assert train.main([*FAST, "--steps", "4", "--save-every", "2", "--save-total-limit", "1", "--eval-every", "2",
                       "--val-data", str(val), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4/4" in text and "tok/s" in text and "validation at step 4" in text
    records = strict_lines(out / "metrics.jsonl")
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4]
    for r in train_lines:
        assert set(r) >= {"step", "loss", "distance", "lr", "grad_norm", "tokens_per_s"}
        assert r["distance"] >= 0 and r["tokens_per_s"] > 0 and r["lr"] == pytest.approx(3e-3)
    assert [(r["step"], set(r)) for r in records if "val_loss" in r] == [(2, {"step", "val_loss", "val_distance"}),
                                                                         (4, {"step", "val_loss", "val_distance"})]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary"]["steps"] == 4 and summary["config"]["template"] == "nemo"
    try:
        import matplotlib  # noqa: F401

        assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        pass
    # final/ is a Hugging Face directory: from_pretrained gives the trained model's logits
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    tok = transformers.AutoTokenizer.from_pretrained(out / "final")
    ckpt = transformers.AutoModelForCausalLM.from_pretrained(out / "checkpoint-4")
    ids = torch.tensor([tok.encode("<extra_id_1>User\nhello\n")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ckpt(ids).logits, rtol=0, atol=0)
    from steerlm_kernels.steerlm2.models.hf_models import build_tiny

    init, _ = build_tiny(0)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, init(ids).logits)  # trained, not the initial weights


def test_three_steps_resumed_to_six_equal_six(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train.main([*FAST, "--steps", "6", "--output", str(full)]) == 0
    assert train.main([*FAST, "--steps", "3", "--save-every", "3", "--output", str(cut)]) == 0
    assert train.main([*FAST, "--steps", "6", "--resume", "auto", "--output", str(cut)]) == 0
    a, b = steps_of(full), steps_of(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a[3:], b[3:]):
        assert x == pytest.approx(y, rel=1e-6)
    m1 = transformers.AutoModelForCausalLM.from_pretrained(full / "final").state_dict()
    m2 = transformers.AutoModelForCausalLM.from_pretrained(cut / "final").state_dict()
    for k in m1:
        torch.testing.assert_close(m1[k], m2[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_checkpoints_and_resumes(tmp_path, signum):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "steerlm_kernels", "train", *FAST, "--steps", "200",
                             "--save-every", "1000", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1:
            break
        time.sleep(0.2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, (stdout, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert f"stopped by {signal.Signals(signum).name}" in stderr
    steps = [r["step"] for r in strict_lines(out / "metrics.jsonl") if "loss" in r]
    last = steps[-1]
    assert steps == list(range(1, last + 1)) and last < 200
    assert (out / f"checkpoint-{last}" / "trainer_state.json").is_file()
    assert not (out / "final").exists()
    done = cli(*FAST, "--steps", str(last + 1), "--resume", "auto", "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in strict_lines(out / "metrics.jsonl") if "loss" in r] == list(range(1, last + 2))
    assert (out / "final" / "config.json").is_file()


def test_two_processes_equal_one(tmp_path):
    """torchrun, 2 CPU processes (gloo) with 1 group each = 1 process with 2 groups per step."""
    one, two = tmp_path / "one", tmp_path / "two"
    argv = [*FAST, "--steps", "3", "--device", "cpu"]
    assert train.main([*argv, "--output", str(one)]) == 0
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "steerlm_kernels", "train", *argv, "--output", str(two)],
                         capture_output=True, text=True, timeout=400, env=env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert "x 2" in run.stdout  # on cpu x 2 processes
    a, b = steps_of(one), steps_of(two)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=2e-5, abs=1e-6)
    m1 = transformers.AutoModelForCausalLM.from_pretrained(one / "final").state_dict()
    m2 = transformers.AutoModelForCausalLM.from_pretrained(two / "final").state_dict()
    # The gradients agree at every step (grad_norm above, rel 2e-5). Adam turns the float32 rounding of an
    # element whose gradient is ~0 into a step of up to +-lr (m / sqrt(v) ~ sign(g)), so a handful of such
    # elements may differ by up to 2 * lr per step; every other element agrees to float32 rounding.
    lr, steps = max(r["lr"] for r in a), len(a)
    for k in m1:
        diff = (m1[k] - m2[k]).abs()
        off = diff > 1e-5 + 1e-4 * m2[k].abs()
        assert off.float().mean() <= 1e-3, (k, int(off.sum()), off.numel())
        assert diff.max() <= 2 * lr * steps + 1e-5, (k, float(diff.max()))


def test_non_finite_loss_never_exits_zero(tmp_path):
    from steerlm_kernels.steerlm2.models.hf_models import build_tiny

    model, tok = build_tiny(0)
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    tok.save_pretrained(tmp_path / "nan")
    out = tmp_path / "out"
    code = train.main([*FAST, "--model", str(tmp_path / "nan"), "--steps", "3", "--device", "cpu",
                       "--precision", "fp32", "--output", str(out)])
    assert code == train.EXIT_NO_TRAINING
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))
    assert strict_lines(out / "metrics.jsonl")[0]["loss"] is None


def bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    afile = tmp_path / "a_file"
    afile.write_text("keep me\n")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(sample_data_path().read_text().splitlines()[0] + "\n{not json\n")
    cases = [
        (["--output", str(afile)], "--output"),
        (["--output", "/proc/x"], "--output"),
        (["--output", "/dev/null/sub"], "--output"),
        (["--steps", "0"], "--steps"),
        (["--lr", "nan"], "--lr"),
        (["--val-fraction", "2"], "--val-fraction"),
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--data", str(bad_json)], "bad.jsonl"),
        (["--model", str(tmp_path / "no_model")], "--model"),
        (["--resume", str(tmp_path)], "--resume"),
        (["--groups-per-step", "1000"], "--groups-per-step"),
    ]
    if not torch.cuda.is_available():
        cases += [(["--device", "cuda"], "--device"), (["--backend", "triton"], "--backend triton"),
                  (["--precision", "fp16"], "--precision"), (["--fsdp", "full_shard"], "--fsdp")]
    return cases


def test_every_failure_is_one_line(tmp_path):
    for argv, names in bad_cases(tmp_path):
        out = tmp_path / "o" if "--output" not in argv else None
        full = argv + (["--output", str(out)] if out else [])
        result = cli(*full)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode not in (0, None), (argv, result.stdout)
        assert len(lines) == 1 and "Traceback" not in result.stderr, (argv, result.stderr)
        assert names in lines[0], (argv, lines[0])
        if out is not None:
            assert not (out / "final").exists()
    assert (tmp_path / "a_file").read_text() == "keep me\n"  # nothing already there is lost


@pytest.mark.slow
def test_default_run_halves_the_distance(tmp_path, capsys):
    """Acceptance: the embedded default (bundled sample + tiny Llama, CPU), shortened to its first half
    (constant lr: a prefix of the default run), brings the mean distance of the last 5 steps below
    half of the first step's (0.41x measured)."""
    out = tmp_path / "run"
    assert train.main(["--steps", "60", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["last_distance_mean"] < 0.5 * summary["first_distance"], summary
    assert "60/60" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").is_file()
