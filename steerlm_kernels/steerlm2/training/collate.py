"""Batches of SteerLM 2.0 prompt groups: the group item, the collate function, the group sampler.

:class:`PromptGroup` is one dataset item (a prompt with its tokenised responses);
:func:`collate_fn` turns whole groups into NeMo's batch (keys and shapes in
:mod:`steerlm_kernels.steerlm2.training.data`, which re-exports everything here);
:class:`GroupBatchSampler` draws whole groups per step; :func:`causal_attention_mask` expands the
``[B, S]`` padding mask for models that want ``[B, 1, S, S]``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Sampler

from steerlm_kernels.steerlm2.formats.records import LOG_Q

__all__ = ["PromptGroup", "GroupBatchSampler", "causal_attention_mask", "collate_fn"]


# ----------------------------------------------------------------------------------------------
# the dataset item


@dataclass
class PromptGroup:
    """One prompt with its tokenised responses (one dataset item).

    ``input_ids[i]``: the full sequence of response ``i`` under the dataset's template (prompt, then
    the scored span), whose first ``prompt_length`` ids are the prompt (the same count for every
    response of the group; with ``nemo`` the ids there may differ where a tokenizer merges across
    the boundary, as NeMo's). ``ws``/``log_q``: ``[n]`` float32.
    """

    input_ids: list[list[int]]
    prompt_length: int
    ws: Tensor
    log_q: Tensor
    pad_id: int
    source: str = "<records>"
    line: int = 0

    @property
    def num_responses(self) -> int:
        """Number of responses ``n`` in the group."""
        return len(self.input_ids)

    @property
    def row_lengths(self) -> list[int]:
        """Length of each response's row in a batch: ``len(input_ids[i]) - 1`` (after the shift)."""
        return [len(s) - 1 for s in self.input_ids]


# ----------------------------------------------------------------------------------------------
# collation


def collate_fn(
    groups: Sequence[PromptGroup],
    *,
    pad_id: int | None = None,
    label_pad_id: int | None = None,
    pad_to_multiple_of: int | None = None,
    max_seq_length: int | None = None,
) -> dict[str, Tensor]:
    """Collate whole prompt groups into one batch with one row per response (NeMo's keys).

    Args:
        groups: prompt groups (each kept whole, in order: rows of a group are consecutive).
        pad_id: id of padded ``tokens`` (default: the groups' ``pad_id``).
        label_pad_id: value of padded ``labels`` (default: ``pad_id``).
        pad_to_multiple_of: round the padded length ``S`` up to a multiple of this, capped at
            ``max_seq_length`` (but never below the longest row).

    Returns a dict with (B = total responses, S = padded length):
    ``tokens`` [B,S] int64, ``labels`` [B,S] int64, ``loss_mask`` [B,S] float32,
    ``attention_mask`` [B,S] int64 (1 = real token), ``position_ids`` [B,S] int64,
    ``ws`` [B] float32, ``"log(Q(y|a,x))"`` [B] float32, ``num_responses`` [B] int64.
    """
    if len(groups) == 0:
        raise ValueError("collate_fn: groups is empty")
    if pad_id is None:
        pad_id = groups[0].pad_id
    if label_pad_id is None:
        label_pad_id = pad_id
    seqs = [s for g in groups for s in g.input_ids]
    prompt_lens = [g.prompt_length for g in groups for _ in g.input_ids]
    lengths = [len(s) - 1 for s in seqs]
    width = max(lengths)
    if pad_to_multiple_of:
        padded = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        if max_seq_length is not None:
            padded = min(padded, max_seq_length)
        width = max(width, padded)
    bsz = len(seqs)
    tokens = torch.full((bsz, width), pad_id, dtype=torch.int64)
    labels = torch.full((bsz, width), label_pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((bsz, width), dtype=torch.float32)
    attention_mask = torch.zeros((bsz, width), dtype=torch.int64)
    for i, (seq, n_prompt, length) in enumerate(zip(seqs, prompt_lens, lengths)):
        row = torch.tensor(seq, dtype=torch.int64)
        tokens[i, :length] = row[:-1]
        labels[i, :length] = row[1:]
        # labels[t] = seq[t+1] is a response token iff t + 1 >= n_prompt
        loss_mask[i, n_prompt - 1 : length] = 1.0
        attention_mask[i, :length] = 1
    position_ids = torch.arange(width, dtype=torch.int64).unsqueeze(0).expand(bsz, width).contiguous()
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "ws": torch.cat([g.ws.to(torch.float32) for g in groups]),
        LOG_Q: torch.cat([g.log_q.to(torch.float32) for g in groups]),
        "num_responses": torch.tensor([g.num_responses for g in groups for _ in g.input_ids], dtype=torch.int64),
    }


def causal_attention_mask(attention_mask: Tensor) -> Tensor:
    """``[B, S]`` padding mask -> ``[B, 1, S, S]`` bool, True where query ``q`` may attend key ``k``.

    ``mask[b, 0, q, k] = k <= q and attention_mask[b, k]`` (the convention of
    ``torch.nn.functional.scaled_dot_product_attention``). Megatron/NeMo use the inverse
    (True = masked out): pass ``~causal_attention_mask(m)`` there. A row that would see no key at
    all (an all-padding sequence) keeps its causal prefix, so no softmax row is empty (no NaN).
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, S], got shape {tuple(attention_mask.shape)}")
    s = attention_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()
    keys = attention_mask.to(torch.bool)[:, None, None, :]
    mask = causal[None, None] & keys
    # a padded query row with no valid key would be all False; let it see position 0..q (harmless, no NaN)
    empty = ~mask.any(dim=-1, keepdim=True)
    return mask | (empty & causal[None, None])


# ----------------------------------------------------------------------------------------------
# sampler


class GroupBatchSampler(Sampler):
    """Batch sampler over prompt groups: each step is a list of whole-group indices.

    A prompt's responses are never split across steps (each item of the dataset *is* a group).
    Every group appears exactly once per epoch (the last step may be smaller unless ``drop_last``).
    With ``shuffle``, epoch ``e`` uses the permutation seeded by ``(seed, e)``; the epoch advances
    by one after each full pass, or is set with :meth:`set_epoch` (as ``DistributedSampler``).

    Args:
        dataset: a sized dataset of groups, or the number of groups.
        groups_per_step: number of groups per step (> 0).
    """

    def __init__(
        self,
        dataset: Sized | int,
        groups_per_step: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        n = dataset if isinstance(dataset, int) else len(dataset)
        if not isinstance(groups_per_step, int) or groups_per_step < 1:
            raise ValueError(f"groups_per_step must be a positive int, got {groups_per_step!r}")
        if n < 0:
            raise ValueError(f"number of groups must be >= 0, got {n}")
        self.num_groups = n
        self.groups_per_step = groups_per_step
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of ``epoch`` for the next pass."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(self.num_groups))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        self.epoch += 1
        k = self.groups_per_step
        for start in range(0, self.num_groups, k):
            step = order[start : start + k]
            if len(step) < k and self.drop_last:
                return
            yield step

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_groups // self.groups_per_step
        return -(-self.num_groups // self.groups_per_step)
