"""The ``cpp`` backend: thin wrappers of the compiled CPU extension.

The extension is the prebuilt ``steerlm_kernels._C`` (``setup.py`` builds it when torch is
importable at build time), or, where an install had no torch at build time (pip's default build
isolation), the same sources built on first use (:mod:`steerlm_kernels.kernels.cpp_build`).
:func:`status` says which without building anything; :func:`extension` loads (or builds) it. The
registry (:mod:`steerlm_kernels.registry`) reports both.

The kernels live in ``csrc/cpu_kernels.cpp`` (OpenMP over rows or groups, ATen
``Vectorized<float>`` SIMD with an inlined exp, float32 accumulation, results independent of the
thread count). They validate their inputs themselves (``RuntimeError`` on a contract violation);
the public API has already raised the user-facing ``ValueError``/``TypeError`` before these are
reached. The C++ functions release the GIL while they run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import Tensor

from steerlm_kernels.kernels import cpp_build

#: How the extension is provided: "prebuilt", "built on first use", "to build on first use" or
#: "unavailable" (see :func:`status`).
PREBUILT, BUILT, BUILDABLE, UNAVAILABLE = "prebuilt", "built on first use", "to build on first use", "unavailable"

_STATE: dict[str, object] = {}


def _prebuilt() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("steerlm_kernels._C"), ""
    except Exception as exc:  # not built (ImportError) or built for another torch (undefined symbol)
        return None, f"{type(exc).__name__}: {exc}"


def status() -> tuple[str, str]:
    """``(kind, reason)`` of the extension here, without building it: ``kind`` is ``PREBUILT``
    (``steerlm_kernels._C`` imports), ``BUILT`` (loaded, or cached by an earlier first-use
    build), ``BUILDABLE`` (sources, compiler and ninja present: built on first use) or
    ``UNAVAILABLE``; ``reason`` says what and where, or why not."""
    if "module" in _STATE:
        return str(_STATE["kind"]), str(_STATE["reason"])
    if "error" in _STATE:
        return UNAVAILABLE, str(_STATE["error"])
    module, why = _prebuilt()
    if module is not None:
        _STATE.update(module=module, kind=PREBUILT,
                      reason=f"prebuilt extension steerlm_kernels._C ({getattr(module, 'simd', '?')})")
        return status()
    problem = cpp_build.jit_problem()
    if problem is not None:
        return UNAVAILABLE, f"extension not built ({why}) and {problem}"
    cached = cpp_build.cached_library()
    if cached is not None:
        return BUILT, f"extension built on first use, cached at {cached}"
    return BUILDABLE, f"extension not prebuilt; built on first use into {cpp_build.cache_dir()}"


def extension() -> ModuleType:
    """The extension module: the prebuilt ``_C``, else built on first use (cached). Raises
    ``ImportError`` with the reason when neither works (and remembers it: no second attempt)."""
    module = _STATE.get("module")
    if module is not None:
        return module  # type: ignore[return-value]
    kind, reason = status()
    if "module" in _STATE:
        return _STATE["module"]  # type: ignore[return-value]
    if kind == UNAVAILABLE:
        raise ImportError(reason)
    try:
        module = cpp_build.jit_load()
    except ImportError as exc:
        _STATE["error"] = str(exc)
        raise
    _STATE.update(module=module, kind=BUILT,
                  reason=f"extension built on first use ({getattr(module, 'simd', '?')}), cached in "
                  f"{cpp_build.cache_dir()}")
    return module


def simd() -> str:
    """SIMD flavour the loaded extension was compiled for: "avx512", "avx2" or "default"."""
    return str(getattr(extension(), "simd", "unknown"))


def softcap_arg(softcap: float | None) -> float:
    """The extension's ``softcap`` argument: 0 for none."""
    return 0.0 if softcap is None else float(softcap)


def scale_arg(scale: float | None) -> float:
    """The extension's ``scale`` argument: 1 for none."""
    return 1.0 if scale is None else float(scale)


def ce_forward(logits: Tensor, labels: Tensor, vocab_start: int, ignore_index: int, softcap: float | None = None,
               scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(m[N], lse[N], target[N])`` float32 of CPU ``logits [N, V]`` (unit column stride, any row
    stride): row max, log-sum-exp relative to it, target logit; ignored rows are not read and
    get 0/0/0. See :mod:`steerlm_kernels.registry`."""
    if softcap is None and scale is None:  # the plain kernels (and the call an older build knows)
        m, lse, target = extension().ce_forward(logits, labels, int(vocab_start), int(ignore_index))
    else:
        m, lse, target = extension().ce_forward(logits, labels, int(vocab_start), int(ignore_index),
                                                softcap_arg(softcap), scale_arg(scale))
    return m, lse, target


def ce_backward(
    logits: Tensor, labels: Tensor, m: Tensor, lse: Tensor, coef: Tensor, vocab_start: int, ignore_index: int,
    out: Tensor, softcap: float | None = None, scale: float | None = None,
) -> None:
    """``out = (exp((logits - m) - lse) - onehot) * coef`` row by row, rounded once to ``out.dtype``;
    rows with ``coef == 0`` or an ignored label are zeroed without reading ``logits``. ``out``
    may be ``logits`` itself (in place)."""
    if softcap is None and scale is None:
        extension().ce_backward(logits, labels, m, lse, coef, int(vocab_start), int(ignore_index), out)
    else:
        extension().ce_backward(logits, labels, m, lse, coef, int(vocab_start), int(ignore_index), out,
                                softcap_arg(softcap), scale_arg(scale))


def segment_sum(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """``y[b] = sum(x[cu_seqlens[b]:cu_seqlens[b+1]])`` float32, bounds clamped to ``[0, len(x)]``,
    summed in index order (deterministic)."""
    return extension().segment_sum(x, cu_seqlens)


def group_softmax(x: Tensor, cu_groups: Tensor, max_group: int) -> Tensor:
    """Softmax within each group ``x[cu_groups[g]:cu_groups[g+1]]``, float32 ``[B]`` (``max_group``
    is not needed: any group size runs). See :mod:`steerlm_kernels.ops.group`."""
    return extension().group_softmax(x, cu_groups)


def steerlm2_weights(
    seq_nll: Tensor, log_q: Tensor, ws: Tensor, cu_groups: Tensor, max_group: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weight [B], baseline [B], kl [G])`` float32: ``baseline = group_softmax(-seq_nll - log_q)``,
    ``weight = ws - baseline``, ``kl[g] = sum (ws + 1e-8) log((ws + 1e-8) / (baseline + 1e-8))``
    over group ``g``. See :mod:`steerlm_kernels.ops.group`."""
    weight, baseline, kl = extension().steerlm2_weights(seq_nll, log_q, ws, cu_groups)
    return weight, baseline, kl
