"""The JSONL output of ``score`` and ``sample``: checked, locked, with its provenance and record digests.

:class:`CommandOutput` does, in this order, before any byte of the output is written:

1. the path can be an output file (not a directory, its directory exists);
2. it is none of the command's inputs (device and inode, :func:`~..formats.outputs.check_not_input`);
3. an existing non-empty output needs ``resume`` or ``overwrite`` (else refused, naming both flags);
4. the lock ``<output>.lock`` is taken (a second command on it fails at once, naming the PID);
5. on resume, ``<output>.provenance.json`` is compared with this command's settings (the first
   difference refused, naming it; ``allowed`` names accepted changes); an output without one is
   refused (not written by this version: ``--overwrite``);
6. the provenance is (re)written and the output opened (:class:`~..formats.jsonl_stream.ResumableWriter`
   with ``<output>.digests``: one digest per output line of the input record it was made from).

While reading its input the command calls :meth:`CommandOutput.check_kept` for each of the first
``done`` well-formed records: every kept record is compared with its input record, not only the last.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from steerlm_kernels.steerlm2.formats.jsonl_stream import CommandError, ResumableWriter
from steerlm_kernels.steerlm2.formats.outputs import OutputLock, check_not_input, check_output_file, refuse_existing
from steerlm_kernels.steerlm2.formats.provenance import (
    compare_settings,
    read_provenance,
    record_digest,
    write_provenance,
)

__all__ = ["CommandOutput", "add_output_arguments", "provenance_path"]


def add_output_arguments(parser: argparse.ArgumentParser, settings: Sequence[str]) -> None:
    """The options of a command's output file: ``--resume``, ``--overwrite``, ``--allow-changed`` (one of
    ``settings``) and ``--quiet`` (``sample`` and ``score``)."""
    parser.add_argument("--resume", action="store_true",
                        help="continue an existing --output made with the same settings (checked)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--allow-changed", default=None, metavar="SETTING[,SETTING]",
                        help="with --resume: accept these recorded settings' changes (" + ", ".join(settings) + ")")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def provenance_path(output: str | Path) -> Path:
    """Where the provenance of a JSONL output is kept: ``<output>.provenance.json``."""
    return Path(f"{output}.provenance.json")


class CommandOutput:
    """A command's JSONL output (module notes). Use as a context manager; ``writer`` is the open
    :class:`~..formats.jsonl_stream.ResumableWriter`, ``done`` its kept lines.

    Args:
        output: the output file.
        command: the command's name (recorded, and in messages).
        inputs: ``{option: path}`` of the files the command reads (never written).
        settings: what changes the output's results (compared on resume; JSON values).
        about: paths and notes recorded beside them (never compared).
        resume / overwrite: the flags given (``resume=True, overwrite=False`` for library use).
        allowed: setting names whose change a resume accepts (``--allow-changed``).
        log: where accepted changes are reported (stderr).
    """

    def __init__(self, output: str | Path, *, command: str, inputs: Mapping[str, str | Path | None],
                 settings: Mapping[str, Any], about: Mapping[str, Any] | None = None, resume: bool = True,
                 overwrite: bool = False, allowed: Collection[str] = (), log: TextIO | None = None) -> None:
        self.path = check_output_file(output)
        self.command = command
        self.precheck(self.path, inputs, resume=resume, overwrite=overwrite)
        existing = self.path.exists() and self.path.stat().st_size > 0
        self.lock = OutputLock(f"{self.path}.lock", f"--output {self.path}").acquire()
        try:
            prov = provenance_path(self.path)
            resuming = resume and not overwrite and existing
            if resuming:
                recorded = read_provenance(prov)
                if recorded is None:
                    raise CommandError(f"--output {self.path}: no provenance record {prov.name} beside it (not an "
                                       f"output of this version's {command}): --overwrite starts afresh")
                for line in compare_settings(recorded["settings"], settings, where=f"--output {self.path}",
                                             allowed=allowed, about=(recorded.get("about", {}), about or {})):
                    print(f"{command}: {line}", file=log or sys.stderr)
            write_provenance(prov, command, settings, about)
            self.writer = ResumableWriter(self.path, resume=resuming, digests=True)
        except BaseException:
            self.lock.release()
            raise

    @staticmethod
    def precheck(output: str | Path, inputs: Mapping[str, str | Path | None], *, resume: bool,
                 overwrite: bool) -> None:
        """Steps 1-3 without the lock, so a command refuses before it loads its models (cheap; the
        constructor checks again under the lock)."""
        path = check_output_file(output)
        check_not_input(path, inputs)
        existing = path.exists() and path.stat().st_size > 0
        holds = [f"{path.name}: {path.stat().st_size} bytes"] if existing else []
        refuse_existing(f"--output {path}", holds, resume=resume, overwrite=overwrite)

    @property
    def done(self) -> int:
        """Complete output lines kept from an earlier run."""
        return self.writer.done

    def check_kept(self, index: int, obj: Any, source: str, lineno: int) -> None:
        """Refuse when kept output line ``index + 1`` was not made from this input record (``obj``,
        ``source`` line ``lineno``): its recorded digest differs."""
        assert self.writer.digests is not None
        if self.writer.digests[index] != record_digest(obj):
            raise CommandError(f"--output {self.path}, line {index + 1}: was made from another record than "
                               f"{source}, line {lineno} (the input changed since the earlier run; --overwrite "
                               "starts afresh)")

    def write(self, objs: list[Any], inputs: list[Any]) -> None:
        """Append the output objects, each with the digest of the input record it was made from."""
        self.writer.write(objs, [record_digest(o) for o in inputs])

    def close(self) -> None:
        """Close the output and release its lock."""
        try:
            self.writer.close()
        finally:
            self.lock.release()

    def __enter__(self) -> CommandOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
