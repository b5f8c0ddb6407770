"""SteerLM 2.0 data pipeline: JSONL reader, importance weights, tokenisation, collation, batching.

This module is the pipeline's one entry point (``sk.data``): it holds the dataset,
the collate function and the group sampler, and re-exports the record layer
(:mod:`steerlm_kernels.steerlm2.records`: file format, validation, errors, importance weights, the
bundled sample) and the text layer (:mod:`steerlm_kernels.steerlm2.tokenization`: prompt template,
byte tokenizer).

Batches (:func:`collate_fn`) follow NeMo's keys, one row per *response* (B = total responses):

==================== ============ ========= ===================================================
key                  shape        dtype     meaning
==================== ============ ========= ===================================================
``tokens``           ``[B, S]``   int64     ``seq[:-1]``, right-padded with ``pad_id``
``labels``           ``[B, S]``   int64     ``seq[1:]`` (``labels[t] = tokens[t+1]``), padded
                                            with ``label_pad_id`` (default ``pad_id``: a valid id)
``loss_mask``        ``[B, S]``   float32   1 where ``labels[t]`` is a response token (incl. eos)
``attention_mask``   ``[B, S]``   int64     1 on real tokens, 0 on padding (Hugging Face style;
                                            causality is the model's; see
                                            :func:`causal_attention_mask` for ``[B,1,S,S]``)
``position_ids``     ``[B, S]``   int64     per response: ``0..len-1`` on real tokens
                                            (padding continues the count)
``ws``               ``[B]``      float32   target weights, sum to 1 within each group
``"log(Q(y|a,x))"``  ``[B]``      float32   log Q'(y|a,x) of each response
``num_responses``    ``[B]``      int64     each row holds its group's size; groups consecutive
==================== ============ ========= ===================================================

Long sequences are never truncated (truncation would make the model's NLL disagree with
``log Q'`` of the full response): a group in which any response's row is longer than
``max_seq_length`` is dropped (counted, with one warning per load), or, with
``on_overflow="error"``, raises.

Typical use::

    ds = SteerLM2Dataset(sample_data_path(), max_seq_length=256)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=GroupBatchSampler(ds, groups_per_step=4, seed=0), collate_fn=ds.collate_fn)
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from steerlm_kernels.steerlm2.records import (
    DEFAULT_RESPONSE_ROLE,
    LOG_P_A,
    LOG_P_Y,
    LOG_Q,
    Response,
    SteerLM2Record,
    SteerLMDataError,
    SteerLMDataWarning,
    importance_weights,
    parse_record,
    read_jsonl,
    sample_data_path,
)
from steerlm_kernels.steerlm2.tokenization import ByteTokenizer, encode_ids, render_prompt, special_token_id

__all__ = [
    "BATCH_KEYS",
    "DEFAULT_RESPONSE_ROLE",
    "LOG_P_A",
    "LOG_P_Y",
    "LOG_Q",
    "ByteTokenizer",
    "GroupBatchSampler",
    "PromptGroup",
    "Response",
    "SteerLM2Dataset",
    "SteerLM2Record",
    "SteerLMDataError",
    "SteerLMDataWarning",
    "causal_attention_mask",
    "collate_fn",
    "importance_weights",
    "parse_record",
    "read_jsonl",
    "render_prompt",
    "sample_data_path",
]

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids", "ws", LOG_Q, "num_responses")


# ----------------------------------------------------------------------------------------------
# dataset


@dataclass
class PromptGroup:
    """One prompt with its tokenised responses (one dataset item).

    ``input_ids[i]``: the full sequence of response ``i`` (``prompt_ids + response_ids [+ eos]``),
    whose first ``prompt_length`` ids are the (shared) prompt. ``ws``/``log_q``: ``[n]`` float32.
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


class SteerLM2Dataset(Dataset):
    """SteerLM 2.0 prompt groups: item ``i`` is a :class:`PromptGroup` with a variable number of responses.

    Args:
        path_or_records: a JSONL path, or an iterable of record dicts (validated the same way;
            errors then name ``"<records>"`` and the 1-based record index).
        tokenizer: any object with ``encode(str)``; default :class:`ByteTokenizer`. Special ids are
            taken from ``eos_token_id``/``eos_id``, ``bos_token_id``/``bos_id`` and
            ``pad_token_id``/``pad_id`` (pad falls back to eos, then 0).
        max_seq_length: longest allowed row (``len(sequence) - 1`` tokens after the label shift);
            ``None`` for no limit.
        on_overflow: ``"drop"`` (default): drop every group with a too-long response, count them in
            ``num_dropped``/``dropped_lines`` and warn once (:class:`SteerLMDataWarning`);
            ``"error"``: raise :class:`SteerLMDataError`. Never truncates.
        add_bos / add_eos: prepend bos / append eos when the tokenizer has one.
        pad_to_multiple_of: :meth:`collate_fn` rounds the padded length up to a multiple of this
            (capped at ``max_seq_length``).
        label_pad_id: value of ``labels`` on padding (default: the pad id, a valid vocabulary id;
            use ``-100`` for an ``ignore_index`` convention). ``loss_mask`` is 0 there either way.
    """

    def __init__(
        self,
        path_or_records: str | Path | Sequence[Mapping[str, Any]],
        tokenizer: Any = None,
        max_seq_length: int | None = 4096,
        on_overflow: Literal["drop", "error"] = "drop",
        *,
        add_bos: bool = True,
        add_eos: bool = True,
        pad_to_multiple_of: int | None = None,
        label_pad_id: int | None = None,
    ) -> None:
        if on_overflow not in ("drop", "error"):
            raise ValueError(f"on_overflow must be 'drop' or 'error', got {on_overflow!r}")
        if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length < 1):
            raise ValueError(f"max_seq_length must be a positive int or None, got {max_seq_length!r}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
        if tokenizer is None:
            tokenizer = ByteTokenizer()
        if not callable(getattr(tokenizer, "encode", None)):
            raise TypeError(f"tokenizer must have an encode(str) method, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.on_overflow = on_overflow
        self.pad_to_multiple_of = pad_to_multiple_of
        self.eos_id = special_token_id(tokenizer, "eos_token_id", "eos_id") if add_eos else None
        self.bos_id = special_token_id(tokenizer, "bos_token_id", "bos_id") if add_bos else None
        pad = special_token_id(tokenizer, "pad_token_id", "pad_id")
        eos = special_token_id(tokenizer, "eos_token_id", "eos_id")
        self.pad_id: int = pad if pad is not None else (eos if eos is not None else 0)
        self.label_pad_id: int = self.pad_id if label_pad_id is None else int(label_pad_id)

        if isinstance(path_or_records, (str, Path)):
            self.source = str(path_or_records)
            self.records = read_jsonl(path_or_records)
        else:
            self.source = "<records>"
            self.records = [parse_record(obj, "<records>", i + 1) for i, obj in enumerate(path_or_records)]
            if not self.records:
                raise SteerLMDataError("<records>", 0, "<records>", "no records")

        self.groups: list[PromptGroup] = []
        self.dropped_lines: list[int] = []
        for rec in self.records:
            group = self._tokenize(rec)
            if group is not None:
                self.groups.append(group)
        if self.dropped_lines:
            warnings.warn(
                f"{self.source}: dropped {self.num_dropped} of {self.num_records} prompt groups with a response "
                f"longer than max_seq_length={self.max_seq_length} tokens (lines {_short_list(self.dropped_lines)}); "
                "they are not truncated because log(Q(y|a,x)) scores the full response",
                SteerLMDataWarning,
                stacklevel=2,
            )
        if not self.groups:
            raise SteerLMDataError(
                self.source, 0, "responses", f"every prompt group exceeds max_seq_length={self.max_seq_length}"
            )

    def _tokenize(self, rec: SteerLM2Record) -> PromptGroup | None:
        prompt_ids = ([self.bos_id] if self.bos_id is not None else []) + encode_ids(self.tokenizer, render_prompt(rec))
        if not prompt_ids:
            raise SteerLMDataError(rec.source, rec.line, "prompt_turns", "the prompt encodes to no tokens")
        seqs: list[list[int]] = []
        for i, resp in enumerate(rec.responses):
            resp_ids = encode_ids(self.tokenizer, resp.value)
            if self.eos_id is not None:
                resp_ids.append(self.eos_id)
            if not resp_ids:
                raise SteerLMDataError(
                    rec.source, rec.line, f"responses[{i}].value", "the response encodes to no tokens"
                )
            seq = prompt_ids + resp_ids
            row = len(seq) - 1
            if self.max_seq_length is not None and row > self.max_seq_length:
                if self.on_overflow == "error":
                    raise SteerLMDataError(
                        rec.source,
                        rec.line,
                        f"responses[{i}].value",
                        f"sequence of {row} tokens (prompt {len(prompt_ids)} + response {len(resp_ids)} - 1) exceeds "
                        f"max_seq_length={self.max_seq_length}; it is never truncated (on_overflow='drop' skips "
                        "the group)",
                    )
                self.dropped_lines.append(rec.line)
                return None
            seqs.append(seq)
        return PromptGroup(
            seqs,
            len(prompt_ids),
            rec.ws,
            torch.tensor([r.log_q for r in rec.responses], dtype=torch.float32),
            self.pad_id,
            rec.source,
            rec.line,
        )

    # -- counters ---------------------------------------------------------------------------------
    @property
    def num_records(self) -> int:
        """Number of records read (kept + dropped)."""
        return len(self.records)

    @property
    def num_dropped(self) -> int:
        """Number of prompt groups dropped for length."""
        return len(self.dropped_lines)

    @property
    def group_sizes(self) -> list[int]:
        """Number of responses of each kept group."""
        return [g.num_responses for g in self.groups]

    @property
    def num_responses_total(self) -> int:
        """Total number of responses over the kept groups."""
        return sum(self.group_sizes)

    # -- Dataset protocol -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> PromptGroup:
        return self.groups[index]

    def collate_fn(self, groups: Sequence[PromptGroup]) -> dict[str, Tensor]:
        """:func:`collate_fn` with this dataset's pad ids, ``pad_to_multiple_of`` and ``max_seq_length``."""
        return collate_fn(
            groups,
            pad_id=self.pad_id,
            label_pad_id=self.label_pad_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
            max_seq_length=self.max_seq_length,
        )

    def __repr__(self) -> str:
        return (
            f"SteerLM2Dataset({self.source!r}, groups={len(self)}, responses={self.num_responses_total}, "
            f"dropped={self.num_dropped}, max_seq_length={self.max_seq_length})"
        )


def _short_list(xs: Sequence[int], limit: int = 10) -> str:
    head = ", ".join(str(x) for x in xs[:limit])
    return head + (f", ... ({len(xs) - limit} more)" if len(xs) > limit else "")


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
