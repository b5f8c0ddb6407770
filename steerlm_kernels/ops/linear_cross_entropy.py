"""Fused linear cross entropy: token NLL straight from hidden states, never holding ``[N, V]`` logits.

``logits = hidden @ weight.T (+ bias)`` is only ever formed a piece at a time, in one of two ways
(chosen once per call by :func:`steerlm_kernels.registry.linear_strategy`, and carried to the ops
as ``chunk_rows``: :data:`TILES` selects the tile kernels):

* **chunks** (every backend, the default): chunks of rows. For a chunk,
  ``logits_c = hidden_c @ W.T (+ bias)`` in one library GEMM (cuBLAS on CUDA; bfloat16 / float32
  matmuls with float32 accumulation; float16 is computed in float32 on CPU, where float16 matmuls
  are extremely slow), then the CE primitives of the backend (:mod:`steerlm_kernels.registry`
  ``ce_forward`` / ``ce_backward``, the latter in place in the chunk buffer: the Triton kernels on
  CUDA, the C++ ones on CPU), then ``grad_hidden_c = g @ W`` and ``grad_W += g.T @ hidden_c``
  (accumulated in float32 across chunks). On CPU, rows whose label is ignored (the public API
  turns masked tokens into ignored ones) are dropped before the matmuls. The chunk holds at most
  ``chunk_rows x V`` logits (:func:`default_chunk_rows`), never ``N x V``. Forward + gradient
  cost exactly three GEMMs plus three passes over the chunk; the result is deterministic.

* **tiles** (Triton only, opt-in: ``STEERLM_KERNELS_LINEAR=tiles``; CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1``): tiles of ``BLOCK_N`` rows x ``BLOCK_V`` vocabulary columns live in
  registers, so not even a chunk of logits is held (``O(N)`` extra memory).

  - forward (``_lce_forward_kernel``): a program owns ``BLOCK_N`` rows and one contiguous split of
    the vocabulary; it builds each logits tile with ``tl.dot`` over ``BLOCK_H``-wide slices of the
    hidden dimension and folds it into a running per-row (max, sum-of-exp), picking the target
    logit out of the tile that holds it. Each program writes one partial log-sum-exp per row into
    a small ``[n_splits, N]`` float32 buffer; the partials are merged afterwards by one
    ``logsumexp`` over the splits (a fixed order: deterministic, no float atomics on the result).
  - backward (``_lce_backward_kernel``): a program recomputes one ``[BLOCK_N, BLOCK_V]`` tile,
    forms ``g = (softmax - onehot) * coef`` in float32 and adds ``g @ W_tile`` into a float32
    ``grad_hidden`` and ``g.T @ h_tile`` into a float32 ``grad_weight`` with atomic adds (and the
    column sums of ``g`` into ``grad_bias``). **The gradients are therefore not bitwise
    deterministic** (float32 addition order varies between runs; the values agree to float32
    rounding). The forward values are deterministic.

  Why chunks are the default on CUDA (a byte / FLOP model, not yet a measurement: ``steerlm-kernels
  bench --sections linear`` on a GPU times both, rows ``triton`` and ``triton-tiles``): the tile
  backward adds each ``[BLOCK_N, H]`` slice of ``grad_hidden`` once per vocabulary tile and each
  ``[BLOCK_V, H]`` slice of ``grad_weight`` once per row tile, ``4·N·V·H·(1/BLOCK_V + 1/BLOCK_N)``
  bytes of float32 atomic adds: ~400 GB at N=8192, V=128256, H=4096 (>= 130 ms even at 3 TB/s),
  against ~26 TFLOP for the three GEMMs (~40 ms on an H100). The chunked path adds three passes
  over ``[N, V]`` bf16 (~6 GB, ~2 ms) and one ``[V, H]`` float32 accumulation per chunk beyond the
  first (:data:`CUDA_MIN_CHUNK_ROWS`).

Three ops, registered with ``torch.library`` (opaque to ``torch.compile``):

``linear_ce_forward(hidden, weight, bias, labels, ...) -> (lse[N], target[N])``
    float32; ``nll = lse - target``; ignored rows give 0 / 0.
``linear_ce_backward(hidden, weight, bias, labels, lse, coef, ...) -> (grad_hidden, grad_weight, grad_bias)``
    gradient of ``sum(coef * nll)``; recomputes the logits (used when the upstream gradient is
    only known in backward: :func:`~steerlm_kernels.api_linear.linear_sequence_nll`).
``linear_ce_fused(hidden, weight, bias, labels, coef, ...) -> (lse, target, grad_hidden, grad_weight, grad_bias)``
    forward and gradient at once, for a coefficient known at forward time
    (:func:`~steerlm_kernels.api_linear.linear_weighted_sequence_loss`): with chunks, each chunk's
    logits are computed once, so forward + backward costs exactly three matmuls.

Gradients are returned in the dtype of their input; a gradient that is not asked for is an empty
``[0]`` tensor.

**Vocabulary parallelism** (``process_group``; Megatron's layout): ``weight`` / ``bias`` are this
rank's contiguous shard ``[V/tp, H]`` / ``[V/tp]``, ``hidden`` is replicated. The kernels are not
told about the shard: the caller turns the global labels into shard-local ones
(:func:`shard_labels`: labels outside the shard become a sentinel that matches no column, so the
row still contributes its log-sum-exp but no target logit), the ops yield the local
``(lse_r, target_r)``, and ONE collective (:func:`steerlm_kernels.distributed.combine_vocab_partials`)
gives the global ``(lse, target)``. Backward needs no communication: each rank recomputes its own
logits columns with the global ``lse``. The gradient w.r.t. ``hidden`` is then this rank's
*partial* contribution ``g_r @ W_r`` (the full one is the sum over the group, as for Megatron's
column-parallel linear, whose ``copy_to_tensor_model_parallel_region`` all-reduces it);
``grad_weight`` / ``grad_bias`` are exactly this rank's shard of the full gradients. With a
coefficient known at forward time the fused single pass is impossible (the gradient needs the
global ``lse``), so :class:`LinearWeightedGradFunction` runs the forward op, the collective and the
recomputing backward op: four matmuls instead of three.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from steerlm_kernels import registry
from steerlm_kernels.distributed import combine_vocab_partials
from steerlm_kernels.ops._triton import tl, triton
from steerlm_kernels.validation import check_label_range

# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _lce_forward_kernel(
    h_ptr,  # *bf16/fp16/fp32 [N, H], unit column stride
    w_ptr,  # same dtype [V, H], unit column stride
    b_ptr,  # same dtype [V] (unused unless HAS_BIAS)
    labels_ptr,  # *i32/i64 [N]
    part_ptr,  # *fp32 [n_splits, N] out: partial log-sum-exp of each row over each split
    target_ptr,  # *fp32 [N] in/out (zero-initialised): the target logit, written by the split holding it
    n_rows,
    n_vocab,
    n_hidden,
    stride_h,  # elements between rows of hidden
    stride_w,  # elements between rows of weight
    cols_per_split,  # a multiple of BLOCK_V
    ignore_index,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision for float32 operands ("ieee" / "tf32")
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program = ``BLOCK_N`` rows x one split of the vocabulary (``cols_per_split`` columns).

    For each ``BLOCK_V``-wide tile of the split it computes the logits tile
    ``h[rows, :] @ W[cols, :].T`` with ``tl.dot`` over ``BLOCK_H`` slices of the hidden dimension
    (float32 accumulator in registers), adds the bias, and folds the tile into a running per-row
    max ``m`` and sum ``s = sum(exp(x - m))``: the logits never leave the chip. Its result is one
    partial log-sum-exp per row, merged over the splits afterwards (deterministic).

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
                w_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None],
                mask=col_ok[None, :] & k_ok[:, None], other=0.0,
            )  # [BLOCK_H, BLOCK_V]: a tile of W.T
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
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
    tl.store(part_ptr + pid_s.to(tl.int64) * n_rows + rows, m + tl.log(s), mask=row_ok)


@triton.jit
def _lce_backward_kernel(
    h_ptr,  # *bf16/fp16/fp32 [N, H]
    w_ptr,  # same dtype [V, H]
    b_ptr,  # same dtype [V] (unused unless HAS_BIAS)
    labels_ptr,  # *i32/i64 [N]
    lse_ptr,  # *fp32 [N]
    coef_ptr,  # *fp32 [N]: d loss / d nll of each row
    gh_ptr,  # *fp32 [N, H] accumulator (contiguous), unused unless GRAD_H
    gw_ptr,  # *fp32 [V, H] accumulator (contiguous), unused unless GRAD_W
    gb_ptr,  # *fp32 [V] accumulator, unused unless GRAD_B
    n_rows,
    n_vocab,
    n_hidden,
    stride_h,
    stride_w,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    GRAD_H: tl.constexpr,
    GRAD_W: tl.constexpr,
    GRAD_B: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program = one ``[BLOCK_N rows, BLOCK_V columns]`` tile of the logits' gradient.

    It recomputes the logits tile (``tl.dot`` over H, as the forward), forms
    ``g = (exp(x - lse) - onehot(label)) * coef`` in float32 (the target column's ``p - 1`` is
    never rounded before the scaling), then sweeps H once more in ``BLOCK_H`` slices:
    ``grad_hidden[rows, ks] += g @ W[cols, ks]`` and ``grad_weight[cols, ks] += g.T @ h[rows, ks]``
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
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(acc - lse[:, None])
    g = (p - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)) * coef[:, None]
    g = tl.where(live[:, None] & col_ok[None, :], g, 0.0)  # dead rows are exactly 0, even with NaN logits

    if GRAD_B:
        tl.atomic_add(gb_ptr + cols, tl.sum(g, axis=0), mask=col_ok & (tl.zeros([BLOCK_V], tl.int32) + n_k > 0))
    gq = g.to(h_ptr.dtype.element_ty)
    # Two sweeps rather than one: only one [*, BLOCK_H] product is live at a time (no spills).
    if GRAD_H:
        for k0 in range(0, n_k, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < n_hidden
            w_t = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                          other=0.0)  # [BLOCK_V, BLOCK_H]
            dh = tl.dot(gq, w_t, input_precision=PRECISION)  # [BLOCK_N, BLOCK_H]
            tl.atomic_add(gh_ptr + rows[:, None] * n_hidden + ks[None, :], dh, mask=row_ok[:, None] & k_ok[None, :])
    if GRAD_W:
        for k0 in range(0, n_k, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < n_hidden
            h_t = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                          other=0.0)  # [BLOCK_N, BLOCK_H]
            dw = tl.dot(tl.trans(gq), h_t, input_precision=PRECISION)  # [BLOCK_V, BLOCK_H]
            tl.atomic_add(gw_ptr + cols[:, None] * n_hidden + ks[None, :], dw, mask=col_ok[:, None] & k_ok[None, :])


#: Tile shape of both kernels, (BLOCK_N, BLOCK_V, BLOCK_H, num_warps), by operand dtype. bf16 /
#: fp16 feed tensor cores with [64, 128] tiles; float32 operands with exact ("ieee") products are
#: multiplied on the FMA units, whose operand fragments live in registers: smaller tiles.
TRITON_BLOCKS: dict[str, tuple[int, int, int, int]] = {
    "bf16": (64, 128, 64, 8),
    "fp16": (64, 128, 64, 8),
    "fp32": (64, 64, 16, 8),
}
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
#: Programs the forward aims for (rows blocks x vocabulary splits): several waves on an H100.
TARGET_PROGRAMS = 1024


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision of float32 operands: TF32 only where torch itself allows it for
    matmuls (``torch.backends.cuda.matmul.allow_tf32``), else exact IEEE float32. Ignored by
    Triton for bf16/fp16 operands."""
    if dtype == torch.float32 and not registry.triton_interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _row_major(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_linear_ce_forward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """``(lse[N], target[N])`` float32 with the Triton kernel; ignored rows give 0 / 0."""
    hidden, weight = _row_major(hidden), _row_major(weight)
    n_rows, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    target = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
    if n_rows == 0:
        return target.clone(), target
    block_n, block_v, block_h, num_warps = TRITON_BLOCKS[_DTYPE_NAMES[hidden.dtype]]
    row_blocks = triton.cdiv(n_rows, block_n)
    v_blocks = triton.cdiv(n_vocab, block_v)
    n_splits = max(1, min(v_blocks, triton.cdiv(TARGET_PROGRAMS, row_blocks)))
    cols_per_split = triton.cdiv(v_blocks, n_splits) * block_v
    n_splits = triton.cdiv(n_vocab, cols_per_split)
    part = torch.empty(n_splits, n_rows, dtype=torch.float32, device=hidden.device)
    _lce_forward_kernel[(row_blocks, n_splits)](
        hidden, weight, weight if bias is None else bias, labels, part, target,
        n_rows, n_vocab, n_hidden, hidden.stride(0), weight.stride(0), cols_per_split, ignore_index,
        HAS_BIAS=bias is not None, PRECISION=_precision(hidden.dtype),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=num_warps,
    )
    lse = part[0] if n_splits == 1 else torch.logsumexp(part, dim=0)
    lse = torch.where(labels != ignore_index, lse, 0.0)
    return lse, target


def triton_linear_ce_backward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, lse: Tensor, coef: Tensor,
    ignore_index: int, need_h: bool, need_w: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """float32 gradient accumulators ``(grad_hidden [N, H], grad_weight [V, H], grad_bias [V])``
    of ``sum(coef * nll)`` (``[0]`` where not needed)."""
    hidden, weight = _row_major(hidden), _row_major(weight)
    n_rows, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    dev = hidden.device
    need_b = need_b and bias is not None
    gh = torch.zeros((n_rows, n_hidden) if need_h else (0,), dtype=torch.float32, device=dev)
    gw = torch.zeros((n_vocab, n_hidden) if need_w else (0,), dtype=torch.float32, device=dev)
    gb = torch.zeros((n_vocab,) if need_b else (0,), dtype=torch.float32, device=dev)
    if n_rows == 0 or not (need_h or need_w or need_b):
        return gh, gw, gb
    block_n, block_v, block_h, num_warps = TRITON_BLOCKS[_DTYPE_NAMES[hidden.dtype]]
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(n_vocab, block_v))
    _lce_backward_kernel[grid](
        hidden, weight, weight if bias is None else bias, labels, lse, coef.float().contiguous(), gh, gw, gb,
        n_rows, n_vocab, n_hidden, hidden.stride(0), weight.stride(0), ignore_index,
        HAS_BIAS=bias is not None, GRAD_H=need_h, GRAD_W=need_w, GRAD_B=need_b,
        PRECISION=_precision(hidden.dtype), BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
        num_warps=num_warps,
    )
    return gh, gw, gb


# --------------------------------------------------------------------------------------------
# Chunked path (every backend: cuBLAS / CPU BLAS GEMMs + the backend's CE kernels)
# --------------------------------------------------------------------------------------------

#: ``chunk_rows`` value that selects the Triton tile kernels instead of chunks (see the module notes).
TILES = -1

#: Default logits chunk budget: 256 MiB of float32 (64 Mi elements), i.e. ``2**26 // V`` rows.
CHUNK_ELEMENTS = 1 << 26

#: Fewest rows per default chunk on CUDA. Each chunk beyond the first costs one float32
#: accumulation pass over ``grad_weight`` (``[V, H]``: read bf16 product + read / write float32,
#: 10 B per element), against the chunk's three GEMMs (``6·rows·V·H`` FLOP): at ~3 TB/s and ~600
#: TFLOP/s the pass is ~330/rows of the GEMM time, ~8 % at 4096 rows. 4096 rows also keep cuBLAS at
#: full tile efficiency. The chunk is then 1 GiB of bf16 logits at V=128k (the full logits of
#: N=32k tokens would be 8 GiB, plus float32 copies in an unfused loss).
CUDA_MIN_CHUNK_ROWS = 4096


def default_chunk_rows(n_vocab: int, device: torch.device | None = None) -> int:
    """Rows per chunk: a float32 ``[rows, V]`` chunk within 256 MiB (``2**26 // V`` rows), and at
    least :data:`CUDA_MIN_CHUNK_ROWS` rows on CUDA."""
    rows = max(1, CHUNK_ELEMENTS // max(n_vocab, 1))
    if device is not None and device.type == "cuda":
        rows = max(rows, CUDA_MIN_CHUNK_ROWS)
    return rows


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Matmul dtype of the chunked path: the input dtype, except float16 on CPU (no fast float16
    GEMM there: it is computed in float32)."""
    return torch.float32 if dtype == torch.float16 and device.type == "cpu" else dtype


def _chunks(rows: Tensor, n_rows: int, step: int) -> Iterator[Tensor | slice]:
    """Row selections of at most ``step`` rows covering the rows where ``rows`` is true, in chunks
    of equal size (give or take one row: 4097 rows at ``step`` 4096 are two chunks of ~2049, not
    4096 + 1, which would cost a whole ``grad_weight`` accumulation for one row).

    On CPU the selected rows are gathered (skipping masked tokens saves their matmuls); all rows
    selected, or another device (no host sync there), gives plain slices over every row.
    """
    if rows.device.type == "cpu":
        idx = rows.nonzero().squeeze(1)
        if idx.numel() != n_rows:
            for start, stop in _even_bounds(idx.numel(), step):
                yield idx[start:stop]
            return
    for start, stop in _even_bounds(n_rows, step):
        yield slice(start, stop)


def _even_bounds(n: int, step: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``ceil(n / step)`` near-equal pieces of ``range(n)``."""
    pieces = -(-n // step)
    return [(i * n // pieces, (i + 1) * n // pieces) for i in range(pieces)]


def _count(sel: Tensor | slice) -> int:
    return sel.numel() if isinstance(sel, Tensor) else sel.stop - sel.start


def _take(x: Tensor, sel: Tensor | slice) -> Tensor:
    return x.index_select(0, sel) if isinstance(sel, Tensor) else x[sel]


def _put(dst: Tensor, sel: Tensor | slice, src: Tensor) -> None:
    if isinstance(sel, Tensor):
        dst.index_copy_(0, sel, src.to(dst.dtype))
    else:
        dst[sel].copy_(src)


def chunked_linear_ce(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    ignore_index: int,
    chunk_rows: int,
    backend: str,
    *,
    coef: Tensor | None = None,
    lse: Tensor | None = None,
    need: tuple[bool, bool, bool] = (False, False, False),
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The chunked driver of every op (every backend; the default strategy).

    Args:
        hidden: ``[N, H]``; weight: ``[V, H]``; bias: ``[V]`` or None (one dtype).
        labels: ``[N]`` int32/int64, ``ignore_index`` for ignored rows.
        chunk_rows: rows per logits chunk (``<= 0``: :func:`default_chunk_rows`).
        backend: ``"triton"``, ``"cpp"`` or ``"torch"``: whose ``ce_forward`` / ``ce_backward``
            run on the chunks (the GEMMs are torch's: cuBLAS on CUDA, the CPU BLAS on CPU).
        coef: ``[N]`` float32 ``d loss / d nll``; with it, the gradient is computed.
        lse: ``[N]`` float32 from a previous forward: skip the forward (backward recompute).
        need: which of ``(grad_hidden, grad_weight, grad_bias)`` to compute.

    Returns:
        ``(lse [N], target [N], grad_hidden, grad_weight, grad_bias)``: float32 statistics (``lse``
        passed through when given, ``target`` then empty) and gradients in the inputs' dtypes
        (``[0]`` where not needed).
    """
    ce = registry.get(backend)
    n_rows, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    dev = hidden.device
    need_h, need_w, need_b = (coef is not None and need[0], coef is not None and need[1],
                              coef is not None and need[2] and bias is not None)
    grads = need_h or need_w or need_b
    cdt = _compute_dtype(hidden.dtype, dev)
    w_c = weight.to(cdt)
    b_c = None if bias is None else bias.to(cdt)
    forward = lse is None
    if forward:
        lse = torch.zeros(n_rows, dtype=torch.float32, device=dev)
        target = torch.zeros(n_rows, dtype=torch.float32, device=dev)
    else:
        target = lse.new_empty(0)
    gh = torch.zeros((n_rows, n_hidden) if need_h else (0,), dtype=hidden.dtype, device=dev)
    gb = torch.zeros((n_vocab,) if need_b else (0,), dtype=torch.float32, device=dev)
    # grad_weight: the first chunk's product as it comes (one rounding, no float32 buffer when a
    # single chunk covers every row, as on CUDA up to CUDA_MIN_CHUNK_ROWS rows); from the second
    # chunk on, a float32 accumulator.
    gw: Tensor | None = None
    gw_shape = (n_vocab, n_hidden) if need_w else (0,)
    if n_rows == 0 or (not forward and not grads):
        return lse, target, gh, torch.zeros(gw_shape, dtype=weight.dtype, device=dev), gb.to(hidden.dtype)

    rows = labels != ignore_index
    if not forward:
        rows &= coef != 0  # backward only: rows without gradient need no logits at all
    step = max(1, min(chunk_rows if chunk_rows > 0 else default_chunk_rows(n_vocab, dev), n_rows))
    buf = torch.empty(min(step, n_rows) * n_vocab, dtype=cdt, device=dev)
    gw_tmp = None
    for sel in _chunks(rows, n_rows, step):
        c = _count(sel)
        h_c = _take(hidden, sel).to(cdt)
        y_c = _take(labels, sel)
        logits = buf[: c * n_vocab].view(c, n_vocab)
        if b_c is None:
            torch.mm(h_c, w_c.t(), out=logits)
        else:
            torch.addmm(b_c, h_c, w_c.t(), out=logits)
        if forward:
            lse_c, target_c = ce.ce_forward(logits, y_c, 0, ignore_index)
            _put(lse, sel, lse_c)
            _put(target, sel, target_c)
        else:
            lse_c = _take(lse, sel)
        if not grads:
            continue
        ce.ce_backward(logits, y_c, lse_c, _take(coef, sel).float().contiguous(), 0, ignore_index, logits)
        if need_h:
            if isinstance(sel, slice) and gh.dtype == cdt:
                torch.mm(logits, w_c, out=gh[sel])
            else:
                _put(gh, sel, torch.mm(logits, w_c))
        if need_w:
            if gw is None:
                gw = torch.mm(logits.t(), h_c)
            elif gw.dtype != torch.float32 or cdt != torch.float32:
                # bf16 GEMM (the fast path), rounded once per chunk, accumulated in float32
                gw = gw.float()
                gw_tmp = torch.mm(logits.t(), h_c, out=gw_tmp) if gw_tmp is not None else torch.mm(logits.t(), h_c)
                gw.add_(gw_tmp)
            else:
                gw.addmm_(logits.t(), h_c)
        if need_b:
            gb.add_(logits.sum(dim=0, dtype=torch.float32))
    gw = torch.zeros(gw_shape, dtype=weight.dtype, device=dev) if gw is None else gw.to(weight.dtype)
    return lse, target, gh, gw, gb.to(hidden.dtype)


# --------------------------------------------------------------------------------------------
# torch.library custom ops, dispatching on the backend name
# --------------------------------------------------------------------------------------------


def _grad_shapes(hidden: Tensor, weight: Tensor, bias: Tensor | None, need_h: bool, need_w: bool,
                 need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    gh = hidden.new_empty(hidden.shape if need_h else (0,))
    gw = weight.new_empty(weight.shape if need_w else (0,))
    gb = (bias if bias is not None else weight).new_empty((weight.shape[0],) if need_b and bias is not None else (0,))
    return gh, gw, gb


def _tiles(chunk_rows: int, backend: str) -> bool:
    """True when an op runs the Triton tile kernels (``chunk_rows == TILES``), else chunks."""
    if chunk_rows != TILES:
        return False
    if backend != "triton":
        raise ValueError(f"the tile kernels are Triton kernels; backend {backend!r} runs chunks")
    return True


@torch.library.custom_op("steerlm_kernels::linear_ce_forward", mutates_args=())
def linear_ce_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    ignore_index: int,
    check_labels: bool,
    chunk_rows: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(lse[N], target[N])`` float32 of ``logits = hidden @ weight.T + bias``; labels are checked
    against ``V`` first when ``check_labels``."""
    if check_labels:
        check_label_range(labels, weight.shape[0], ignore_index)
    if _tiles(chunk_rows, backend):
        return triton_linear_ce_forward(hidden, weight, bias, labels, ignore_index)
    lse, target, *_ = chunked_linear_ce(hidden, weight, bias, labels, ignore_index, chunk_rows, backend)
    return lse, target


@linear_ce_forward.register_fake
def _(hidden, weight, bias, labels, ignore_index, check_labels, chunk_rows, backend):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("steerlm_kernels::linear_ce_backward", mutates_args=())
def linear_ce_backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    coef: Tensor,
    ignore_index: int,
    chunk_rows: int,
    backend: str,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of ``sum(coef * nll)`` w.r.t. ``(hidden, weight, bias)``, recomputing the logits."""
    if _tiles(chunk_rows, backend):
        gh, gw, gb = triton_linear_ce_backward(hidden, weight, bias, labels, lse, coef, ignore_index,
                                               need_h, need_w, need_b)
        return gh.to(hidden.dtype), gw.to(weight.dtype), gb.to(weight.dtype)
    _, _, gh, gw, gb = chunked_linear_ce(hidden, weight, bias, labels, ignore_index, chunk_rows, backend,
                                         coef=coef, lse=lse, need=(need_h, need_w, need_b))
    return gh, gw, gb


@linear_ce_backward.register_fake
def _(hidden, weight, bias, labels, lse, coef, ignore_index, chunk_rows, backend, need_h, need_w, need_b):
    return _grad_shapes(hidden, weight, bias, need_h, need_w, need_b)


@torch.library.custom_op("steerlm_kernels::linear_ce_fused", mutates_args=())
def linear_ce_fused(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    coef: Tensor,
    ignore_index: int,
    check_labels: bool,
    chunk_rows: int,
    backend: str,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward statistics and the gradient of ``sum(coef * nll)`` in one call (``coef`` known at
    forward time): ``(lse, target, grad_hidden, grad_weight, grad_bias)``."""
    if check_labels:
        check_label_range(labels, weight.shape[0], ignore_index)
    if _tiles(chunk_rows, backend):
        lse, target = triton_linear_ce_forward(hidden, weight, bias, labels, ignore_index)
        gh, gw, gb = triton_linear_ce_backward(hidden, weight, bias, labels, lse, coef, ignore_index,
                                               need_h, need_w, need_b)
        return lse, target, gh.to(hidden.dtype), gw.to(weight.dtype), gb.to(weight.dtype)
    return chunked_linear_ce(hidden, weight, bias, labels, ignore_index, chunk_rows, backend,
                             coef=coef, need=(need_h, need_w, need_b))


@linear_ce_fused.register_fake
def _(hidden, weight, bias, labels, coef, ignore_index, check_labels, chunk_rows, backend, need_h, need_w, need_b):
    n = hidden.shape[0]
    stats = (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32))
    return (*stats, *_grad_shapes(hidden, weight, bias, need_h, need_w, need_b))


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


def _nll(lse: Tensor, target: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    return torch.where(labels == ignore_index, 0.0, lse - target)


def shard_labels(labels: Tensor, vocab_start: int, n_local: int, ignore_index: int) -> Tensor:
    """Global labels ``[N]`` -> labels local to the vocabulary shard ``[vocab_start, vocab_start +
    n_local)``: ``label - vocab_start`` inside the shard, ``ignore_index`` kept, and a negative
    sentinel (``-1``, or ``-2`` when ``ignore_index == -1``) elsewhere, which every backend treats
    as "row active, target not in this shard" (it matches no column)."""
    sentinel = -2 if ignore_index == -1 else -1
    local = labels - vocab_start
    inside = (local >= 0) & (local < n_local)
    out = torch.where(inside, local, torch.full_like(labels, sentinel))
    return torch.where(labels == ignore_index, labels, out)


def _linear_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                  check_labels: bool, chunk_rows: int, backend: str, process_group: Any) -> tuple[Tensor, Tensor]:
    """Global ``(lse [N], target [N])``: the forward op, plus (with ``process_group``) the one
    collective combining every shard's partials."""
    lse, target = torch.ops.steerlm_kernels.linear_ce_forward(
        hidden, weight, bias, labels, ignore_index, check_labels, chunk_rows, backend
    )
    if process_group is not None:
        lse, target = combine_vocab_partials(lse, target, weight.shape[0], process_group)
    return lse, target


class LinearTokenNLLFunction(torch.autograd.Function):
    """``nll[N]`` float32 of ``logits = hidden @ weight.T + bias``, differentiable w.r.t. hidden,
    weight and bias. Saves the inputs (no copies) and ``lse [N]``; the backward recomputes the
    logits chunk by chunk (tile by tile on Triton). With ``process_group``, ``weight`` / ``bias``
    are this rank's vocabulary shard, ``labels`` shard-local (:func:`shard_labels`), the saved
    ``lse`` is the global one, and ``grad_hidden`` is this rank's partial (see the module notes)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                check_labels: bool, chunk_rows: int, backend: str, process_group: Any = None) -> Tensor:
        lse, target = _linear_stats(hidden, weight, bias, labels, ignore_index, check_labels, chunk_rows, backend,
                                    process_group)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.ignore_index, ctx.chunk_rows, ctx.backend = ignore_index, chunk_rows, backend
        return _nll(lse, target, labels, ignore_index)

    @staticmethod
    def backward(ctx, grad_nll: Tensor):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh, gw, gb = torch.ops.steerlm_kernels.linear_ce_backward(
            hidden, weight, bias, labels, lse, grad_nll.float().contiguous(), ctx.ignore_index, ctx.chunk_rows,
            ctx.backend, need_h, need_w, need_b and bias is not None,
        )
        return (gh if need_h else None, gw if need_w else None, gb if need_b and bias is not None else None,
                None, None, None, None, None, None)


class LinearWeightedNLLFunction(torch.autograd.Function):
    """``loss = sum_i coef[i] * nll[i]`` (0-d float32) with ``coef`` known at forward time.

    The gradient w.r.t. hidden / weight / bias is computed in the forward (on CPU from the same
    logits chunk as the loss: three matmuls in all) and scaled by the scalar upstream gradient in
    backward. ``coef`` itself may require grad (``d loss / d coef = nll``).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, coef: Tensor,
                ignore_index: int, check_labels: bool, chunk_rows: int, backend: str) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        coef32 = coef.detach().float().contiguous()
        lse, target, gh, gw, gb = torch.ops.steerlm_kernels.linear_ce_fused(
            hidden, weight, bias, labels, coef32, ignore_index, check_labels, chunk_rows, backend,
            need_h, need_w, need_b,
        )
        nll = _nll(lse, target, labels, ignore_index)
        ctx.save_for_backward(gh, gw, gb, nll if ctx.needs_input_grad[4] else None)
        ctx.need = (need_h, need_w, need_b)
        return (coef32 * nll).sum()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        gh, gw, gb, nll = ctx.saved_tensors
        need_h, need_w, need_b = ctx.need
        g = grad_loss.float()
        return (
            (gh * g).to(gh.dtype) if need_h else None,
            (gw * g).to(gw.dtype) if need_w else None,
            (gb * g).to(gb.dtype) if need_b else None,
            None,
            nll * g if nll is not None else None,
            None, None, None, None,
        )


class LinearWeightedGradFunction(torch.autograd.Function):
    """``(carrier, nll)``: the per-token ``nll [N]`` float32 (not differentiable) and a 0-d float32
    zero ``carrier`` whose gradient w.r.t. hidden / weight / bias is that of ``sum(coef * nll)``,
    computed in the forward (``coef`` known then) and scaled by the carrier's upstream gradient.

    The caller builds the loss as ``f(nll.detach(), mask, weight, ...) + carrier`` where ``f`` is
    linear in ``nll`` with ``d f / d nll = coef``: the loss then has the right value and the right
    gradients w.r.t. everything, including tensors (weight, normalizer, float mask) that ``f`` sees
    and that may be reduced across context-parallel ranks in between (per-sequence sums), which a
    scalar-valued fused op could not express.

    Without ``process_group``: one fused op (three matmuls on CPU). With it (``weight`` / ``bias``
    this rank's vocabulary shard, ``labels`` shard-local): the forward op, one collective for the
    global ``lse``, then the recomputing gradient op (four matmuls; ``grad_hidden`` is this rank's
    partial). No communication in backward.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, coef: Tensor,
                ignore_index: int, check_labels: bool, chunk_rows: int, backend: str,
                process_group: Any) -> tuple[Tensor, Tensor]:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        coef32 = coef.detach().float().contiguous()
        if process_group is None:
            lse, target, gh, gw, gb = torch.ops.steerlm_kernels.linear_ce_fused(
                hidden, weight, bias, labels, coef32, ignore_index, check_labels, chunk_rows, backend,
                need_h, need_w, need_b,
            )
        else:
            lse, target = _linear_stats(hidden, weight, bias, labels, ignore_index, check_labels, chunk_rows,
                                        backend, process_group)
            gh, gw, gb = torch.ops.steerlm_kernels.linear_ce_backward(
                hidden, weight, bias, labels, lse, coef32, ignore_index, chunk_rows, backend, need_h, need_w, need_b,
            )
        nll = _nll(lse, target, labels, ignore_index)
        ctx.save_for_backward(gh, gw, gb)
        ctx.need = (need_h, need_w, need_b)
        ctx.mark_non_differentiable(nll)
        return lse.new_zeros(()), nll

    @staticmethod
    def backward(ctx, grad_carrier: Tensor, grad_nll: Tensor | None):
        gh, gw, gb = ctx.saved_tensors
        need_h, need_w, need_b = ctx.need
        g = grad_carrier.float()
        return (
            (gh * g).to(gh.dtype) if need_h else None,
            (gw * g).to(gw.dtype) if need_w else None,
            (gb * g).to(gb.dtype) if need_b else None,
            None, None, None, None, None, None, None,
        )


def linear_nll_with_grad(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, coef: Tensor,
                         ignore_index: int, check_labels: bool, chunk_rows: int, backend: str,
                         process_group: Any = None) -> tuple[Tensor, Tensor | None]:
    """``(nll [N] float32, carrier)`` for a loss linear in ``nll`` with coefficients ``coef [N]``
    known now (see :class:`LinearWeightedGradFunction`). ``carrier`` is None when no gradient
    w.r.t. hidden / weight / bias is needed (then only the forward op and, with
    ``process_group``, its collective run)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        carrier, nll = LinearWeightedGradFunction.apply(hidden, weight, bias, labels, coef, ignore_index,
                                                        check_labels, chunk_rows, backend, process_group)
        return nll, carrier
    lse, target = _linear_stats(hidden, weight, bias, labels, ignore_index, check_labels, chunk_rows, backend,
                                process_group)
    return _nll(lse, target, labels, ignore_index), None


def linear_token_nll(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                     check_labels: bool, chunk_rows: int, backend: str, process_group: Any = None) -> Tensor:
    """Per-token NLL ``[N]`` float32 of validated ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]``
    and ``labels [N]``. Goes through autograd only when a gradient is needed (nothing is saved in
    the baseline phase). With ``process_group``: ``weight [V/tp, H]`` / ``bias [V/tp]`` are this
    rank's shard and ``labels`` are shard-local (:func:`shard_labels`); one collective per call."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return LinearTokenNLLFunction.apply(hidden, weight, bias, labels, ignore_index, check_labels, chunk_rows,
                                            backend, process_group)
    lse, target = _linear_stats(hidden, weight, bias, labels, ignore_index, check_labels, chunk_rows, backend,
                                process_group)
    return _nll(lse, target, labels, ignore_index)


def linear_weighted_nll(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, coef: Tensor,
                        ignore_index: int, check_labels: bool, chunk_rows: int, backend: str) -> Tensor:
    """``sum(coef * nll)`` 0-d float32, with the gradient computed eagerly in the forward."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias, coef)):
        return LinearWeightedNLLFunction.apply(hidden, weight, bias, labels, coef, ignore_index, check_labels,
                                               chunk_rows, backend)
    lse, target = torch.ops.steerlm_kernels.linear_ce_forward(
        hidden, weight, bias, labels, ignore_index, check_labels, chunk_rows, backend
    )
    return (coef.float() * _nll(lse, target, labels, ignore_index)).sum()


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs, checked for sm_80 / sm_90 by steerlm_kernels._aot
# --------------------------------------------------------------------------------------------


def _lce_aot_variants(backward: bool) -> list[dict]:
    """Compile variants at the default tile shape, one per dtype (plus int32 labels and a
    no-bias / hidden-gradient-only backward). H=4096 and V=128256 are multiples of 16, so sizes
    and row strides are marked 16-divisible as the launcher would; ``ignore_index=-100`` is not."""
    cases = [(dt, "i64", True, (True, True, True)) for dt in ("bf16", "fp16", "fp32")]
    cases += [("bf16", "i32", False, (True, True, False))]
    if backward:
        cases += [("bf16", "i64", False, (True, False, False))]
    variants = []
    for dt, label_ty, has_bias, (gh, gw, gb) in cases:
        block_n, block_v, block_h, num_warps = TRITON_BLOCKS[dt]
        sig = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "labels_ptr": f"*{label_ty}"}
        if backward:
            sig |= {"lse_ptr": "*fp32", "coef_ptr": "*fp32", "gh_ptr": "*fp32", "gw_ptr": "*fp32", "gb_ptr": "*fp32"}
        else:
            sig |= {"part_ptr": "*fp32", "target_ptr": "*fp32"}
        sig |= {"n_rows": "i32", "n_vocab": "i32", "n_hidden": "i32", "stride_h": "i32", "stride_w": "i32"}
        sig |= {} if backward else {"cols_per_split": "i32"}
        sig |= {"ignore_index": "i32", "HAS_BIAS": "constexpr"}
        constexprs: dict = {"HAS_BIAS": has_bias}
        if backward:
            sig |= {"GRAD_H": "constexpr", "GRAD_W": "constexpr", "GRAD_B": "constexpr"}
            constexprs |= {"GRAD_H": gh, "GRAD_W": gw, "GRAD_B": gb and has_bias}
        sig |= {"PRECISION": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_H": "constexpr"}
        constexprs |= {"PRECISION": "ieee" if dt == "fp32" else "tf32", "BLOCK_N": block_n, "BLOCK_V": block_v,
                       "BLOCK_H": block_h}
        divisible = [k for k in sig if k.endswith("_ptr")] + ["n_vocab", "n_hidden", "stride_h", "stride_w"]
        divisible += [] if backward else ["cols_per_split"]
        variants.append({
            "signature": sig, "constexprs": constexprs, "num_warps": num_warps, "divisible_by_16": divisible,
            "note": f"labels={label_ty} bias={has_bias}" + (f" grads(h,w,b)={gh:d}{gw:d}{gb and has_bias:d}"
                                                              if backward else ""),
        })
    return variants


AOT_SPECS: dict[str, list[dict]] = {
    "_lce_forward_kernel": _lce_aot_variants(backward=False),
    "_lce_backward_kernel": _lce_aot_variants(backward=True),
}
