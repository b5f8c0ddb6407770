#!/usr/bin/env python
"""SteerLM 2.0 training with the package's Hugging Face ``Trainer``: ``SteerLM2Trainer``.

Run it (CPU, a few seconds; no download, no network; needs ``transformers`` and ``accelerate``)::

    .venv/bin/python python/example_hf_trainer.py
    .venv/bin/python python/example_hf_trainer.py --steps 60 --groups-per-step 8 --grad-accum 2

:class:`steerlm_kernels.steerlm2.training.trainer.SteerLM2Trainer` is a ``transformers.Trainer`` whose step
is SteerLM 2.0's two phases (NeMo-Aligner's semantics, through ``GPTSteerLMModel``):

1. baseline, forward only and with dropout off: ``sk.sequence_nll`` of the logits (read once,
   nothing kept for backward), then ``sk.steerlm2_weights(seq_nll, log_q, ws, num_responses)`` ->
   ``weight = ws - baseline`` and ``distance`` = mean over groups of ``KL(ws || baseline)``;
2. training, in micro-batches: ``sk.weighted_sequence_loss(logits, labels, loss_mask, weight,
   normalizer)`` with NeMo's normalizer, back-propagated with one gradient all-reduce per step.

Everything else - AdamW, schedules, clipping, bf16, checkpoints, resume, DDP - is the Trainer's,
set with ``TrainingArguments``. One dataset item is one whole prompt group, so a batch of
``per_device_train_batch_size`` items is that many complete groups. The model is the built-in tiny
``LlamaForCausalLM`` (:func:`steerlm_kernels.steerlm2.models.hf_models.build_tiny`, from a config) and
the data the bundled sample rendered with NeMo's template.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import transformers

from steerlm_kernels.steerlm2.models.hf_models import build_tiny
from steerlm_kernels.steerlm2.training.data import SteerLM2Dataset, sample_data_path
from steerlm_kernels.steerlm2.training.trainer import SteerLM2Trainer


def build_trainer(args: argparse.Namespace, output_dir: str) -> SteerLM2Trainer:
    """The model, data and ``SteerLM2Trainer`` of ``args`` (see :func:`parse_args`)."""
    model, tokenizer = build_tiny(args.seed)
    dataset = SteerLM2Dataset(sample_data_path(), tokenizer=tokenizer, max_seq_length=4096)
    training_args = transformers.TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.groups_per_step,  # whole prompt groups per batch
        gradient_accumulation_steps=args.grad_accum,
        dataloader_drop_last=True,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=args.device == "cpu",
        disable_tqdm=True,
        seed=args.seed,
    )
    return SteerLM2Trainer(model=model.train(), args=training_args, train_dataset=dataset,
                           processing_class=tokenizer, metrics_path=False,
                           steerlm2={"forward_micro_batch_size": 32, "micro_batch_size": 16})


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default: %(default)s)")
    p.add_argument("--groups-per-step", type=int, default=8, help="prompt groups per batch (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="batches of --groups-per-step groups per optimizer step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "auto"),
                   help="cpu, or auto: the Trainer's choice (a GPU when there is one) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="model init and data order (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; returns per-step ``losses``/``distances``, their first / last values, and the trainer."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="steerlm-trainer-") as output_dir:
        trainer = build_trainer(args, output_dir)
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.steerlm_history]
    distances = [h["distance"] for h in trainer.steerlm_history]
    last = distances[-5:]
    result = {
        "steps": trainer.state.global_step,
        "losses": losses,
        "distances": distances,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "first_distance": distances[0],
        "last_distance_mean": sum(last) / len(last),  # mean of the last (up to) 5 steps
        "training_loss": output.training_loss,
        "seconds": seconds,
        "trainer": trainer,
    }
    print(f"{result['steps']} steps in {seconds:.1f}s: distance {result['first_distance']:.4f} (first step) -> "
          f"{result['last_distance_mean']:.4f} (mean of the last {len(last)})")
    return result


if __name__ == "__main__":
    main()
