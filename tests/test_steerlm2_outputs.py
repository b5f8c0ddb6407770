"""steerlm2.outputs / provenance: refusals, same-file checks by inode, locks (a dead holder never
blocks), settings comparison, fingerprints and record digests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from steerlm_kernels.steerlm2.formats.outputs import (
    OutputError,
    OutputLock,
    check_not_input,
    check_output_file,
    refuse_existing,
    same_file,
)
from steerlm_kernels.steerlm2.formats.provenance import (
    compare_settings,
    file_fingerprint,
    model_fingerprint,
    parse_allow_changed,
    read_provenance,
    record_digest,
    write_provenance,
)


def test_same_file_is_by_inode(tmp_path) -> None:
    a = tmp_path / "a.jsonl"
    a.write_text("x\n")
    os.link(a, tmp_path / "hard.jsonl")
    os.symlink(a, tmp_path / "soft.jsonl")
    (tmp_path / "copy.jsonl").write_text("x\n")
    assert same_file(a, tmp_path / "hard.jsonl") and same_file(a, tmp_path / "soft.jsonl")
    assert same_file(a, tmp_path / "sub" / ".." / "a.jsonl") is False  # no such directory: not a file
    assert not same_file(a, tmp_path / "copy.jsonl") and not same_file(a, tmp_path / "missing")
    with pytest.raises(OutputError, match="--output .*hard.jsonl is the same file as --data .*a.jsonl"):
        check_not_input(tmp_path / "hard.jsonl", {"--data": a})
    check_not_input(tmp_path / "copy.jsonl", {"--data": a, "--other": None})
    assert a.read_text() == "x\n"


def test_output_file_checks(tmp_path) -> None:
    with pytest.raises(OutputError, match="is a directory"):
        check_output_file(tmp_path)
    with pytest.raises(OutputError, match="does not exist"):
        check_output_file(tmp_path / "no" / "o.jsonl")
    assert check_output_file(tmp_path / "o.jsonl") == tmp_path / "o.jsonl"


def test_refuse_existing_names_both_flags() -> None:
    with pytest.raises(OutputError, match=r"holds an earlier run's output \(metrics.jsonl\): --resume auto continues "
                                          r"it, --overwrite replaces it"):
        refuse_existing("--output r", ["metrics.jsonl"], resume=False, overwrite=False, resume_flag="--resume auto")
    with pytest.raises(OutputError, match="exclude each other"):
        refuse_existing("--output r", [], resume=True, overwrite=True)
    refuse_existing("--output r", [], resume=False, overwrite=False)
    refuse_existing("--output r", ["x"], resume=True, overwrite=False)
    refuse_existing("--output r", ["x"], resume=False, overwrite=True)


HOLD = "import sys, time; from steerlm_kernels.steerlm2.formats.outputs import OutputLock; " \
       "l = OutputLock(sys.argv[1], 'x').acquire(); print('held', flush=True); time.sleep(60)"


def test_lock_names_a_live_holder_and_ignores_a_dead_one(tmp_path) -> None:
    path = tmp_path / "o.jsonl.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=f"--output o.jsonl is in use by process {holder.pid}"):
            OutputLock(path, "--output o.jsonl").acquire()
    finally:
        holder.kill()  # kill -9: no clean-up of its lock file
        holder.wait()
    assert path.exists() and path.read_text().strip() == str(holder.pid)
    with OutputLock(path, "--output o.jsonl") as lock:  # the dead holder's file does not block
        assert lock.held and path.read_text().strip() == str(os.getpid())
        with pytest.raises(OutputError, match=f"in use by process {os.getpid()}"):  # a second lock, same process
            OutputLock(path, "--output o.jsonl").acquire()
    assert not path.exists()  # released: removed


def test_lock_of_a_dead_pid_without_flock_support(tmp_path, monkeypatch) -> None:
    import errno
    import fcntl

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "r.lock"
    path.write_text(f"{dead.pid}\n")

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with OutputLock(path, "--output r"):  # the PID is dead: taken over
        assert path.read_text().strip() == str(os.getpid())
    path.write_text(f"{os.getppid()}\n")  # a live PID (our parent) holds it
    with pytest.raises(OutputError, match=f"in use by process {os.getppid()}"):
        OutputLock(path, "--output r").acquire()


def test_compare_settings_names_the_setting_and_both_values() -> None:
    old = {"seed": 0, "template": "nemo", "model": "builtin:tiny"}
    assert compare_settings(old, dict(old), where="--output o") == []
    with pytest.raises(OutputError, match=r"--output o was made with seed = 0; this command has 1 "
                                          r"\(--allow-changed seed accepts"):
        compare_settings(old, {**old, "seed": 1}, where="--output o")
    with pytest.raises(OutputError, match="made with extra = null; this command has 2"):
        compare_settings(old, {**old, "extra": 2}, where="--output o")
    notes = compare_settings(old, {**old, "seed": 1}, where="--output o", allowed={"seed"})
    assert len(notes) == 1 and "seed changed from 0 to 1" in notes[0]
    with pytest.raises(OutputError, match=r"model = \"builtin:tiny\" \(tiny\); this command has \"builtin:small\" "
                                          r"\(small\)"):
        compare_settings(old, {**old, "model": "builtin:small"}, where="--output o",
                         about=({"model": "tiny"}, {"model": "small"}))
    assert parse_allow_changed("seed, max-seq-length", ["seed", "max_seq_length"]) == {"seed", "max_seq_length"}
    with pytest.raises(OutputError, match="unknown setting 'sed'"):
        parse_allow_changed("sed", ["seed"])


def test_fingerprints_change_with_content(tmp_path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    (d / "model.safetensors").write_bytes(b"\0" * 1000)
    first = model_fingerprint(d)
    assert first.startswith("dir:sha256:") and model_fingerprint(d) == first
    (d / ".cache").write_text("ignored")
    assert model_fingerprint(d) == first
    (d / "model.safetensors").write_bytes(b"\0" * 999 + b"\1")  # one byte of the weights
    assert model_fingerprint(d) != first
    assert model_fingerprint("tiny", ["tiny", "small"]) == "builtin:tiny"
    f = tmp_path / "in.jsonl"
    f.write_text("a\n")
    fa = file_fingerprint(f)
    f.write_text("b\n")
    assert file_fingerprint(f) != fa and fa.startswith("sha256:")
    with pytest.raises(OutputError, match="cannot read"):
        file_fingerprint(tmp_path / "missing")


def test_record_digest_is_of_the_record_not_its_spelling() -> None:
    a = {"system": "s", "prompt_turns": [{"from": "User", "value": "x"}], "label": None}
    assert record_digest(a) == record_digest(dict(reversed(list(a.items()))))
    assert record_digest(a) != record_digest({**a, "label": "v:1"})
    assert len(record_digest(a)) == 32


def test_provenance_round_trip(tmp_path) -> None:
    p = tmp_path / "o.jsonl.provenance.json"
    assert read_provenance(p) is None
    write_provenance(p, "score", {"seed": 0}, {"data": "in.jsonl"})
    got = read_provenance(p)
    assert got["command"] == "score" and got["settings"] == {"seed": 0} and got["about"] == {"data": "in.jsonl"}
    p.write_text("{torn")
    with pytest.raises(OutputError, match="not a provenance record"):
        read_provenance(p)

