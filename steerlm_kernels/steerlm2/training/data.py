"""SteerLM 2.0 data pipeline: JSONL reader, importance weights, tokenisation, collation, batching.

This module is the pipeline's one entry point (``sk.data``): it holds the dataset and re-exports
the batching layer (:mod:`steerlm_kernels.steerlm2.training.collate`: prompt group, collate function, group
sampler), the record layer
(:mod:`steerlm_kernels.steerlm2.formats.records`: file format, validation, errors, importance weights, the
bundled sample), the template layer (:mod:`steerlm_kernels.steerlm2.formats.templates`: ``nemo``,
``chat``, ``plain``; which tokens are the prompt and which the scored span) and the text layer
(:mod:`steerlm_kernels.steerlm2.formats.tokenization`: byte tokenizer, ``encode`` normalisation).

Batches (:func:`collate_fn`) follow NeMo's keys, one row per *response* (B = total responses):

==================== ============ ========= ===================================================
key                  shape        dtype     meaning
==================== ============ ========= ===================================================
``tokens``           ``[B, S]``   int64     ``seq[:-1]``, right-padded with ``pad_id``
``labels``           ``[B, S]``   int64     ``seq[1:]`` (``labels[t] = tokens[t+1]``), padded
                                            with ``label_pad_id`` (default ``pad_id``: a valid id)
``loss_mask``        ``[B, S]``   float32   1 where ``labels[t]`` is in the template's scored span
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
``max_seq_length`` is dropped (counted, with one warning per load that says how many, which lines
and the longest row), or, with ``on_overflow="error"``, raises. A group of one response (weight and
loss 0: it teaches nothing, but counts as a group in NeMo's normaliser) is kept with one counted
warning by default (``on_single="warn"``), or dropped (``"drop"``), or refused (``"error"``).
A record that ``score`` marked ``"unscored"`` (too long to score: its sums are missing, or stale) is
skipped, counted in ``unscored_lines``, with one warning per load.

Typical use::

    ds = SteerLM2Dataset(sample_data_path(), max_seq_length=256, template="plain")
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=GroupBatchSampler(ds, groups_per_step=4, seed=0), collate_fn=ds.collate_fn)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from steerlm_kernels.steerlm2.formats.records import (
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
from steerlm_kernels.steerlm2.formats.templates import TEMPLATES, NemoTokens, encode_example, render_prompt
from steerlm_kernels.steerlm2.formats.tokenization import ByteTokenizer, special_token_id
from steerlm_kernels.steerlm2.models.model_helpers import BATCH_KEYS
from steerlm_kernels.steerlm2.training.collate import GroupBatchSampler, PromptGroup, causal_attention_mask, collate_fn

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
    "TEMPLATES",
    "NemoTokens",
    "causal_attention_mask",
    "collate_fn",
    "importance_weights",
    "parse_record",
    "read_jsonl",
    "render_prompt",
    "sample_data_path",
]


# ----------------------------------------------------------------------------------------------
# dataset


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
        template: ``"plain"`` (default), ``"nemo"`` or ``"chat"``
            (:mod:`~steerlm_kernels.steerlm2.formats.templates`); ``nemo_tokens``: ``nemo``'s special tokens.
        on_single: a group of one response: ``"warn"`` (default: kept, counted in
            ``single_lines``, one warning), ``"drop"`` (dropped, counted, one warning) or ``"error"``.
        add_bos / add_eos: ``plain`` only: prepend bos / append eos when the tokenizer has one
            (``nemo`` has neither; ``chat`` writes what the tokenizer's chat template writes).
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
        template: str = "plain",
        nemo_tokens: NemoTokens | None = None,
        on_single: Literal["warn", "drop", "error"] = "warn",
        add_bos: bool = True,
        add_eos: bool = True,
        pad_to_multiple_of: int | None = None,
        label_pad_id: int | None = None,
    ) -> None:
        if on_overflow not in ("drop", "error"):
            raise ValueError(f"on_overflow must be 'drop' or 'error', got {on_overflow!r}")
        if on_single not in ("warn", "drop", "error"):
            raise ValueError(f"on_single must be 'warn', 'drop' or 'error', got {on_single!r}")
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        if nemo_tokens is not None and not isinstance(nemo_tokens, NemoTokens):
            raise TypeError(f"nemo_tokens must be a NemoTokens, got {type(nemo_tokens).__name__}")
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
        self.on_single = on_single
        self.template = template
        self.nemo_tokens = nemo_tokens
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.pad_to_multiple_of = pad_to_multiple_of
        pad = special_token_id(tokenizer, "pad_token_id", "pad_id")
        eos = special_token_id(tokenizer, "eos_token_id", "eos_id")
        self.pad_id: int = pad if pad is not None else (eos if eos is not None else 0)
        self.label_pad_id: int = self.pad_id if label_pad_id is None else int(label_pad_id)

        self.unscored_lines: list[int] = []
        if isinstance(path_or_records, (str, Path)):
            self.source = str(path_or_records)
            self.records = read_jsonl(path_or_records, unscored=self.unscored_lines)
        else:
            self.source = "<records>"
            self.records = []
            for i, obj in enumerate(path_or_records):
                if isinstance(obj, Mapping) and "unscored" in obj:
                    self.unscored_lines.append(i + 1)
                else:
                    self.records.append(parse_record(obj, "<records>", i + 1))
            if not self.records:
                raise SteerLMDataError("<records>", 0, "<records>", "no records")

        self.groups: list[PromptGroup] = []
        self.dropped_lines: list[int] = []
        self.single_lines: list[int] = []
        self.longest_dropped_row = 0
        for rec in self.records:
            group = self._tokenize(rec)
            if group is not None and group.num_responses == 1:
                if self.on_single == "error":
                    raise SteerLMDataError(rec.source, rec.line, "responses", "a group of one response teaches "
                                           "nothing (its weight is 0); on_single='warn' keeps it, 'drop' drops it")
                self.single_lines.append(rec.line)
                if self.on_single == "drop":
                    group = None
            if group is not None:
                self.groups.append(group)
        for message in (self.unscored_report, self.length_report, self.single_report):
            if message is not None:
                warnings.warn(message, SteerLMDataWarning, stacklevel=2)
        if not self.groups:
            why = (f"every prompt group exceeds max_seq_length={self.max_seq_length} (the longest needs "
                   f"{self.longest_dropped_row})") if self.dropped_lines else "no prompt group left (on_single='drop')"
            raise SteerLMDataError(self.source, 0, "responses", why)

    def _tokenize(self, rec: SteerLM2Record) -> PromptGroup | None:
        seqs: list[list[int]] = []
        starts: set[int] = set()
        longest = 0
        for i, resp in enumerate(rec.responses):
            try:
                seq, start = encode_example(
                    self.tokenizer, self.template, rec.system, rec.prompt_turns, rec.label, resp.value,
                    nemo_tokens=self.nemo_tokens, response_role=rec.response_role,
                    add_bos=self.add_bos, add_eos=self.add_eos,
                )
            except ValueError as exc:
                raise SteerLMDataError(rec.source, rec.line, f"responses[{i}].value", str(exc)) from None
            row = len(seq) - 1
            longest = max(longest, row)
            if self.max_seq_length is not None and row > self.max_seq_length and self.on_overflow == "error":
                raise SteerLMDataError(
                    rec.source,
                    rec.line,
                    f"responses[{i}].value",
                    f"sequence of {row} tokens (prompt {start} + scored span {len(seq) - start} - 1) exceeds "
                    f"max_seq_length={self.max_seq_length}; it is never truncated (on_overflow='drop' skips "
                    "the group)",
                )
            seqs.append(seq)
            starts.add(start)
        if self.max_seq_length is not None and longest > self.max_seq_length:
            self.dropped_lines.append(rec.line)
            self.longest_dropped_row = max(self.longest_dropped_row, longest)
            return None
        if len(starts) != 1:  # cannot happen with the built-in templates: the prompt is encoded alone
            raise SteerLMDataError(rec.source, rec.line, "prompt_turns", f"prompt lengths differ: {sorted(starts)}")
        ws = rec.ws
        if not bool(torch.isfinite(ws).all()):  # excluded by parse_record's checks; never let NaN through
            raise SteerLMDataError(rec.source, rec.line, "responses", "the importance weights are not finite")
        return PromptGroup(
            seqs,
            starts.pop(),
            ws,
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
    def num_single(self) -> int:
        """Number of groups of one response (kept or dropped per ``on_single``)."""
        return len(self.single_lines)

    @property
    def length_report(self) -> str | None:
        """One line saying how many groups were dropped for length, which, and why (None if none)."""
        if not self.dropped_lines:
            return None
        return (
            f"{self.source}: dropped {self.num_dropped} of {self.num_records} prompt groups with a sequence longer "
            f"than max_seq_length={self.max_seq_length} tokens (lines {_short_list(self.dropped_lines)}; the "
            f"longest needs {self.longest_dropped_row}); they are not truncated because log(Q(y|a,x)) scores the "
            "full response: raise max_seq_length to keep them"
        )

    @property
    def unscored_report(self) -> str | None:
        """One line about the records skipped because ``score`` marked them ``"unscored"`` (None if none)."""
        if not self.unscored_lines:
            return None
        return (f"{self.source}: skipped {len(self.unscored_lines)} record(s) marked \"unscored\" by score (lines "
                f"{_short_list(self.unscored_lines)}): they have no valid log-probabilities")

    @property
    def single_report(self) -> str | None:
        """One line about the groups of one response (None if none)."""
        if not self.single_lines:
            return None
        fate = "dropped" if self.on_single == "drop" else "kept"
        return (
            f"{self.source}: {self.num_single} prompt group(s) with a single response {fate} (lines "
            f"{_short_list(self.single_lines)}): a group of one has ws = baseline = 1, so its weight and loss are 0"
        )

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
            f"dropped={self.num_dropped}, max_seq_length={self.max_seq_length}, template={self.template!r})"
        )


def _short_list(xs: Sequence[int], limit: int = 10) -> str:
    head = ", ".join(str(x) for x in xs[:limit])
    return head + (f", ... ({len(xs) - limit} more)" if len(xs) > limit else "")
