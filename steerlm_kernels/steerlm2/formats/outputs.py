"""What every command does before it writes an output: refuse, compare, lock.

The commands (``train``, ``score``, ``sample``, ``pipeline``) write outputs that a later run may
continue. Nothing a run wrote before is lost or mixed with a run of other settings:

* **Refusal of an existing output** (:func:`refuse_existing`): an output that already holds data
  (a non-empty file; a run directory with any of the command's outputs) is used only with
  ``--resume`` (continue it) or ``--overwrite`` (replace it). Without either flag the command
  ends with exit status 2 and one line saying which flag does what.
* **Same-file checks** (:func:`check_not_input`): an output that is one of the command's inputs
  (the same device and inode - a hard link, a symbolic link or another spelling of the path) is
  refused *before anything is opened for writing*; ``--overwrite`` never truncates an input.
* **One lock per output** (:class:`OutputLock`): the command holds an exclusive ``fcntl.flock`` on
  ``<output>.lock`` (a file output) or ``<run dir>/.lock`` (a run directory) for its whole life; the
  lock file holds the holder's PID. A second command on the same output fails at once with one
  line naming that PID. The kernel drops the lock of a process that dies (``kill -9`` included), so
  a lock file left by a dead process never blocks; on file systems without ``flock`` the PID is
  checked with ``os.kill(pid, 0)`` instead.

What made an output (settings, model and input fingerprints) and the resume comparison are in
:mod:`~steerlm_kernels.steerlm2.formats.provenance`. Every failure here is an :class:`OutputError` (a
``ValueError``) with a one-line message; the commands turn it into exit status 2.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["OutputError", "OutputLock", "check_not_input", "check_output_file", "refuse_existing", "same_file"]


class OutputError(ValueError):
    """An output that cannot be used as asked (one line: the option, the path, what to do)."""


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` are the same existing file (device and inode: hard links and symbolic
    links count); False when either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None],
                    option: str = "--output") -> None:
    """Refuse ``output`` when it is one of ``inputs`` (``{option: path}``), compared by device and
    inode (:func:`same_file`), before anything is opened for writing.

    Raises:
        OutputError: ``--output X is the same file as --data Y (a hard link or another path to it)``.
    """
    for name, path in inputs.items():
        if path is not None and same_file(output, path):
            raise OutputError(f"{option} {output} is the same file as {name} {path} (the same device and inode: "
                              "a link or another path to it); writing it would destroy the input")


def check_output_file(output: str | os.PathLike, option: str = "--output") -> Path:
    """``output`` as a Path when it can be a JSONL output file: not a directory, in an existing directory.

    Raises:
        OutputError: naming ``option`` and the path.
    """
    p = Path(output)
    if p.is_dir():
        raise OutputError(f"{option} {output} is a directory; give a file path")
    if p.exists() and not p.is_file():
        raise OutputError(f"{option} {output} is not a regular file")
    if not p.parent.is_dir():
        raise OutputError(f"{option} {output}: directory {p.parent} does not exist")
    return p


def refuse_existing(what: str, holds: Iterable[str], *, resume: bool, overwrite: bool,
                    resume_flag: str = "--resume") -> None:
    """Refuse an output that already holds data when neither ``--resume`` nor ``--overwrite`` is given.

    Args:
        what: the output as the message names it (e.g. ``"--output runs/a"``).
        holds: what it holds already (names shown in the message); empty: nothing, no refusal.
        resume / overwrite: the flags given (both: refused, they exclude each other).
        resume_flag: how the command spells resume (``--resume auto`` for train).
    """
    shown = sorted(holds)
    if resume and overwrite:
        raise OutputError(f"{resume_flag.split()[0]} and --overwrite exclude each other")
    if shown and not resume and not overwrite:
        listed = ", ".join(shown[:4]) + (", ..." if len(shown) > 4 else "")
        raise OutputError(f"{what} holds an earlier run's output ({listed}): {resume_flag} continues it, "
                          "--overwrite replaces it")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: alive
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return int(text.split()[0]) if text else None
    except ValueError:
        return None


class OutputLock:
    """An exclusive lock on one output for the life of a command (module notes).

    Args:
        path: the lock file (``<output>.lock``, or ``<run dir>/.lock``).
        what: how messages name the output (``"--output runs/a"``).

    Use as a context manager, or :meth:`acquire` / :meth:`release`. :meth:`acquire` raises
    :class:`OutputError` naming the PID of the process that holds it. The lock file is removed on
    release.
    """

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock (at once or never: a held lock is an OutputError naming its holder)."""
        import fcntl

        for _ in range(20):  # the holder may remove the file between our open and our flock: retry
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"{self.what}: cannot create the lock file {self.path} "
                                  f"({exc.strerror or exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    pid = _read_pid(self.path)
                    holder = f"process {pid}" if pid is not None else "another process"
                    raise OutputError(f"{self.what} is in use by {holder} (lock {self.path}); wait for it to end "
                                      "or stop it") from None
                if exc.errno not in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self._fallback_pid_check()  # no flock on this file system: the PID decides
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # removed / replaced by its previous holder meanwhile: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return self
        raise OutputError(f"{self.what}: could not take the lock {self.path} (it keeps being replaced)")

    def _fallback_pid_check(self) -> None:
        pid = _read_pid(self.path)
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            raise OutputError(f"{self.what} is in use by process {pid} (lock {self.path}); wait for it to end "
                              "or stop it")

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
