"""Triton tile kernels of the fused linear cross entropy, and their launchers.

Tiles of ``BLOCK_N`` rows x ``BLOCK_V`` vocabulary columns of ``logits = hidden @ lm_head_weight.T
(+ bias)`` live in registers, so not even a chunk of logits is held (``O(N)`` extra memory). This
is the ``tiles`` strategy of the fused linear ops (Triton only, opt-in:
``STEERLM_KERNELS_LINEAR=tiles``; see :func:`steerlm_kernels.registry.linear_strategy`); the
default strategy, chunks of rows through library GEMMs, is :mod:`steerlm_kernels.ops.linear_chunks`.

- forward (``_lce_forward_kernel``): a program owns ``BLOCK_N`` rows and one contiguous split of
  the vocabulary; it builds each logits tile with ``tl.dot`` over ``BLOCK_H``-wide slices of the
  hidden dimension and folds it into a running per-row (max, sum-of-exp), picking the target
  logit out of the tile that holds it. Each program writes one partial ``(m, log s)`` per row
  (its split's max and log-sum-exp relative to it, never added: no precision lost to a large
  common offset) into two small ``[n_splits, N]`` float32 buffers; the partials are merged
  afterwards over the splits (:func:`steerlm_kernels.kernels.reference.merge_stats`: a fixed
  order, deterministic, no float atomics on the result).
- backward (``_lce_backward_kernel``): a program recomputes one ``[BLOCK_N, BLOCK_V]`` tile,
  forms ``g = (exp((x - m) - lse) - onehot) * coef`` in float32 and adds ``g @ W_tile`` into a float32
  ``grad_hidden`` and ``g.T @ h_tile`` into a float32 ``grad_lm_head`` with atomic adds (and the
  column sums of ``g`` into ``grad_bias``). **The gradients are therefore not bitwise
  deterministic** (float32 addition order varies between runs; the values agree to float32
  rounding). The forward values are deterministic.

Both kernels apply the logit transform (``softcap`` / ``scale``) to each logits tile when their
``TRANSFORM`` constexpr asks for it (compiled out otherwise), as the CE kernels do
(:mod:`steerlm_kernels.kernels.cross_entropy`).

Why chunks are the default on CUDA (a byte / FLOP model, not yet a measurement: ``steerlm-kernels
bench --sections linear`` on a GPU times both, rows ``triton`` and ``triton-tiles``): the tile
backward adds each ``[BLOCK_N, H]`` slice of ``grad_hidden`` once per vocabulary tile and each
``[BLOCK_V, H]`` slice of ``grad_lm_head`` once per row tile, ``4·N·V·H·(1/BLOCK_V + 1/BLOCK_N)``
bytes of float32 atomic adds: ~400 GB at N=8192, V=128256, H=4096 (>= 130 ms even at 3 TB/s),
against ~26 TFLOP for the three GEMMs (~40 ms on an H100).
"""

from __future__ import annotations

import torch
from torch import Tensor

from steerlm_kernels.kernels._triton import interpreting, tl, triton
from steerlm_kernels.kernels.cross_entropy import (
    NO_TRANSFORM,
    SCALE_ONLY,
    SOFTCAP,
    apply_transform,
    tanh_sech2,
    transform_args,
)
from steerlm_kernels.kernels.reference import merge_stats

# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _lce_forward_kernel(
    h_ptr,  # *bf16/fp16/fp32 [N, H], unit column stride
    lm_head_ptr,  # same dtype [V, H], unit column stride
    b_ptr,  # same dtype [V] (unused unless HAS_BIAS)
    labels_ptr,  # *i32/i64 [N]
    part_m_ptr,  # *fp32 [n_splits, N] out: each row's max over each split (0 if all -inf)
    part_s_ptr,  # *fp32 [n_splits, N] out: log(sum(exp(x - m))) of each row over each split
    target_ptr,  # *fp32 [N] in/out (zero-initialised): the target logit, written by the split holding it
    n_rows,
    n_vocab,
    n_hidden,
    stride_h,  # elements between rows of hidden
    stride_lm_head,  # elements between rows of lm_head_weight
    cols_per_split,  # a multiple of BLOCK_V
    ignore_index,
    pre,  # fp32: the logit transform's inner factor (kernels.cross_entropy.transform_args)
    cap,  # fp32: the softcap (TRANSFORM == 2)
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision for float32 operands ("ieee" / "tf32")
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TRANSFORM: tl.constexpr,  # NO_TRANSFORM / SCALE_ONLY / SOFTCAP (compiled out when 0)
):
    """One program = ``BLOCK_N`` rows x one split of the vocabulary (``cols_per_split`` columns).

    For each ``BLOCK_V``-wide tile of the split it computes the logits tile
    ``h[rows, :] @ W[cols, :].T`` with ``tl.dot`` over ``BLOCK_H`` slices of the hidden dimension
    (float32 accumulator in registers), adds the bias, and folds the tile into a running per-row
    max ``m`` and sum ``s = sum(exp(x - m))``: the logits never leave the chip. Its result is one
    partial ``(m, log s)`` per row, merged over the splits afterwards (deterministic).

    Why this shape: a ``[64, 128]`` float32 accumulator is 32 registers per thread at 8 warps,
    large enough for tensor-core ``tl.dot`` (every dim >= 16) and small enough not to spill; the
    hidden tile ``[64, BLOCK_H]`` is re-read from L2 for every vocabulary tile, which costs far
    less than writing the logits. Splitting the vocabulary over programs keeps every SM busy when
    ``N`` is small; the partial buffer is ``n_splits x N`` floats, not ``N x V``.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # 64-bit: rows * stride may pass 2**31
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    active = row_ok & (labels != ignore_index)
    # A block of ignored rows (a masked prompt) computes nothing: the loop over H is empty.
    n_k = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, n_hidden, 0)

    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, n_vocab)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, n_k, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < n_hidden
            a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(
                lm_head_ptr + cols[None, :].to(tl.int64) * stride_lm_head + ks[:, None],
                mask=col_ok[None, :] & k_ok[:, None], other=0.0,
            )  # [BLOCK_H, BLOCK_V]: a tile of W.T
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if TRANSFORM != 0:
            acc = apply_transform(acc, pre, cap, TRANSFORM)
        x = tl.where(col_ok[None, :], acc, float("-inf"))

        # target logit: exactly one tile of one split holds it (no race, no atomics)
        hit = cols[None, :] == labels[:, None]
        t = tl.sum(tl.where(hit, x, 0.0), axis=1)
        here = active & (labels >= v0) & (labels < v0 + BLOCK_V) & (labels < v_end)
        tl.store(target_ptr + rows, t, mask=here)

        m_new = tl.maximum(m, tl.max(x, axis=1))
        # rows whose logits are all -inf so far (e.g. a -inf bias) keep s = 0 instead of NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), axis=1)
        m = m_new
    part = pid_s.to(tl.int64) * n_rows + rows
    tl.store(part_m_ptr + part, tl.where(m == float("-inf"), 0.0, m), mask=row_ok)
    tl.store(part_s_ptr + part, tl.log(s), mask=row_ok)


@triton.jit
def _lce_backward_kernel(
    h_ptr,  # *bf16/fp16/fp32 [N, H]
    lm_head_ptr,  # same dtype [V, H]
    b_ptr,  # same dtype [V] (unused unless HAS_BIAS)
    labels_ptr,  # *i32/i64 [N]
    max_ptr,  # *fp32 [N]: the row max m
    lse_ptr,  # *fp32 [N]: log(sum(exp(x - m)))
    coef_ptr,  # *fp32 [N]: d loss / d nll of each row
    gh_ptr,  # *fp32 [N, H] accumulator (contiguous), unused unless GRAD_H
    glm_ptr,  # *fp32 [V, H] accumulator (contiguous), unused unless GRAD_LM
    gb_ptr,  # *fp32 [V] accumulator, unused unless GRAD_B
    n_rows,
    n_vocab,
    n_hidden,
    stride_h,
    stride_lm_head,
    ignore_index,
    pre,  # fp32: see the forward kernel
    cap,  # fp32
    scale,  # fp32: the slope's factor under a softcap
    HAS_BIAS: tl.constexpr,
    GRAD_H: tl.constexpr,
    GRAD_LM: tl.constexpr,
    GRAD_B: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TRANSFORM: tl.constexpr,
):
    """One program = one ``[BLOCK_N rows, BLOCK_V columns]`` tile of the logits' gradient.

    It recomputes the logits tile (``tl.dot`` over H, as the forward), forms
    ``g = (exp((x - m) - lse) - onehot(label)) * coef`` in float32 (the target column's ``p - 1`` is
    never rounded before the scaling), then sweeps H once more in ``BLOCK_H`` slices:
    ``grad_hidden[rows, ks] += g @ W[cols, ks]`` and ``grad_lm_head[cols, ks] += g.T @ h[rows, ks]``
    with float32 atomic adds (other tiles of the same rows / columns add into the same places, so
    the summation order, hence the last bits, vary between runs). ``g`` enters those dots in the
    operands' dtype (bf16/fp16 tensor cores, as an unfused backward would hold the logits'
    gradient), accumulating in float32.

    A tile whose rows all have ``coef == 0`` or an ignored label (a masked prompt, a zero-weight
    response) does no work at all. Same tile shape as the forward, for the same reasons; the
    operand tiles of the second sweep come from L2 (the first sweep just read them).
    """
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < n_vocab
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    live = row_ok & (labels != ignore_index) & (coef != 0.0)
    coef = tl.where(live, coef, 0.0)
    any_live = tl.max(live.to(tl.int32), axis=0) > 0
    n_k = tl.where(any_live, n_hidden, 0)

    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, n_k, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < n_hidden
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(lm_head_ptr + cols[None, :] * stride_lm_head + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    m = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    if TRANSFORM == 1:
        acc = acc * pre
    elif TRANSFORM == 2:
        t, sech2 = tanh_sech2(acc * pre)
        acc = cap * t
    p = tl.exp((acc - m[:, None]) - lse[:, None])
    g = (p - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)) * coef[:, None]
    if TRANSFORM == 1:
        g = g * pre
    elif TRANSFORM == 2:
        g = g * (scale * sech2)  # d z'/d z, in float32 before the one rounding below
    g = tl.where(live[:, None] & col_ok[None, :], g, 0.0)  # dead rows are exactly 0, even with NaN logits

    if GRAD_B:
        tl.atomic_add(gb_ptr + cols, tl.sum(g, axis=0), mask=col_ok & (tl.zeros([BLOCK_V], tl.int32) + n_k > 0))
    gq = g.to(h_ptr.dtype.element_ty)
    # Two sweeps rather than one: only one [*, BLOCK_H] product is live at a time (no spills).
    if GRAD_H:
        for k0 in range(0, n_k, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < n_hidden
            w_t = tl.load(lm_head_ptr + cols[:, None] * stride_lm_head + ks[None, :],
                          mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_V, BLOCK_H]
            dh = tl.dot(gq, w_t, input_precision=PRECISION)  # [BLOCK_N, BLOCK_H]
            tl.atomic_add(gh_ptr + rows[:, None] * n_hidden + ks[None, :], dh, mask=row_ok[:, None] & k_ok[None, :])
    if GRAD_LM:
        for k0 in range(0, n_k, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < n_hidden
            h_t = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                          other=0.0)  # [BLOCK_N, BLOCK_H]
            dw = tl.dot(tl.trans(gq), h_t, input_precision=PRECISION)  # [BLOCK_V, BLOCK_H]
            tl.atomic_add(glm_ptr + cols[:, None] * n_hidden + ks[None, :], dw, mask=col_ok[:, None] & k_ok[None, :])


#: Tile shape of both kernels, (BLOCK_N, BLOCK_V, BLOCK_H, num_warps), by operand dtype. bf16 /
#: fp16 feed tensor cores with [64, 128] tiles; float32 operands with exact ("ieee") products are
#: multiplied on the FMA units, whose operand fragments live in registers: smaller tiles, and 4
#: warps: at 8 warps triton 3.6 gives the fp32 backward an 8-byte stack frame on sm_80 (64x64x16
#: down to 32x32x16 tiles all spill somewhere at 8 warps there); 64x64x16 at 4 warps compiles
#: without spills for sm_80 and sm_90 on triton 3.6 and 3.9 alike (~170-210 registers per thread),
#: which ``tests/test_kernels_aot.py`` checks on both CI stacks.
TRITON_BLOCKS: dict[str, tuple[int, int, int, int]] = {
    "bf16": (64, 128, 64, 8),
    "fp16": (64, 128, 64, 8),
    "fp32": (64, 64, 16, 4),
}
#: The float32 backward tiles under a softcap: the slope keeps a second [BLOCK_N, BLOCK_V] float32
#: tile live, which at 64x64 spills on sm_80 (16-byte stack, triton 3.9); 32x64 does not (the
#: forward keeps 64x64: at 32x64 it is ptxas that spills, on sm_90).
SOFTCAP_FP32_BLOCKS: tuple[int, int, int, int] = (32, 64, 16, 4)
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def tile_blocks(dtype_name: str, kind: int, backward: bool) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_V, BLOCK_H, num_warps)`` of a tile kernel for operands of ``dtype_name``
    under the logit transform ``kind``: :data:`TRITON_BLOCKS`, except the float32 backward with a
    softcap (:data:`SOFTCAP_FP32_BLOCKS`)."""
    if backward and dtype_name == "fp32" and kind == SOFTCAP:
        return SOFTCAP_FP32_BLOCKS
    return TRITON_BLOCKS[dtype_name]
#: Programs the forward aims for (rows blocks x vocabulary splits): several waves on an H100.
TARGET_PROGRAMS = 1024


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision of float32 operands: TF32 only where torch itself allows it for
    matmuls (``torch.backends.cuda.matmul.allow_tf32``), else exact IEEE float32. Ignored by
    Triton for bf16/fp16 operands."""
    if dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _row_major(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def linear_ce_forward(
    hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
    softcap: float | None = None, scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(m[N], lse[N], target[N])`` float32 with the Triton kernel (the backend contract's
    ``ce_forward`` of the logits ``hidden @ lm_head_weight.T + bias``); ignored rows give 0 / 0 / 0."""
    hidden, lm_head_weight = _row_major(hidden), _row_major(lm_head_weight)
    n_rows, n_hidden = hidden.shape
    n_vocab = lm_head_weight.shape[0]
    target = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
    if n_rows == 0:
        return target.clone(), target.clone(), target
    pre, cap, _, kind = transform_args(softcap, scale)
    block_n, block_v, block_h, num_warps = tile_blocks(_DTYPE_NAMES[hidden.dtype], kind, backward=False)
    row_blocks = triton.cdiv(n_rows, block_n)
    v_blocks = triton.cdiv(n_vocab, block_v)
    n_splits = max(1, min(v_blocks, triton.cdiv(TARGET_PROGRAMS, row_blocks)))
    cols_per_split = triton.cdiv(v_blocks, n_splits) * block_v
    n_splits = triton.cdiv(n_vocab, cols_per_split)
    part_m = torch.empty(n_splits, n_rows, dtype=torch.float32, device=hidden.device)
    part_s = torch.empty_like(part_m)
    _lce_forward_kernel[(row_blocks, n_splits)](
        hidden, lm_head_weight, lm_head_weight if bias is None else bias, labels, part_m, part_s, target,
        n_rows, n_vocab, n_hidden, hidden.stride(0), lm_head_weight.stride(0), cols_per_split, ignore_index,
        pre, cap, HAS_BIAS=bias is not None, PRECISION=_precision(hidden.dtype),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, TRANSFORM=kind, num_warps=num_warps,
    )
    m, lse = (part_m[0], part_s[0]) if n_splits == 1 else merge_stats(part_m, part_s)
    active = labels != ignore_index
    return torch.where(active, m, 0.0), torch.where(active, lse, 0.0), target


def linear_ce_backward(
    hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None, labels: Tensor, m: Tensor, lse: Tensor,
    coef: Tensor, ignore_index: int, need_h: bool, need_lm: bool, need_b: bool,
    softcap: float | None = None, scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """float32 gradient accumulators ``(grad_hidden [N, H], grad_lm_head [V, H], grad_bias [V])``
    of ``sum(coef * nll)`` from the forward's ``(m, lse)`` (``[0]`` where not needed)."""
    hidden, lm_head_weight = _row_major(hidden), _row_major(lm_head_weight)
    n_rows, n_hidden = hidden.shape
    n_vocab = lm_head_weight.shape[0]
    dev = hidden.device
    need_b = need_b and bias is not None
    gh = torch.zeros((n_rows, n_hidden) if need_h else (0,), dtype=torch.float32, device=dev)
    glm = torch.zeros((n_vocab, n_hidden) if need_lm else (0,), dtype=torch.float32, device=dev)
    gb = torch.zeros((n_vocab,) if need_b else (0,), dtype=torch.float32, device=dev)
    if n_rows == 0 or not (need_h or need_lm or need_b):
        return gh, glm, gb
    pre, cap, slope, kind = transform_args(softcap, scale)
    block_n, block_v, block_h, num_warps = tile_blocks(_DTYPE_NAMES[hidden.dtype], kind, backward=True)
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(n_vocab, block_v))
    _lce_backward_kernel[grid](
        hidden, lm_head_weight, lm_head_weight if bias is None else bias, labels, m, lse, coef.float().contiguous(),
        gh, glm, gb,
        n_rows, n_vocab, n_hidden, hidden.stride(0), lm_head_weight.stride(0), ignore_index, pre, cap, slope,
        HAS_BIAS=bias is not None, GRAD_H=need_h, GRAD_LM=need_lm, GRAD_B=need_b,
        PRECISION=_precision(hidden.dtype), BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, TRANSFORM=kind,
        num_warps=num_warps,
    )
    return gh, glm, gb


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs, checked for sm_80 / sm_90 by steerlm_kernels.kernels.aot
# --------------------------------------------------------------------------------------------


def _lce_aot_variants(backward: bool) -> list[dict]:
    """Compile variants at the default tile shape, one per dtype (plus int32 labels and a
    no-bias / hidden-gradient-only backward). H=4096 and V=128256 are multiples of 16, so sizes
    and row strides are marked 16-divisible as the launcher would; ``ignore_index=-100`` is not."""
    cases = [(dt, "i64", True, (True, True, True), NO_TRANSFORM) for dt in ("bf16", "fp16", "fp32")]
    cases += [("bf16", "i32", False, (True, True, False), NO_TRANSFORM)]
    if backward:
        cases += [("bf16", "i64", False, (True, False, False), NO_TRANSFORM)]
    # the logit transforms (softcap: Gemma; logit_scale: Cohere / Granite)
    # (fp32 with a bias: the fp32 forward WITHOUT one has a 24-byte stack frame on sm_80 with triton
    # 3.9, with or without a transform; it predates the transforms)
    cases += [(dt, "i64", dt == "fp32", (True, True, dt == "fp32"), SOFTCAP) for dt in ("bf16", "fp16", "fp32")]
    cases += [("bf16", "i64", True, (True, True, True), SCALE_ONLY)]
    variants = []
    for dt, label_ty, has_bias, (gh, glm, gb), kind in cases:
        block_n, block_v, block_h, num_warps = tile_blocks(dt, kind, backward)
        sig = {"h_ptr": f"*{dt}", "lm_head_ptr": f"*{dt}", "b_ptr": f"*{dt}", "labels_ptr": f"*{label_ty}"}
        if backward:
            sig |= {"max_ptr": "*fp32", "lse_ptr": "*fp32", "coef_ptr": "*fp32", "gh_ptr": "*fp32", "glm_ptr": "*fp32",
                    "gb_ptr": "*fp32"}
        else:
            sig |= {"part_m_ptr": "*fp32", "part_s_ptr": "*fp32", "target_ptr": "*fp32"}
        sig |= {"n_rows": "i32", "n_vocab": "i32", "n_hidden": "i32", "stride_h": "i32", "stride_lm_head": "i32"}
        sig |= {} if backward else {"cols_per_split": "i32"}
        sig |= {"ignore_index": "i32", "pre": "fp32", "cap": "fp32"} | ({"scale": "fp32"} if backward else {})
        sig |= {"HAS_BIAS": "constexpr"}
        constexprs: dict = {"HAS_BIAS": has_bias}
        if backward:
            sig |= {"GRAD_H": "constexpr", "GRAD_LM": "constexpr", "GRAD_B": "constexpr"}
            constexprs |= {"GRAD_H": gh, "GRAD_LM": glm, "GRAD_B": gb and has_bias}
        sig |= {"PRECISION": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_H": "constexpr",
                "TRANSFORM": "constexpr"}
        constexprs |= {"PRECISION": "ieee" if dt == "fp32" else "tf32", "BLOCK_N": block_n, "BLOCK_V": block_v,
                       "BLOCK_H": block_h, "TRANSFORM": kind}
        divisible = [k for k in sig if k.endswith("_ptr")] + ["n_vocab", "n_hidden", "stride_h", "stride_lm_head"]
        divisible += [] if backward else ["cols_per_split"]
        variants.append({
            "signature": sig, "constexprs": constexprs, "num_warps": num_warps, "divisible_by_16": divisible,
            "note": f"labels={label_ty} bias={has_bias}" + (f" grads(h,w,b)={gh:d}{glm:d}{gb and has_bias:d}"
                                                              if backward else "")
            + ("", " scale", " softcap")[kind],
        })
    return variants


AOT_SPECS: dict[str, list[dict]] = {
    "_lce_forward_kernel": _lce_aot_variants(backward=False),
    "_lce_backward_kernel": _lce_aot_variants(backward=True),
}
