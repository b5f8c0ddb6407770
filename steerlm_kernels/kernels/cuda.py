"""The ``cuda`` backend: the hand-written CUDA kernels of ``csrc/*.cu``, through the extension.

``csrc/cross_entropy.cu`` (``ce_forward`` / ``ce_backward``: one 256-thread block per row, an
online max / sum-of-exp per thread merged in a fixed tree order, float32 math, in place safe) and
``csrc/segment_sum.cu`` (one block per segment, fixed-order reduction) are torch-free kernels;
``csrc/cuda_bindings.cpp`` wraps them for torch tensors and ``csrc/bindings.cpp`` routes CUDA
tensors of the extension's functions (``_C.ce_forward``, ``_C.ce_backward``, ``_C.segment_sum``)
there. They exist only in an extension built with CUDA: ``setup.py`` compiles them when a CUDA
toolkit (``nvcc``) and a CUDA build of torch are both present at install time (``pip install
--no-build-isolation .``); the extension exposes ``_C.with_cuda``. The first-use build of
:mod:`steerlm_kernels.kernels.cpp_build` is CPU-only, so an install with build isolation has no
``cuda`` backend (:func:`status` says so).

What the backend runs, per op of the backend contract (:mod:`steerlm_kernels.registry`):

==================  ============================================================================
``ce_forward``      ``csrc/cross_entropy.cu`` (float32 / bfloat16 / float16 logits, int32 / int64
                    labels, any row stride)
``ce_backward``     ``csrc/cross_entropy.cu`` (``out`` may be the logits: in place)
``segment_sum``     ``csrc/segment_sum.cu``
``group_softmax``,  the torch reference (:mod:`steerlm_kernels.kernels.reference`): O(B) ops over
``steerlm2_weights`` the sequences, a few small CUDA launches; there is no hand-written kernel
                    for them, and borrowing Triton's would make this backend need Triton
fused linear        the ``chunks`` strategy (:func:`steerlm_kernels.registry.linear_strategy`):
                    cuBLAS GEMMs plus the ``ce_forward`` / ``ce_backward`` above, per chunk
==================  ============================================================================

Inputs reaching these wrappers have been validated by the public API (the same checks as every
backend); the C++ side checks the contract again (``RuntimeError``), and the wrappers refuse
tensors that are not on a CUDA device (the extension's functions would run the CPU kernels).
"""

from __future__ import annotations

from torch import Tensor

from steerlm_kernels.kernels import cpp, reference

#: Why the CUDA kernels are missing from a first-use (JIT) or CPU-only build.
WITHOUT_CUDA = ("extension built without CUDA (the CUDA kernels are compiled only by an install with "
                "--no-build-isolation where nvcc and a CUDA build of torch exist)")


def status() -> tuple[bool, str]:
    """``(available, reason)`` of the CUDA kernels in the extension, without building anything
    (a CUDA device is not checked here: :func:`steerlm_kernels.registry.backends` does that)."""
    kind, reason = cpp.status()
    if kind == cpp.UNAVAILABLE:
        return False, f"extension unavailable: {reason}"
    if kind != cpp.PREBUILT:  # built (or to be built) on first use: CPU sources only
        return False, WITHOUT_CUDA
    if not getattr(cpp.extension(), "with_cuda", False):
        return False, WITHOUT_CUDA
    return True, "hand-written CUDA kernels (csrc/*.cu) of the prebuilt steerlm_kernels._C"


def check_cuda(*tensors: Tensor) -> None:
    """Raise ``ValueError`` unless every tensor is on a CUDA device."""
    for t in tensors:
        if t.device.type != "cuda":
            raise ValueError(f"the cuda backend runs on CUDA tensors only; got a tensor on {t.device}")


def ce_forward(logits: Tensor, labels: Tensor, vocab_start: int, ignore_index: int, softcap: float | None = None,
               scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(m[N], lse[N], target[N])`` float32 of CUDA ``logits [N, V]`` (float32/bf16/fp16, unit
    column stride, any row stride; ``labels [N]`` int32/int64): row max, log-sum-exp relative to
    it, target logit; ignored rows are not read and get 0/0/0. See :mod:`steerlm_kernels.registry`."""
    check_cuda(logits, labels)
    if softcap is None and scale is None:
        m, lse, target = cpp.extension().ce_forward(logits, labels, int(vocab_start), int(ignore_index))
    else:
        m, lse, target = cpp.extension().ce_forward(logits, labels, int(vocab_start), int(ignore_index),
                                                    cpp.softcap_arg(softcap), cpp.scale_arg(scale))
    return m, lse, target


def ce_backward(
    logits: Tensor, labels: Tensor, m: Tensor, lse: Tensor, coef: Tensor, vocab_start: int, ignore_index: int,
    out: Tensor, softcap: float | None = None, scale: float | None = None,
) -> None:
    """``out = (exp((logits - m) - lse) - onehot) * coef`` row by row on CUDA, float32 math rounded
    once to ``out.dtype`` (``[N, V]``, the logits' dtype); rows with ``coef == 0`` or an ignored
    label are zeroed without reading ``logits``. ``out`` may be ``logits`` itself (in place)."""
    check_cuda(logits, labels, m, lse, coef, out)
    if softcap is None and scale is None:
        cpp.extension().ce_backward(logits, labels, m, lse, coef, int(vocab_start), int(ignore_index), out)
    else:
        cpp.extension().ce_backward(logits, labels, m, lse, coef, int(vocab_start), int(ignore_index), out,
                                    cpp.softcap_arg(softcap), cpp.scale_arg(scale))


def segment_sum(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """``y[b] = sum(x[cu_seqlens[b]:cu_seqlens[b+1]])`` float32 ``[B]`` on CUDA (``x [N]`` any
    float dtype, ``cu_seqlens [B+1]`` int32/int64), bounds clamped to ``[0, N]``, a fixed
    reduction order (deterministic)."""
    check_cuda(x, cu_seqlens)
    return cpp.extension().segment_sum(x, cu_seqlens)


def group_softmax(x: Tensor, cu_groups: Tensor, max_group: int) -> Tensor:
    """Softmax within each group, float32 ``[B]``: the torch reference's
    (:func:`steerlm_kernels.kernels.reference.group_softmax`); no hand-written kernel."""
    return reference.group_softmax(x, cu_groups, max_group)


def steerlm2_weights(
    seq_nll: Tensor, log_q: Tensor, ws: Tensor, cu_groups: Tensor, max_group: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weight [B], baseline [B], kl [G])`` float32: the torch reference's
    (:func:`steerlm_kernels.kernels.reference.steerlm2_weights`); no hand-written kernel."""
    return reference.steerlm2_weights(seq_nll, log_q, ws, cu_groups, max_group)
