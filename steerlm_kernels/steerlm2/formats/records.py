"""SteerLM 2.0 records: the JSONL file format, its validation, and the importance weights.

File format (one JSON object per line, key names exactly as NeMo-Aligner's ``SteerLM2Dataset``)::

    {"system": "Be brief.",
     "prompt_turns": [{"from": "User", "value": "Tell me about tea."}],
     "label": "helpfulness:4,verbosity:1",
     "responses": [{"from": "Assistant", "value": "tea is warm.",
                    "log(P(a|x,y))": -1.2, "log(P(y|x))": -20.5, "log(Q(y|a,x))": -19.0},
                   ...]}

* ``system``: str (may be empty). ``prompt_turns``: non-empty list of ``{"from": str, "value": str}``.
* ``label``: the attribute string, or ``null``/absent for no label.
* ``responses``: non-empty list; each has a non-empty ``value`` and three log-probabilities.
  ``from`` is optional (default ``"Assistant"``) and must be the same for every response.
  Responses may differ in number from prompt to prompt (NeMo requires equal numbers; we do not).
  A group of ONE response is valid but teaches nothing (its ``ws`` and baseline are both 1, so its
  weight and loss are 0): the dataset warns about such groups, counted (``on_single``).

What a log-probability may be (:func:`log_prob_problem`): a JSON number (not a string, bool or
null), finite as a float64 (``NaN``/``Infinity`` literals, ``1e400`` and integer literals beyond
float64 such as 1 followed by 400 zeros are refused), and ``<= 0`` up to
:data:`LOG_PROB_TOLERANCE` (values in ``(0, 0.01]`` are accepted as the rounding of a true 0 and
used as given; anything larger is not a log-probability). ``log(Q(y|a,x))`` must also be finite in
float32 (the batch carries it as float32: ``>= -3.4e38``), and each response's
``log P(a|x,y) + log P(y|x) - log Q(y|a,x)`` must be finite in float64 (two values of -1.7e308
overflow), so ``ws`` is never NaN.

Every defect raises :class:`SteerLMDataError` (a ``ValueError``) with a one-line message naming the
file, the line and the key, e.g. ``data.jsonl, line 7, key 'responses[1].log(Q(y|a,x))': must be
finite, got nan``; this includes invalid UTF-8, invalid JSON and JSON nested too deeply for the
parser (e.g. 200,000 levels). Blank lines are skipped; a UTF-8 byte-order mark at the start of the
file is accepted and ignored (anywhere else it is invalid JSON).

Importance weights (per prompt group, float64 math, stored float32)::

    ws = softmax_group(log P(a|x,y) + log P(y|x) - log Q(y|a,x))

Tokenisation, collation and batching of the records: :mod:`steerlm_kernels.steerlm2.training.data`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_RESPONSE_ROLE",
    "LOG_PROB_TOLERANCE",
    "LOG_P_A",
    "LOG_P_Y",
    "LOG_Q",
    "Response",
    "SteerLM2Record",
    "SteerLMDataError",
    "SteerLMDataWarning",
    "decode_json_line",
    "importance_weights",
    "log_prob_problem",
    "parse_record",
    "read_jsonl",
    "same_prompt",
    "sample_data_path",
]

LOG_P_A = "log(P(a|x,y))"
LOG_P_Y = "log(P(y|x))"
LOG_Q = "log(Q(y|a,x))"
DEFAULT_RESPONSE_ROLE = "Assistant"
#: How far above 0 a log-probability may be (rounding of a scorer's true 0); larger values are refused.
LOG_PROB_TOLERANCE = 1e-2
_FLOAT32_MAX = 3.4028234663852886e38

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SAMPLE_FILE = Path(__file__).resolve().parent / "sample_data" / "sample_steerlm2.jsonl"


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


def log_prob_problem(x: Any) -> str | None:
    """Why ``x`` cannot be a log-probability (module docstring), or None when it can."""
    if not _is_number(x):
        return f"must be a number, got {_type_name(x)}"
    try:
        value = float(x)
    except OverflowError:  # an integer literal beyond float64, e.g. 1 followed by 400 zeros
        return f"must be a finite number, got an integer of about 10^{int(abs(x).bit_length() * 0.30103)}"
    if not math.isfinite(value):
        return f"must be finite, got {value}"
    if value > LOG_PROB_TOLERANCE:
        return f"must be <= 0 (a log-probability; up to {LOG_PROB_TOLERANCE} of rounding is accepted), got {value!r}"
    return None


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
            problem = log_prob_problem(resp[key])
            if problem is not None:
                raise fail(f"responses[{i}].{key}", problem)
            logs.append(float(resp[key]))
        if logs[2] < -_FLOAT32_MAX:
            raise fail(f"responses[{i}].{LOG_Q}", f"must be finite in float32 (>= -3.4e38; the batch carries it "
                                                  f"as float32), got {logs[2]!r}")
        if not math.isfinite(logs[0] + logs[1] - logs[2]):
            raise fail(f"responses[{i}]", f"{LOG_P_A} + {LOG_P_Y} - {LOG_Q} overflows float64 ({logs[0]!r} + "
                                          f"{logs[1]!r} - {logs[2]!r}): the importance weight is undefined")
        responses.append(Response(value, logs[0], logs[1], logs[2]))
    return SteerLM2Record(system, tuple(turns), label, role or DEFAULT_RESPONSE_ROLE, tuple(responses), source, line)


def same_prompt(a: Any, b: Any) -> bool:
    """Whether two decoded records hold the same prompt (``system``, ``prompt_turns``, ``label``):
    how ``sample`` and ``score`` recognise the input record of an earlier run's last output line."""
    keys = ("system", "prompt_turns", "label")
    return isinstance(a, Mapping) and isinstance(b, Mapping) and all(a.get(k) == b.get(k) for k in keys)


def decode_json_line(text: str, source: str, line: int) -> Any:
    """``json.loads(text)``, every failure as a one-line :class:`SteerLMDataError` (key ``<json>``),
    including a lone surrogate escape such as ``"\\ud800"`` (valid JSON, but not Unicode text: no
    tokenizer or UTF-8 writer takes it)."""
    try:
        obj = json.loads(text)
        if _SURROGATE_ESCAPE.search(text):
            json.dumps(obj, ensure_ascii=False).encode("utf-8")  # a lone surrogate cannot be encoded
        return obj
    except UnicodeEncodeError as exc:
        problem = (f"invalid JSON text: a lone surrogate escape (\\u{ord(exc.object[exc.start]):04x}) is not a "
                   "Unicode character")
    except json.JSONDecodeError as exc:
        problem = f"invalid JSON: {exc.msg} (column {exc.colno})"
    except RecursionError:
        problem = "invalid JSON: nested too deeply for the parser (objects / arrays within each other)"
    except ValueError as exc:  # e.g. an integer literal beyond the int conversion limit (4300 digits)
        problem = f"invalid JSON: {str(exc).splitlines()[0]}"
    raise SteerLMDataError(source, line, "<json>", problem)


def read_jsonl(path: str | Path, unscored: list[int] | None = None) -> list[SteerLM2Record]:
    """Read and validate a SteerLM 2.0 JSONL file. Blank lines are skipped.

    A UTF-8 byte-order mark at the start of the file is ignored. ``unscored``: when a list is given,
    records holding an ``"unscored"`` key (left unscored by ``score``: no valid sums) are skipped and
    their line numbers appended to it; otherwise they are validated like any other record.

    Raises :class:`SteerLMDataError` for invalid UTF-8, invalid JSON (including nesting too deep
    for the parser and integer literals too long to convert) or a malformed record (naming the
    file, the 1-based line and the key), and when the file holds no record at all.
    """
    src = str(path)
    records: list[SteerLM2Record] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SteerLMDataError(
                    src, lineno, "<line>", f"invalid UTF-8 ({exc.reason} at byte {exc.start})"
                ) from None
            if not text.strip():
                continue
            obj = decode_json_line(text, src, lineno)
            if unscored is not None and isinstance(obj, Mapping) and "unscored" in obj:
                unscored.append(lineno)
                continue
            records.append(parse_record(obj, src, lineno))
    if not records:
        what = f"all {len(unscored)} records are marked \"unscored\"" if unscored else "the file is empty"
        raise SteerLMDataError(src, 0, "<file>", f"no records ({what})")
    return records
