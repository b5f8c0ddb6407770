"""The chunked strategy of the fused linear cross entropy (every backend; the default).

``logits = hidden @ lm_head_weight.T (+ bias)`` is formed a chunk of rows at a time: for a chunk,
``logits_c = hidden_c @ W.T (+ bias)`` in one library GEMM (cuBLAS on CUDA; bfloat16 / float32
matmuls with float32 accumulation; float16 is computed in float32 on CPU, where float16 matmuls
are extremely slow), then the backend's cross-entropy kernels on it (``ce_forward`` /
``ce_backward`` of :func:`steerlm_kernels.registry.backend_kernels`; the latter in place in the
chunk buffer), then ``grad_hidden_c = g @ W`` and ``grad_lm_head += g.T @ hidden_c`` (accumulated
in float32 across chunks). The chunk holds at most ``chunk_rows x V`` logits
(:func:`default_chunk_rows`), never ``N x V``. On CPU, rows whose label is ignored (the public API
turns masked tokens into ignored ones) are dropped before the matmuls. Results are deterministic.

One function per mode:

* :func:`linear_stats` - ``(m, lse, target)`` (the forward; one GEMM per chunk): the row max,
  the log-sum-exp relative to it and the target logit, as the backend contract's ``ce_forward``;
* :func:`linear_grads` - the gradient of ``sum(coef * nll)`` from a known ``(m, lse)`` (the
  backward, recomputing each chunk's logits; three GEMMs per chunk);
* :func:`linear_stats_and_grads` - both at once when ``coef`` is known at forward time (three
  GEMMs per chunk in all: each chunk's logits are computed once).

Gradients are returned in the dtype of their input; a gradient that is not asked for is an empty
``[0]`` tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from steerlm_kernels import registry

#: Default logits chunk budget: 256 MiB of float32 (64 Mi elements), i.e. ``2**26 // V`` rows.
CHUNK_ELEMENTS = 1 << 26

#: Fewest rows per default chunk on CUDA. Each chunk beyond the first costs one float32
#: accumulation pass over ``grad_lm_head`` (``[V, H]``: read bf16 product + read / write float32,
#: 10 B per element), against the chunk's three GEMMs (``6·rows·V·H`` FLOP): at ~3 TB/s and ~600
#: TFLOP/s the pass is ~330/rows of the GEMM time, ~8 % at 4096 rows. 4096 rows also keep cuBLAS at
#: full tile efficiency. The chunk is then 1 GiB of bf16 logits at V=128k (the full logits of
#: N=32k tokens would be 8 GiB, plus float32 copies in an unfused loss).
CUDA_MIN_CHUNK_ROWS = 4096

Need = tuple[bool, bool, bool]  # which of (grad_hidden, grad_lm_head, grad_bias) to compute


def default_chunk_rows(n_vocab: int, device: torch.device | None = None) -> int:
    """Rows per chunk: a float32 ``[rows, V]`` chunk within 256 MiB (``2**26 // V`` rows), and at
    least :data:`CUDA_MIN_CHUNK_ROWS` rows on CUDA."""
    rows = max(1, CHUNK_ELEMENTS // max(n_vocab, 1))
    if device is not None and device.type == "cuda":
        rows = max(rows, CUDA_MIN_CHUNK_ROWS)
    return rows


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Matmul dtype of the chunks: the input dtype, except float16 on CPU (no fast float16 GEMM
    there: it is computed in float32)."""
    return torch.float32 if dtype == torch.float16 and device.type == "cpu" else dtype


def even_bounds(n: int, step: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``ceil(n / step)`` near-equal pieces of ``range(n)``."""
    pieces = -(-n // step)
    return [(i * n // pieces, (i + 1) * n // pieces) for i in range(pieces)]


def _selections(rows: Tensor, n_rows: int, step: int) -> Iterator[Tensor | slice]:
    """Row selections of at most ``step`` rows covering the rows where ``rows`` is true, in chunks
    of equal size (give or take one row: 4097 rows at ``step`` 4096 are two chunks of ~2049, not
    4096 + 1, which would cost a whole ``grad_lm_head`` accumulation for one row).

    On CPU the selected rows are gathered (skipping masked tokens saves their matmuls); all rows
    selected, or another device (no host sync there), gives plain slices over every row.
    """
    if rows.device.type == "cpu":
        idx = rows.nonzero().squeeze(1)
        if idx.numel() != n_rows:
            for start, stop in even_bounds(idx.numel(), step):
                yield idx[start:stop]
            return
    for start, stop in even_bounds(n_rows, step):
        yield slice(start, stop)


def _take(x: Tensor, sel: Tensor | slice) -> Tensor:
    return x.index_select(0, sel) if isinstance(sel, Tensor) else x[sel]


def _put(dst: Tensor, sel: Tensor | slice, src: Tensor) -> None:
    if isinstance(sel, Tensor):
        dst.index_copy_(0, sel, src.to(dst.dtype))
    else:
        dst[sel].copy_(src)


class _Chunks:
    """The logits of selected rows, one chunk at a time, in one reused buffer.

    Iterating yields ``(sel, hidden_c, labels_c, logits_c)``: the chunk's row selection, its
    hidden states and labels, and its logits ``[rows, V]`` in the compute dtype.
    """

    def __init__(self, hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None, labels: Tensor,
                 rows: Tensor, chunk_rows: int) -> None:
        self.n_rows, self.n_vocab = hidden.shape[0], lm_head_weight.shape[0]
        self.dtype = _compute_dtype(hidden.dtype, hidden.device)
        self.hidden, self.labels, self.rows = hidden, labels, rows
        self.lm_head = lm_head_weight.to(self.dtype)
        self.bias = None if bias is None else bias.to(self.dtype)
        step = chunk_rows if chunk_rows > 0 else default_chunk_rows(self.n_vocab, hidden.device)
        self.step = max(1, min(step, self.n_rows))

    def __iter__(self) -> Iterator[tuple[Tensor | slice, Tensor, Tensor, Tensor]]:
        buf = torch.empty(self.step * self.n_vocab, dtype=self.dtype, device=self.hidden.device)
        for sel in _selections(self.rows, self.n_rows, self.step):
            h_c = _take(self.hidden, sel).to(self.dtype)
            logits = buf[: h_c.shape[0] * self.n_vocab].view(h_c.shape[0], self.n_vocab)
            if self.bias is None:
                torch.mm(h_c, self.lm_head.t(), out=logits)
            else:
                torch.addmm(self.bias, h_c, self.lm_head.t(), out=logits)
            yield sel, h_c, _take(self.labels, sel), logits


class _Grads:
    """Accumulates ``(grad_hidden, grad_lm_head, grad_bias)`` from each chunk's logits gradient."""

    def __init__(self, hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None, need: Need) -> None:
        self.need_h, self.need_lm, self.need_b = need[0], need[1], need[2] and bias is not None
        self.hidden_dtype, self.lm_head_dtype = hidden.dtype, lm_head_weight.dtype
        self.lm_head_shape = tuple(lm_head_weight.shape)
        dev = hidden.device
        self.gh = torch.zeros(hidden.shape if self.need_h else (0,), dtype=hidden.dtype, device=dev)
        self.gb = torch.zeros((lm_head_weight.shape[0],) if self.need_b else (0,), dtype=torch.float32, device=dev)
        # grad_lm_head: the first chunk's product as it comes (one rounding, no float32 buffer when
        # a single chunk covers every row, as on CUDA up to CUDA_MIN_CHUNK_ROWS rows); from the
        # second chunk on, a float32 accumulator.
        self.glm: Tensor | None = None
        self._glm_tmp: Tensor | None = None

    @property
    def any(self) -> bool:
        return self.need_h or self.need_lm or self.need_b

    def add(self, sel: Tensor | slice, h_c: Tensor, g: Tensor, lm_head: Tensor) -> None:
        """Add the contribution of one chunk: ``g`` is the chunk's ``d loss / d logits``."""
        if self.need_h:
            if isinstance(sel, slice) and self.gh.dtype == g.dtype:
                torch.mm(g, lm_head, out=self.gh[sel])
            else:
                _put(self.gh, sel, torch.mm(g, lm_head))
        if self.need_lm:
            if self.glm is None:
                self.glm = torch.mm(g.t(), h_c)
            elif self.glm.dtype != torch.float32 or g.dtype != torch.float32:
                # bf16 GEMM (the fast path), rounded once per chunk, accumulated in float32
                self.glm = self.glm.float()
                if self._glm_tmp is None:
                    self._glm_tmp = torch.mm(g.t(), h_c)
                else:
                    torch.mm(g.t(), h_c, out=self._glm_tmp)
                self.glm.add_(self._glm_tmp)
            else:
                self.glm.addmm_(g.t(), h_c)
        if self.need_b:
            self.gb.add_(g.sum(dim=0, dtype=torch.float32))

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        dev = self.gh.device
        if self.glm is None:
            glm = torch.zeros(self.lm_head_shape if self.need_lm else (0,), dtype=self.lm_head_dtype, device=dev)
        else:
            glm = self.glm.to(self.lm_head_dtype)
        return self.gh, glm, self.gb.to(self.hidden_dtype)


def _stats_buffers(n_rows: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.zeros(n_rows, dtype=torch.float32, device=device) for _ in range(3))  # type: ignore[return-value]


def linear_stats(hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                 chunk_rows: int, backend: str, softcap: float | None = None,
                 scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(m [N], lse [N], target [N])`` float32 of ``logits = hidden @ lm_head_weight.T + bias``
    (row max, log-sum-exp relative to it, target logit); ignored rows give 0 / 0 / 0.

    Args:
        hidden: ``[N, H]``; lm_head_weight: ``[V, H]``; bias: ``[V]`` or None (one dtype).
        labels: ``[N]`` int32/int64, ``ignore_index`` for ignored rows.
        chunk_rows: rows per logits chunk (``<= 0``: :func:`default_chunk_rows`).
        backend: whose ``ce_forward`` runs on the chunks (the GEMMs are torch's).
        softcap, scale: the logit transform, applied by the backend's kernels (see the registry).
    """
    kernels = registry.backend_kernels(backend)
    n_rows = hidden.shape[0]
    stats = _stats_buffers(n_rows, hidden.device)
    if n_rows == 0:
        return stats
    for sel, _, y_c, logits in _Chunks(hidden, lm_head_weight, bias, labels, labels != ignore_index, chunk_rows):
        for dst, src in zip(stats, kernels.ce_forward(logits, y_c, 0, ignore_index, softcap, scale), strict=True):
            _put(dst, sel, src)
    return stats


def linear_grads(hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None, labels: Tensor, m: Tensor,
                 lse: Tensor, coef: Tensor, ignore_index: int, chunk_rows: int, backend: str,
                 need: Need, softcap: float | None = None, scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of ``sum(coef * nll)`` w.r.t. ``(hidden, lm_head_weight, bias)`` from the forward's
    ``(m [N], lse [N])``, recomputing the logits; rows with ``coef == 0`` or an ignored label are
    skipped.

    Args: as :func:`linear_stats`, plus ``m`` / ``lse`` / ``coef`` ``[N]`` float32 and ``need``.
    """
    kernels = registry.backend_kernels(backend)
    grads = _Grads(hidden, lm_head_weight, bias, need)
    if hidden.shape[0] == 0 or not grads.any:
        return grads.result()
    rows = (labels != ignore_index) & (coef != 0)
    chunks = _Chunks(hidden, lm_head_weight, bias, labels, rows, chunk_rows)
    for sel, h_c, y_c, logits in chunks:
        _ce_backward_in_place(kernels, logits, y_c, _take(m, sel), _take(lse, sel), _take(coef, sel), ignore_index,
                              softcap, scale)
        grads.add(sel, h_c, logits, chunks.lm_head)
    return grads.result()


def linear_stats_and_grads(hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None, labels: Tensor,
                           coef: Tensor, ignore_index: int, chunk_rows: int, backend: str, need: Need,
                           softcap: float | None = None,
                           scale: float | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(m, lse, target, grad_hidden, grad_lm_head, grad_bias)``: :func:`linear_stats` and
    :func:`linear_grads` from one computation of each chunk's logits (``coef`` known now)."""
    kernels = registry.backend_kernels(backend)
    grads = _Grads(hidden, lm_head_weight, bias, need)
    n_rows = hidden.shape[0]
    stats = _stats_buffers(n_rows, hidden.device)
    if n_rows == 0:
        return (*stats, *grads.result())
    chunks = _Chunks(hidden, lm_head_weight, bias, labels, labels != ignore_index, chunk_rows)
    for sel, h_c, y_c, logits in chunks:
        m_c, lse_c, target_c = kernels.ce_forward(logits, y_c, 0, ignore_index, softcap, scale)
        for dst, src in zip(stats, (m_c, lse_c, target_c), strict=True):
            _put(dst, sel, src)
        if grads.any:
            _ce_backward_in_place(kernels, logits, y_c, m_c, lse_c, _take(coef, sel), ignore_index, softcap, scale)
            grads.add(sel, h_c, logits, chunks.lm_head)
    return (*stats, *grads.result())


def _ce_backward_in_place(kernels: registry.BackendKernels, logits: Tensor, labels: Tensor, m: Tensor, lse: Tensor,
                          coef: Tensor, ignore_index: int, softcap: float | None, scale: float | None) -> None:
    """Turn a chunk's logits into ``d sum(coef * nll) / d logits`` (through the transform) in place."""
    kernels.ce_backward(logits, labels, m, lse, coef.float().contiguous(), 0, ignore_index, logits, softcap, scale)
