"""Streaming, resumable JSONL for the data commands (``steerlm-kernels sample`` / ``score``).

* :func:`iter_objects`: the input file line by line (memory does not grow with the file), each
  non-blank line as ``(line number, decoded object)`` or ``(line number, LineError)`` for invalid
  UTF-8 / invalid JSON, so that a bad line is named and everything after it is still read.
* :class:`ResumableWriter`: the output file, one complete JSON object per line. Opening an
  existing file keeps its complete lines (``done`` of them) and cuts a trailing partial line (the
  trace of a run killed mid-write); :meth:`ResumableWriter.write` appends whole lines, then
  flushes and ``fsync``-s, so a killed run never loses a line it wrote. The commands map every
  well-formed input record to exactly one output line, in order: a rerun skips the first ``done``
  well-formed records of the input.
* :class:`Progress`: a progress line on stderr (``\\r``-updated on a terminal, one line every few
  seconds otherwise) with records done / total and a throughput.

Output is strict JSON (``allow_nan=False``), UTF-8, ``\\n``-terminated lines.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from steerlm_kernels.steerlm2.formats.outputs import OutputError
from steerlm_kernels.steerlm2.formats.records import SteerLMDataError, decode_json_line

__all__ = ["CommandError", "LineError", "Progress", "ResumableWriter", "count_nonblank_lines", "dumps",
           "iter_objects"]


class CommandError(Exception):
    """A failure of a data command, reported as one line (``file, line N: ...`` / ``--option: ...``)."""


def run_command(name: str, body: Callable[[], object]) -> int:
    """Run the body of data command ``name``: exit status 0 when it returns, 2 with one line on
    stderr for a :class:`CommandError` / :class:`~steerlm_kernels.steerlm2.formats.outputs.OutputError`, 130
    on Ctrl-C (the output is resumable: say so; a KeyboardInterrupt raised by user code says where),
    1 for a ``SystemExit`` that escapes user code (never exit 0 on a half-written output)."""
    try:
        body()
    except (CommandError, OutputError) as exc:
        print(f"steerlm-kernels {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        where = f" ({exc})" if str(exc) else ""
        print(f"steerlm-kernels {name}: interrupted{where}; rerun the same command with --resume to continue",
              file=sys.stderr)
        return 130
    except SystemExit as exc:
        print(f"steerlm-kernels {name}: error: SystemExit({exc.code!r}) raised inside the command (user code "
              "must not exit); the output is incomplete: rerun with --resume", file=sys.stderr)
        return 1
    return 0


class LineError(ValueError):
    """An input line that is not one JSON value (invalid UTF-8 or JSON); ``line`` is 1-based."""

    def __init__(self, source: str, line: int, problem: str) -> None:
        self.source = source
        self.line = line
        self.problem = problem
        super().__init__(f"{source}, line {line}: {problem}")


def dumps(obj: Any) -> str:
    """One strict-JSON line (no NaN / inf, UTF-8 kept as is), without the newline."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


def iter_objects(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, decoded JSON value | LineError)`` for every non-blank line of ``path``.

    Reads one line at a time. Raises ``CommandError`` when the file cannot be opened.
    """
    src = str(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CommandError(f"{src}: cannot read ({exc.strerror or exc})") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as read_jsonl
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, LineError(src, lineno, f"invalid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not text.strip():
                continue
            try:  # the records' decoder: also JSON nested too deeply and integers too long to convert
                obj = decode_json_line(text, src, lineno)
            except SteerLMDataError as exc:
                obj = LineError(src, lineno, exc.problem)
            yield lineno, obj


def count_nonblank_lines(path: str | Path) -> int:
    """Number of non-blank lines of ``path`` (one streaming pass; for the progress total)."""
    n = 0
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                n += 1
    return n


class ResumableWriter:
    """Append-only JSONL output that survives kills: whole lines, flushed and fsync-ed per write.

    Args:
        path: the output file (its directory must exist).
        resume: keep the complete lines of an existing file (else start it afresh).
        digests: keep ``<path>.digests`` beside it: one line per output line, the digest of the input
            record it was made from (:func:`~steerlm_kernels.steerlm2.formats.provenance.record_digest`),
            written after the output line. On resume both are cut to the lines they both hold (a kill
            between the two writes loses that window, never a check).

    Attributes:
        done: number of complete lines kept from an earlier run (0 for a new file).
        last: the last kept object (None when ``done == 0``).
        digests: the kept lines' input digests (``digests=True``), else None.
    """

    def __init__(self, path: str | Path, *, resume: bool = True, digests: bool = False) -> None:
        self.path = Path(path)
        self.done = 0
        self.last: Any = None
        self.digest_path = Path(f"{self.path}.digests") if digests else None
        self.digests: list[str] | None = [] if digests else None
        if not self.path.parent.is_dir():
            raise CommandError(f"--output {path}: directory {self.path.parent} does not exist")
        if self.path.is_dir():
            raise CommandError(f"--output {path}: is a directory; give a file path")
        if self.path.exists() and not self.path.is_file():
            raise CommandError(f"--output {path}: not a regular file")
        if resume and self.path.exists():
            self._recover()
        try:
            self._f: TextIO = open(self.path, "a" if resume else "w", encoding="utf-8", newline="\n")
            self._d: TextIO | None = None
            if self.digest_path is not None:
                self._d = open(self.digest_path, "a" if resume else "w", encoding="ascii", newline="\n")
        except OSError as exc:
            raise CommandError(f"--output {path}: cannot write ({exc.strerror or exc})") from None

    def _recover(self) -> None:
        """Count the complete lines of the existing file, cut a trailing partial line (and, with
        digests, cut both files to the lines both hold)."""
        offsets = [0]  # offsets[k]: byte offset just past the k-th complete, valid line
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    break  # a partial last line: the run was killed while writing it
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise CommandError(
                        f"--output {self.path}, line {lineno}: not a JSON line of an earlier run; "
                        "pass --overwrite to start afresh") from None
                self.last = obj
                offsets.append(offsets[-1] + len(raw))
        self.done = len(offsets) - 1
        if self.digests is not None and self.digest_path is not None:
            kept: list[str] = []
            if self.digest_path.exists():
                with open(self.digest_path, "rb") as f:
                    for raw in f:
                        text = raw.decode("ascii", "replace").strip()
                        if not raw.endswith(b"\n") or len(text) != 32:
                            break
                        kept.append(text)
            n = min(self.done, len(kept))
            self.digests = kept[:n]
            with open(self.digest_path, "ab") as f:
                f.truncate(33 * n)
            if n < self.done:
                self.done = n
                self.last = None
                if n:
                    with open(self.path, "rb") as f:
                        f.seek(offsets[n - 1])
                        self.last = json.loads(f.readline().decode("utf-8"))
        if offsets[self.done] != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(offsets[self.done])

    def write(self, objs: list[Any], digests: list[str] | None = None) -> None:
        """Append one line per object, then flush and fsync (a kill never leaves a lost line); with
        digests, then one digest line per object (``digests``: one per object)."""
        if not objs:
            return
        self._f.write("".join(dumps(o) + "\n" for o in objs))
        self._f.flush()
        os.fsync(self._f.fileno())
        if self._d is not None:
            if digests is None or len(digests) != len(objs):
                raise ValueError("ResumableWriter(digests=True).write needs one digest per object")
            self._d.write("".join(d + "\n" for d in digests))
            self._d.flush()
            os.fsync(self._d.fileno())
            assert self.digests is not None
            self.digests.extend(digests)

    def close(self) -> None:
        """Close the file(s)."""
        self._f.close()
        if self._d is not None:
            self._d.close()

    def __enter__(self) -> ResumableWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """Progress on stderr: ``prefix [####----] k/total  <text>  | 12.3s``.

    On a terminal the line is rewritten in place; otherwise a line is printed at most every
    ``every`` seconds (and at :meth:`close`). ``quiet`` prints nothing.
    """

    def __init__(self, prefix: str, total: int, *, every: float = 5.0, quiet: bool = False,
                 stream: TextIO | None = None, width: int = 20) -> None:
        self.prefix = prefix
        self.total = max(total, 0)
        self.every = every
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self.last_print = -float("inf")
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.text = ""
        self.k = 0
        self.shown = False

    def update(self, k: int, text: str) -> None:
        """Records done so far ``k`` and a status text (throughput etc.)."""
        self.k, self.text = k, text
        self.shown = False
        now = time.perf_counter()
        if self.tty or now - self.last_print >= self.every:
            self.last_print = now
            self._print(final=False)
            self.shown = True

    def _print(self, final: bool) -> None:
        if self.quiet:
            return
        k, total = self.k, self.total
        filled = round(self.width * min(k, total) / total) if total else self.width
        line = (f"{self.prefix} [{'#' * filled}{'-' * (self.width - filled)}] {k}/{total}  {self.text}  "
                f"| {time.perf_counter() - self.start:.1f}s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Print the final state (unless the last update printed it already, off a terminal)."""
        if self.tty or not self.shown:
            self._print(final=True)
