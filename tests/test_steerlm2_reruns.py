"""A command run again on an output that exists never loses or mixes data (issue 17, items 1-12):
``train``, ``score``, ``sample`` and ``pipeline`` refuse, compare provenance, lock, check inodes, cut
torn lines. The hard-link, concurrent-run, kill and no-GPU cases run the real command in a subprocess;
the others call the command's entry point (``cli.main``: argv in, exit status and stderr out)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from steerlm_kernels import cli  # noqa: E402
from steerlm_kernels.steerlm2.formats.records import LOG_P_A, LOG_P_Y, LOG_Q, sample_data_path  # noqa: E402
from steerlm_kernels.steerlm2.training import train  # noqa: E402
from steerlm_kernels.steerlm2.training.metrics import read_metrics  # noqa: E402

FAST = ["--groups-per-step", "2", "--backend", "torch"]
SCORER = "steerlm_kernels.steerlm2.formats.example_scorers:verbosity_length"


# one thread in this process (autouse fixture) and in the children (env): train's tests' own
from tests.test_steerlm2_train import env, one_thread  # noqa: E402, F401


def command(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steerlm_kernels", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env())


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def last_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def records(n: int, start: int = 0) -> list[dict]:
    return [json.loads(x) for x in sample_data_path().read_text().splitlines()[start:start + n]]


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def score_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["score", "--data", str(data), "--output", str(out), "--sft-model", "tiny", "--steerlm-model", "tiny",
            "--quiet", *extra]


def sample_argv(prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--prompts", str(prompts), "--model", "tiny", "--num-responses", "2", "--max-new-tokens", "4",
            "--output", str(out), "--quiet", *extra]


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


# ------------------------------------------------------------------------------------------------
# 1. a hard link of the input as --output


def test_1_hard_link_of_the_input_is_never_truncated(tmp_path) -> None:
    data = write(tmp_path / "in.jsonl", records(2))
    before = data.read_bytes()
    os.link(data, tmp_path / "link.jsonl")
    for argv, option in ((score_argv(data, tmp_path / "link.jsonl", "--overwrite"), "--data"),
                         (sample_argv(data, tmp_path / "link.jsonl", "--overwrite"), "--prompts")):
        done = command(*argv)
        assert done.returncode == 2, done.stderr
        line = one_line(done.stderr)
        assert "link.jsonl is the same file as " + option in line
        assert data.read_bytes() == before  # the input is intact
    assert not (tmp_path / "link.jsonl.provenance.json").exists()  # refused before anything was written


def test_1_train_never_overwrites_its_data(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    data = write(out / "metrics.jsonl", records(4))  # the data file is where the run writes its metrics
    before = data.read_bytes()
    os.link(data, tmp_path / "data.jsonl")
    assert train.main([*FAST, "--steps", "1", "--data", str(tmp_path / "data.jsonl"), "--output", str(out),
                       "--overwrite"]) == 2
    assert "metrics.jsonl is the same file as --data" in last_line(capsys)
    assert data.read_bytes() == before


# ------------------------------------------------------------------------------------------------
# 2. train into an earlier run without --resume


def test_2_train_refuses_an_earlier_run_and_overwrite_replaces_it(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert train.main([*FAST, "--steps", "2", "--save-every", "1", "--output", str(out)]) == 0
    metrics = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert train.main([*FAST, "--steps", "3", "--output", str(out)]) == 2
    line = last_line(capsys)
    assert "holds an earlier run's output" in line and "--resume auto continues it" in line
    assert "--overwrite replaces it" in line
    assert (out / "metrics.jsonl").read_bytes() == metrics and (out / "checkpoint-2").is_dir()
    (out / "notes.txt").write_text("mine")
    assert train.main([*FAST, "--steps", "1", "--save-every", "1", "--output", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # none of the old run's left
    assert train_steps(out) == [1] and (out / "notes.txt").read_text() == "mine"  # only the run's files removed


# ------------------------------------------------------------------------------------------------
# 3 / 4 / 5. score and sample resumed with other settings; every kept record checked


def test_3_score_resume_with_another_model_template_or_seed_is_refused(tmp_path, capsys) -> None:
    data = write(tmp_path / "in.jsonl", records(3))
    out = tmp_path / "scored.jsonl"
    assert cli.main(score_argv(data, out)) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert cli.main(score_argv(data, out)) == 2  # neither --resume nor --overwrite
    assert "--resume continues it, --overwrite replaces it" in last_line(capsys)
    for extra, name in ((["--template", "plain"], "template"), (["--seed", "1"], "seed")):
        assert cli.main(score_argv(data, out, "--resume", *extra)) == 2
        line = last_line(capsys)
        assert f"was made with {name} = " in line and f"--allow-changed {name}" in line, line
    argv = score_argv(data, out, "--resume")
    argv[argv.index("--steerlm-model") + 1] = "small"
    assert cli.main(argv) == 2
    line = last_line(capsys)
    assert 'steerlm_model = "builtin:tiny" (tiny); this command has "builtin:small" (small)' in line, line
    assert out.read_bytes() == before
    assert cli.main(score_argv(data, out, "--resume")) == 0  # the same settings: nothing left to do
    assert out.read_bytes() == before


def test_4_sample_resume_with_other_sampling_settings_is_refused(tmp_path, capsys) -> None:
    prompts = write(tmp_path / "p.jsonl", records(2))
    out = tmp_path / "samples.jsonl"
    assert cli.main(sample_argv(prompts, out)) == 0
    before = out.read_bytes()
    for extra, name in ((["--num-responses", "5"], "num_responses"), (["--temperature", "0.5"], "temperature"),
                        (["--model", "small"], "model")):
        argv = sample_argv(prompts, out, "--resume")
        for k in range(0, len(extra), 2):
            if extra[k] in argv:
                argv[argv.index(extra[k]) + 1] = extra[k + 1]
            else:
                argv += extra[k:k + 2]
        capsys.readouterr()
        assert cli.main(argv) == 2
        assert f"was made with {name} = " in last_line(capsys)
    assert out.read_bytes() == before
    groups = {len(json.loads(x)["responses"]) for x in out.read_text().splitlines()}
    assert groups == {2}


def test_5_score_resume_checks_every_kept_record(tmp_path, capsys) -> None:
    rows = records(3)
    data = write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    assert cli.main(score_argv(data, out)) == 0
    rows[0]["responses"][0]["value"] = "an edited earlier record"  # not the last kept one
    write(data, rows)
    capsys.readouterr()
    assert cli.main(score_argv(data, out, "--resume")) == 2
    assert "was made with data = " in last_line(capsys)
    assert cli.main(score_argv(data, out, "--resume", "--allow-changed", "data")) == 2
    assert "scored.jsonl, line 1: was made from another record than" in last_line(capsys)


# ------------------------------------------------------------------------------------------------
# 6. train resumed on other data / groups per step; pipeline reruns with another --max-prompts


def test_6_train_resume_with_other_data_or_groups_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert train.main([*FAST, "--steps", "2", "--save-every", "2", "--output", str(out)]) == 0
    other = write(tmp_path / "other.jsonl", records(20))
    capsys.readouterr()
    assert train.main([*FAST, "--steps", "4", "--resume", "auto", "--data", str(other), "--output", str(out)]) == 2
    line = last_line(capsys)
    assert "was made with data = " in line and "other.jsonl" in line
    argv = ["--groups-per-step", "4", "--backend", "torch", "--steps", "4", "--resume", "auto", "--output", str(out)]
    assert train.main(argv) == 2
    assert "was made with groups_per_step = 2; this command has 4" in last_line(capsys)
    assert train_steps(out) == [1, 2]
    assert train.main([*argv, "--allow-changed", "groups_per_step"]) == 0  # accepted, said
    assert "setting groups_per_step changed from 2 to 4" in capsys.readouterr().err
    assert train_steps(out) == [1, 2, 3, 4]


def test_6_pipeline_rerun_with_other_max_prompts_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "p"
    argv = ["pipeline", "--max-prompts", "2", "--num-responses", "2", "--max-new-tokens", "4", "--steps", "1",
            "--output", str(out), "--quiet"]
    assert cli.main(argv) == 0
    scored = (out / "scored.jsonl").read_bytes()
    capsys.readouterr()
    assert cli.main(argv) == 2  # an earlier pipeline: --resume or --overwrite
    assert "--resume continues it" in last_line(capsys)
    more = [*argv, "--resume"]
    more[more.index("--max-prompts") + 1] = "3"
    assert cli.main(more) == 2
    assert "was made with max_prompts = 2; this command has 3" in last_line(capsys)
    assert (out / "scored.jsonl").read_bytes() == scored and train_steps(out / "train") == [1]


# ------------------------------------------------------------------------------------------------
# 7. two commands on one output at once


def test_7_second_train_on_a_running_output_fails_at_once_naming_the_pid(tmp_path) -> None:
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "steerlm_kernels", "train", *FAST, "--steps", "400",
                              "--save-every", "1000", "--output", str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env())
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "metrics.jsonl").exists() and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None
        second = command("train", *FAST, "--steps", "400", "--resume", "auto", "--output", str(out))
        assert second.returncode == 2
        assert f"is in use by process {first.pid}" in one_line(second.stderr)
        steps = train_steps(out)
        assert steps == list(range(1, len(steps) + 1))  # the first run's lines only, never interleaved
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=240)


def test_7_score_on_a_locked_output_fails_naming_the_pid(tmp_path) -> None:
    data = write(tmp_path / "in.jsonl", records(1))
    out = tmp_path / "o.jsonl"
    hold = ("import sys, time; from steerlm_kernels.steerlm2.formats.outputs import OutputLock; "
            "OutputLock(sys.argv[1], 'x').acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, f"{out}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = command(*score_argv(data, out))
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert f"in use by process {holder.pid}" in done.stderr.strip().splitlines()[-1]
    finally:
        holder.kill()
        holder.wait()
    assert command(*score_argv(data, out)).returncode == 0  # the dead holder's lock does not block


# ------------------------------------------------------------------------------------------------
# 8 / 9. incomplete checkpoints, resumes to fewer steps


def test_8_checkpoint_without_optimizer_or_scheduler_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert train.main([*FAST, "--steps", "2", "--save-every", "2", "--output", str(out)]) == 0
    (out / "checkpoint-2" / "optimizer.pt").unlink()
    (out / "checkpoint-2" / "scheduler.pt").unlink()
    capsys.readouterr()
    argv = [*FAST, "--steps", "3", "--resume", "auto", "--output", str(out)]
    assert train.main(argv) == 2
    line = last_line(capsys)
    assert "lacks optimizer.pt" in line and "scheduler.pt" in line and "--allow-partial-checkpoint" in line
    assert train_steps(out) == [1, 2]
    assert train.main([*argv, "--allow-partial-checkpoint"]) == 0
    err = capsys.readouterr().err
    assert "warning: --resume" in err and "resumed without optimizer.pt" in err
    assert train_steps(out) == [1, 2, 3]


def test_9_resume_to_fewer_steps_than_the_checkpoint_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert train.main([*FAST, "--steps", "3", "--save-every", "3", "--output", str(out)]) == 0
    final = (out / "final" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert train.main([*FAST, "--steps", "2", "--resume", "auto", "--output", str(out)]) == 2
    assert "--steps 2 is below the checkpoint's step 3" in last_line(capsys)
    assert (out / "final" / "model.safetensors").read_bytes() == final
    assert train.main([*FAST, "--steps", "4", "--resume", "auto", "--output", str(out)]) == 0
    assert "done: 1 steps (steps 4-4, resumed from step 3)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# 10. records left unscored


def test_10_unscored_records_lose_stale_sums_and_train_skips_them(tmp_path, capsys) -> None:
    rows = records(4)
    rows[1]["responses"][0]["value"] = "word " * 200  # too long for --max-seq-length 600: left unscored
    rows[2]["unscored"] = "an earlier run's reason"  # fits now: scored, the marker goes
    data = write(tmp_path / "in.jsonl", rows)  # every response holds (stale) sums from the sample file
    out = tmp_path / "scored.jsonl"
    assert cli.main(score_argv(data, out, "--max-seq-length", "600", "--attribute-scorer", SCORER)) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert "unscored" in got[1] and all(LOG_P_Y not in r and LOG_Q not in r for r in got[1]["responses"])
    assert all(LOG_P_A in r for r in got[1]["responses"])  # not a sum of score's: kept
    assert "unscored" not in got[2] and all(LOG_Q in r for r in got[2]["responses"])
    assert got[0]["responses"][0][LOG_Q] != rows[0]["responses"][0][LOG_Q]  # rescored
    capsys.readouterr()
    run = tmp_path / "run"
    assert train.main([*FAST, "--steps", "1", "--data", str(out), "--output", str(run)]) == 0
    err = capsys.readouterr().err
    assert 'skipped 1 record(s) marked "unscored" by score (lines 2)' in err


# ------------------------------------------------------------------------------------------------
# 11. kill -9 mid-run, a torn metrics line, then --resume auto


def test_11_kill_9_then_a_torn_metrics_line_resumes(tmp_path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "steerlm_kernels", "train", *FAST, "--steps", "400",
                             "--save-every", "2", "--output", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (out / "checkpoint-2").is_dir():
        time.sleep(0.2)
    proc.kill()  # SIGKILL: no checkpoint, no clean-up, the lock file left behind
    proc.communicate(timeout=60)
    ckpts = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert ckpts, "no checkpoint before the kill"
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 999, "loss": 0.5, "dis')  # a kill during a write
    target = ckpts[-1] + 1
    done = command("train", *FAST, "--steps", str(target), "--save-every", "2", "--resume", "auto",
                   "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "JSONDecodeError" not in done.stderr
    assert train_steps(out) == list(range(1, target + 1))


# ------------------------------------------------------------------------------------------------
# 12. one line, the documented exit status


def test_12_lone_surrogate_escapes_are_named(tmp_path, capsys) -> None:
    rows = records(3)
    bad = json.dumps(rows[1]).replace('"Assistant"', '"Assistant\\ud800"', 1)
    data = write(tmp_path / "bad.jsonl", [rows[0], bad, rows[2]])
    assert cli.main(score_argv(data, tmp_path / "o.jsonl")) == 0  # a malformed line: reported and skipped
    err = capsys.readouterr().err
    assert "bad.jsonl, line 2" in err and "lone surrogate" in err and "Traceback" not in err
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2
    for option in ("--data", "--val-data"):
        argv = [*FAST, "--steps", "1", "--output", str(tmp_path / option.strip("-")), option, str(data)]
        assert train.main(argv) == 2
        line = last_line(capsys)
        assert line.startswith(f"steerlm-kernels train: error: {option}: ") and "bad.jsonl, line 2" in line, line


def test_12_bad_outputs_and_seeds_are_one_line_exit_2(tmp_path, capsys) -> None:
    data = write(tmp_path / "in.jsonl", records(1))
    assert cli.main(score_argv(data, tmp_path)) == 2
    assert "is a directory" in last_line(capsys)
    afile = write(tmp_path / "a_file", ["keep me"])
    for argv, needle in (([*FAST, "--output", str(afile)], "--output"),
                         ([*FAST, "--seed", "-1", "--output", str(tmp_path / "s1")], "--seed"),
                         ([*FAST, "--seed", str(10**20), "--output", str(tmp_path / "s2")], "--seed")):
        assert train.main(argv) == 2, argv
        line = last_line(capsys)
        assert needle in line and "ValueError" not in line and "--model" not in line, line
    assert afile.read_text() == "keep me\n"
    assert cli.main(score_argv(data, tmp_path / "o.jsonl", "--seed", "-1")) == 2
    assert "--seed" in last_line(capsys)


def test_12_triton_without_a_gpu_is_one_line(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    data = write(tmp_path / "in.jsonl", records(1))
    done = command(*score_argv(data, tmp_path / "o.jsonl", "--backend", "triton"))
    assert done.returncode == 2 and "--backend triton" in one_line(done.stderr)


def test_12_tiny_checkpoint_resumed_with_the_small_model_is_one_line(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert train.main([*FAST, "--steps", "1", "--save-every", "1", "--output", str(out)]) == 0
    capsys.readouterr()
    assert train.main([*FAST, "--model", "small", "--steps", "2", "--resume", "auto", "--output", str(out)]) == 2
    line = last_line(capsys)
    assert 'made with model = "builtin:tiny"' in line and "builtin:small" in line


def test_12_attribute_scorer_calling_sys_exit_fails(tmp_path, capsys) -> None:
    (tmp_path / "exits.py").write_text("import sys\ndef judge(records):\n    sys.exit(0)\n")
    (tmp_path / "stops.py").write_text("def judge(records):\n    raise KeyboardInterrupt\n")
    rows = records(2)
    for r in rows:
        for resp in r["responses"]:
            del resp[LOG_P_A]  # the scorer is called for the missing values
    data = write(tmp_path / "in.jsonl", rows)
    assert cli.main(score_argv(data, tmp_path / "o.jsonl", "--attribute-scorer", f"{tmp_path / 'exits.py'}:judge")) \
        == 2
    line = last_line(capsys)
    assert "--attribute-scorer called sys.exit(0)" in line
    status = cli.main(score_argv(data, tmp_path / "o2.jsonl", "--attribute-scorer", f"{tmp_path / 'stops.py'}:judge"))
    assert status == 130
    assert "interrupted (in --attribute-scorer" in last_line(capsys)


def test_12_summary_without_a_first_distance_has_no_nan_ratio(tmp_path, capsys) -> None:
    rows = records(4)
    for r in rows:
        r["responses"] = r["responses"][:1]  # groups of one: ws = baseline = 1, the distance is 0
    data = write(tmp_path / "single.jsonl", rows)
    assert train.main([*FAST, "--steps", "1", "--data", str(data), "--output", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "nan" not in text.lower() and "no ratio: the first step's distance is 0" in text


