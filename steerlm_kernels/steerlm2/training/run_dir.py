"""``train``'s run directory: what an earlier run left there, checkpoints fit to resume, provenance.

* :func:`run_contents` lists what a run wrote in a directory (``metrics.jsonl``, ``checkpoint-*``,
  ``final/``, ``summary.json``, ``provenance.json``, ...); a directory holding any of them is an
  earlier run: ``train`` refuses it without ``--resume`` (continue) or ``--overwrite``
  (:func:`clear_run` removes exactly those entries, nothing else).
* :func:`checkpoint_problems` says what a checkpoint lacks of what a resume restores: the model,
  the optimizer (``optimizer.pt``), the scheduler (``scheduler.pt``), the RNG state
  (``rng_state.pth`` / ``rng_state_<rank>.pth``) and the data position (``trainer_state.json``:
  global step and epoch). A checkpoint that lacks any is refused, or with
  ``--allow-partial-checkpoint`` resumed with a warning that names what restarts from scratch.
* :func:`train_settings` is what ``provenance.json`` records for a run (the settings that change
  its results, the model's and the data's fingerprints); a resume compares them
  (:func:`~steerlm_kernels.steerlm2.formats.provenance.compare_settings`): the first difference is refused
  with one line naming it and both values, ``--allow-changed SETTING[,...]`` accepts it.
* :func:`claim_run_dir`: ``DIR/.lock`` (:class:`~steerlm_kernels.steerlm2.formats.outputs.OutputLock`) is
  held for the command's life: a second ``train`` on ``DIR`` fails at once, naming the PID.
* :func:`check_resume`: ``--steps`` below the checkpoint's step is refused. ``metrics.jsonl`` is cut
  back to the checkpoint's step by the trainer (a torn last line too, its mode kept): the checkpoint,
  not the metrics file, is what a resume restores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from steerlm_kernels.steerlm2.formats.outputs import OutputError, OutputLock, check_not_input, refuse_existing
from steerlm_kernels.steerlm2.formats.provenance import (
    compare_settings,
    file_fingerprint,
    model_fingerprint,
    parse_allow_changed,
    read_provenance,
    write_provenance,
)

__all__ = ["PROVENANCE", "RUN_FILES", "SETTINGS", "check_checkpoint", "check_resume", "checkpoint_problems",
           "checkpoint_step", "claim_run_dir", "clear_run", "run_contents", "train_settings"]

#: The file of a run directory that records what made the run.
PROVENANCE = "provenance.json"
#: Files and directories a run writes at the top of its directory (besides ``checkpoint-<step>/``).
RUN_FILES = ("metrics.jsonl", "metrics.png", "summary.json", PROVENANCE, "final", ".final-tmp", ".staging")
#: The settings ``provenance.json`` records and a resume compares (``--allow-changed`` names).
SETTINGS = ("model", "template", "seed", "data", "val_data", "val_fraction", "groups_per_step", "micro_batch_size",
            "forward_micro_batch_size", "max_seq_length", "lr", "min_lr", "warmup_steps", "lr_schedule",
            "weight_decay", "adam_betas", "grad_clip", "precision", "backend", "world_size", "schedule_steps")


def run_contents(out: Path) -> list[str]:
    """What an earlier run left in ``out`` (names; ``[]`` for a new or unrelated directory)."""
    if not out.is_dir():
        return []
    found = [name for name in RUN_FILES if (out / name).exists()]
    found += sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir())
    return found


def clear_run(out: Path) -> None:
    """Remove what a run wrote in ``out`` (:data:`RUN_FILES`, ``checkpoint-*``); other files stay."""
    for name in run_contents(out):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def checkpoint_step(path: Path) -> int:
    """The global step recorded in a checkpoint's ``trainer_state.json`` (0 when unreadable)."""
    try:
        return int(json.loads((path / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def checkpoint_problems(path: Path) -> list[str]:
    """What ``path`` lacks of a resumable checkpoint (``[]``: complete; module notes)."""
    missing = []
    if not (path / "trainer_state.json").is_file():
        missing.append("trainer_state.json (the data position: step and epoch)")
    if not any((path / name).exists() for name in ("model.safetensors", "pytorch_model.bin",
                                                   "model.safetensors.index.json", "pytorch_model.bin.index.json")):
        missing.append("the model weights")
    if not (path / "optimizer.pt").is_file() and not (path / "optimizer.bin").is_file():
        missing.append("optimizer.pt (AdamW's moments: a fresh optimizer)")
    if not (path / "scheduler.pt").is_file():
        missing.append("scheduler.pt (the learning-rate schedule: warm-up would restart)")
    if not list(path.glob("rng_state*.pth")):
        missing.append("rng_state.pth (the random state: dropout and data order would differ)")
    return missing


def train_settings(ns: argparse.Namespace, s: dict[str, Any], *, data: Path, precision: str, world: int,
                   steps: int, builtin: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(settings, about)`` of a run: what changes its results (module notes) and the paths behind
    the fingerprints. ``schedule_steps`` is the step count for a cosine schedule (whose shape depends
    on it) and None for a constant one (a longer resume is the same run continued)."""
    settings = {
        "model": model_fingerprint(ns.model, builtin), "template": ns.template, "seed": ns.seed,
        "data": file_fingerprint(data),
        "val_data": file_fingerprint(ns.val_data) if ns.val_data is not None else None,
        "val_fraction": ns.val_fraction,
        **{k: s[k] for k in ("groups_per_step", "micro_batch_size", "forward_micro_batch_size", "max_seq_length",
                             "lr", "min_lr", "warmup_steps", "lr_schedule", "weight_decay", "grad_clip")},
        "adam_betas": list(s["adam_betas"]), "precision": precision, "backend": ns.backend, "world_size": world,
        "schedule_steps": steps if s["lr_schedule"] == "cosine" else None,
    }
    about = {"model": str(ns.model), "data": str(data), "val_data": ns.val_data}
    return settings, about


def claim_run_dir(out: Path, *, resume: bool, overwrite: bool, stack: contextlib.ExitStack,
                  inputs: dict[str, str | None] | None = None) -> Path:
    """Check and create ``out``, take its lock ``out/.lock`` (held until ``stack`` closes), refuse an
    earlier run without ``resume`` / ``overwrite``; ``overwrite`` removes that run's files
    (:func:`clear_run`). ``inputs`` (``{option: path}``): none may be a file the run writes (same
    inode). Raises ValueError / OutputError with one line naming ``--output``."""
    from steerlm_kernels.steerlm2.training.metrics import check_output_dir

    for name in RUN_FILES:
        check_not_input(out / name, inputs or {}, option=f"--output {out}:")
    out = check_output_dir(out)
    stack.enter_context(OutputLock(out / ".lock", f"--output {out}"))
    refuse_existing(f"--output {out}", run_contents(out), resume=resume, overwrite=overwrite,
                    resume_flag="--resume auto")
    if overwrite:
        clear_run(out)
    return out


def check_checkpoint(path: Path, *, allow_partial: bool) -> str | None:
    """Refuse (OutputError) a checkpoint that lacks optimizer / scheduler / RNG / data-position state
    (:func:`checkpoint_problems`); with ``allow_partial`` return the warning to print instead (the model
    weights and ``trainer_state.json`` are needed either way)."""
    missing = checkpoint_problems(path)
    if not missing:
        return None
    if not allow_partial or any(m.startswith(("trainer_state", "the model")) for m in missing):
        raise OutputError(f"--resume: checkpoint {path} lacks {'; '.join(missing)}"
                          + ("" if allow_partial else "; --allow-partial-checkpoint resumes it anyway"))
    return f"warning: --resume {path}: resumed without {'; '.join(missing)} (--allow-partial-checkpoint)"


def check_resume(ns: argparse.Namespace, s: dict[str, Any], out: Path, resume: str | None, *, precision: str,
                 world: int, steps: int, write: bool) -> tuple[int, list[str]]:
    """The resume checks of ``train``: ``--steps`` below the checkpoint's step is refused; the run's
    recorded settings (``out/provenance.json``, else the checkpoint's run directory's) are compared
    with this command's (:func:`train_settings`; ``--allow-changed`` accepts named changes). Writes
    ``provenance.json`` when ``write`` (rank 0). Returns ``(start step, warnings)``; OutputError otherwise.
    Nothing is compared for a fresh start (no checkpoint: nothing of an earlier run is continued)."""
    from steerlm_kernels.steerlm2.formats.records import sample_data_path
    from steerlm_kernels.steerlm2.models.hf_models import TINY_MODELS

    data = Path(ns.data) if ns.data is not None else sample_data_path()
    allowed = parse_allow_changed(ns.allow_changed, SETTINGS)
    settings, about = train_settings(ns, s, data=data, precision=precision, world=world, steps=steps,
                                     builtin=tuple(TINY_MODELS))
    start, notes = 0, []
    if resume is not None:
        start = checkpoint_step(Path(resume))
        if start > steps:
            raise OutputError(f"--steps {steps} is below the checkpoint's step {start} ({resume}): a resume continues "
                              f"to --steps; give --steps {start} or more")
        source = out / PROVENANCE
        if not source.exists():
            source = Path(resume).parent / PROVENANCE
        recorded = read_provenance(source)
        if recorded is None:
            raise OutputError(f"--resume {resume}: no {PROVENANCE} in its run directory (not a run of this version):"
                              " --overwrite starts afresh")
        notes = compare_settings(recorded["settings"], settings, where=f"--resume {resume}", allowed=allowed,
                                 about=(recorded.get("about", {}), about))
    if write:
        write_provenance(out / PROVENANCE, "train", settings, about)
    return start, notes
