"""Triton kernel of the segment (per-sequence) sum over packed token vectors, and its launcher.

``segment_sum(x[T], cu_seqlens[B+1]) -> y[B]`` sums the tokens of each packed sequence: the
deterministic reduction behind ``sequence_nll(..., cu_seqlens=...)`` (no float atomics, each
sequence summed in a fixed order by one program). The custom op and its backward live in
:mod:`steerlm_kernels.ops.segment`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steerlm_kernels.kernels._triton import tl, triton


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


def segment_sum(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """``y[b] = sum(x[cu_seqlens[b]:cu_seqlens[b+1]])`` float32 (see :mod:`steerlm_kernels.registry`)."""
    n_seg = cu_seqlens.shape[0] - 1
    y = torch.empty(n_seg, dtype=torch.float32, device=x.device)
    if n_seg > 0:
        _segment_sum_kernel[(n_seg,)](x, cu_seqlens, y, x.shape[0], BLOCK=SEGMENT_BLOCK, num_warps=4)
    return y


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs, checked for sm_80 / sm_90 by steerlm_kernels.kernels.aot
# --------------------------------------------------------------------------------------------

#: Variants as ``segment_sum`` launches them (BLOCK=SEGMENT_BLOCK, 4 warps): int32 and
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
