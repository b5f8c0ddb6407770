"""Batched sampling for ``sample`` and ``steer-eval``: left padding, one random stream per response.

:func:`generate_rows` runs the decoding loop itself (a key/value cache, no Hugging Face
``generate``): rows are prompts left-padded to a common length, ``position_ids`` count only the real
tokens, and every row draws its tokens from its **own** ``torch.Generator`` (seeded by the caller),
by the Gumbel-max trick on the temperature-scaled, nucleus-filtered log-probabilities. A row's
tokens therefore depend on its prompt and its seed only - not on which other rows share its batch,
nor on the batch size - so a batch of prompts gives what each prompt gives alone (up to the
floating-point rounding of the batched matmuls, which the tests find exact on CPU). Finished rows
leave the batch (a cache with ``batch_select_indices``, as Hugging Face's) once they are a quarter
of it, so a batch of short and long responses costs about what its responses' tokens cost.

:func:`sample_prompts` draws ``num_responses`` responses per prompt: response ``i`` of a prompt
with seed ``s`` uses the stream :func:`row_seed` ``(s, i, k)`` for its ``k``-th draw (a draw
whose text is empty is drawn again, up to :data:`MAX_DRAWS` times). The seed does not involve
the label: ``steer-eval`` samples the same prompt at every requested level with the same streams
(common random numbers, so differences between levels are paired).

Every :class:`Draw` keeps what makes its text trustworthy (``sample`` writes the three fields
into each response):

``token_ids``
    the response's token ids as sampled (before the stop token; for ``nemo`` without the
    trailing end-of-turn ``\\n``), i.e. the ids of ``value``;
``capped``
    the response hit ``max_new_tokens`` without a stop token: it did not end, it was cut;
``exact``
    ``encode(value) == token_ids``: the text re-tokenises to the sampled ids. It is false when a
    byte-level model emitted invalid UTF-8 (decoded to U+FFFD) or a tokenizer would merge the
    text differently: the text then is not the sampled sequence.

Decision: ``score`` and ``train`` read ``value`` (never ``token_ids``); for a response with ``exact``
true the two are the same tokens, and the responses that are ``capped`` or not ``exact`` are
**dropped** before scoring (:func:`drop_flagged`; ``pipeline`` does it, ``--keep-flagged`` keeps
them): dropping by a property of the response alone is rejection sampling from ``Q'``, exact for
SteerLM 2.0's group-normalised weights. ``score`` scores whatever it is given; ``sample`` reports
the capped count and ``steer-eval`` the capped share.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from steerlm_kernels.steerlm2.formats.records import DEFAULT_RESPONSE_ROLE, SteerLM2Record, parse_record
from steerlm_kernels.steerlm2.formats.templates import NemoTokens
from steerlm_kernels.steerlm2.formats.tokenization import encode_ids

__all__ = ["MAX_DRAWS", "MAX_ROWS", "Draw", "draw_fields", "drop_flagged", "generate_rows", "parse_prompt",
           "response_draw", "row_seed", "sample_prompts", "stop_ids"]

#: Draws per response before an empty text is an error.
MAX_DRAWS = 8
#: Rows (prompt x response) decoded together at most.
MAX_ROWS = 256
#: The response keys that :func:`drop_flagged` reads.
FLAG_KEYS = ("capped", "exact")


@dataclass(frozen=True)
class Draw:
    """One sampled response: ``text`` (the ``value``), ``token_ids``, ``capped``, ``exact`` (module
    docstring) and ``new_tokens`` (tokens generated, the stop token included)."""

    text: str
    token_ids: tuple[int, ...]
    capped: bool
    exact: bool
    new_tokens: int


def row_seed(seed: int, response: int, draw: int = 0) -> int:
    """The seed of the random stream of response ``response``'s ``draw``-th draw for a prompt of ``seed``."""
    return (seed * 1_000_033 + response * 104_729 + draw * 7_927 + 1) % (2**63 - 1)


def parse_prompt(obj: Any, source: str, lineno: int) -> SteerLM2Record:
    """Validate a prompt record (``system``, ``prompt_turns``, ``label``); its ``responses`` are
    optional (only their ``from`` is used: the responding role). SteerLMDataError otherwise."""
    if isinstance(obj, dict):
        role = DEFAULT_RESPONSE_ROLE
        resp = obj.get("responses")
        if isinstance(resp, list) and resp and isinstance(resp[0], dict) and isinstance(resp[0].get("from"), str):
            role = resp[0]["from"]
        obj = {**obj, "responses": [{"from": role, "value": "-", "log(P(a|x,y))": 0.0, "log(P(y|x))": 0.0,
                                     "log(Q(y|a,x))": 0.0}]}
    return parse_record(obj, source, lineno)


def stop_ids(tokenizer: Any, template: str) -> list[int]:
    """Token ids that end a response: EOS, and for ``nemo`` the turn token when it is one token."""
    ids = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    if template == "nemo" and hasattr(tokenizer, "convert_tokens_to_ids"):
        turn = tokenizer.convert_tokens_to_ids(NemoTokens().turn)
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(turn, int) and turn >= 0 and turn != unk:
            ids.append(turn)
    return ids


def response_draw(tokenizer: Any, new_ids: Sequence[int], stops: Sequence[int], template: str,
                  max_new_tokens: int) -> Draw:
    """The :class:`Draw` of generated ids ``new_ids``: cut at the first stop id (``capped`` when there is
    none within ``max_new_tokens``), special tokens dropped, the template's end-of-turn text removed
    (``nemo``: one trailing ``\\n``). ``token_ids`` are the ids before the stop id as sampled (special
    tokens included: the text drops them, and ``exact`` is then false)."""
    ids = list(new_ids)
    stop = next((k for k, t in enumerate(ids) if t in stops), None)
    new_tokens = len(ids) if stop is None else stop + 1
    capped = stop is None and len(ids) >= max_new_tokens
    ids = ids if stop is None else ids[:stop]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    end = NemoTokens().end_of_turn
    if template == "nemo" and text.endswith(end):
        text = text[: -len(end)]
        tail = encode_ids(tokenizer, end)
        if ids[len(ids) - len(tail):] == tail:
            ids = ids[: len(ids) - len(tail)]
    exact = bool(text) and encode_ids(tokenizer, text) == ids
    return Draw(text, tuple(ids), capped, exact, new_tokens)


def draw_fields(draw: Draw) -> dict[str, Any]:
    """The response fields ``sample`` writes for ``draw``: ``value``, ``token_ids``, ``capped``, ``exact``."""
    return {"value": draw.text, "token_ids": list(draw.token_ids), "capped": draw.capped, "exact": draw.exact}


def drop_flagged(obj: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """``(record without its capped / inexact responses, how many were removed)``.

    Removing responses by a property of the response alone is rejection sampling from ``Q'``: the
    kept ones are draws of ``Q'`` restricted to complete, exact responses, whose normaliser is the
    same for the whole group and cancels in SteerLM 2.0's group-normalised weights ``ws`` and
    ``baseline``. A record whose responses are all removed keeps an empty ``responses`` list.
    """
    responses = obj.get("responses")
    if not isinstance(responses, list):
        return dict(obj), 0
    kept = [r for r in responses
            if not (isinstance(r, Mapping) and (r.get("capped") is True or r.get("exact") is False))]
    return {**obj, "responses": kept}, len(responses) - len(kept)


def _left_pad(prompts: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, position_ids)`` ``[B, L]`` int64 of left-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        if p:
            ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[r, width - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _pick(logits: Tensor, gens: list[torch.Generator], temperature: float, top_p: float) -> Tensor:
    """Next token per row ``[B]`` from ``logits [B, V]``: argmax for temperature 0, else Gumbel-max on
    the nucleus of ``softmax(logits / temperature)`` with row ``r``'s noise from ``gens[r]``."""
    if temperature == 0:
        return logits.argmax(-1)
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    if top_p < 1:
        sorted_lp, order = logp.sort(dim=-1, descending=True)
        before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()  # mass of the tokens ranked above
        drop = before >= top_p
        logp = logp.scatter(-1, order, sorted_lp.masked_fill(drop, float("-inf")))
    noise = torch.stack([torch.rand(logits.shape[-1], generator=g, dtype=torch.float64) for g in gens])
    gumbel = -torch.log(-torch.log(noise.clamp_min(1e-300)))
    return (logp.cpu() + gumbel).argmax(-1).to(logits.device)


def _logits_of(out: Any) -> Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _cache_key(model: Any) -> str:
    """The forward's name of the key/value cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: Any) -> Any:
    for key in ("cache", "past_key_values"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return None


@torch.no_grad()
def generate_rows(model: Any, prompts: Sequence[Sequence[int]], seeds: Sequence[int], *, stops: Sequence[int],
                  pad_id: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0) -> list[list[int]]:
    """Generated ids per row (at most ``max_new_tokens``, up to and including the first stop id).

    Args:
        model: a causal LM called as ``model(input_ids=, attention_mask=, position_ids=,
            cache=, use_cache=True)`` (``past_key_values=`` when its forward has no ``cache``) returning
            ``.logits [B, S, V]`` and ``.cache`` / ``.past_key_values`` (Hugging Face); whatever it returns
            there is handed back at the next step.
        prompts: ``B`` prompts of token ids (non-empty), left-padded here with ``pad_id``.
        seeds: ``B`` seeds, one random stream per row (module docstring).
        stops: ids that end a row. ``temperature``: 0 = greedy. ``top_p``: nucleus mass in (0, 1].
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts and seeds must have the same length, got {len(prompts)} and {len(seeds)}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not prompts:
        return []
    device = next(model.parameters()).device
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    ids, mask, pos = _left_pad(prompts, pad_id, device)
    stop_t = torch.tensor(list(stops) or [-1], device=device)
    out_rows: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # the original row of each batch row (finished rows are dropped)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    key = _cache_key(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    cache = _cache_of(out)
    logits = _logits_of(out)[:, -1, :].float()
    last_pos = pos[:, -1:]
    for step in range(max_new_tokens):
        nxt = _pick(logits, [gens[r] for r in active], temperature, top_p)
        for r, t, finished in zip(active, nxt.tolist(), done.tolist()):
            if not finished:
                out_rows[r].append(t)
        done |= torch.isin(nxt, stop_t)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        select = getattr(cache, "batch_select_indices", None)
        if select is not None and 4 * int(done.sum()) >= len(active):  # drop the finished rows from the batch
            keep = (~done).nonzero().flatten()
            select(keep)
            active = [active[j] for j in keep.tolist()]
            nxt, mask, last_pos, done = nxt[keep], mask[keep], last_pos[keep], done[keep]
        feed = torch.where(done, torch.full_like(nxt, pad_id), nxt).unsqueeze(1)
        mask = torch.cat([mask, torch.ones_like(feed)], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=feed, attention_mask=mask, position_ids=last_pos, use_cache=True, **{key: cache})
        cache = _cache_of(out)
        logits = _logits_of(out)[:, -1, :].float()
    return out_rows


def sample_prompts(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], seeds: Sequence[int], *,
                   template: str, num_responses: int, max_new_tokens: int, temperature: float = 1.0,
                   top_p: float = 1.0, pad_id: int | None = None, max_rows: int = MAX_ROWS,
                   allow_empty: bool = False) -> list[list[Draw]]:
    """``num_responses`` :class:`Draw` per prompt (``prompts``: token ids; ``seeds``: one per prompt).

    Draws with empty text are drawn again (at most :data:`MAX_DRAWS` rounds, then ValueError naming
    the prompt's index), unless ``allow_empty`` (``steer-eval``: an empty response is a measurement).
    ``temperature == 0``: the greedy continuation, ``num_responses`` times.
    Rows are decoded ``max_rows`` at a time, in the order (prompt, response).
    """
    if num_responses < 1:
        raise ValueError(f"num_responses must be positive, got {num_responses}")
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts and seeds must have the same length, got {len(prompts)} and {len(seeds)}")
    stops = stop_ids(tokenizer, template)
    if pad_id is None:
        pad = getattr(tokenizer, "pad_token_id", None)
        pad_id = pad if isinstance(pad, int) else (stops[0] if stops else 0)
    greedy = temperature == 0
    per_prompt = 1 if greedy else num_responses
    result: list[list[Draw | None]] = [[None] * per_prompt for _ in prompts]
    for k in range(1 if greedy or allow_empty else MAX_DRAWS):
        todo = [(p, i) for p in range(len(prompts)) for i in range(per_prompt) if result[p][i] is None]
        if not todo:
            break
        for c in range(0, len(todo), max_rows):
            chunk = todo[c:c + max_rows]
            rows = generate_rows(model, [prompts[p] for p, _ in chunk], [row_seed(seeds[p], i, k) for p, i in chunk],
                                 stops=stops, pad_id=pad_id, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p)
            for (p, i), row in zip(chunk, rows):
                draw = response_draw(tokenizer, row, stops, template, max_new_tokens)
                if draw.text or allow_empty:
                    result[p][i] = draw
    out: list[list[Draw]] = []
    for p, draws in enumerate(result):
        got = [d for d in draws if d is not None]
        if len(got) < per_prompt:
            what = "the greedy draw" if greedy else f"{MAX_DRAWS} draws"
            raise ValueError(f"prompt {p}: {what} gave only {len(got)} non-empty responses of {per_prompt}")
        out.append(got * num_responses if greedy else got)
    return out
