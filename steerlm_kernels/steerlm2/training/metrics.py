"""Run outputs of SteerLM 2.0 training: the strict-JSON metrics file, its plot, the output directory check.

``metrics.jsonl`` holds one JSON object per line: per optimizer step ``step, loss, distance, lr,
grad_norm, tokens, tokens_per_s, epoch``; per evaluation ``step, val_loss, val_distance``. Values
that are not finite are written as ``null`` (strict JSON: no ``NaN`` / ``Infinity``).

The file is a log, never the state of a run (the checkpoint is): a line torn by a kill during a
write (no newline, or not JSON) is skipped by :func:`read_metrics` and cut by
:meth:`MetricsLog.truncate_after`, which keeps the file's permission bits.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "check_output_dir", "plot_metrics", "read_metrics", "strict"]


def strict(value: Any) -> Any:
    """``value`` with every non-finite float (also inside dicts / lists) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: strict(x) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(x) for x in value]
    return value


def read_metrics(path: str | os.PathLike, skipped: list[int] | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (``[]`` when it does not exist). Lines that are not a JSON
    object (a line torn by a kill) are skipped; their 1-based numbers are appended to ``skipped``."""
    p = Path(path)
    if not p.exists():
        return []
    records = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError, ValueError):
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("step", 0), int):
            records.append(obj)
        elif skipped is not None:
            skipped.append(lineno)
    return records


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` through a temporary file, keeping ``path``'s permission bits."""
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class MetricsLog:
    """Appends strict-JSON lines to ``path`` (flushed per line, so a killed run keeps its lines)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Keep the records of steps ``<= step`` (all of them dropped for ``step = 0``): what a run
        resumed from the checkpoint of ``step`` will write again. Torn lines are cut (said on stderr)."""
        if not self.path.exists():
            return
        skipped: list[int] = []
        records = read_metrics(self.path, skipped)
        if skipped:
            print(f"warning: {self.path}: cut {len(skipped)} torn line(s) (lines "
                  f"{', '.join(map(str, skipped[:5]))}): a kill during a write", file=sys.stderr)
        kept = [r for r in records if int(r.get("step", 0)) <= step] if step > 0 else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (non-finite floats as ``null``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(strict(dict(record)), allow_nan=False) + "\n")
            f.flush()


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (with parents) and check that a file can be written in it.

    Raises:
        ValueError: one line naming ``path`` and why not (an existing file, an unwritable place).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--output {str(p)!r} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"--output {str(p)!r} cannot be written: {exc.strerror or exc}") from None
    return p


def plot_metrics(records: list[dict[str, Any]], path: str | os.PathLike, title: str) -> str | None:
    """Loss and distance per step (and the validation curves, when there are any) to a PNG.

    Returns None, or why no plot was written (matplotlib missing, no steps).
    """
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    if not steps:
        return "no training steps to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'steerlm-kernels[plot]')"

    def curve(rows: list[dict[str, Any]], key: str) -> tuple[list[Any], list[float]]:
        pairs = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(*curve(steps, "loss"), color="tab:blue", label="train")
    ax2.plot(*curve(steps, "distance"), color="tab:red", label="train")
    if vals:
        ax1.plot(*curve(vals, "val_loss"), "o-", color="tab:green", label="validation")
        ax2.plot(*curve(vals, "val_distance"), "o-", color="tab:green", label="validation")
        ax1.legend()
        ax2.legend()
    ax1.set_ylabel("loss")
    ax1.axhline(0.0, color="grey", lw=0.5)
    ax2.set_ylabel("distance KL(ws || baseline)")
    ax2.set_xlabel("step")
    ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
