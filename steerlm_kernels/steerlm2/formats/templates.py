"""Prompt templates: the one module that turns a SteerLM 2.0 example into text and token ids.

Training (:mod:`~steerlm_kernels.steerlm2.training.data`), scoring and sampling all render through
:func:`encode_example` / :func:`render_text`, so the text a model is trained on is the text its
``log Q'(y|a,x)`` / ``log P(y|x)`` were scored on. Three templates (:data:`TEMPLATES`):

``nemo``
    NeMo-Aligner's ``SteerLM2Dataset`` exactly (special tokens :class:`NemoTokens`, defaults shown)::

        <extra_id_0>System\\n{system}\\n
        <extra_id_1>{turn.from}\\n{turn.value}\\n          (every prompt turn)
        <extra_id_1>{response_from}\\n
        <extra_id_2>{label}\\n                            (only when label is not None)
        {response}\\n<extra_id_1>                         (the scored span)

    No BOS, no EOS. As NeMo does, the prompt and the full text (prompt + scored span) are
    tokenised separately, with no special tokens added; the scored span starts at
    ``len(encode(prompt))`` in the full text's ids (NeMo's ``mask``), whatever the tokenizer
    merges across the boundary.
``chat``
    The tokenizer's own chat template (``tokenizer.apply_chat_template``, Hugging Face). Turns map
    to roles by their ``from`` (``User``/``Human`` -> ``user``, ``Assistant``/``GPT``/``Model``/
    ``Bot`` -> ``assistant``, ``System`` -> ``system``, case-insensitive). The record's ``system``
    text is the system message; the **attribute string goes into the system message**, on its own
    last line ``Attributes: {label}`` (after a blank line when there is a system text). The prompt is
    the rendering with ``add_generation_prompt=True``; the scored span is what the rendering with
    the response as a final assistant message adds to it (the response and the template's
    end-of-turn, e.g. ``<|im_end|>\\n`` or ``<|eot_id|>``). Prompt and scored span are tokenised
    separately with no special tokens added (the template writes its own BOS text).
``plain``
    The package's simple format (no special tokens needed)::

        System: {system}\\n                      (only when system is non-empty)
        {turn.from}: {turn.value}\\n              (every prompt turn)
        {response_from} [{label}]:               (or "{response_from}: " when label is None)

    Ids: ``[bos] + encode(prompt) + encode(response) + [eos]`` (bos / eos when the tokenizer has
    them and ``add_bos`` / ``add_eos``); the scored span is ``encode(response) + [eos]``.

``label=None`` renders the prompt without the attribute string (``log P(y|x)`` of the SFT model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from steerlm_kernels.steerlm2.formats.tokenization import encode_ids, special_token_id

__all__ = [
    "CHAT_ATTRIBUTE_PREFIX",
    "DEFAULT_RESPONSE_ROLE",
    "TEMPLATES",
    "NemoTokens",
    "chat_messages",
    "encode_example",
    "encode_prompt",
    "render_prompt",
    "render_text",
]

#: The template names, in the order of ``--template``'s choices.
TEMPLATES: tuple[str, ...] = ("nemo", "chat", "plain")
#: Role of the responses when a record does not say (NeMo's data always says).
DEFAULT_RESPONSE_ROLE = "Assistant"
#: The ``chat`` template's line holding the attribute string in the system message.
CHAT_ATTRIBUTE_PREFIX = "Attributes: "

_CHAT_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class NemoTokens:
    """NeMo-Aligner's ``special_tokens`` of the SteerLM 2.0 chat format (its defaults)."""

    system: str = "<extra_id_0>"  # system_turn_start
    turn: str = "<extra_id_1>"  # turn_start
    label: str = "<extra_id_2>"  # label_start
    end_of_turn: str = "\n"
    end_of_name: str = "\n"


Turns = Sequence[Mapping[str, str] | tuple[str, str]]


def _turns(prompt_turns: Turns) -> list[tuple[str, str]]:
    """``[(from, value)]`` from turn dicts (``{"from", "value"}``) or ``(from, value)`` pairs."""
    if isinstance(prompt_turns, (str, bytes)) or not isinstance(prompt_turns, Sequence):
        raise TypeError(f"prompt_turns must be a list of {{'from', 'value'}} turns, got {type(prompt_turns).__name__}")
    out = []
    for i, turn in enumerate(prompt_turns):
        if isinstance(turn, Mapping):
            role, value = turn.get("from"), turn.get("value")
        elif isinstance(turn, (tuple, list)) and len(turn) == 2:
            role, value = turn
        else:
            raise TypeError(f"prompt_turns[{i}] must be a {{'from', 'value'}} mapping or a pair, got {turn!r}")
        if not isinstance(role, str) or not isinstance(value, str):
            raise TypeError(f"prompt_turns[{i}]: 'from' and 'value' must be strings, got {role!r}, {value!r}")
        out.append((role, value))
    return out


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


# ----------------------------------------------------------------------------------------------
# text


def _nemo_prompt(system: str, turns: list[tuple[str, str]], label: str | None, role: str, t: NemoTokens) -> str:
    parts = [f"{t.system}System{t.end_of_name}{system}{t.end_of_turn}"]
    parts.extend(f"{t.turn}{who}{t.end_of_name}{value}{t.end_of_turn}" for who, value in turns)
    parts.append(f"{t.turn}{role}{t.end_of_name}")
    if label is not None:
        parts.append(f"{t.label}{label}{t.end_of_turn}")
    return "".join(parts)


def _plain_prompt(system: str, turns: list[tuple[str, str]], label: str | None, role: str) -> str:
    parts = [f"System: {system}\n"] if system else []
    parts.extend(f"{who}: {value}\n" for who, value in turns)
    parts.append(f"{role} [{label}]: " if label is not None else f"{role}: ")
    return "".join(parts)


def _chat_role(name: str, where: str) -> str:
    role = _CHAT_ROLES.get(name.strip().lower())
    if role is None:
        raise ValueError(f"template 'chat': {where} {name!r} maps to no chat role (known: {sorted(_CHAT_ROLES)})")
    return role


def chat_messages(system: str, prompt_turns: Turns, label: str | None) -> list[dict[str, str]]:
    """The ``chat`` template's messages ``[{"role", "content"}]`` of a prompt (attribute string in
    the system message; no system message when there is neither system text nor label)."""
    sys_text = system
    if label is not None:
        sys_text = f"{system}\n\n{CHAT_ATTRIBUTE_PREFIX}{label}" if system else f"{CHAT_ATTRIBUTE_PREFIX}{label}"
    messages = [{"role": "system", "content": sys_text}] if sys_text else []
    for i, (who, value) in enumerate(_turns(prompt_turns)):
        messages.append({"role": _chat_role(who, f"prompt_turns[{i}].from"), "content": value})
    return messages


def _apply_chat(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not callable(getattr(tokenizer, "apply_chat_template", None)) or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"template 'chat' needs a tokenizer with a chat template ({type(tokenizer).__name__} has none); "
            "use --template nemo or plain"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def render_text(
    tokenizer: Any,
    template: str,
    system: str,
    prompt_turns: Turns,
    label: str | None,
    response: str,
    *,
    nemo_tokens: NemoTokens | None = None,
    response_role: str = DEFAULT_RESPONSE_ROLE,
) -> tuple[str, str]:
    """``(prompt text, scored-span text)`` of one example under ``template`` (module docstring).

    ``tokenizer`` is only used by ``chat`` (its chat template; may be None otherwise). For
    ``plain`` the BOS / EOS ids that :func:`encode_example` adds are not part of the text.
    """
    _check_template(template)
    turns = _turns(prompt_turns)
    if template == "nemo":
        t = nemo_tokens or NemoTokens()
        return _nemo_prompt(system, turns, label, response_role, t), f"{response}{t.end_of_turn}{t.turn}"
    if template == "plain":
        return _plain_prompt(system, turns, label, response_role), response
    messages = chat_messages(system, turns, label)
    _chat_role(response_role, "response_role")
    prompt = _apply_chat(tokenizer, messages, True)
    full = _apply_chat(tokenizer, [*messages, {"role": "assistant", "content": response}], False)
    if not full.startswith(prompt):
        raise ValueError(
            "template 'chat': the tokenizer's chat template does not render the conversation with the response "
            "as the generation prompt followed by the response (e.g. it rewrites earlier turns); use --template "
            "nemo or plain"
        )
    return prompt, full[len(prompt) :]


def render_prompt(record: Any, template: str = "plain", tokenizer: Any = None, *,
                  nemo_tokens: NemoTokens | None = None) -> str:
    """The prompt text of a :class:`~steerlm_kernels.steerlm2.formats.records.SteerLM2Record` (with its label)."""
    prompt, _ = render_text(tokenizer, template, record.system, record.prompt_turns, record.label, "",
                            nemo_tokens=nemo_tokens, response_role=record.response_role)
    return prompt


# ----------------------------------------------------------------------------------------------
# token ids


def encode_prompt(
    tokenizer: Any,
    template: str,
    system: str,
    prompt_turns: Turns,
    label: str | None,
    *,
    nemo_tokens: NemoTokens | None = None,
    response_role: str = DEFAULT_RESPONSE_ROLE,
    add_bos: bool = True,
) -> list[int]:
    """Token ids of the prompt alone (what generation continues from); the first ``start`` ids of
    :func:`encode_example` for ``chat`` / ``plain``, and NeMo's ``prompt_tokens`` for ``nemo``."""
    prompt, _ = render_text(tokenizer, template, system, prompt_turns, label, "", nemo_tokens=nemo_tokens,
                            response_role=response_role)
    return _prompt_ids(tokenizer, template, prompt, add_bos)


def _prompt_ids(tokenizer: Any, template: str, prompt: str, add_bos: bool) -> list[int]:
    """The ids of a rendered prompt: ``encode(prompt)``, after bos for ``plain`` with ``add_bos``."""
    ids = encode_ids(tokenizer, prompt)
    if template == "plain" and add_bos:
        bos = special_token_id(tokenizer, "bos_token_id", "bos_id")
        if bos is not None:
            ids.insert(0, bos)
    return ids


def encode_example(
    tokenizer: Any,
    template: str,
    system: str,
    prompt_turns: Turns,
    label: str | None,
    response: str,
    *,
    nemo_tokens: NemoTokens | None = None,
    response_role: str = DEFAULT_RESPONSE_ROLE,
    add_bos: bool = True,
    add_eos: bool = True,
) -> tuple[list[int], int]:
    """Token ids of prompt + scored span, and the index where the scored span starts.

    Args:
        tokenizer: any object with ``encode(str)`` (``chat`` also needs ``apply_chat_template``).
        template: one of :data:`TEMPLATES`.
        system, prompt_turns, label, response: the example (``prompt_turns``: ``{"from", "value"}``
            dicts or ``(from, value)`` pairs; ``label=None``: no attribute string).
        nemo_tokens: the ``nemo`` template's special tokens (default :class:`NemoTokens`).
        response_role: the responses' ``from`` (NeMo: ``responses[0]["from"]``).
        add_bos / add_eos: ``plain`` only: prepend bos / append eos when the tokenizer has them.

    Returns:
        ``(ids, start)``: ``ids[start:]`` is the scored span (what the per-sequence NLL and
        ``log Q'`` sum over), ``ids[:start]`` the prompt; ``0 < start < len(ids)``.

    Raises:
        ValueError: unknown template, a ``chat`` tokenizer without a chat template, or a scored
            span that encodes to no token.
    """
    prompt, scored = render_text(tokenizer, template, system, prompt_turns, label, response,
                                 nemo_tokens=nemo_tokens, response_role=response_role)
    prompt_ids = _prompt_ids(tokenizer, template, prompt, add_bos)
    start = len(prompt_ids)
    if template == "nemo":  # NeMo: text_to_ids(prompt) and text_to_ids(prompt + scored), positional mask
        ids = encode_ids(tokenizer, prompt + scored)
    else:
        ids = prompt_ids + encode_ids(tokenizer, scored)
        if template == "plain" and add_eos:
            eos = special_token_id(tokenizer, "eos_token_id", "eos_id")
            if eos is not None:
                ids.append(eos)
    if start == 0:
        raise ValueError(f"template {template!r}: the prompt encodes to no tokens")
    if len(ids) <= start:
        raise ValueError(f"template {template!r}: the scored span (response) encodes to no tokens")
    return ids, start
