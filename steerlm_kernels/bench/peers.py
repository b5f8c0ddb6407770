"""Adapters for the peers our users compare us with: one function per peer and entry point.

Peers (optional; ``pip install --no-deps "steerlm-kernels[peers]"`` pins them, or
``pip install --no-deps liger-kernel==0.8.5 cut-cross-entropy==25.1.1``; ``--no-deps`` keeps pip
away from torch/triton):

``liger``  Liger-Kernel (``liger_kernel``, LinkedIn): a Triton cross entropy on logits
           (:func:`liger_token_nll`) and a fused linear cross entropy (chunked cuBLAS matmuls +
           that Triton kernel; :func:`liger_linear_token_nll`).
``cce``    Apple's Cut Cross-Entropy (``cut_cross_entropy``): Triton kernels that never hold the
           logits. It has only a fused-linear entry point (hidden states and classifier in;
           :func:`cce_linear_token_nll`).

Every adapter returns the per-token NLL as float32 ``[N]`` (0 at ``ignore_index`` labels),
differentiable through autograd w.r.t. its floating-point inputs (exceptions documented below),
so the benchmark can time the peers through the same calls it uses for us.
:func:`token_nll_adapter` / :func:`linear_token_nll_adapter` pick a peer's adapter by name.

Both peers are Triton code: they need CUDA tensors, or CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` in the environment before the peer is first imported; the interpreter is
chosen when a kernel is decorated). Under the interpreter only agreement is meaningful, never time,
and only float32 / float16: Triton 3.9's interpreter holds bfloat16 values as raw 16-bit integers,
so bfloat16 arithmetic there is garbage.

The agreement check against our public functions and a float64 reference is
:mod:`steerlm_kernels.bench.peers_check` (``python -m steerlm_kernels.bench.peers_check``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from steerlm_kernels import registry

__all__ = [
    "PEERS", "available", "cce_linear_token_nll", "check_peer", "interpreting", "linear_token_nll_adapter",
    "liger_linear_token_nll", "liger_token_nll", "token_nll_adapter",
]

PEERS: tuple[str, ...] = ("liger", "cce")

#: peer -> (importable module, pinned distribution)
_PACKAGES: dict[str, tuple[str, str]] = {
    "liger": ("liger_kernel", "liger-kernel==0.8.5"),
    "cce": ("cut_cross_entropy", "cut-cross-entropy==25.1.1"),
}


# --------------------------------------------------------------------------------------------
# availability


def interpreting() -> bool:
    """Whether Triton kernels decorated from now on run in the interpreter (``TRITON_INTERPRET``)."""
    return registry.triton_interpreting()


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _peer_kernels(peer: str) -> list[Any]:
    """The peer's Triton kernel objects (imports the peer)."""
    if peer == "liger":
        from liger_kernel.ops import cross_entropy

        return [cross_entropy.liger_cross_entropy_kernel]
    from cut_cross_entropy import cce_backward, cce_lse_forward, indexed_dot

    return [cce_lse_forward._cce_lse_forward_kernel, indexed_dot._indexed_neg_dot_forward_kernel,
            cce_backward._cce_backward_kernel]


def _is_interpreted(kernel: Any) -> bool:
    """Whether a (possibly autotuner/heuristics-wrapped) Triton kernel runs in the interpreter."""
    for _ in range(8):
        if type(kernel).__name__ == "InterpretedFunction":
            return True
        if not hasattr(kernel, "fn"):
            return False
        kernel = kernel.fn
    return False


def _why_unavailable(peer: str, device: torch.device) -> str:
    module, pin = _PACKAGES[peer]
    if importlib.util.find_spec(module) is None:
        return f"not installed (pip install --no-deps {pin!r})"
    if importlib.util.find_spec("triton") is None:
        return "triton is not importable (the peer is Triton code)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
    elif device.type == "cpu":
        if not interpreting():
            # Importing the peer now would decorate its kernels for a GPU for the whole process.
            return ("needs CUDA tensors; CPU tensors only under Triton's interpreter "
                    "(TRITON_INTERPRET=1 set before the peer is imported)")
    else:
        return f"runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {device.type}"
    try:
        kernels = _peer_kernels(peer)
    except Exception as exc:  # a broken install, an incompatible triton/torch
        return f"import failed ({type(exc).__name__}: {exc})"
    if device.type == "cpu" and not all(_is_interpreted(k) for k in kernels):
        return ("imported before TRITON_INTERPRET=1 was set: its kernels are compiled for a GPU in this process "
                "(run `python -m steerlm_kernels.bench.peers_check --device cpu`, a fresh process)")
    return ""


def available(device: str | torch.device | None = None) -> dict[str, str]:
    """Which peers can run here, and why not.

    Args:
        device: the device of the tensors the peers would get; default CUDA when available, else CPU.
            On CPU a peer is usable only when ``TRITON_INTERPRET=1`` is set (and was set before the
            peer was first imported). Nothing is imported on CPU when it is not set.

    Returns:
        ``{peer: ""}`` for each usable peer, ``{peer: reason}`` otherwise (not installed, no CUDA
        device, needs the interpreter, import failure), for every name in :data:`PEERS`.
    """
    dev = _resolve_device(device)
    return {peer: _why_unavailable(peer, dev) for peer in PEERS}


def check_peer(peer: Any) -> None:
    """``ValueError`` unless ``peer`` is one of :data:`PEERS`."""
    if peer not in PEERS:
        raise ValueError(f"peer must be one of {PEERS}, got {peer!r}")


# --------------------------------------------------------------------------------------------
# adapters


@contextlib.contextmanager
def _cce_interpreter_log1p() -> Iterator[None]:
    """Under Triton's interpreter, give CCE a working ``libdevice.log1p`` for the call.

    CCE's LSE forward kernel merges partial log-sum-exps with ``log1p`` from
    ``triton.language.extra.libdevice``. Triton 3.9's interpreter implements none of libdevice:
    the stubs return ``None`` and the kernel fails with an ``AttributeError``. For the duration of
    the call, ``cut_cross_entropy.tl_utils.tl_libdevice`` (CCE's alias of that module, the only
    name its kernels look it up by) is swapped for a namespace whose ``log1p`` is ``numpy.log1p``
    on the interpreter's arrays, i.e. the function libdevice computes. CCE's own code and math are
    untouched; nothing is patched outside the interpreter or outside the call.
    """
    if not interpreting():
        yield
        return
    import numpy as np
    from cut_cross_entropy import tl_utils

    saved = tl_utils.tl_libdevice
    # tanh: used by CCE only with softcap (never here); supplied the same way for completeness.
    tl_utils.tl_libdevice = types.SimpleNamespace(log1p=lambda x: _interp_unary(x, np.log1p),
                                                  tanh=lambda x: _interp_unary(x, np.tanh))
    try:
        yield
    finally:
        tl_utils.tl_libdevice = saved


def _interp_unary(x: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` (a numpy ufunc) on an interpreter tensor's array, as the interpreter's own math ops do."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    return tl.core.tensor(TensorHandle(fn(x.handle.data), x.handle.dtype.scalar), x.type)


def liger_token_nll(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Per-token NLL ``-log softmax(logits)[label]`` by Liger-Kernel's cross entropy on logits.

    Args:
        logits: ``[N, V]`` float32 / bfloat16 / float16 (CUDA, or CPU under the interpreter).
            **Liger overwrites it**: its kernel writes the gradient into the logits' storage during
            the forward (when ``logits.requires_grad``) and zeroes the rows of ignored tokens even
            without grad. Pass a tensor you do not need afterwards (a copy, or logits nothing else
            saved for backward); Liger does this behind autograd's back (no version-counter bump).
        labels: ``[N]`` int64; ``ignore_index`` contributes 0. Liger asserts that the other labels
            lie in ``[0, V)`` (a host sync).
        ignore_index: the ignored label value (default -100).

    Returns:
        float32 ``[N]``, 0 at ignored tokens; differentiable w.r.t. ``logits`` (Liger's own
        per-token loss is of the logits' dtype, so bf16/fp16 values are rounded to that dtype
        before the cast to float32). Liger's backward multiplies its stored gradient by the
        upstream ``[N]`` gradient (one more ``[N, V]`` tensor).

    Raises:
        ValueError: logits that are not 2-D, or labels that are not ``[N]``.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V] and labels [N]; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    from liger_kernel.transformers.functional import liger_cross_entropy

    loss = liger_cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    return loss.float()


def _check_linear_shapes(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be [N, H], weight [V, H], labels [N]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}]; got {tuple(bias.shape)}")


def liger_linear_token_nll(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, *, ignore_index: int = -100
) -> Tensor:
    """Per-token NLL of ``logits = hidden @ weight.T (+ bias)`` by Liger-Kernel's fused linear cross entropy.

    Args:
        hidden: ``[N, H]`` float32 / bfloat16 / float16 (CUDA, or CPU under the interpreter).
        weight: ``[V, H]``, the classifier (LM head), ``hidden``'s dtype.
        labels: ``[N]`` int64; ``ignore_index`` contributes 0. No shift is applied: ``labels[i]``
            is the target of ``hidden[i]``.
        bias: optional ``[V]``.
        ignore_index: the ignored label value (default -100).

    Returns:
        float32 ``[N]``, 0 at ignored tokens; differentiable w.r.t. ``hidden``, ``weight`` (and
        ``bias``). Inputs are never modified.

    ``LigerFusedLinearCrossEntropyFunction`` with ``reduction="none"`` and its default options
    (``accum_dtype=None``: ``grad_weight``/``grad_bias`` accumulate in the parameters' dtype). With
    ``reduction="none"`` Liger computes no gradient in the forward; its backward recomputes the
    chunked logits and folds the upstream per-token gradient in (chunks of rows sized so a logits
    chunk is about ``N x H`` elements). bf16/fp16 logits chunks are rounded to that dtype before its
    float32 cross entropy.

    Raises:
        ValueError: bad shapes.
    """
    _check_linear_shapes(hidden, weight, labels, bias)
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    loss = liger_fused_linear_cross_entropy(hidden, weight, labels, bias, ignore_index=ignore_index,
                                            reduction="none")
    return loss.float()


def cce_linear_token_nll(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, *, ignore_index: int = -100
) -> Tensor:
    """Per-token NLL of ``logits = hidden @ weight.T`` by Cut Cross-Entropy's ``linear_cross_entropy``.

    Arguments and result as :func:`liger_linear_token_nll`, except that CCE has no bias (``bias``
    is accepted only as ``None``, so that both linear adapters share a signature).

    ``cut_cross_entropy.linear_cross_entropy(hidden, weight, labels, reduction="none", shift=False,
    filter_eps=None, impl="cce")``. ``shift=False`` is CCE's default, given explicitly.
    ``filter_eps=None`` turns OFF CCE's default gradient filtering (``filter_eps="high"``: blocks
    whose softmax is below ``finfo(dtype).eps / 32`` are skipped in the backward, an approximation)
    so the comparison is exact; timings are therefore of CCE without filtering, which is slower than
    its default. CCE's backward accepts only bfloat16 / float16 ``hidden``: a float32 ``hidden``
    works forward-only (``ValueError`` here when a gradient would be needed, instead of CCE's
    ``AssertionError`` at backward time). Under Triton's interpreter the call runs with
    :func:`_cce_interpreter_log1p` (a missing interpreter function supplied, CCE's math unchanged).

    Raises:
        ValueError: bad shapes, ``bias`` given, float32 ``hidden`` with a gradient needed.
    """
    _check_linear_shapes(hidden, weight, labels, bias)
    if bias is not None:
        raise ValueError("cce: Cut Cross-Entropy's linear_cross_entropy takes no bias")
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if needs_grad and hidden.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"cce: Cut Cross-Entropy's backward requires bfloat16/float16 hidden states, got {hidden.dtype} "
            "(use it under torch.no_grad() or with detached inputs for values only)"
        )
    from cut_cross_entropy import linear_cross_entropy

    with _cce_interpreter_log1p():
        loss = linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, reduction="none",
                                    shift=False, filter_eps=None, impl="cce")
    return loss.float()


def token_nll_adapter(peer: str) -> Callable[..., Tensor]:
    """The peer's cross entropy on logits: :func:`liger_token_nll` (``"cce"`` has none: ``ValueError``)."""
    check_peer(peer)
    if peer == "cce":
        raise ValueError(
            "cce: Cut Cross-Entropy has no cross entropy on precomputed logits, only the fused "
            "linear one (hidden states and classifier in): use cce_linear_token_nll"
        )
    return liger_token_nll


def linear_token_nll_adapter(peer: str) -> Callable[..., Tensor]:
    """The peer's fused linear cross entropy: :func:`liger_linear_token_nll` or :func:`cce_linear_token_nll`."""
    check_peer(peer)
    return liger_linear_token_nll if peer == "liger" else cce_linear_token_nll
