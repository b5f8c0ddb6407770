#!/usr/bin/env python
"""SteerLM 2.0 training with the fused losses of ``steerlm_kernels`` in a Hugging Face ``Trainer``.

Run it (CPU, about 15 s on 2 idle cores; no download, no network; needs ``transformers`` and
``accelerate``, both in the ``test`` extra)::

    .venv/bin/python python/example_hf_trainer.py
    .venv/bin/python python/example_hf_trainer.py --steps 60 --groups-per-step 8

``SteerLMTrainer`` overrides ``Trainer.compute_loss`` with SteerLM 2.0's two phases:

1. baseline, under ``torch.no_grad``: ``sk.sequence_nll`` of the model's logits (read once,
   nothing kept for backward), then ``sk.steerlm2_weights(seq_nll, log_q, ws, num_responses)``
   -> ``weight = ws - baseline`` and ``distance`` = mean over groups of ``KL(ws || baseline)``;
2. training: ``sk.weighted_sequence_loss(logits, labels, loss_mask, weight, normalizer,
   inplace_backward=True)``, which the Trainer back-propagates (one fused pass over the logits).

The model is a tiny ``LlamaForCausalLM`` built from a config (random init, byte vocabulary); the
data is the bundled sample (:func:`steerlm_kernels.steerlm2.data.sample_data_path`) read by
:class:`steerlm_kernels.steerlm2.data.SteerLM2Dataset`, whose items are whole prompt groups (a prompt
with all its responses) and whose ``collate_fn`` is the data collator.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
import transformers
from torch import Tensor, nn

import steerlm_kernels as sk
from steerlm_kernels.steerlm2.data import LOG_Q, ByteTokenizer, SteerLM2Dataset, sample_data_path
from steerlm_kernels.steerlm2.model import avg_num_valid_tokens_in_ub

MAX_LEN = 256


def group_normalizer(loss_mask: Tensor, num_responses: Tensor, num_microbatches: int = 1) -> Tensor:
    """NeMo's normalizer ``avg_num_valid_tokens_in_ub`` ``[B]``: per response, the mean number of
    loss tokens over its prompt group, times ``num_groups / num_microbatches``; the package's own
    (:func:`steerlm_kernels.steerlm2.model.avg_num_valid_tokens_in_ub`, also used by ``GPTSteerLMModel``)."""
    return avg_num_valid_tokens_in_ub(loss_mask, num_responses, num_microbatches)


class SteerLMTrainer(transformers.Trainer):
    """``Trainer`` whose loss is SteerLM 2.0's (baseline phase + weighted per-sequence NLL).

    Batches are :func:`steerlm_kernels.steerlm2.data.collate_fn` dictionaries holding whole prompt groups.
    The ``loss`` / ``distance`` of every training batch (every ``compute_loss`` call in training
    mode; several per optimizer step with gradient accumulation) are kept in
    :attr:`steerlm_history`, and the distance is added to the Trainer's logs.
    """

    # Our loss is this batch's objective (a mean over its prompt groups), not a sum to be divided by
    # the Trainer's token count ``num_items_in_batch``: the Trainer must divide it by the number of
    # gradient-accumulation steps itself. (Left at None, the Trainer would assume a Llama loss
    # already normalised over the whole accumulated batch and skip that division.)
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Same for transformers versions without ``loss_is_scaled_for_ga``; it also stops the Trainer
        # from counting ``labels != -100`` tokens for a ``num_items_in_batch`` we do not use.
        self.model_accepts_loss_kwargs = False
        self.steerlm_history: list[dict[str, float]] = []
        self._distances_since_log: list[float] = []

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        model_inputs = {"input_ids": inputs["tokens"], "attention_mask": inputs["attention_mask"],
                        "position_ids": inputs["position_ids"]}
        labels, loss_mask = inputs["labels"], inputs["loss_mask"]

        # Phase 1 - baseline weights, no graph. (A second forward, as NeMo does; since this batch is
        # one micro-batch, the phase-2 logits would do as well.)
        with torch.no_grad():
            seq_nll = sk.sequence_nll(model(**model_inputs).logits, labels, loss_mask)
            weights = sk.steerlm2_weights(seq_nll, inputs[LOG_Q], inputs["ws"], inputs["num_responses"])

        # Phase 2 - weighted loss. Its backward writes the logits' gradient over the logits
        # (inplace_backward), so only when the caller does not get the logits back.
        logits = model(**model_inputs).logits
        normalizer = group_normalizer(loss_mask, inputs["num_responses"])
        loss = sk.weighted_sequence_loss(logits, labels, loss_mask, weights.weight, normalizer,
                                         inplace_backward=not return_outputs)
        if model.training:
            self.steerlm_history.append({"loss": loss.item(), "distance": weights.distance.item()})
            self._distances_since_log.append(weights.distance.item())
        if return_outputs:
            return loss, {"logits": logits, "weight": weights.weight, "baseline": weights.baseline,
                          "distance": weights.distance}
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the mean distance of the steps since the last log to the Trainer's training logs."""
        if "loss" in logs and self._distances_since_log:
            logs["distance"] = sum(self._distances_since_log) / len(self._distances_since_log)
            self._distances_since_log.clear()
        super().log(logs, *args, **kwargs)


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    """A 2-layer, width-64 ``LlamaForCausalLM`` over the byte tokenizer's 259 ids (random init)."""
    tok = ByteTokenizer()
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_LEN,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def build_trainer(args: argparse.Namespace, output_dir: str) -> SteerLMTrainer:
    """The model, data and ``SteerLMTrainer`` of ``args`` (see :func:`parse_args`)."""
    dataset = SteerLM2Dataset(sample_data_path(), max_seq_length=MAX_LEN)
    training_args = transformers.TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        # One dataset item is one whole prompt group (all its responses), so the Trainer's default
        # sampler - which shuffles items - shuffles groups and never splits one: a batch of
        # `groups_per_step` items is `groups_per_step` complete groups, as the baseline (a softmax
        # within each group) requires. No custom sampler or get_train_dataloader is needed.
        per_device_train_batch_size=args.groups_per_step,
        gradient_accumulation_steps=args.grad_accum,
        dataloader_drop_last=True,  # equal-sized batches: each one's loss is a mean over the same number of groups
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=args.device == "cpu",
        dataloader_pin_memory=args.device != "cpu",
        remove_unused_columns=False,  # keep ws, log(Q(y|a,x)), num_responses, loss_mask in the batch
        disable_tqdm=True,
        seed=args.seed,
    )
    return SteerLMTrainer(model=tiny_llama(args.seed), args=training_args, train_dataset=dataset,
                          data_collator=dataset.collate_fn)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default: %(default)s)")
    p.add_argument("--groups-per-step", type=int, default=8, help="prompt groups per step (default: %(default)s)")
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
        trainer.train()
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
        "seconds": seconds,
        "trainer": trainer,
    }
    print(f"{result['steps']} steps in {seconds:.1f}s: distance {result['first_distance']:.4f} (first step) -> "
          f"{result['last_distance_mean']:.4f} (mean of the last {len(last)})")
    return result


if __name__ == "__main__":
    main()
