"""Custom op and autograd of the segment (per-sequence) sum over packed token vectors.

``segment_sum_op(x[T], cu_seqlens[B+1], backend) -> y[B]`` sums the tokens of each packed
sequence with the backend's deterministic kernel (:func:`steerlm_kernels.registry.backend_kernels`).
Its backward is a gather (``grad_x[t] = grad_y[segment of t]``), plain PyTorch on ``[T]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steerlm_kernels import registry


@torch.library.custom_op("steerlm_kernels::segment_sum", mutates_args=())
def segment_sum_op(x: Tensor, cu_seqlens: Tensor, backend: str) -> Tensor:
    """``y[b] = sum(x[cu_seqlens[b]:cu_seqlens[b+1]])``; ``x [T]`` float32, ``y [B]`` float32."""
    return registry.backend_kernels(backend).segment_sum(x.contiguous(), cu_seqlens.contiguous())


@segment_sum_op.register_fake
def _(x, cu_seqlens, backend):
    return x.new_empty(cu_seqlens.shape[0] - 1, dtype=torch.float32)


def _segment_sum_setup(ctx, inputs, output) -> None:
    x, cu_seqlens, _ = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.n_tokens = x.shape[0]


def _segment_sum_backward(ctx, grad_y: Tensor):
    (cu_seqlens,) = ctx.saved_tensors
    positions = torch.arange(ctx.n_tokens, device=grad_y.device, dtype=cu_seqlens.dtype)
    seg = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    return grad_y[seg.clamp_(max=grad_y.shape[0] - 1)], None, None


segment_sum_op.register_autograd(_segment_sum_backward, setup_context=_segment_sum_setup)
