"""Hugging Face models for the SteerLM 2.0 application: the built-in tiny model and local loading.

The built-in tiny model is a small ``LlamaConfig`` built into a ``LlamaForCausalLM`` from its
config (no download, deterministic weights from a seed), with a byte-level tokenizer built offline
with the ``tokenizers`` library (:func:`build_byte_tokenizer`): ids ``0..255`` are the UTF-8 bytes
(as :class:`~steerlm_kernels.steerlm2.formats.tokenization.ByteTokenizer`), then ``<pad>`` 256, ``<s>``
257 (BOS), ``</s>`` 258 (EOS) and NeMo's special tokens ``<extra_id_0>`` 259, ``<extra_id_1>``
260, ``<extra_id_2>`` 261, each one token. Its chat template (``--template chat``)::

    <extra_id_1>{role}\\n{content}</s>        (per message; the generation prompt: <extra_id_1>assistant\\n)

``save_pretrained`` then ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
round-trip both. Needs ``transformers`` and ``tokenizers`` (``pip install 'steerlm-kernels[app]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from steerlm_kernels.hf.heads import logit_transform

__all__ = [
    "SPECIAL_TOKENS",
    "TINY_CHAT_TEMPLATE",
    "TINY_MODELS",
    "build_byte_tokenizer",
    "build_tiny",
    "bytes_to_unicode",
    "final_hidden_states",
    "lm_head_of",
    "load_model_and_tokenizer",
]

#: The tiny tokenizer's special tokens, in id order from 256.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<extra_id_0>", "<extra_id_1>", "<extra_id_2>")
#: The tiny tokenizer's chat template (Jinja, as Hugging Face chat templates are).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<extra_id_1>{{ message['role'] }}\n{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<extra_id_1>assistant\n{% endif %}"
)
#: Built-in model sizes by name (``load_model_and_tokenizer("tiny")``): Llama widths and depths.
TINY_MODELS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 176},
    "small": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 352},
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "the SteerLM 2.0 models need transformers and tokenizers: pip install 'steerlm-kernels[app]'"
        ) from None
    return transformers


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE tokenizers)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_byte_tokenizer() -> Any:
    """The tiny model's tokenizer: a ``PreTrainedTokenizerFast`` over UTF-8 bytes (module docstring).

    ``encode(text)`` adds no BOS/EOS; every string round-trips through ``decode``.
    """
    transformers = _transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def build_tiny(
    seed: int = 0,
    *,
    size: str = "tiny",
    vocab_size: int | None = None,
    max_position_embeddings: int = 4096,
    tokenizer: Any = None,
    **overrides: Any,
) -> tuple[nn.Module, Any]:
    """The built-in tiny model: ``(LlamaForCausalLM, tokenizer)``, float32, on CPU, in eval mode.

    Args:
        seed: the weights are a function of ``seed`` alone (the global RNG is saved and restored).
        size: a key of :data:`TINY_MODELS`.
        vocab_size: the model's vocabulary ``V`` (default: the tokenizer's length, 262); larger
            values pad it (e.g. ``32000`` for an LM-head-dominated benchmark model).
        max_position_embeddings: longest sequence (RoPE positions; no learned table).
        tokenizer: default :func:`build_byte_tokenizer`.
        overrides: any other ``LlamaConfig`` field (e.g. ``attention_dropout=0.1``).
    """
    transformers = _transformers()
    if size not in TINY_MODELS:
        raise ValueError(f"size must be one of {sorted(TINY_MODELS)}, got {size!r}")
    tok = build_byte_tokenizer() if tokenizer is None else tokenizer
    v = len(tok) if vocab_size is None else int(vocab_size)
    if v < len(tok):
        raise ValueError(f"vocab_size={v} is smaller than the tokenizer's {len(tok)} tokens")
    fields: dict[str, Any] = dict(TINY_MODELS[size])
    fields.update(
        vocab_size=v,
        max_position_embeddings=max_position_embeddings,
        num_key_value_heads=fields["num_attention_heads"],
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )
    fields.update(overrides)
    config = transformers.LlamaConfig(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def load_model_and_tokenizer(
    spec: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from ``spec``: a built-in name of :data:`TINY_MODELS` (:func:`build_tiny`
    with ``seed``) or a local Hugging Face model directory (``AutoModelForCausalLM`` +
    ``AutoTokenizer``, ``local_files_only``: nothing downloads; weights newly initialised by the
    architecture are seeded with ``seed``).

    ``dtype``: ``None`` keeps the weights' dtype as stored (float32 for the built-in models).
    Returns the model on ``device``, in eval mode (the caller switches to ``train()``).

    Raises:
        ValueError: ``spec`` is neither a built-in name nor a directory, or the directory does not
            hold a loadable model / tokenizer (the message says which and why).
    """
    transformers = _transformers()
    if isinstance(spec, str) and spec in TINY_MODELS:
        model, tok = build_tiny(seed, size=spec)
        return model.to(device=device, dtype=dtype), tok
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(
            f"model {str(spec)!r} is neither a built-in model ({', '.join(TINY_MODELS)}) nor a local directory"
        )
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; report one line
        raise ValueError(f"model {str(path)!r}: cannot load its tokenizer: {type(exc).__name__}: {exc}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, dtype="auto" if dtype is None else dtype
            )
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"model {str(path)!r}: cannot load the model: {type(exc).__name__}: {exc}") from None
    return model.to(device=device).eval(), tok


# ----------------------------------------------------------------------------------------------
# the fused-linear path


def lm_head_of(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of a Hugging Face causal LM's output layer.

    Raises:
        ValueError: the model has no output embeddings, or scales / caps its logits after the head
            (``logit_scale``, ``final_logit_softcapping``, ``logits_scaling``, or an unknown transform:
            :func:`steerlm_kernels.hf.heads.logit_transform`): these plain weights would then not give
            the model's own log-probabilities (:func:`steerlm_kernels.hf.heads.find_head` returns the
            transform with the head, for the fused ops' ``softcap=`` / ``logit_scale=``).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head) with a .weight")
    transform = logit_transform(getattr(model, "config", None))
    if not transform.identity:
        raise ValueError(
            f"{type(model).__name__}'s logits are {transform.describe()} after the LM head (config "
            f"final_logit_softcapping / logit_scale / logits_scaling); use steerlm_kernels.hf.heads.find_head"
        )
    return head.weight, getattr(head, "bias", None)


def final_hidden_states(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
) -> Tensor:
    """The final (normalised) hidden states ``[B, S, H]`` of a Hugging Face causal LM, without its
    LM head: ``model.base_model(...).last_hidden_state``, so that ``lm_head_of(model)`` applied to
    them gives the model's logits (the fused-linear path never forms those)."""
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise ValueError(f"{type(model).__name__} exposes no base model (the transformer without its LM head)")
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state
