"""Backend selection, in one place.

Every op has four implementations with the same signature, collected in a
:class:`BackendKernels`:

========  ==================  ====================================================================
name      runs on             where it lives
========  ==================  ====================================================================
triton    CUDA tensors        ``steerlm_kernels/kernels/*.py`` Triton kernels (also CPU tensors when
                              ``TRITON_INTERPRET=1`` is set before ``triton`` is imported: tests)
cpp       CPU tensors         ``steerlm_kernels._C`` (``csrc/``), the compiled extension, through
                              ``steerlm_kernels/kernels/cpp.py``
torch     anywhere            ``steerlm_kernels/kernels/reference.py``: chunked plain PyTorch
cuda      CUDA tensors        the hand-written CUDA kernels ``csrc/*.cu`` of an extension built with
                              CUDA, through ``steerlm_kernels/kernels/cuda.py`` (the group ops are
                              the torch reference's there); chosen only when asked for
========  ==================  ====================================================================

``resolve(backend, device)`` turns the user's ``backend=`` argument (or the environment variable
``STEERLM_KERNELS_BACKEND`` when the argument is ``"auto"``) into one of these names, and
``backend_kernels(name)`` returns that backend's :class:`BackendKernels`. Nothing else in the
package chooses a backend. The registry sits below the custom ops (:mod:`steerlm_kernels.ops`) and
imports only the backends (:mod:`steerlm_kernels.kernels`).

The backend contract (all tensors on one device; ``logits`` is ``[N, V]`` with unit column stride
and any row stride; ``labels`` ``[N]`` int32/int64; results float32). The statistics stay
RELATIVE TO THE ROW MAX: ``m`` and ``lse`` are never added together, because ``m + lse`` in
float32 rounds ``lse`` away when ``|m|`` is large (at ``m = 1e8`` an ulp is 8: ``nll`` of seven
equal logits would come out 0 instead of ``log 7``). This costs nothing on the ``[N, V]`` side
(the logits are read as before) and one more float per row on the ``[N]`` side.

The logit transform: ``ce_forward`` and ``ce_backward`` take two trailing arguments
``softcap: float | None = None`` and ``scale: float | None = None`` (validated: finite, > 0;
None: none). With either, every logit ``x`` is replaced, before anything below, by
``z' = softcap * tanh(scale * x / softcap)`` (``scale * x`` without a softcap; scale first, then
cap), so ``m``, ``lse`` and ``target`` are those of the TRANSFORMED row (``target`` = the
transformed target logit), and the backward applies the chain rule ``dz'/dx = scale * (1 -
tanh^2)`` (or ``scale``) to every element, in float32 before the one rounding. The transform is
elementwise, so vocabulary shards merge as below unchanged. With neither, the backends run their
plain kernels (the Triton ``TRANSFORM`` constexpr, the C++/CUDA template parameter, are 0: the
transform is compiled out). The C++ / CUDA extension takes ``softcap = 0`` and ``scale = 1`` for
None.

``ce_forward(logits, labels, vocab_start, ignore_index, softcap=None, scale=None) -> (m[N], lse[N], target[N])``
    ``m`` is the row max (the largest logit in float32; **0 when every logit of the row is
    -inf**, so that no ``-inf - -inf`` arises), ``lse = log(sum(exp(x - m)))`` over the row
    (``-inf`` for a row of ``-inf`` only; NaN when the row holds NaN or ``+inf``), and
    ``target`` the logit of column ``labels - vocab_start`` itself (its exact float32 value,
    absolute, not relative) when that column lies in ``[0, V)``, else 0. The token's NLL is then
    ``lse - (target - m)``. Rows whose label is ``ignore_index`` are not read and get
    ``m = lse = target = 0``. With vocabulary shards (``vocab_start``), per-shard results merge
    as ``M = max m_r`` over the shards with ``lse_r > -inf``,
    ``lse = log(sum_r exp((m_r - M) + lse_r))``, ``target = sum_r target_r``
    (:func:`steerlm_kernels.kernels.reference.merge_stats`).
``ce_backward(logits, labels, m, lse, coef, vocab_start, ignore_index, out, softcap=None, scale=None) -> None``
    ``out[i] = (exp((logits[i] - m[i]) - lse[i]) - onehot(labels[i] - vocab_start)) * coef[i]``,
    the subtraction of ``m`` first (exact for the logits that matter), computed in float32 and
    rounded once to ``out.dtype``; rows with ``coef == 0`` or an ignored label are written as
    zeros without reading the logits. ``out`` may be ``logits`` itself (in place): each element
    is read before it is written, by the same thread. (The caller never passes logits whose
    rows overlap in memory as ``out``; see :mod:`steerlm_kernels.ops.cross_entropy`.)
``segment_sum(x, cu_seqlens) -> y[B]``
    ``y[b] = sum(x[cu_seqlens[b]:cu_seqlens[b+1]])`` in a fixed order (deterministic).
``group_softmax(x, cu_groups, max_group) -> y[B]`` and
``steerlm2_weights(seq_nll, log_q, ws, cu_groups, max_group) -> (weight[B], baseline[B], kl[G])``
    the O(B) group ops of :mod:`steerlm_kernels.ops.group`: softmax within consecutive groups
    ``cu_groups`` (int64 ``[G+1]`` offsets, groups non-empty), and SteerLM 2.0's baseline /
    weight / per-group KL. ``max_group`` (the largest group) sizes the Triton launch; the ``cpp``
    and ``torch`` implementations do not need it.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from steerlm_kernels.kernels import cpp, cuda
from steerlm_kernels.kernels._triton import interpreting

BACKENDS: tuple[str, ...] = ("triton", "cpp", "torch", "cuda")
ENV_VAR = "STEERLM_KERNELS_BACKEND"
#: How the fused-linear ops run on the Triton backend: ``chunks`` (default) or ``tiles``.
LINEAR_ENV_VAR = "STEERLM_KERNELS_LINEAR"
LINEAR_STRATEGIES: tuple[str, ...] = ("chunks", "tiles")


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, and why (not). ``bool(status)`` is ``available``."""

    name: str
    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'unavailable'} ({self.reason})"


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return interpreting()


# What resolve() needs to know, probed once at import (cheap: nothing is built) and kept in plain
# dicts, so that resolve() reads them without importing anything: torch.compile(fullgraph=True)
# traces resolve() when it holds the first call of an op in the process, and dynamo cannot trace
# an import (builtins.__import__ is a skipped function).
def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


_TRITON: dict[str, str | None] = {"error": _import_error("triton")}
_CPP: dict[str, str] = {}


def _refresh_cpp() -> None:
    kind, reason = cpp.status()
    _CPP.update(kind=kind, reason=reason)


_refresh_cpp()
# the cuda backend: whether the extension holds the CUDA kernels (None) or why not; a CUDA device
# is implied by the tensors resolve() is asked about, and checked by backends()
_CUDA: dict[str, str | None] = {"error": None}


def _refresh_cuda() -> None:
    ok, reason = cuda.status()
    _CUDA.update(error=None if ok else reason, reason=reason)


_refresh_cuda()


def _triton_import_error() -> str | None:
    err = _TRITON["error"]
    return None if err is None else f"triton is not importable ({err})"


def _cpp_import_error(load: bool = False) -> str | None:
    """None when the cpp backend can run here, else why not. ``load=True`` (eager calls) builds the
    extension now when it is to be built on first use, so that a failed build is reported here, not
    inside the op; while torch.compile traces, the import-time probe is trusted (the op's first
    run builds it)."""
    if load and _CPP["kind"] == cpp.BUILDABLE and not torch.compiler.is_compiling():
        try:
            cpp.extension()
        except ImportError:
            pass
        _refresh_cpp()
    return _CPP["reason"] if _CPP["kind"] == cpp.UNAVAILABLE else None


def backends() -> dict[str, BackendStatus]:
    """Report every backend: available or not, and why.

    Returns:
        ``{"triton": BackendStatus, "cpp": BackendStatus, "torch": BackendStatus,
        "cuda": BackendStatus}``; each status is truthy when the backend can run on this machine.
    """
    out: dict[str, BackendStatus] = {}
    err = _triton_import_error()
    if err is not None:
        out["triton"] = BackendStatus("triton", False, err)
    elif torch.cuda.is_available():
        out["triton"] = BackendStatus("triton", True, f"CUDA tensors on {torch.cuda.get_device_name()}")
    elif triton_interpreting():
        out["triton"] = BackendStatus("triton", True, "CPU tensors through the interpreter (TRITON_INTERPRET=1)")
    else:
        out["triton"] = BackendStatus(
            "triton", False, "no CUDA device (set TRITON_INTERPRET=1 to interpret kernels on CPU tensors)"
        )
    err = _cpp_import_error()
    out["cpp"] = BackendStatus("cpp", err is None, err or _CPP["reason"])
    out["torch"] = BackendStatus("torch", True, "chunked PyTorch reference, any device")
    if _CUDA["error"] is not None:
        out["cuda"] = BackendStatus("cuda", False, str(_CUDA["error"]))
    elif not torch.cuda.is_available():
        out["cuda"] = BackendStatus("cuda", False, "no CUDA device")
    else:
        out["cuda"] = BackendStatus("cuda", True, f"CUDA tensors on {torch.cuda.get_device_name()}: {_CUDA['reason']}")
    return out


def resolve(backend: str, device: torch.device) -> str:
    """Pick the backend name for tensors on ``device``.

    ``backend="auto"`` defers to ``$STEERLM_KERNELS_BACKEND`` when set, else picks ``triton`` for
    CUDA tensors, ``cpp`` for CPU tensors when the extension is built, and ``torch`` otherwise
    (``cuda`` is never picked by ``auto``: name it). A forced backend that cannot run on ``device``
    raises ``ValueError``.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    name = backend
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto").strip() or "auto"
        source = f"${ENV_VAR}"
    else:
        source = "backend"
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"{source} must be one of {('auto',) + BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            return "triton" if _triton_import_error() is None else "torch"
        if device.type == "cpu" and _cpp_import_error(load=True) is None:
            return "cpp"
        return "torch"
    if name == "triton":
        if _triton_import_error() is not None:
            raise ValueError(f"{source}='triton' is unavailable: {_triton_import_error()}")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            raise ValueError(
                f"{source}='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                f"got tensors on {device}"
            )
    elif name == "cpp":
        if device.type != "cpu":
            raise ValueError(f"{source}='cpp' runs on CPU tensors only; got tensors on {device}")
        err = _cpp_import_error(load=True)
        if err is not None:
            raise ValueError(f"{source}='cpp' is unavailable: {err}")
    elif name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{source}='cuda' runs on CUDA tensors only; got tensors on {device}")
        if _CUDA["error"] is not None:
            raise ValueError(f"{source}='cuda' is unavailable: {_CUDA['error']}")
    return name


def linear_strategy(backend: str) -> str:
    """How the fused-linear ops (:mod:`steerlm_kernels.ops.linear_cross_entropy`) run on ``backend``.

    ``"chunks"`` (every backend; the default): chunks of rows, ``logits_c = hidden_c @ W.T`` by the
    library GEMM (cuBLAS on CUDA), then the backend's own cross-entropy kernels on the chunk
    (in place), then ``grad_hidden_c = g @ W`` and ``grad_W += g.T @ hidden_c`` by GEMM:
    deterministic, three GEMMs at library speed plus three passes over a ``[chunk, V]`` buffer.
    ``"tiles"`` (Triton only, ``$STEERLM_KERNELS_LINEAR=tiles``): the Triton tile kernels, which
    never hold a logits chunk (``O(N)`` extra memory) but multiply with ``tl.dot`` and accumulate
    the gradients with float32 atomic adds (not bitwise deterministic). Other backends ignore the
    variable. An unknown value raises ``ValueError``.
    """
    value = os.environ.get(LINEAR_ENV_VAR, "").strip() or "chunks"
    if value not in LINEAR_STRATEGIES:
        raise ValueError(f"${LINEAR_ENV_VAR} must be one of {LINEAR_STRATEGIES}, got {value!r}")
    return value if backend == "triton" else "chunks"


@dataclass(frozen=True)
class BackendKernels:
    """One backend's implementations of the backend contract (see the module docstring).

    ``linear_tiles_forward`` / ``linear_tiles_backward`` are the Triton tile kernels of the fused
    linear ops (:mod:`steerlm_kernels.kernels.linear_tiles`; trailing ``softcap, scale`` as
    ``ce_forward``); None on backends without them.
    """

    name: str
    ce_forward: Callable[..., tuple[Tensor, Tensor]]
    ce_backward: Callable[..., None]
    segment_sum: Callable[..., Tensor]
    group_softmax: Callable[..., Tensor]
    steerlm2_weights: Callable[..., tuple[Tensor, Tensor, Tensor]]
    linear_tiles_forward: Callable[..., tuple[Tensor, Tensor]] | None = None
    linear_tiles_backward: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None


@functools.cache
def backend_kernels(name: str) -> BackendKernels:
    """The kernels of backend ``name`` (a name :func:`resolve` returned)."""
    if name == "triton":
        from steerlm_kernels.kernels import cross_entropy, group, linear_tiles, segment

        return BackendKernels(
            name, cross_entropy.ce_forward, cross_entropy.ce_backward, segment.segment_sum,
            group.group_softmax, group.steerlm2_weights,
            linear_tiles.linear_ce_forward, linear_tiles.linear_ce_backward,
        )
    if name == "torch":
        from steerlm_kernels.kernels import reference

        return BackendKernels(
            name, reference.ce_forward, reference.ce_backward, reference.segment_sum,
            reference.group_softmax, reference.steerlm2_weights,
        )
    if name == "cpp":
        return BackendKernels(name, cpp.ce_forward, cpp.ce_backward, cpp.segment_sum, cpp.group_softmax,
                              cpp.steerlm2_weights)
    if name == "cuda":
        return BackendKernels(name, cuda.ce_forward, cuda.ce_backward, cuda.segment_sum, cuda.group_softmax,
                              cuda.steerlm2_weights)
    raise ValueError(f"unknown backend {name!r}")
