"""Token ids from text: the byte-level tokenizer and any tokenizer's ``encode``, normalised.

The templates that turn a record into text (``nemo``, ``chat``, ``plain``) and the prompt /
scored-span boundary are :mod:`steerlm_kernels.steerlm2.formats.templates`; this module only encodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

__all__ = ["ByteTokenizer", "encode_ids", "special_token_id"]


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


def special_token_id(tokenizer: Any, *names: str) -> int | None:
    """The first of ``tokenizer``'s attributes ``names`` holding a non-negative int id, else None."""
    for name in names:
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def encode_ids(tokenizer: Any, text: str) -> list[int]:
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
