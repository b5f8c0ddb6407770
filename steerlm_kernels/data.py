"""SteerLM 2.0 data pipeline: JSONL reader, importance weights, tokenisation, collation, batching.

File format (one JSON object per line, key names exactly as NeMo-Aligner's ``SteerLM2Dataset``)::

    {"system": "Be brief.",
     "prompt_turns": [{"from": "User", "value": "Tell me about tea."}],
     "label": "helpfulness:4,verbosity:1",
     "responses": [{"from": "Assistant", "value": "tea is warm.",
                    "log(P(a|x,y))": -1.2, "log(P(y|x))": -20.5, "log(Q(y|a,x))": -19.0},
                   ...]}

* ``system``: str (may be empty). ``prompt_turns``: non-empty list of ``{"from": str, "value": str}``.
* ``label``: the attribute string, or ``null``/absent for no label.
* ``responses``: non-empty list; each has a non-empty ``value`` and three finite log-probabilities.
  ``from`` is optional (default ``"Assistant"``) and must be the same for every response.
  Responses may differ in number from prompt to prompt (NeMo requires equal numbers; we do not).

Every defect raises :class:`SteerLMDataError` (a ``ValueError``) naming the file, the line and the
key, e.g. ``data.jsonl, line 7, key 'responses[1].log(Q(y|a,x))': must be finite, got nan``.
Blank lines are skipped.

Importance weights (per prompt group, float64 math, stored float32)::

    ws = softmax_group(log P(a|x,y) + log P(y|x) - log Q(y|a,x))

Prompt rendering (our own simple chat template; it does not need to match NeMo's)::

    "System: {system}\\n"                      (only when system is non-empty)
    "{turn.from}: {turn.value}\\n"             (for every prompt turn)
    "{response_from} [{label}]: "              (or "{response_from}: " when there is no label)

The sequence of one response is ``[bos] + encode(prompt) + encode(response) + [eos]`` (``bos``
only when the tokenizer has one and ``add_bos``; ``eos`` only when it has one and ``add_eos``).
Prompt and response are encoded separately, so the prompt/response boundary is exact whatever the
tokenizer, and the response tokens are exactly those whose log-probability ``log Q'`` scores.

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

import json
import math
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

__all__ = [
    "BATCH_KEYS",
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

LOG_P_A = "log(P(a|x,y))"
LOG_P_Y = "log(P(y|x))"
LOG_Q = "log(Q(y|a,x))"
BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids", "ws", LOG_Q, "num_responses")
DEFAULT_RESPONSE_ROLE = "Assistant"

_SAMPLE_FILE = Path(__file__).resolve().parent / "_sample" / "sample_steerlm2.jsonl"


def sample_data_path() -> Path:
    """Path of the bundled sample file (40 prompts, 4-8 responses each; see ``python/make_sample_data.py``)."""
    return _SAMPLE_FILE


# ----------------------------------------------------------------------------------------------
# errors


class SteerLMDataError(ValueError):
    """A malformed SteerLM 2.0 record or file; names the source, the line and the offending key.

    Attributes: ``source`` (file path, or ``"<records>"`` for in-memory records), ``line``
    (1-based line of the file, or 1-based index of the in-memory record; 0 for the whole file),
    ``key`` (dotted path of the offending key, e.g. ``"responses[2].value"``), ``problem``.
    """

    def __init__(self, source: str, line: int, key: str, problem: str) -> None:
        self.source = source
        self.line = line
        self.key = key
        self.problem = problem
        where = "record" if source == "<records>" else "line"
        super().__init__(f"{source}, {where} {line}, key {key!r}: {problem}")


class SteerLMDataWarning(UserWarning):
    """Warning category of the data pipeline (e.g. prompt groups dropped for length)."""


# ----------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Response:
    """One sampled response ``y`` and its three log-probabilities (float64, finite)."""

    value: str
    log_p_a: float  # log P(a|x,y)
    log_p_y: float  # log P(y|x)
    log_q: float  # log Q'(y|a,x)


@dataclass(frozen=True)
class SteerLM2Record:
    """One validated JSONL record: a prompt and its group of responses."""

    system: str
    prompt_turns: tuple[tuple[str, str], ...]  # (from, value)
    label: str | None
    response_role: str
    responses: tuple[Response, ...]
    source: str
    line: int

    @property
    def log_w(self) -> list[float]:
        """Unnormalised log importance weights ``log P(a|x,y) + log P(y|x) - log Q(y|a,x)`` (float64)."""
        return [r.log_p_a + r.log_p_y - r.log_q for r in self.responses]

    @property
    def ws(self) -> Tensor:
        """Normalised importance weights of the group, ``[n]`` float32 (computed in float64)."""
        return importance_weights(
            [r.log_p_a for r in self.responses], [r.log_p_y for r in self.responses], [r.log_q for r in self.responses]
        )


def importance_weights(log_p_a: Sequence[float], log_p_y: Sequence[float], log_q: Sequence[float]) -> Tensor:
    """``softmax(log_p_a + log_p_y - log_q)`` over one group, in float64; returns ``[n]`` float32."""
    logw = (
        torch.tensor(log_p_a, dtype=torch.float64)
        + torch.tensor(log_p_y, dtype=torch.float64)
        - torch.tensor(log_q, dtype=torch.float64)
    )
    return torch.softmax(logw, dim=0).to(torch.float32)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _type_name(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def parse_record(obj: Any, source: str = "<records>", line: int = 1) -> SteerLM2Record:
    """Validate one decoded JSON object and return it as a :class:`SteerLM2Record`.

    Raises :class:`SteerLMDataError` naming ``source``, ``line`` and the offending key.
    """

    def fail(key: str, problem: str) -> SteerLMDataError:
        return SteerLMDataError(source, line, key, problem)

    if not isinstance(obj, Mapping):
        raise fail("<record>", f"a record must be a JSON object, got {_type_name(obj)}")
    for key in ("system", "prompt_turns", "responses"):
        if key not in obj:
            raise fail(key, "missing key")

    system = obj["system"]
    if not isinstance(system, str):
        raise fail("system", f"must be a string, got {_type_name(system)}")

    turns_raw = obj["prompt_turns"]
    if not isinstance(turns_raw, list):
        raise fail("prompt_turns", f"must be a list of turns, got {_type_name(turns_raw)}")
    if not turns_raw:
        raise fail("prompt_turns", "must not be empty")
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(turns_raw):
        if not isinstance(turn, Mapping):
            raise fail(f"prompt_turns[{i}]", f"must be an object with 'from' and 'value', got {_type_name(turn)}")
        for key in ("from", "value"):
            if key not in turn:
                raise fail(f"prompt_turns[{i}].{key}", "missing key")
            if not isinstance(turn[key], str):
                raise fail(f"prompt_turns[{i}].{key}", f"must be a string, got {_type_name(turn[key])}")
        turns.append((turn["from"], turn["value"]))

    label = obj.get("label")
    if label is not None and not isinstance(label, str):
        raise fail("label", f"must be a string or null, got {_type_name(label)}")

    resp_raw = obj["responses"]
    if not isinstance(resp_raw, list):
        raise fail("responses", f"must be a list of responses, got {_type_name(resp_raw)}")
    if not resp_raw:
        raise fail("responses", "must not be empty (a prompt needs at least one response)")
    responses: list[Response] = []
    role: str | None = None
    for i, resp in enumerate(resp_raw):
        if not isinstance(resp, Mapping):
            raise fail(f"responses[{i}]", f"must be an object, got {_type_name(resp)}")
        if "value" not in resp:
            raise fail(f"responses[{i}].value", "missing key")
        value = resp["value"]
        if not isinstance(value, str):
            raise fail(f"responses[{i}].value", f"must be a string, got {_type_name(value)}")
        if not value:
            raise fail(f"responses[{i}].value", "empty response text")
        r_from = resp.get("from", DEFAULT_RESPONSE_ROLE)
        if not isinstance(r_from, str):
            raise fail(f"responses[{i}].from", f"must be a string, got {_type_name(r_from)}")
        if role is None:
            role = r_from
        elif r_from != role:
            raise fail(f"responses[{i}].from", f"all responses must be from the same role: {role!r} vs {r_from!r}")
        logs: list[float] = []
        for key in (LOG_P_A, LOG_P_Y, LOG_Q):
            if key not in resp:
                raise fail(f"responses[{i}].{key}", "missing key")
            x = resp[key]
            if not _is_number(x):
                raise fail(f"responses[{i}].{key}", f"must be a number, got {_type_name(x)}")
            x = float(x)
            if not math.isfinite(x):
                raise fail(f"responses[{i}].{key}", f"must be finite, got {x}")
            logs.append(x)
        responses.append(Response(value, logs[0], logs[1], logs[2]))
    return SteerLM2Record(system, tuple(turns), label, role or DEFAULT_RESPONSE_ROLE, tuple(responses), source, line)


def read_jsonl(path: str | Path) -> list[SteerLM2Record]:
    """Read and validate a SteerLM 2.0 JSONL file. Blank lines are skipped.

    Raises :class:`SteerLMDataError` for invalid UTF-8, invalid JSON or a malformed record (naming
    the file, the 1-based line and the key), and when the file holds no record at all.
    """
    src = str(path)
    records: list[SteerLM2Record] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SteerLMDataError(
                    src, lineno, "<line>", f"invalid UTF-8 ({exc.reason} at byte {exc.start})"
                ) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SteerLMDataError(src, lineno, "<json>", f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            records.append(parse_record(obj, src, lineno))
    if not records:
        raise SteerLMDataError(src, 0, "<file>", "no records (the file is empty)")
    return records


# ----------------------------------------------------------------------------------------------
# tokenisation


class ByteTokenizer:
    """Byte-level tokenizer needing no download: ids ``0..255`` are the UTF-8 bytes, then specials.

    ``pad_token_id = 256``, ``bos_token_id = 257``, ``eos_token_id = 258``, ``vocab_size = 259``.
    """

    pad_token_id: int = 256
    bos_token_id: int = 257
    eos_token_id: int = 258
    vocab_size: int = 259

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """UTF-8 bytes of ``text`` (preceded by ``bos`` when ``add_special_tokens``)."""
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        """Inverse of :meth:`encode`; specials are dropped (or shown as ``<pad>``/``<bos>``/``<eos>``)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        names = {self.pad_token_id: "<pad>", self.bos_token_id: "<bos>", self.eos_token_id: "<eos>"}
        out = bytearray()
        for i in ids:
            if 0 <= i < 256:
                out.append(i)
            elif not skip_special_tokens:
                out.extend(names.get(i, f"<{i}>").encode())
        return out.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259, pad=256, bos=257, eos=258)"


def _special_id(tokenizer: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _encode(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer.encode(text)`` without special tokens, normalised to a flat ``list[int]``.

    Accepts a list / tuple / tensor / array of ids, a mapping or object with ``input_ids`` (HF
    ``BatchEncoding``), or an object with ``ids`` (``tokenizers.Encoding``).
    """
    try:
        out = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        out = tokenizer.encode(text)
    if isinstance(out, Mapping):
        if "input_ids" not in out:
            raise TypeError("tokenizer.encode returned a mapping without 'input_ids'")
        out = out["input_ids"]
    elif hasattr(out, "input_ids"):
        out = out.input_ids
    elif hasattr(out, "ids"):
        out = out.ids
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if len(out) == 1 and isinstance(out[0], (list, tuple)):  # batch of one
        out = list(out[0])
    ids: list[int] = []
    for t in out:
        if hasattr(t, "item"):
            t = t.item()
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise TypeError(f"tokenizer.encode must return non-negative integer ids, got element {t!r}")
        ids.append(t)
    return ids


def render_prompt(record: SteerLM2Record) -> str:
    """The prompt text of a record under this module's chat template (see the module docstring)."""
    parts = []
    if record.system:
        parts.append(f"System: {record.system}\n")
    parts.extend(f"{role}: {value}\n" for role, value in record.prompt_turns)
    if record.label is not None:
        parts.append(f"{record.response_role} [{record.label}]: ")
    else:
        parts.append(f"{record.response_role}: ")
    return "".join(parts)


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
        self.eos_id = _special_id(tokenizer, "eos_token_id", "eos_id") if add_eos else None
        self.bos_id = _special_id(tokenizer, "bos_token_id", "bos_id") if add_bos else None
        pad = _special_id(tokenizer, "pad_token_id", "pad_id")
        eos = _special_id(tokenizer, "eos_token_id", "eos_id")
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
        prompt_ids = ([self.bos_id] if self.bos_id is not None else []) + _encode(self.tokenizer, render_prompt(rec))
        if not prompt_ids:
            raise SteerLMDataError(rec.source, rec.line, "prompt_turns", "the prompt encodes to no tokens")
        seqs: list[list[int]] = []
        for i, resp in enumerate(rec.responses):
            resp_ids = _encode(self.tokenizer, resp.value)
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
