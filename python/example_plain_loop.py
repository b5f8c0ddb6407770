#!/usr/bin/env python
"""SteerLM 2.0 training with the fused losses of ``steerlm_kernels`` in a plain PyTorch loop.

Run it (CPU, about 10 s on 2 idle cores; no download, no network)::

    .venv/bin/python python/example_plain_loop.py
    .venv/bin/python python/example_plain_loop.py --steps 100 --groups-per-step 8 --device cuda

Data: the bundled sample (40 prompts with 4-8 sampled responses each, byte tokenizer) read by
:class:`steerlm_kernels.steerlm2.training.data.SteerLM2Dataset`; every step takes a few *whole* prompt groups
(:class:`~steerlm_kernels.steerlm2.training.data.GroupBatchSampler`) and
:func:`~steerlm_kernels.steerlm2.training.data.collate_fn`
gives one row per response with NeMo's keys (``tokens``, ``labels``, ``loss_mask``,
``attention_mask``, ``position_ids``, ``ws``, ``"log(Q(y|a,x))"``, ``num_responses``).
Model: :class:`steerlm_kernels.steerlm2.models.tiny_lm.TinyCausalLM` (2 layers, width 64, built from code).

Each step is SteerLM 2.0's two phases:

1. baseline, under ``torch.no_grad``: ``seq_nll = sk.sequence_nll(logits, labels, loss_mask)``
   (the logits are read once, nothing is kept for backward), then
   ``weight, baseline, distance = sk.steerlm2_weights(seq_nll, log_q, ws, num_responses)``:
   ``baseline = softmax`` of ``-seq_nll - log_q`` within each prompt group, ``weight = ws - baseline``,
   ``distance`` = mean over groups of ``KL(ws || baseline)`` (what training drives down);
2. training: ``loss = sk.weighted_sequence_loss(logits, labels, loss_mask, weight, normalizer,
   inplace_backward=True)`` = ``sum_i weight_i * seq_nll_i / normalizer_i``, then backward (one
   fused pass that writes the logits' gradient over the logits) and an optimizer step.

``normalizer`` is NeMo-Aligner's ``avg_num_valid_tokens_in_ub`` (see :func:`group_normalizer`).
The whole batch is one micro-batch here; for gradient accumulation over several micro-batches
use :class:`steerlm_kernels.GPTSteerLMModel`, which does the same with NeMo's micro-batching.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import steerlm_kernels as sk
from steerlm_kernels.steerlm2.models.model import avg_num_valid_tokens_in_ub
from steerlm_kernels.steerlm2.models.tiny_lm import TINY_CONFIGS, TinyCausalLM
from steerlm_kernels.steerlm2.training.data import LOG_Q, GroupBatchSampler, SteerLM2Dataset, sample_data_path


def group_normalizer(loss_mask: Tensor, num_responses: Tensor, num_microbatches: int = 1) -> Tensor:
    """NeMo's normalizer ``avg_num_valid_tokens_in_ub`` ``[B]``: per response, the mean number of
    loss tokens over its prompt group, times ``num_groups / num_microbatches``; the package's own
    (:func:`steerlm_kernels.steerlm2.models.model.avg_num_valid_tokens_in_ub`, also used by ``GPTSteerLMModel``)."""
    return avg_num_valid_tokens_in_ub(loss_mask, num_responses, num_microbatches)


def steerlm2_step(model: nn.Module, batch: Mapping[str, Tensor], optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One SteerLM 2.0 step on ``batch`` (whole prompt groups): baseline phase, weighted loss, update.

    Returns ``{"loss": ..., "distance": ...}`` of the model *before* the update.
    """

    def logits_of(b: Mapping[str, Tensor]) -> Tensor:
        return model(input_ids=b["tokens"], attention_mask=b["attention_mask"], position_ids=b["position_ids"])

    labels, loss_mask = batch["labels"], batch["loss_mask"]

    # Phase 1 - baseline weights. No graph, and sequence_nll keeps nothing for backward.
    # (With a single micro-batch the phase-2 logits could serve here too; a separate forward is
    # what NeMo does, because its training phase is split into micro-batches.)
    with torch.no_grad():
        seq_nll = sk.sequence_nll(logits_of(batch), labels, loss_mask)  # [B] float32
        weight, _baseline, distance = sk.steerlm2_weights(seq_nll, batch[LOG_Q], batch["ws"], batch["num_responses"])

    # Phase 2 - the weighted per-sequence NLL; its backward is one fused pass over the logits,
    # written in place (inplace_backward=True): the logits must not be used after backward().
    normalizer = group_normalizer(loss_mask, batch["num_responses"])
    loss = sk.weighted_sequence_loss(logits_of(batch), labels, loss_mask, weight, normalizer, inplace_backward=True)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return {"loss": loss.item(), "distance": distance.item()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default: %(default)s)")
    p.add_argument("--groups-per-step", type=int, default=8, help="prompt groups per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--model", default="tiny", choices=sorted(TINY_CONFIGS), help="model size (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="model init and data order (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no per-step output")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; returns per-step ``losses``/``distances`` and their first / last values."""
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    dataset = SteerLM2Dataset(sample_data_path(), max_seq_length=256)  # byte tokenizer: V = 259
    sampler = GroupBatchSampler(dataset, groups_per_step=args.groups_per_step, shuffle=True, seed=args.seed,
                                drop_last=True)  # whole groups per step: the baseline is a softmax per group
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate_fn)
    model = TinyCausalLM(dataset.tokenizer.vocab_size, max_seq_len=256, seed=args.seed, **TINY_CONFIGS[args.model])
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)

    losses: list[float] = []
    distances: list[float] = []
    start = time.perf_counter()
    while len(losses) < args.steps:  # epochs over the 40 prompts
        for batch in loader:
            if len(losses) == args.steps:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            out = steerlm2_step(model, batch, optimizer)
            losses.append(out["loss"])
            distances.append(out["distance"])
            if not args.quiet:
                print(f"step {len(losses):3d}/{args.steps}  responses {batch['tokens'].shape[0]:3d}  "
                      f"loss {out['loss']:+.4f}  distance {out['distance']:.4f}", flush=True)
    seconds = time.perf_counter() - start
    last = distances[-5:]
    result = {
        "steps": len(losses),
        "losses": losses,
        "distances": distances,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "first_distance": distances[0],
        "last_distance": distances[-1],
        "last_distance_mean": sum(last) / len(last),  # mean of the last (up to) 5 steps
        "seconds": seconds,
    }
    if not args.quiet:
        print(f"{result['steps']} steps in {seconds:.1f}s: distance {result['first_distance']:.4f} (first step) -> "
              f"{result['last_distance_mean']:.4f} (mean of the last {len(last)})")
    return result


if __name__ == "__main__":
    main()
