"""A tiny causal language model in plain PyTorch (no download, no ``transformers``): for tests and examples
of a non-Hugging-Face ``nn.Module`` under :class:`~steerlm_kernels.steerlm2.models.model.GPTSteerLMModel`.
The built-in model of ``train`` / ``score`` is the Hugging Face one of
:mod:`steerlm_kernels.steerlm2.models.hf_models` (a small ``LlamaForCausalLM``), which saves and loads as
any Hugging Face model.

Pre-LN transformer: token + learned position embeddings, ``n_layers`` blocks of causal
multi-head self-attention (``F.scaled_dot_product_attention``) and a GELU MLP, a final
LayerNorm and an untied LM head. Called like a Hugging Face model
(``model(input_ids=..., attention_mask=..., position_ids=...)``) but returns the logits tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TINY_CONFIGS", "TinyCausalLM"]

#: Sizes by name (``python/example_plain_loop.py --model``; the commands' ``--model tiny`` is
#: :data:`~steerlm_kernels.steerlm2.models.hf_models.TINY_MODELS`).
TINY_CONFIGS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4},
    "small": {"d_model": 128, "n_layers": 4, "n_heads": 4},
}


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


def _right_padded(attention_mask: Tensor) -> bool:
    """True when every row of the ``[B, S]`` mask is ones then zeros: causal attention alone then
    gives the same result at every real position (a real query never sees a later padded key)."""
    keep = attention_mask.bool()
    return bool((keep[:, 1:] <= keep[:, :-1]).all())


class TinyCausalLM(nn.Module):
    """Tiny pre-LN causal transformer LM.

    Args:
        vocab_size: number of token ids ``V``.
        d_model: width (divisible by ``n_heads``).
        n_layers: number of transformer blocks.
        n_heads: attention heads.
        max_seq_len: number of learned positions (``position_ids`` must be below it).
        seed: parameters are initialised deterministically from this seed (GPT-2 style: normal
            std 0.02, residual projections scaled by ``1/sqrt(2 n_layers)``, zero biases).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        max_seq_len: int = 256,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_seq_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Deterministic initialisation from ``seed`` (independent of the global RNG)."""
        gen = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * max(len(self.blocks), 1))
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif "ln" in name.split(".")[-2]:
                p.fill_(1.0)
            else:
                std = residual_std if name.endswith(("proj.weight", "out.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        """Logits of the next token.

        Args:
            input_ids: ``[B, S]`` int64 token ids in ``[0, V)``.
            attention_mask: optional ``[B, S]`` padding mask (1/True = real token, 0 = padding);
                padded keys are not attended to (a position always attends to itself). Right
                padding (each row ones then zeros) takes the plain causal path: identical outputs
                at real positions, unspecified (finite) ones at padded positions.
            position_ids: optional ``[B, S]`` (or ``[S]``) int64 positions; default ``0..S-1``.

        Returns:
            ``[B, S, V]`` logits in the parameters' dtype.
        """
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device)
        if position_ids.numel() and int(position_ids.max()) >= self.max_seq_len:
            raise ValueError(f"position_ids reach {int(position_ids.max())} but max_seq_len is {self.max_seq_len}")
        x = self.tok(input_ids) + self.pos(position_ids).expand(b, s, -1)
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != (b, s):
                raise ValueError(f"attention_mask must be a [B, S] padding mask, got {tuple(attention_mask.shape)}")
        if attention_mask is not None and not _right_padded(attention_mask):
            idx = torch.arange(s, device=input_ids.device)
            causal = idx[None, :] <= idx[:, None]  # [S, S]: key <= query
            keep = attention_mask.bool()[:, None, None, :] & causal  # [B, 1, S, S]
            mask = keep | torch.eye(s, dtype=torch.bool, device=input_ids.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.lm_head(self.ln_f(x))
