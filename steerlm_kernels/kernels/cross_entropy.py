"""Triton kernels of the token cross entropy, straight from the logits, and their launchers.

Two passes over the ``[N, V]`` logits make the whole logits-in family:

* **forward** (``_ce_forward_kernel``): one read of each row; an online log-sum-exp in float32
  registers and one scalar load of the target logit. Output, float32 ``[N]`` each: the row max
  ``m``, ``lse = log(sum(exp(x - m)))`` relative to it, and the target logit, so
  ``nll = lse - (target - m)``: nothing is ever added to ``m``, so a large common offset of the
  logits costs no precision. Nothing of size ``N x V`` is written.
* **backward** (``_ce_backward_kernel``): one read and one write of each row;
  ``grad = (exp((x - m) - lse) - onehot) * coef`` in float32, rounded once to the logits' dtype.
  ``out`` may be the logits themselves (in place), which saves the second ``N x V`` buffer.

Logit transforms (``softcap`` / ``scale``, the registry contract): a ``TRANSFORM`` constexpr
selects ``z' = cap * tanh(pre * x)`` or ``pre * x`` (applied to every loaded logit, the target
included; the backward multiplies by ``dz'/dx``, in float32 before the rounding). At 0 the
transform is compiled out: the plain kernels are unchanged. ``tanh`` is written from ``tl.exp``
(:func:`tanh_sech2`), which the interpreter runs too.

Rows whose label is ``ignore_index`` are neither read nor differentiated. Both kernels take
``vocab_start``: under tensor (vocabulary) parallelism a rank holds columns
``[vocab_start, vocab_start + V)`` of the full vocabulary and the target logit is loaded only by
the rank that holds it.

:func:`ce_forward` and :func:`ce_backward` are the ``triton`` backend's entries of the backend
contract (:mod:`steerlm_kernels.registry`); the custom ops and autograd live in
:mod:`steerlm_kernels.ops.cross_entropy`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steerlm_kernels.kernels._triton import tl, triton
from steerlm_kernels.kernels.reference import transform_factors

# --------------------------------------------------------------------------------------------
# The logit transform (softcap / logit_scale), shared with the tile kernels
# --------------------------------------------------------------------------------------------

#: ``TRANSFORM`` constexpr values: no transform (the plain kernels, nothing of the transform is
#: compiled in), ``z' = pre * z`` (logit_scale only), ``z' = cap * tanh(pre * z)`` (softcap).
NO_TRANSFORM, SCALE_ONLY, SOFTCAP = 0, 1, 2
#: ``@triton.jit`` functions of this module called from kernels, never launched (see kernels.aot).
DEVICE_FUNCTIONS = ("tanh_sech2", "apply_transform")


def transform_args(softcap: float | None, scale: float | None) -> tuple[float, float, float, int]:
    """``(pre, cap, scale, TRANSFORM)`` kernel arguments of the transform ``softcap`` / ``scale``
    (validated numbers or None): ``z' = cap * tanh(pre * z)`` with ``pre = scale / cap``, slope
    ``scale * sech^2``; or ``z' = pre * z`` with ``pre = scale``; or nothing."""
    pre, cap = transform_factors(softcap, scale)
    kind = NO_TRANSFORM if softcap is None and scale is None else (SCALE_ONLY if softcap is None else SOFTCAP)
    return pre, cap, 1.0 if scale is None else float(scale), kind


@triton.jit
def tanh_sech2(y):
    """``(tanh(y), 1 - tanh(y)^2)`` in float32 from ``tl.exp`` alone (libdevice's tanh is not
    available under the interpreter): with ``e = exp(-2|y|)`` (never overflows),
    ``tanh|y| = (1 - e) / (1 + e)`` and ``sech^2 y = 4e / (1 + e)^2`` (no cancellation, exact to a
    few ulps as ``|y|`` grows and ``tanh`` saturates). Below ``|y| = 0.2`` the odd Taylor series to
    ``y^7`` replaces ``1 - e`` (which cancels there); its truncation is under one float32 ulp.
    NaN gives NaN; ``+-inf`` gives ``+-1`` and 0."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    one_e = 1.0 + e
    t = (1.0 - e) / one_e
    a2 = a * a
    series = a + a * a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * -0.05396825396825397))
    t = tl.where(a < 0.2, series, t)
    t = tl.where(y < 0.0, -t, t)
    return t, (4.0 * e) / (one_e * one_e)


@triton.jit
def apply_transform(x, pre, cap, TRANSFORM: tl.constexpr):
    """``z'`` of float32 logits ``x`` (see :func:`transform_args`); identity for ``NO_TRANSFORM``."""
    if TRANSFORM == 1:
        x = x * pre
    elif TRANSFORM == 2:
        t, _ = tanh_sech2(x * pre)
        x = cap * t
    return x


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _ce_forward_kernel(
    logits_ptr,  # *bf16/fp16/fp32 [N, V], unit column stride
    labels_ptr,  # *i32/i64 [N]
    max_ptr,  # *fp32 [N] out: the row max m (0 for a row of -inf only)
    lse_ptr,  # *fp32 [N] out: log(sum(exp(x - m))), relative to m
    target_ptr,  # *fp32 [N] out: the target logit itself
    n_cols,  # V of this shard
    stride_row,  # elements between rows (i64 when N*V may pass 2**31)
    vocab_start,  # first global column of this shard
    ignore_index,
    pre,  # fp32: the transform's factor inside (see transform_args; unused for TRANSFORM == 0)
    cap,  # fp32: the softcap (TRANSFORM == 2)
    BLOCK_V: tl.constexpr,
    TRANSFORM: tl.constexpr,  # NO_TRANSFORM / SCALE_ONLY / SOFTCAP
):
    """One program = one row. Stream the row in BLOCK_V-wide tiles, keeping a running max ``m``
    and a running sum ``s = sum(exp(x - m))`` in float32 registers (one exp per element: the
    tile max is taken first, then the old sum is rescaled once per tile).

    The results stay relative to the max: ``m``, ``log s`` and the target logit are stored
    separately and never added (``m + log s`` would round away ``log s`` when ``|m|`` is large:
    at ``m = 1e8`` a float32 ulp is 8). A row of ``-inf`` only has ``s = 0``: its reference point
    is 0 instead of ``-inf`` (no ``-inf - -inf``), so it gives ``log s = -inf``, which a
    vocabulary-parallel combine weighs as nothing.

    Why one row per program: training batches have N = B*S in the thousands, enough programs to
    fill every SM, and a row needs no cross-program communication, so the result is
    deterministic and the logits are read exactly once. BLOCK_V (up to 8192) is the widest tile
    that keeps 16 float32 values per thread at 16 warps: wide enough to issue several 16-byte
    loads per thread per iteration, small enough to never spill.
    """
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride_row may pass 2**31
    label = tl.load(labels_ptr + row).to(tl.int64)
    active = label != ignore_index
    row_ptr = logits_ptr + row * stride_row
    n_read = tl.where(active, n_cols, 0)  # ignored rows are never read

    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for start in range(0, n_read, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        if TRANSFORM != 0:  # the padding must stay -inf (a softcap would map it to -cap)
            x = tl.where(cols < n_cols, apply_transform(x, pre, cap, TRANSFORM), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # -inf so far: s stays 0, no NaN
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)

    local = label - vocab_start
    in_shard = active & (local >= 0) & (local < n_cols)
    target = tl.load(row_ptr + local, mask=in_shard, other=0.0).to(tl.float32)
    if TRANSFORM != 0:
        target = tl.where(in_shard, apply_transform(target, pre, cap, TRANSFORM), 0.0)
    tl.store(max_ptr + row, tl.where(active, m, 0.0))
    tl.store(lse_ptr + row, tl.where(active, tl.log(s), 0.0))
    tl.store(target_ptr + row, target)


@triton.jit
def _ce_backward_kernel(
    logits_ptr,  # *bf16/fp16/fp32 [N, V] in
    grad_ptr,  # same dtype [N, V] out; may equal logits_ptr (in place)
    labels_ptr,  # *i32/i64 [N]
    max_ptr,  # *fp32 [N]: the reference point m of each row
    lse_ptr,  # *fp32 [N]: log(sum(exp(x - m)))
    coef_ptr,  # *fp32 [N]: d loss / d nll of each token
    n_cols,
    stride_row,
    grad_stride_row,
    vocab_start,
    ignore_index,
    pre,  # fp32: see the forward kernel
    cap,  # fp32
    scale,  # fp32: the slope's factor (TRANSFORM == 2)
    BLOCK_V: tl.constexpr,
    TRANSFORM: tl.constexpr,
):
    """One program = one row: ``grad = (exp((x - m) - lse) - onehot(label)) * coef``, ``x`` the
    transformed logits, times ``dx/dz`` (``pre``, or ``scale * sech^2`` under a softcap) when a
    transform is compiled in.

    ``x - m`` is exact for the logits that matter (Sterbenz), so a large common offset costs no
    precision. Each tile is loaded, turned into its gradient in float32 and stored at once, so the in-place
    variant is safe (a thread overwrites only the elements it has just read). The target
    column's ``p - 1`` is formed in float32 before the single rounding to the output dtype.
    Rows with ``coef == 0`` (masked, ignored or zero-weight tokens) skip the load and write
    zeros. Same tile width as the forward, for the same reason.
    """
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    coef = tl.load(coef_ptr + row)
    coef = tl.where(label == ignore_index, 0.0, coef)
    m = tl.load(max_ptr + row)
    lse = tl.load(lse_ptr + row)
    n_read = tl.where(coef != 0.0, n_cols, 0)  # dead rows: write zeros, read nothing
    local = label - vocab_start
    in_ptr = logits_ptr + row * stride_row
    out_ptr = grad_ptr + row * grad_stride_row
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        live = cols < n_read
        x = tl.load(in_ptr + cols, mask=live, other=float("-inf")).to(tl.float32)
        if TRANSFORM == 1:
            x = x * pre
        elif TRANSFORM == 2:
            t, sech2 = tanh_sech2(x * pre)
            x = cap * t
        p = tl.exp((x - m) - lse)
        g = (p - tl.where(cols == local, 1.0, 0.0)) * coef
        if TRANSFORM == 1:
            g = g * pre
        elif TRANSFORM == 2:
            g = g * (scale * sech2)
        g = tl.where(live, g, 0.0)
        tl.store(out_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < n_cols)


def launch_config(n_cols: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for rows of ``n_cols`` logits: tiles of at most 8192 elements,
    16 float32 values per thread at the widest."""
    block = min(triton.next_power_of_2(max(n_cols, 1)), 8192)
    num_warps = max(1, min(16, block // 512))
    return block, num_warps


def ce_forward(logits: Tensor, labels: Tensor, vocab_start: int, ignore_index: int, softcap: float | None = None,
               scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(m[N], lse[N], target[N])`` float32 of ``logits [N, V]`` (see :mod:`steerlm_kernels.registry`)."""
    n_rows, n_cols = logits.shape
    m, lse, target = (torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    if n_rows == 0:
        return m, lse, target
    block, num_warps = launch_config(n_cols)
    pre, cap, _, kind = transform_args(softcap, scale)
    _ce_forward_kernel[(n_rows,)](
        logits, labels, m, lse, target, n_cols, logits.stride(0), vocab_start, ignore_index, pre, cap,
        BLOCK_V=block, TRANSFORM=kind, num_warps=num_warps,
    )
    return m, lse, target


def ce_backward(
    logits: Tensor, labels: Tensor, m: Tensor, lse: Tensor, coef: Tensor, vocab_start: int, ignore_index: int,
    out: Tensor, softcap: float | None = None, scale: float | None = None,
) -> None:
    """``out = (exp((logits - m) - lse) - onehot) * coef`` row by row; ``out`` may be ``logits`` (in place)."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block, num_warps = launch_config(n_cols)
    pre, cap, slope, kind = transform_args(softcap, scale)
    _ce_backward_kernel[(n_rows,)](
        logits, out, labels, m, lse, coef, n_cols, logits.stride(0), out.stride(0), vocab_start, ignore_index,
        pre, cap, slope, BLOCK_V=block, TRANSFORM=kind, num_warps=num_warps,
    )


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs, checked for sm_80 / sm_90 by steerlm_kernels.kernels.aot
# --------------------------------------------------------------------------------------------


def _ce_aot_variants(backward: bool) -> list[dict]:
    """Compile variants of one CE kernel, as the runtime specialises its launches.

    Types and 16-divisibility mirror what Triton's launcher derives from the arguments: torch
    allocations are 16-byte aligned, ``vocab_start=0`` divides by 16, ``ignore_index=-100`` does
    not; V=128256 (divisible) and V=1000 (not) at their ``launch_config``. Ints are i32 unless the
    value passes 2**31, so one variant takes 64-bit row strides; one takes int32 labels.
    """
    cases = [(dt, "i64", n, "i32", NO_TRANSFORM) for dt in ("bf16", "fp16", "fp32") for n in (128256, 1000)]
    cases += [("bf16", "i32", 128256, "i32", NO_TRANSFORM), ("bf16", "i64", 128256, "i64", NO_TRANSFORM)]
    # the transform variants (softcap: Gemma's 256k vocabulary is a multiple of 16; logit_scale)
    cases += [(dt, "i64", 256000, "i32", SOFTCAP) for dt in ("bf16", "fp16", "fp32")]
    cases += [("bf16", "i64", 1000, "i32", SOFTCAP), ("bf16", "i64", 256000, "i32", SCALE_ONLY),
              ("fp32", "i64", 1000, "i32", SCALE_ONLY)]
    variants = []
    for dt, label_ty, n_cols, stride_ty, kind in cases:
        block, num_warps = launch_config(n_cols)
        strides = {"stride_row": stride_ty} | ({"grad_stride_row": stride_ty} if backward else {})
        signature = (
            {"logits_ptr": f"*{dt}"}
            | ({"grad_ptr": f"*{dt}"} if backward else {})
            | {"labels_ptr": f"*{label_ty}", "max_ptr": "*fp32", "lse_ptr": "*fp32"}
            | ({"coef_ptr": "*fp32"} if backward else {"target_ptr": "*fp32"})
            | {"n_cols": "i32"}
            | strides
            | {"vocab_start": "i32", "ignore_index": "i32", "pre": "fp32", "cap": "fp32"}
            | ({"scale": "fp32"} if backward else {})
            | {"BLOCK_V": "constexpr", "TRANSFORM": "constexpr"}
        )
        divisible = [k for k in signature if k.endswith("_ptr")] + list(strides) + ["vocab_start"]
        if n_cols % 16 == 0:
            divisible.append("n_cols")
        else:
            divisible = [k for k in divisible if k not in strides]  # contiguous rows: stride == V
        variants.append({
            "signature": signature, "constexprs": {"BLOCK_V": block, "TRANSFORM": kind}, "num_warps": num_warps,
            "divisible_by_16": divisible,
            "note": f"V={n_cols} labels={label_ty} stride={stride_ty}" + ("", " scale", " softcap")[kind],
        })
    return variants


AOT_SPECS: dict[str, list[dict]] = {
    "_ce_forward_kernel": _ce_aot_variants(backward=False),
    "_ce_backward_kernel": _ce_aot_variants(backward=True),
}
