"""``steerlm-kernels train``: SteerLM 2.0 training, a thin command over :class:`SteerLM2Trainer`.

With no arguments it runs an embedded default - the bundled sample data
(:func:`~steerlm_kernels.steerlm2.formats.records.sample_data_path`) and the built-in tiny Llama
(:func:`~steerlm_kernels.steerlm2.models.hf_models.build_tiny`) on CPU in about a minute - printing loss,
distance and tokens/s per step with a progress bar.

``--output DIR`` (checked and created before anything is trained) receives ``checkpoint-<step>/``
every ``--save-every`` steps (the newest ``--save-total-limit`` kept; resumable with ``--resume
auto|PATH``), ``final/`` (a Hugging Face model directory with its tokenizer), ``metrics.jsonl`` (one
strict-JSON line per step and per evaluation), ``summary.json``, ``metrics.png`` (matplotlib) and
``provenance.json`` (what made the run: :func:`~steerlm_kernels.steerlm2.training.run_dir.train_settings`).

Runs are never lost or mixed (:mod:`.run_dir` has the rules): an earlier
run in ``DIR`` needs ``--resume`` or ``--overwrite``; ``DIR/.lock`` holds it while the command runs;
a resume past ``--steps``, from an incomplete checkpoint or with other recorded settings is refused
(``--allow-partial-checkpoint``, ``--allow-changed``); "done: N steps" counts this process's steps.

Defaults: for a model directory NeMo-Aligner's (``gpt_sft.yaml``: lr 3e-5 cosine to 9e-7 after 10
warm-up steps, weight decay 0.01, betas 0.9/0.98, gradient clip 1.0, bf16 on CUDA, one epoch, checkpoints
and validation every 100 steps, 5 kept); for the built-in models a preset tuned to show learning in a
minute on CPU (lr 3e-3 constant, no weight decay, betas 0.9/0.95, fp32, 120 steps).

Exit status: 0 done; 2 bad option or data (one line naming it); 3 no usable training (non-finite
loss); 1 another error (one line; ``STEERLM_KERNELS_DEBUG=1`` shows the traceback); 128 + the signal
number after SIGTERM (143) or SIGINT (130), which stop training after the current step and write a
checkpoint first. Several processes: ``torchrun --nproc_per_node N -m steerlm_kernels train ...``
(``--groups-per-step`` is the global batch, split over the ranks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from steerlm_kernels.steerlm2.formats.templates import TEMPLATES
from steerlm_kernels.steerlm2.models.hf_models import TINY_MODELS
from steerlm_kernels.steerlm2.models.loss_path import LOSS_PATHS, resolve_loss_path
from steerlm_kernels.steerlm2.training.run_dir import SETTINGS as RUN_SETTINGS
from steerlm_kernels.steerlm2.training.run_dir import check_checkpoint, check_resume, claim_run_dir
from steerlm_kernels.steerlm2.training.train_guards import (
    add_guard_arguments,
    fluency_callbacks,
    preset_note,
    print_warnings,
)

__all__ = ["BUILTIN_PRESET", "NEMO_PRESET", "TrainError", "add_arguments", "main", "run"]

#: Defaults for a Hugging Face model directory: NeMo-Aligner's gpt_sft.yaml (SteerLM 2.0 trains with it).
NEMO_PRESET: dict[str, Any] = {
    "steps": None, "lr": 3e-5, "min_lr": 9e-7, "warmup_steps": 10, "lr_schedule": "cosine", "weight_decay": 0.01,
    "adam_betas": (0.9, 0.98), "grad_clip": 1.0, "precision": "auto", "save_every": 100, "eval_every": 100,
    "save_total_limit": 5,
}
#: Defaults for the built-in models (the embedded default run): the mean distance of the last steps
#: falls well below the first step's; constant lr, so a run with fewer ``--steps`` is a prefix of it.
BUILTIN_PRESET: dict[str, Any] = {
    "steps": 120, "lr": 3e-3, "min_lr": 0.0, "warmup_steps": 0, "lr_schedule": "constant", "weight_decay": 0.0,
    "adam_betas": (0.9, 0.95), "grad_clip": 1.0, "precision": "fp32", "save_every": 60, "eval_every": 20,
    "save_total_limit": 2,
}
#: Final steps whose mean distance the summary compares with the first step's.
LAST_STEPS = 5
EXIT_BAD_INPUT, EXIT_NO_TRAINING, EXIT_ERROR = 2, 3, 1


class TrainError(Exception):
    """A failure reported as one line (``code``: the exit status)."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` options to ``parser`` (a sub-command parser); returns it."""
    parser.description = ("SteerLM 2.0 training (Hugging Face Trainer) on a JSONL file and a causal LM; with no "
                          "arguments, the bundled sample and the tiny model on CPU (about a minute).")
    a = parser.add_argument
    a("--data", default=None, help="SteerLM 2.0 JSONL file (default: the bundled sample, 40 prompts); records "
      "marked \"unscored\" by score are skipped, counted")
    a("--val-data", default=None, help="validation JSONL file (loss and distance every --eval-every steps)")
    a("--val-fraction", type=float, default=None, help="hold out this fraction of --data's groups for validation")
    a("--eval-every", type=int, default=None,
      help="steps between validations; needs validation data, --val-data or --val-fraction (default: 100 for a "
           "model directory, 20 for the built-in models)")
    a("--model", default="tiny", help="a local Hugging Face model directory, or a built-in Llama trained from "
      "scratch with the byte tokenizer: tiny (the default; the one-minute CPU run) or small (larger; slower on "
      "CPU)")
    a("--template", default="nemo", choices=TEMPLATES,
      help="prompt format: nemo (NeMo-Aligner's SteerLM2Dataset), chat (the tokenizer's chat template), plain")
    a("--steps", type=int, default=None, help="optimizer steps in all, a resumed run's included (default: 120 for "
      "the built-in models, else 1 epoch)")
    a("--groups-per-step", type=int, default=8,
      help="prompt groups (with all their responses) per step, over all ranks (default: %(default)s)")
    a("--micro-batch-size", type=int, default=16, help="responses per training micro-batch (default: %(default)s)")
    a("--forward-micro-batch-size", type=int, default=32,
      help="responses per baseline-phase forward (default: %(default)s)")
    a("--max-seq-length", type=int, default=4096,
      help="longest sequence; longer groups are dropped (counted), never truncated (default: %(default)s)")
    def preset(key: str, fmt: Any = str) -> str:
        return (f"default: {fmt(NEMO_PRESET[key])} for a model directory, {fmt(BUILTIN_PRESET[key])} for the "
                "built-in models")

    a("--lr", type=float, default=None, help=f"peak learning rate ({preset('lr')})")
    a("--min-lr", type=float, default=None, help=f"final learning rate of the cosine schedule ({preset('min_lr')})")
    a("--warmup-steps", type=int, default=None, help=f"linear warm-up steps ({preset('warmup_steps')})")
    a("--lr-schedule", choices=("constant", "cosine"), default=None,
      help=f"after warm-up ({preset('lr_schedule')})")
    a("--weight-decay", type=float, default=None, help=f"AdamW weight decay ({preset('weight_decay')})")
    a("--adam-betas", type=float, nargs=2, default=None, metavar=("B1", "B2"),
      help=f"AdamW betas ({preset('adam_betas', lambda b: ' '.join(map(str, b)))})")
    a("--grad-clip", type=float, default=None, help=f"gradient-norm clip, 0 = off ({preset('grad_clip')})")
    a("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None,
      help="autocast precision; weights keep their loaded dtype (default: auto = bf16 on CUDA, else fp32, for a "
           "model directory; fp32 for the built-in models)")
    a("--save-every", type=int, default=None, help=f"steps between checkpoints ({preset('save_every')})")
    a("--save-total-limit", type=int, default=None, help=f"newest checkpoints kept ({preset('save_total_limit')})")
    a("--resume", default=None, help="a checkpoint directory, or auto: the newest in --output (settings checked "
      "against the run's provenance.json)")
    a("--overwrite", action="store_true", help="remove an earlier run's files from --output and start afresh")
    a("--allow-changed", default=None, metavar="SETTING[,SETTING]",
      help="with --resume: accept these recorded settings' changes (" + ", ".join(RUN_SETTINGS) + ")")
    a("--allow-partial-checkpoint", action="store_true",
      help="with --resume: resume a checkpoint without optimizer / scheduler / RNG state (with a warning)")
    a("--fsdp", default=None, help="Trainer's FSDP option, e.g. 'full_shard auto_wrap' (CUDA only, torchrun)")
    a("--device", default="auto", help="auto (cpu for the built-in models, else cuda when available), cpu, cuda")
    a("--backend", default="auto", choices=("auto", "triton", "cpp", "torch", "cuda"), help="kernel backend")
    a("--loss-path", default="auto", choices=LOSS_PATHS,
      help="fused = final hidden states + LM head into the fused losses (no [B, S, V] logits), logits = the "
           "model's logits; auto = fused wherever the model allows it (default: %(default)s)")
    a("--output", default=None, help="output directory (default: runs/<timestamp>)")
    a("--seed", type=int, default=0, help="seed of the model init and data order (default: %(default)s)")
    return add_guard_arguments(parser)  # --heldout: held-out fluency (train_guards)


def _is_builtin(spec: str) -> bool:
    return spec in TINY_MODELS


def _settings(ns: argparse.Namespace) -> dict[str, Any]:
    """The options with the preset filled in, checked (TrainError naming the option)."""
    preset = BUILTIN_PRESET if _is_builtin(ns.model) else NEMO_PRESET
    s = {k: (preset[k] if getattr(ns, k, None) is None else getattr(ns, k)) for k in preset}
    s["adam_betas"] = tuple(s["adam_betas"])
    for name in ("groups_per_step", "micro_batch_size", "forward_micro_batch_size", "max_seq_length"):
        s[name] = getattr(ns, name)
    for name in ("steps", "groups_per_step", "micro_batch_size", "forward_micro_batch_size", "max_seq_length",
                 "save_every", "eval_every", "save_total_limit"):
        if s[name] is not None and s[name] < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be positive, got {s[name]}")
    if s["warmup_steps"] < 0:
        raise TrainError(f"--warmup-steps must be >= 0, got {s['warmup_steps']}")
    for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
        if not (math.isfinite(s[name]) and s[name] >= 0) or (name == "lr" and s[name] == 0):
            raise TrainError(f"--{name.replace('_', '-')} must be a finite number {'> 0' if name == 'lr' else '>= 0'}"
                             f", got {s[name]}")
    if not all(0 <= b < 1 for b in s["adam_betas"]):
        raise TrainError(f"--adam-betas must be in [0, 1), got {s['adam_betas']}")
    if ns.val_fraction is not None and not 0 < ns.val_fraction < 1:
        raise TrainError(f"--val-fraction must be in (0, 1), got {ns.val_fraction}")
    if ns.val_fraction is not None and ns.val_data is not None:
        raise TrainError("--val-data and --val-fraction exclude each other")
    if not 0 <= ns.seed <= 2**32 - 1:
        raise TrainError(f"--seed must be an integer in [0, {2**32 - 1}], got {ns.seed}")
    return s


def _device(ns: argparse.Namespace, precision: str) -> tuple[torch.device, str]:
    """The device and the resolved precision; TrainError for a device / backend this machine lacks."""
    import steerlm_kernels as sk

    name = ns.device
    if name == "auto":
        name = "cpu" if _is_builtin(ns.model) or not torch.cuda.is_available() else "cuda"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TrainError(f"--device {ns.device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {ns.device}: CUDA is not available here (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"--device {ns.device!r}: only cpu and cuda are supported")
    if ns.backend != "auto":
        status = sk.backends().get(ns.backend)
        interpreted = ns.backend == "triton" and sk.registry.triton_interpreting()
        if status is not None and not status.available and not interpreted:
            raise TrainError(f"--backend {ns.backend}: not available here ({status.reason})")
        if ns.backend in ("triton", "cuda") and device.type != "cuda" and not interpreted:
            raise TrainError(f"--backend {ns.backend} needs a CUDA device, this run is on {device}")
        if ns.backend == "cpp" and device.type != "cpu":
            raise TrainError(f"--backend cpp runs on CPU tensors, this run is on {device}")
    if ns.fsdp and device.type != "cuda":
        # the Trainer (accelerate) would silently wrap the model in DDP instead on CPU
        raise TrainError(f"--fsdp {ns.fsdp!r}: FSDP runs on CUDA devices only (on CPU use plain data parallel: "
                         "torchrun without --fsdp)")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise TrainError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return device, precision


def _datasets(ns: argparse.Namespace, tokenizer: Any, rank0: bool) -> tuple[Any, Any, str]:
    """``(train, validation or None, description)``; TrainError for unusable data."""
    from steerlm_kernels.steerlm2.training.data import SteerLM2Dataset, SteerLMDataWarning, sample_data_path

    kwargs: dict[str, Any] = {"tokenizer": tokenizer, "max_seq_length": ns.max_seq_length, "template": ns.template}

    def load(path: Any, option: str) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SteerLMDataWarning)
            try:
                ds = SteerLM2Dataset(path, **kwargs)
            except (ValueError, OSError, RecursionError, OverflowError) as exc:
                raise TrainError(f"{option}: {exc}") from None
        if rank0:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
        return ds

    train = load(ns.data if ns.data is not None else sample_data_path(), "--data")
    desc = (f"{train.source}: {len(train)} prompt groups, {train.num_responses_total} responses"
            + (f" ({train.num_dropped} groups dropped: longer than --max-seq-length {ns.max_seq_length})"
               if train.num_dropped else ""))
    val = None
    if ns.val_data is not None:
        val = load(ns.val_data, "--val-data")
        desc += f"; validation {val.source}: {len(val)} groups"
    elif ns.val_fraction is not None:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(ns.seed)).tolist()
        n_val = max(1, round(ns.val_fraction * len(train)))
        if n_val >= len(train):
            raise TrainError(f"--val-fraction {ns.val_fraction} leaves no training group of {len(train)}")
        val = torch.utils.data.Subset(train, sorted(order[:n_val]))
        kept = torch.utils.data.Subset(train, sorted(order[n_val:]))
        kept.source, kept.pad_id, kept.label_pad_id = train.source, train.pad_id, train.label_pad_id
        kept.max_seq_length, kept.pad_to_multiple_of = train.max_seq_length, train.pad_to_multiple_of
        desc += f"; validation: {n_val} held-out groups (--val-fraction {ns.val_fraction})"
        train = kept
    return train, val, desc


def _training_arguments(ns: argparse.Namespace, s: dict[str, Any], out: Path, device: torch.device,
                        precision: str, world: int, has_val: bool, steps: int) -> Any:
    import transformers

    per_device = s["groups_per_step"] // world
    kwargs: dict[str, Any] = {}
    if s["lr_schedule"] == "cosine":
        kwargs.update(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": s["min_lr"]})
    else:
        kwargs.update(lr_scheduler_type="constant_with_warmup")
    if has_val:
        kwargs.update(eval_strategy="steps", eval_steps=s["eval_every"], per_device_eval_batch_size=per_device)
    if ns.fsdp:
        kwargs.update(fsdp=ns.fsdp)
    if device.type == "cpu" and world > 1:
        kwargs.update(ddp_backend="gloo")
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=1, learning_rate=s["lr"], warmup_steps=s["warmup_steps"],
        weight_decay=s["weight_decay"], adam_beta1=s["adam_betas"][0], adam_beta2=s["adam_betas"][1],
        max_grad_norm=s["grad_clip"], bf16=precision == "bf16", fp16=precision == "fp16",
        logging_steps=1, save_strategy="steps", save_steps=s["save_every"], save_total_limit=s["save_total_limit"],
        report_to=[], use_cpu=device.type == "cpu", dataloader_pin_memory=device.type == "cuda",
        dataloader_drop_last=True, remove_unused_columns=False, disable_tqdm=True, seed=ns.seed,
        data_seed=ns.seed, ddp_broadcast_buffers=False, log_level="warning", **kwargs)


def _progress_callback(total: int, trainer_ref: list[Any]) -> Any:
    import transformers

    class Progress(transformers.TrainerCallback):
        """One line per step: ``[#####-----] k/n loss distance tok/s | elapsed eta``."""

        start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
            trainer = trainer_ref[0]
            if not state.is_world_process_zero or logs is None:
                return
            k = state.global_step
            if "eval_loss" in logs:
                print(f"  validation at step {k}: loss {logs['eval_loss']:+.4f}  distance "
                      f"{logs.get('eval_distance', float('nan')):7.4f}", flush=True)
            elif "distance" in logs and trainer.steerlm_history:
                r = trainer.steerlm_history[-1]
                done = round(24 * k / max(total, 1))
                elapsed = time.perf_counter() - self.start
                eta = elapsed / max(k - self.first, 1) * (total - k)
                print(f"[{'#' * done}{'-' * (24 - done)}] {k:>{len(str(total))}}/{total} loss {r['loss']:+.4f}  "
                      f"distance {r['distance']:7.4f}  {r['tokens_per_s']:7.0f} tok/s | {elapsed:5.1f}s eta "
                      f"{eta:4.0f}s", flush=True)

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            self.first = state.global_step
            self.start = time.perf_counter()

    return Progress()


def _resume_path(ns: argparse.Namespace, out: Path) -> str | None:
    if ns.resume is None:
        return None
    if ns.resume == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        found = get_last_checkpoint(str(out))
        if found is None:
            print(f"--resume auto: no checkpoint in {out}, starting from step 0")
        return found
    path = Path(ns.resume)
    if not (path / "trainer_state.json").is_file():
        raise TrainError(f"--resume {ns.resume!r} is not a checkpoint directory (no trainer_state.json)")
    return str(path)


#: What the running command holds (the run directory's lock); closed when ``run`` returns.
_HELD = contextlib.ExitStack()


def _checked(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` of :mod:`.run_dir`, its ValueError as a TrainError (exit 2)."""
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        raise TrainError(str(exc)) from None

def _save_final(trainer: Any, out: Path) -> Path:
    """The model and tokenizer to ``out/final`` through a temporary directory and a rename."""
    final, tmp = out / "final", out / ".final-tmp"
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    return final


def _train(ns: argparse.Namespace) -> int:
    from steerlm_kernels.steerlm2.training.metrics import plot_metrics, read_metrics, strict

    s = _settings(ns)
    device, precision = _device(ns, s["precision"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if s["groups_per_step"] % world:
        raise TrainError(f"--groups-per-step {s['groups_per_step']} is not a multiple of the {world} processes")
    out = Path(ns.output) if ns.output else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if rank0:
        out = _checked(claim_run_dir, out, resume=ns.resume is not None, overwrite=ns.overwrite, stack=_HELD,
                       inputs={"--data": ns.data, "--val-data": ns.val_data})
    resume = _resume_path(ns, out)
    if resume is not None:
        note = _checked(check_checkpoint, Path(resume), allow_partial=ns.allow_partial_checkpoint)
        if note and rank0:
            print(note, file=sys.stderr)

    import transformers

    from steerlm_kernels.steerlm2.models.hf_models import load_model_and_tokenizer
    from steerlm_kernels.steerlm2.training.trainer import SteerLM2Trainer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()

    try:
        model, tokenizer = load_model_and_tokenizer(ns.model, device="cpu", seed=ns.seed)
    except (ValueError, ImportError, OSError) as exc:
        raise TrainError(f"--model: {exc}") from None
    model.train()
    train_ds, val_ds, data_desc = _datasets(ns, tokenizer, rank0)
    steps = s["steps"] or max(1, len(train_ds) // s["groups_per_step"])
    if len(train_ds) < s["groups_per_step"]:
        raise TrainError(f"--groups-per-step {s['groups_per_step']} exceeds the {len(train_ds)} training groups")
    start_step, notes = _checked(check_resume, ns, s, out, resume, precision=precision, world=world, steps=steps,
                                 write=rank0)
    print(*notes, sep="\n", file=sys.stderr) if notes and rank0 else None
    args = _training_arguments(ns, s, out, device, precision, world, val_ds is not None, steps)
    trainer_ref: list[Any] = []
    if ns.loss_path == "fused":
        try:
            resolve_loss_path(model, "fused", probe=False)
        except ValueError as exc:
            raise TrainError(f"--loss-path fused: {exc}") from None
    trainer = SteerLM2Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
        steerlm2={"forward_micro_batch_size": s["forward_micro_batch_size"],
                  "micro_batch_size": s["micro_batch_size"], "backend": ns.backend, "loss_path": ns.loss_path},
        callbacks=[_progress_callback(steps, trainer_ref)])
    trainer_ref.append(trainer)
    guards = fluency_callbacks(ns, tokenizer, ns.template, s["eval_every"], trainer_ref, TrainError)  # val_nll
    trainer.remove_callback(transformers.PrinterCallback)  # our progress line replaces its dict per log
    n_params = sum(p.numel() for p in model.parameters())
    if rank0:
        print(f"model: {type(model).__name__} from {ns.model}, {n_params / 1e6:.2f}M parameters "
              f"({next(model.parameters()).dtype}), on {args.device} x {world}, backend {ns.backend}, "
              f"precision {precision}, template {ns.template}")
        print(f"loss path: {trainer.loss_path[0]} ({trainer.loss_path[1]})")
        print(f"data: {data_desc}")
        print(f"steps {steps} x {s['groups_per_step']} groups, lr {s['lr']} ({s['lr_schedule']}, warm-up "
              f"{s['warmup_steps']}), micro-batches {s['forward_micro_batch_size']} (baseline) / "
              f"{s['micro_batch_size']} (training), output {out}" + (f", resuming from {resume}" if resume else ""))
        print(preset_note(ns.model, _is_builtin(ns.model), BUILTIN_PRESET if _is_builtin(ns.model) else NEMO_PRESET))
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    history = trainer.steerlm_history
    if trainer.failure is not None:
        raise TrainError(f"{trainer.failure}; see {out / 'metrics.jsonl'}", EXIT_NO_TRAINING)
    if trainer.stop_signal is not None:
        step = trainer.state.global_step
        if rank0:
            print(f"stopped by {signal.Signals(trainer.stop_signal).name} after step {step}: checkpoint "
                  f"{out / f'checkpoint-{step}'}; continue with --resume auto --output {out}", file=sys.stderr)
        return 128 + int(trainer.stop_signal)
    final = _save_final(trainer, out)
    if not rank0:
        return 0
    records = read_metrics(out / "metrics.jsonl")
    steps_done = [r for r in records if "loss" in r]
    first = steps_done[0]["distance"] if steps_done else None
    last = [r["distance"] for r in steps_done[-LAST_STEPS:] if r["distance"] is not None]
    last_mean = sum(last) / len(last) if last else None
    tokens = sum(r["tokens"] for r in history)
    summary = {"steps": trainer.state.global_step, "steps_this_run": trainer.state.global_step - start_step,
               "seconds": seconds, "first_distance": first,
               "last_distance_mean": last_mean, "last_steps": len(last),
               "distance_ratio": last_mean / first if first and last_mean is not None else None,
               "final_loss": steps_done[-1]["loss"] if steps_done else None,
               "tokens_per_s": tokens / seconds if seconds > 0 else None,
               "loss_path": trainer.loss_path[0], "loss_path_reason": trainer.loss_path[1]}
    config = {k: v for k, v in vars(ns).items() if k != "func"}
    config.update(s, precision=precision, device=str(args.device), world_size=world, parameters=n_params,
                  data=str(getattr(train_ds, "source", ns.data)), output=str(out), resumed_from=resume)
    (out / "summary.json").write_text(json.dumps(strict({"config": config, "summary": summary}), indent=1,
                                                 allow_nan=False, default=str) + "\n")
    why_not = plot_metrics(records, out / "metrics.png", f"SteerLM 2.0: {Path(ns.model).name} on "
                           f"{Path(config['data']).name}")
    print()
    ran = summary["steps_this_run"]
    since = f" (steps {start_step + 1}-{summary['steps']}, resumed from step {start_step})" if start_step else ""
    print(f"done: {ran} steps{since} in {seconds:.1f}s ({tokens / max(seconds, 1e-9):.0f} tokens/s)")
    if first is not None and last_mean is not None:
        ratio = f"{last_mean / first:.2f}x" if first else "no ratio: the first step's distance is 0"
        print(f"distance: first step {first:.4f} -> mean of the last {len(last)} steps {last_mean:.4f} ({ratio})")
    print_warnings(first, last_mean, len(last), guards)  # distance rose, held-out NLL rose (train_guards)
    print(f"wrote {final}/ (from_pretrained), {out / 'metrics.jsonl'}, {out / 'summary.json'}")
    print(f"wrote {out / 'metrics.png'}" if why_not is None else f"no plot: {why_not}")
    return 0


def run(ns: argparse.Namespace) -> int:
    """Run the ``train`` sub-command with the parsed options; returns the exit status (module notes)."""
    try:
        with _HELD:
            return _train(ns)
    except TrainError as exc:
        print(f"steerlm-kernels train: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("steerlm-kernels train: interrupted (a second SIGINT stops without a checkpoint)", file=sys.stderr)
        return 128 + int(signal.SIGINT)
    except Exception as exc:  # noqa: BLE001 - the CLI ends in one line, never a traceback
        if os.environ.get("STEERLM_KERNELS_DEBUG") == "1":
            raise
        print(f"steerlm-kernels train: error: {type(exc).__name__}: {exc} (STEERLM_KERNELS_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m steerlm_kernels.steerlm2.training.train [options]``."""
    parser = add_arguments(argparse.ArgumentParser(prog="steerlm-kernels train"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
