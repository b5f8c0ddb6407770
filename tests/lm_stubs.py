"""Stand-in causal LMs for the sampling and steering tests (the byte tokenizer's vocabulary).

They follow the calling convention of :func:`steerlm_kernels.steerlm2.datatools.generation.generate_rows`
(``model(input_ids=, attention_mask=, position_ids=, cache=, use_cache=True)`` -> ``.logits``,
``.cache``) and carry their per-row state in the returned cache, so they need no real attention.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch
from torch import nn

V = 262  # the byte tokenizer's vocabulary
EOS = 258
BIG = 50.0


class ScriptedLM(nn.Module):
    """Emits fixed continuations: row ``r`` of the ``k``-th row of all prefills so far gets
    ``scripts[k % len(scripts)]``, then ``after`` forever."""

    def __init__(self, scripts: list[list[int]], after: int = 256) -> None:
        super().__init__()
        self.scripts, self.after, self.rows = scripts, after, 0
        self.dummy = nn.Parameter(torch.zeros(1))

    def _one_hot(self, tokens: list[int], width: int) -> torch.Tensor:
        logits = torch.zeros(len(tokens), width, V)
        logits[torch.arange(len(tokens)), -1, torch.tensor(tokens)] = BIG
        return logits

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True, **kw):
        if cache is None:  # prefill: assign scripts to rows
            cache = {"script": [self.scripts[(self.rows + r) % len(self.scripts)] for r in range(len(input_ids))],
                     "step": 0}
            self.rows += len(input_ids)
        else:
            cache = {**cache, "step": cache["step"] + 1}
        k = cache["step"]
        tokens = [s[k] if k < len(s) else self.after for s in cache["script"]]
        return SimpleNamespace(logits=self._one_hot(tokens, input_ids.shape[1]), cache=cache)


class LengthLM(nn.Module):
    """Writes words ``"w"`` separated by spaces, then EOS: ``base`` words, plus (when ``follow``) the
    number that the prompt's ``verbosity:K`` asks for (``per_level * K``), plus a random number of
    extra words (each extra word with probability 1/2: sampled through the logits, so the row's
    random stream decides). Its log-probabilities of any full sequence are uniform over bytes
    (held-out NLL = log 256)."""

    def __init__(self, tokenizer, *, follow: bool, base: int = 2, per_level: int = 3) -> None:
        super().__init__()
        self.tok, self.follow, self.base, self.per_level = tokenizer, follow, base, per_level
        self.dummy = nn.Parameter(torch.zeros(1))
        self.w, self.space = tokenizer.encode("w", add_special_tokens=False)[0], tokenizer.encode(
            " ", add_special_tokens=False)[0]

    def _target(self, ids: list[int]) -> int:
        text = self.tok.decode(ids)
        m = re.search(r"verbosity:(\d)", text)
        level = int(m.group(1)) if m and self.follow else 0
        return self.base + self.per_level * level

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True, **kw):
        b, s = input_ids.shape
        if cache is None:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            cache = {"target": [self._target([t for t, m in zip(row, mr) if m])
                                for row, mr in zip(input_ids.tolist(), mask.tolist())],
                     "written": [[] for _ in range(b)]}
            logits = torch.zeros(b, s, V)  # uniform over the 256 bytes (held-out NLL)
            logits[:, :, 256:] = -BIG
        else:
            cache = {"target": cache["target"], "written": [w + [t] for w, t in zip(cache["written"],
                                                                                   input_ids[:, -1].tolist())]}
            logits = torch.full((b, s, V), -BIG)
        for r in range(b):
            written = cache["written"][r]
            words = sum(1 for t in written if t == self.w)
            last = logits[r, -1]
            last.fill_(-BIG)
            if written and written[-1] == self.w:
                if words >= cache["target"][r]:  # optional extra word, or the end: 1/2 each
                    last[self.space] = 0.0
                    last[EOS] = 0.0
                else:
                    last[self.space] = 0.0
            else:
                last[self.w] = 0.0
        return SimpleNamespace(logits=logits, cache=cache)
