"""SteerLM 2.0 on Hugging Face's ``Trainer``: :class:`SteerLM2Trainer` and :class:`SteerLM2Collator`.

Drop them into your own script (``steerlm-kernels train`` is a thin command over them)::

    from steerlm_kernels.steerlm2.training.data import SteerLM2Dataset
    from steerlm_kernels.steerlm2.training.trainer import SteerLM2Collator, SteerLM2Trainer

    ds = SteerLM2Dataset("train.jsonl", tokenizer=tok, max_seq_length=4096)
    args = transformers.TrainingArguments(
        output_dir="run", max_steps=1000, per_device_train_batch_size=8,   # prompt GROUPS per device
        remove_unused_columns=False, logging_steps=1, save_steps=100, bf16=True)
    trainer = SteerLM2Trainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                              steerlm2={"forward_micro_batch_size": 32, "micro_batch_size": 16})
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

One item of the dataset is one whole prompt group (all its responses), so the Trainer's batch of
``per_device_train_batch_size`` items is that many complete groups (the baseline is a softmax within
each group). Each optimizer step runs NeMo-Aligner's two phases through
:class:`~steerlm_kernels.steerlm2.models.model.GPTSteerLMModel`:

1. **baseline**, forward only, in micro-batches of ``forward_micro_batch_size`` responses, with the
   model in ``eval()`` mode (no dropout) and without the DDP wrapper (no collective);
2. **training**, in ``M`` micro-batches of ``micro_batch_size`` responses, each loss (NeMo's
   normalizer ``avg_num_valid_tokens_in_ub``) divided by ``M`` (and by the Trainer's
   gradient-accumulation steps) before ``accelerator.backward``; all but the last micro-batch run
   under ``accelerator.no_sync``, so DDP all-reduces the gradients once per step.

``loss`` and ``distance`` are averaged over the data-parallel ranks (one all-reduce of a few floats
per step, which also carries the stop request of a signal, so every rank stops at the same step).
Each optimizer step appends one strict-JSON line to ``<output_dir>/metrics.jsonl``
(``step, loss, distance, lr, grad_norm, tokens, tokens_per_s, epoch``; evaluation lines
``step, val_loss, val_distance``); on resume the lines after the checkpoint's step are dropped.
Checkpoints (``checkpoint-<step>/``: model, optimizer, scheduler, RNG, trainer state with the data
position) are written under a temporary name and renamed, so a kill during a save never leaves a
broken newest checkpoint. During :meth:`train`, SIGTERM and SIGINT finish the current step, write a
checkpoint and return (:attr:`SteerLM2Trainer.stop_signal` says which signal; a second SIGINT
interrupts at once). A non-finite loss stops training without saving
(:attr:`SteerLM2Trainer.failure` says why).

``TrainingArguments`` the trainer sets when left at their defaults: ``ddp_broadcast_buffers=False``
(ranks may run different numbers of forwards when group sizes differ). It needs
``remove_unused_columns=False`` (else the Trainer drops ``ws`` and friends; set for you).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import Tensor, nn

from steerlm_kernels.steerlm2.models.loss_path import resolve_loss_path
from steerlm_kernels.steerlm2.models.model import GPTSteerLMModel, avg_num_valid_tokens_in_ub
from steerlm_kernels.steerlm2.models.model_helpers import eval_mode, split_batch
from steerlm_kernels.steerlm2.training.data import PromptGroup, collate_fn
from steerlm_kernels.steerlm2.training.metrics import MetricsLog

__all__ = ["SteerLM2Collator", "SteerLM2Config", "SteerLM2Trainer"]

STAGING_DIR = ".staging"


@dataclass
class SteerLM2Config:
    """SteerLM 2.0 settings of :class:`SteerLM2Trainer` (NeMo's ``cfg.steerlm2``).

    ``forward_micro_batch_size``: responses per baseline-phase forward; ``micro_batch_size``:
    responses per training micro-batch; ``backend``: kernel backend of the fused losses;
    ``inplace_backward``: let the loss' backward overwrite the logits (saves one ``[N, V]`` buffer);
    ``loss_path``: ``auto`` / ``fused`` / ``logits`` (:attr:`SteerLM2Trainer.loss_path`).
    """

    forward_micro_batch_size: int = 32
    micro_batch_size: int = 16
    backend: str = "auto"
    inplace_backward: bool = False
    loss_path: str = "auto"


class SteerLM2Collator:
    """Data collator: a list of :class:`~steerlm_kernels.steerlm2.training.data.PromptGroup` -> one batch dict
    (NeMo's keys, one row per response; :func:`~steerlm_kernels.steerlm2.training.data.collate_fn`).

    Args:
        pad_id / label_pad_id: ids of padded ``tokens`` / ``labels`` (default: the groups' pad id).
        pad_to_multiple_of: round the padded length up to a multiple of this.
        max_seq_length: cap of that rounding.
    """

    def __init__(self, pad_id: int | None = None, label_pad_id: int | None = None,
                 pad_to_multiple_of: int | None = None, max_seq_length: int | None = None) -> None:
        self.pad_id = pad_id
        self.label_pad_id = label_pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_seq_length = max_seq_length

    @classmethod
    def for_dataset(cls, dataset: Any) -> SteerLM2Collator:
        """The collator of a :class:`~.data.SteerLM2Dataset` (its pad ids and lengths)."""
        return cls(getattr(dataset, "pad_id", None), getattr(dataset, "label_pad_id", None),
                   getattr(dataset, "pad_to_multiple_of", None), getattr(dataset, "max_seq_length", None))

    def __call__(self, groups: Sequence[PromptGroup]) -> dict[str, Tensor]:
        return collate_fn(groups, pad_id=self.pad_id, label_pad_id=self.label_pad_id,
                          pad_to_multiple_of=self.pad_to_multiple_of, max_seq_length=self.max_seq_length)


class _StepControl(transformers.TrainerCallback):
    """Turns the trainer's stop / failure flags into the Trainer's control (after DefaultFlowCallback)."""

    def __init__(self, trainer: SteerLM2Trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 - the Trainer's signature
        if self.trainer.failure is not None:
            control.should_save = False
            control.should_evaluate = False
            control.should_training_stop = True
        elif self.trainer.stop_signal is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


def _as_config(steerlm2: SteerLM2Config | Mapping[str, Any] | None) -> SteerLM2Config:
    if steerlm2 is None:
        return SteerLM2Config()
    if isinstance(steerlm2, SteerLM2Config):
        return steerlm2
    if isinstance(steerlm2, Mapping):
        unknown = set(steerlm2) - set(SteerLM2Config.__dataclass_fields__)
        if unknown:
            raise ValueError(f"steerlm2: unknown keys {sorted(unknown)}")
        return SteerLM2Config(**steerlm2)
    raise TypeError(f"steerlm2 must be a SteerLM2Config or a mapping, got {type(steerlm2).__name__}")


class SteerLM2Trainer(transformers.Trainer):
    """``transformers.Trainer`` whose step is SteerLM 2.0's two phases (module notes).

    Args:
        model, args, train_dataset, eval_dataset, processing_class, callbacks, ...: as
            ``transformers.Trainer``; the datasets' items are prompt groups
            (:class:`~steerlm_kernels.steerlm2.training.data.SteerLM2Dataset`).
        steerlm2: :class:`SteerLM2Config` or a mapping of its fields.
        data_collator: default :meth:`SteerLM2Collator.for_dataset` of ``train_dataset``.
        metrics_path: the JSONL metrics file (default ``<output_dir>/metrics.jsonl``; ``False``: none).
        handle_signals: catch SIGTERM / SIGINT during :meth:`train` (main thread only).

    Attributes:
        steerlm_history: per-step dicts (``step, loss, distance, lr, grad_norm, tokens, tokens_per_s``).
        stop_signal: the signal number that stopped training, else None.
        failure: why training failed (non-finite loss), else None.
    """

    # the step's loss is a mean over this batch's groups: the Trainer divides by its accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module | None = None, args: transformers.TrainingArguments | None = None, *,
                 steerlm2: SteerLM2Config | Mapping[str, Any] | None = None,
                 metrics_path: str | os.PathLike | bool | None = None, handle_signals: bool = True,
                 **kwargs: Any) -> None:
        self.steerlm2 = _as_config(steerlm2)
        if kwargs.get("data_collator") is None and kwargs.get("train_dataset") is not None:
            kwargs["data_collator"] = SteerLM2Collator.for_dataset(kwargs["train_dataset"])
        if args is not None:
            args.remove_unused_columns = False
            if args.ddp_broadcast_buffers is None:
                args.ddp_broadcast_buffers = False
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = False  # no num_items_in_batch: our loss is a per-batch mean
        self.add_callback(_StepControl(self))
        self.handle_signals = handle_signals
        if metrics_path is None:
            metrics_path = os.path.join(self.args.output_dir, "metrics.jsonl")
        self.metrics = MetricsLog(metrics_path) if metrics_path and self.is_world_process_zero() else None
        self.steerlm_history: list[dict[str, float]] = []
        self.stop_signal: int | None = None
        self.failure: str | None = None
        self._pending_stop: int | None = None
        self._since_log: list[dict[str, float]] = []
        self._last_log_time: float | None = None
        self._loss_path: tuple[str, str, Any] | None = None
        if self.model is not None:
            self.loss_path  # noqa: B018 - resolved now: a refused --loss-path fused fails before training

    # ------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------

    @property
    def loss_path(self) -> tuple[str, str]:
        """``("fused" | "logits", why)``: both phases run on the fused-linear path (final hidden states
        and the LM head into the fused losses, inside the model's forward; no ``[B, S, V]`` logits)
        wherever :func:`~steerlm_kernels.steerlm2.models.loss_path.resolve_loss_path` accepts the model
        (probe-checked, except under FSDP / DeepSpeed where the parameters may be sharded), else on
        the logits path. Resolved once, on the unwrapped model; ValueError for a refused ``fused``."""
        if self._loss_path is None:
            sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
            self._loss_path = resolve_loss_path(self.model, self.steerlm2.loss_path, probe=not sharded,
                                                backend=self.steerlm2.backend)
        return self._loss_path[0], self._loss_path[1]

    def _wrapper(self, model: nn.Module) -> GPTSteerLMModel:
        cfg = {"steerlm2": {"forward_micro_batch_size": self.steerlm2.forward_micro_batch_size,
                            "micro_batch_size": self.steerlm2.micro_batch_size}}
        head = self._loss_path[2] if self.loss_path[0] == "fused" else None
        return GPTSteerLMModel(model, cfg, backend=self.steerlm2.backend, hf_head=head,
                               inplace_backward=self.steerlm2.inplace_backward)

    def _forward_only_model(self, model: nn.Module) -> nn.Module:
        """The model for forwards without gradient: without the DDP wrapper (no hooks, no collective),
        the wrapped one under FSDP / DeepSpeed (whose parameters must be gathered)."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return model
        return self.accelerator.unwrap_model(model)

    def baseline_weights(self, model: nn.Module, inputs: Mapping[str, Any]) -> Any:
        """Phase 1 on ``inputs`` with dropout off: ``SteerLM2Weights(weight [B], baseline [B], distance)``
        (local, float32); the model's train/eval mode is restored."""
        plain = self._forward_only_model(model)
        was_training = plain.training
        plain.eval()
        try:
            with self.accelerator.autocast():
                return self._wrapper(plain).compute_baseline_weights(inputs)
        finally:
            plain.train(was_training)

    def training_step(self, model: nn.Module, inputs: dict[str, Tensor | Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """Both phases on one batch of whole groups; accumulates the gradient (one DDP all-reduce).

        Returns the local mean micro-batch loss divided by the gradient-accumulation steps (0-d,
        detached), as the Trainer expects.
        """
        model.train()
        inputs = self._prepare_inputs(inputs)
        t0 = time.perf_counter()
        weights = self.baseline_weights(model, inputs)
        wrapper = self._wrapper(model)
        batch = dict(inputs)
        wrapper.attach_weights(batch, weights)  # NeMo's weight and normalizer for M micro-batches
        chunks = split_batch(batch, self.steerlm2.micro_batch_size)
        m = len(chunks)
        fwd = wrapper.get_forward_output_and_loss_func()
        accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        scale = m * accumulation
        losses = []
        for i, chunk in enumerate(chunks):
            sync = contextlib.nullcontext() if i == m - 1 else self.accelerator.no_sync(model)
            with sync:
                with self.accelerator.autocast():
                    logits, loss_func = fwd(iter([chunk]), model)
                    loss, reduced = loss_func(logits)
                del logits
                self.accelerator.backward(loss / scale)
            losses.append(reduced["avg"])
        loss_mean = torch.stack(losses).mean()
        mask = inputs.get("attention_mask")
        tokens = mask.sum() if mask is not None else inputs["tokens"].numel()
        stop = float(self._pending_stop or 0)
        values = torch.stack([loss_mean.float(), weights.distance.float(),
                              torch.as_tensor(tokens, dtype=torch.float32, device=loss_mean.device),
                              torch.tensor(stop, device=loss_mean.device), torch.tensor(1.0, device=loss_mean.device)])
        values = self._sum_over_ranks(values)
        world = float(values[4])
        loss_value, distance, tokens_all, stop_all = (values[:4] / torch.tensor([world, world, 1, 1],
                                                                              device=values.device)).tolist()
        if stop_all > 0 and self.stop_signal is None:
            self.stop_signal = int(self._pending_stop or signal.SIGTERM)
        if not (math.isfinite(loss_value) and math.isfinite(distance)) and self.failure is None:
            self.failure = (f"the loss is not finite at step {self.state.global_step + 1} "
                            f"(loss {loss_value}, distance {distance}); nothing was saved from this step")
        self._since_log.append({"loss": loss_value, "distance": distance, "tokens": tokens_all,
                                "seconds": time.perf_counter() - t0})
        return loss_mean.detach() / accumulation

    @staticmethod
    def _sum_over_ranks(values: Tensor) -> Tensor:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def compute_loss(self, model: nn.Module, inputs: dict[str, Tensor | Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The SteerLM 2.0 objective of ``inputs`` without gradient (both phases forward only)."""
        plain = self._forward_only_model(model)
        with torch.no_grad(), self.accelerator.autocast():
            weights = self.baseline_weights(model, inputs)
            wrapper = self._wrapper(plain)
            batch = dict(inputs, weight=weights.weight,
                         avg_num_valid_tokens_in_ub=avg_num_valid_tokens_in_ub(inputs["loss_mask"],
                                                                               inputs["num_responses"], 1))
            fwd = wrapper.get_forward_output_and_loss_func()
            losses = []
            with eval_mode(plain):
                for chunk in split_batch(batch, wrapper.forward_micro_batch_size):
                    out, loss_func = fwd(iter([chunk]), plain)
                    losses.append(loss_func(out)[0])
            loss = torch.stack(losses).sum()
        if return_outputs:
            return loss, {"weight": weights.weight, "baseline": weights.baseline, "distance": weights.distance}
        return loss

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Loss and distance over the whole evaluation set (forward only, dropout off; every group
        counted once: a mean over groups, over batches and ranks): ``{prefix}_loss``,
        ``{prefix}_distance``; logged (``val_loss`` / ``val_distance`` in metrics.jsonl)."""
        drop_last = self.args.dataloader_drop_last
        self.args.dataloader_drop_last = False  # no group of the evaluation set is skipped
        try:
            loader = self.get_eval_dataloader(eval_dataset)
        finally:
            self.args.dataloader_drop_last = drop_last
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        sums = torch.zeros(3, dtype=torch.float64)
        for inputs in loader:
            inputs = self._prepare_inputs(inputs)
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
            groups = float((1.0 / inputs["num_responses"].double()).sum())  # a batch's values are means over groups
            sums += torch.tensor([float(loss) * groups, float(out["distance"]) * groups, groups], dtype=torch.float64)
        sums = self._sum_over_ranks(sums.to(self.args.device)).double().cpu()
        count = max(float(sums[2]), 1e-12)
        metrics = {f"{metric_key_prefix}_loss": float(sums[0]) / count,
                   f"{metric_key_prefix}_distance": float(sums[1]) / count}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ------------------------------------------------------------------------------------------
    # logging: one metrics.jsonl line per optimizer step
    # ------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``distance`` and ``tokens_per_s`` to the training logs; write metrics.jsonl lines."""
        step = self.state.global_step
        if "loss" in logs and self._since_log:
            now = time.perf_counter()
            recent = self._since_log
            self._since_log = []
            seconds = (now - self._last_log_time) if self._last_log_time is not None else sum(
                r["seconds"] for r in recent)
            self._last_log_time = now
            tokens = sum(r["tokens"] for r in recent)
            record = {"step": step,
                      "loss": sum(r["loss"] for r in recent) / len(recent),
                      "distance": sum(r["distance"] for r in recent) / len(recent),
                      "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                      "tokens": int(tokens), "tokens_per_s": tokens / max(seconds, 1e-9),
                      "epoch": self.state.epoch}
            logs["loss"] = record["loss"]
            logs["distance"] = record["distance"]
            logs["tokens_per_s"] = record["tokens_per_s"]
            self.steerlm_history.append(record)
            if self.metrics is not None:
                self.metrics.write(record)
        elif "eval_loss" in logs and self.metrics is not None:
            self.metrics.write({"step": step, "val_loss": logs["eval_loss"],
                                "val_distance": logs.get("eval_distance")})
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------
    # signals and checkpoints
    # ------------------------------------------------------------------------------------------

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask training to stop after the current step (with a checkpoint); what the signal handler does."""
        if self._pending_stop is None:
            self._pending_stop = int(signum)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self._pending_stop is not None:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.request_stop(signum)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train`` with SIGTERM / SIGINT turned into a checkpoint and a clean stop, and
        metrics.jsonl cut back to the resumed step."""
        if self.metrics is not None:
            self.metrics.truncate_after(_checkpoint_step(resume_from_checkpoint, self.args.output_dir))
        self._last_log_time = None
        with self._signals():
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if getattr(self, "_staging", False) else run_dir

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write ``checkpoint-<step>`` under ``<output_dir>/.staging/`` and rename it into place
        (atomic on one file system), then keep the newest ``save_total_limit``."""
        run_dir = self._get_output_dir(trial)
        name = f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged, final = os.path.join(run_dir, STAGING_DIR, name), os.path.join(run_dir, name)
            old = None
            if os.path.exists(final):
                old = os.path.join(run_dir, STAGING_DIR, f"old-{name}")
                os.replace(final, old)
            os.replace(staged, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(run_dir, STAGING_DIR))  # only when empty
            rotate = getattr(transformers.trainer_utils, "rotate_checkpoints", None)
            if rotate is not None:
                rotate(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                       best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
            else:  # transformers 4: a method of the Trainer
                self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
        self.accelerator.wait_for_everyone()


def _checkpoint_step(resume: str | bool | None, output_dir: str) -> int:
    """The global step a resumed run starts from (0 for a fresh run)."""
    if not resume:
        return 0
    path = resume if isinstance(resume, str) else transformers.trainer_utils.get_last_checkpoint(output_dir)
    if path is None:
        return 0
    state = os.path.join(path, transformers.trainer.TRAINER_STATE_NAME)
    if not os.path.exists(state):
        return 0
    return int(transformers.TrainerState.load_from_json(state).global_step)

