"""Custom op and autograd of the segment (per-sequence) sum over packed token vectors.

``segment_sum_op(x[T], cu_seqlens[B+1], backend) -> y[B]`` sums the tokens of each packed
sequence with the backend's deterministic kernel (:func:`steerlm_kernels.registry.backend_kernels`).
:func:`segment_sum` is its differentiable form: the backward is a gather (``grad_x[t] =
grad_y[segment of t]``), plain PyTorch on ``[T]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steerlm_kernels import registry
from steerlm_kernels.ops.cross_entropy import autograd_needed


@torch.library.custom_op("steerlm_kernels::segment_sum", mutates_args=())
def segment_sum_op(x: Tensor, cu_seqlens: Tensor, backend: str) -> Tensor:
    """``y[b] = sum(x[cu_seqlens[b]:cu_seqlens[b+1]])``; ``x [T]`` float32, ``y [B]`` float32."""
    return registry.backend_kernels(backend).segment_sum(x.contiguous(), cu_seqlens.contiguous())


@segment_sum_op.register_fake
def _(x, cu_seqlens, backend):
    return x.new_empty(cu_seqlens.shape[0] - 1, dtype=torch.float32)


class SegmentSumFunction(torch.autograd.Function):
    """Autograd of :func:`segment_sum_op`: the backward is a gather, ``grad_x[t] = grad_y[segment
    of t]`` (plain PyTorch on ``[T]``). An ``autograd.Function`` in the ``forward`` /
    ``setup_context`` style rather than ``register_autograd``, so that ``torch.func`` transforms
    (``grad``, ``vmap``) run it as well as ``torch.compile`` does."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, cu_seqlens: Tensor, backend: str) -> Tensor:
        return segment_sum_op(x, cu_seqlens, backend)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, cu_seqlens, _ = inputs
        ctx.save_for_backward(cu_seqlens)
        ctx.n_tokens = x.shape[0]

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        (cu_seqlens,) = ctx.saved_tensors
        positions = torch.arange(ctx.n_tokens, device=grad_y.device, dtype=cu_seqlens.dtype)
        seg = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
        return grad_y[seg.clamp(max=grad_y.shape[0] - 1)], None, None


def segment_sum(x: Tensor, cu_seqlens: Tensor, backend: str) -> Tensor:
    """``y[b] = sum(x[cu_seqlens[b]:cu_seqlens[b+1]])`` float32 ``[B]`` of ``x [T]``, differentiable
    w.r.t. ``x`` (through :class:`SegmentSumFunction` only when a gradient is needed)."""
    if autograd_needed(x):
        return SegmentSumFunction.apply(x, cu_seqlens, backend)
    return segment_sum_op(x, cu_seqlens, backend)
