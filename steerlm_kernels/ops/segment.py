"""Segment (per-sequence) reductions over packed token vectors.

``segment_sum(x[T], cu_seqlens[B+1]) -> y[B]`` sums the tokens of each packed sequence. It is the
deterministic reduction behind ``sequence_nll(..., cu_seqlens=...)``: no float atomics, each
sequence summed in a fixed order by one program. Its backward is a gather (``grad_x[t] =
grad_y[segment of t]``), plain PyTorch on ``[T]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steerlm_kernels import registry
from steerlm_kernels.ops._triton import tl, triton


@triton.jit
def _segment_sum_kernel(
    x_ptr,  # *fp32 [T]
    cu_ptr,  # *i32/i64 [B + 1]
    y_ptr,  # *fp32 [B] out
    n_tokens,
    BLOCK: tl.constexpr,
):
    """One program = one segment: a BLOCK-wide float32 accumulator swept over the segment, then
    one tree reduction. Bounds are clamped to ``[0, T]`` so that bad offsets never read out of
    bounds. The sum is an O(T) pass over float32 scalars; 1024 lanes (4 warps x 8) keep the loop
    short for typical sequence lengths (hundreds to thousands of tokens)."""
    seg = tl.program_id(0)
    start = tl.load(cu_ptr + seg).to(tl.int64)
    end = tl.load(cu_ptr + seg + 1).to(tl.int64)
    start = tl.minimum(tl.maximum(start, 0), n_tokens)
    end = tl.minimum(tl.maximum(end, start), n_tokens)
    acc = tl.zeros([BLOCK], tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + idx, mask=idx < end, other=0.0).to(tl.float32)
    tl.store(y_ptr + seg, tl.sum(acc, axis=0))


SEGMENT_BLOCK = 1024


def triton_segment_sum(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Triton backend of ``segment_sum``."""
    n_seg = cu_seqlens.shape[0] - 1
    y = torch.empty(n_seg, dtype=torch.float32, device=x.device)
    if n_seg > 0:
        _segment_sum_kernel[(n_seg,)](x, cu_seqlens, y, x.shape[0], BLOCK=SEGMENT_BLOCK, num_warps=4)
    return y


@torch.library.custom_op("steerlm_kernels::segment_sum", mutates_args=())
def segment_sum(x: Tensor, cu_seqlens: Tensor, backend: str) -> Tensor:
    """``y[b] = sum(x[cu_seqlens[b]:cu_seqlens[b+1]])``; ``x [T]`` float32, ``y [B]`` float32."""
    return registry.get(backend).segment_sum(x.contiguous(), cu_seqlens.contiguous())


@segment_sum.register_fake
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


segment_sum.register_autograd(_segment_sum_backward, setup_context=_segment_sum_setup)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs, checked for sm_80 / sm_90 by steerlm_kernels._aot
# --------------------------------------------------------------------------------------------

#: Variants as ``triton_segment_sum`` launches them (BLOCK=SEGMENT_BLOCK, 4 warps): int32 and
#: int64 ``cu_seqlens``, T divisible by 16 or not, and a 64-bit ``n_tokens`` (T >= 2**31).
AOT_SPECS: dict[str, list[dict]] = {
    "_segment_sum_kernel": [
        {
            "signature": {"x_ptr": "*fp32", "cu_ptr": f"*{cu_ty}", "y_ptr": "*fp32", "n_tokens": n_ty,
                          "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": SEGMENT_BLOCK}, "num_warps": 4,
            "divisible_by_16": ["x_ptr", "cu_ptr", "y_ptr"] + (["n_tokens"] if t_div else []),
            "note": f"cu={cu_ty} n_tokens={n_ty}{'' if t_div else ' T%16!=0'}",
        }
        for cu_ty, n_ty, t_div in (("i32", "i32", True), ("i64", "i32", False), ("i32", "i64", True))
    ],
}
