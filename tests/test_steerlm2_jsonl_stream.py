"""steerlm2.jsonl_stream: line-by-line input with named bad lines, the resumable output, progress."""

from __future__ import annotations

import io
import json

import pytest

from steerlm_kernels.steerlm2.formats.jsonl_stream import (
    CommandError,
    LineError,
    Progress,
    ResumableWriter,
    count_nonblank_lines,
    dumps,
    iter_objects,
)


def test_iter_objects_names_bad_lines_and_reads_on(tmp_path) -> None:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"a": 1}\n{bad\n\n  \n\xff\xfe\n[2]\n{"b": 2}')
    got = list(iter_objects(p))
    assert [n for n, _ in got] == [1, 2, 5, 6, 7]
    assert got[0][1] == {"a": 1} and got[3][1] == [2] and got[4][1] == {"b": 2}
    assert isinstance(got[1][1], LineError) and "line 2: invalid JSON" in str(got[1][1])
    assert isinstance(got[2][1], LineError) and "line 5: invalid UTF-8" in str(got[2][1])
    assert count_nonblank_lines(p) == 5
    with pytest.raises(CommandError, match="cannot read"):
        list(iter_objects(tmp_path / "missing.jsonl"))


def test_iter_objects_reads_lines_as_train_does(tmp_path) -> None:
    """A byte-order mark is skipped; JSON too deep for the parser or an integer too long to convert is
    a named bad line (as records.read_jsonl says), not an exception that ends the command."""
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n" + b"1" * 5000 + b'\n{"b": 2}\n')
    got = list(iter_objects(p))
    assert got[0] == (1, {"a": 1}) and got[3] == (4, {"b": 2})
    assert isinstance(got[1][1], LineError) and "line 2: invalid JSON: nested too deeply" in str(got[1][1])
    assert isinstance(got[2][1], LineError) and "line 3: invalid JSON" in str(got[2][1])


def test_writer_keeps_complete_lines_and_cuts_a_partial_one(tmp_path) -> None:
    p = tmp_path / "out.jsonl"
    with ResumableWriter(p) as w:
        assert w.done == 0
        w.write([{"i": 0}, {"i": 1, "s": "é"}])
    with open(p, "a") as f:
        f.write('{"i": 2, "cut')
    with ResumableWriter(p) as w:
        assert w.done == 2 and w.last == {"i": 1, "s": "é"}
        w.write([{"i": 2}])
    assert [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()] == [{"i": 0}, {"i": 1, "s": "é"},
                                                                                  {"i": 2}]
    with ResumableWriter(p, resume=False) as w:
        assert w.done == 0
    assert p.read_text() == ""


def test_writer_refuses_a_foreign_file_and_a_missing_directory(tmp_path) -> None:
    p = tmp_path / "out.jsonl"
    p.write_text('{"ok": 1}\nnot json\n')
    with pytest.raises(CommandError, match="line 2: not a JSON line"):
        ResumableWriter(p)
    with pytest.raises(CommandError, match="does not exist"):
        ResumableWriter(tmp_path / "no" / "out.jsonl")


def test_dumps_is_strict_json() -> None:
    assert dumps({"a": "é"}) == '{"a": "é"}'
    with pytest.raises(ValueError):
        dumps({"x": float("nan")})


def test_progress_off_a_terminal_prints_lines_and_the_final_state_once() -> None:
    buf = io.StringIO()
    p = Progress("score", 4, every=0.0, stream=buf)
    p.update(2, "a")
    p.update(4, "b")
    p.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and "2/4" in lines[0] and "4/4" in lines[1] and "b" in lines[1]
    quiet = io.StringIO()
    q = Progress("x", 1, quiet=True, stream=quiet)
    q.update(1, "")
    q.close()
    assert quiet.getvalue() == ""


def test_run_command_exit_statuses(capsys):
    from steerlm_kernels.steerlm2.formats.jsonl_stream import CommandError, run_command

    def fails():
        raise CommandError("--data x.jsonl: no such file")

    def interrupted():
        raise KeyboardInterrupt

    assert run_command("score", lambda: None) == 0
    assert run_command("score", fails) == 2
    assert capsys.readouterr().err.strip() == "steerlm-kernels score: error: --data x.jsonl: no such file"
    assert run_command("sample", interrupted) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "rerun the same command with --resume" in err

    def exits():
        raise SystemExit(0)  # user code calling sys.exit(0): never exit 0 with a half-written output

    assert run_command("score", exits) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SystemExit(0)" in err[0]
    from steerlm_kernels.steerlm2.formats.outputs import OutputError

    def refused():
        raise OutputError("--output o.jsonl holds an earlier run's output")

    assert run_command("score", refused) == 2
    with pytest.raises(ValueError):  # anything else is a bug: not swallowed
        run_command("score", lambda: int("x"))


def test_writer_digests_are_cut_with_the_lines_they_check(tmp_path) -> None:
    p = tmp_path / "out.jsonl"
    with ResumableWriter(p, digests=True) as w:
        w.write([{"i": 0}, {"i": 1}], ["a" * 32, "b" * 32])
    with open(p, "a") as f:  # killed after the output line, before its digest
        f.write('{"i": 2}\n')
    with ResumableWriter(p, digests=True) as w:
        assert w.done == 2 and w.digests == ["a" * 32, "b" * 32] and w.last == {"i": 1}
    assert p.read_text().splitlines() == ['{"i": 0}', '{"i": 1}']
    with open(f"{p}.digests", "a") as f:  # a torn digest line
        f.write("c" * 10)
    with ResumableWriter(p, digests=True) as w:
        assert w.done == 2 and w.digests == ["a" * 32, "b" * 32]
        with pytest.raises(ValueError, match="one digest per object"):
            w.write([{"i": 2}])
    assert (tmp_path / "out.jsonl.digests").read_text() == "a" * 32 + "\n" + "b" * 32 + "\n"
