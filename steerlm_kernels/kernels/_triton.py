"""Import shim: ``triton`` and ``tl`` when Triton is installed, stand-ins otherwise.

Kernel modules do ``from steerlm_kernels.kernels._triton import triton, tl`` so that the package
still imports (and the ``cpp``/``torch`` backends still work) where Triton is absent, e.g. on
macOS. ``registry.backends()`` reports Triton as unavailable there.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - Linux x86_64 always has it (a dependency)
    from types import SimpleNamespace

    HAS_TRITON = False

    def _jit(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    triton = SimpleNamespace(jit=_jit, next_power_of_2=lambda n: 1 << max(0, (n - 1).bit_length()))
    tl = SimpleNamespace(constexpr=int)



def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the interpreter, parsed as Triton parses it (``1``,
    ``true``, ``on``, ``yes``): Triton kernels decorated from then on run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


__all__ = ["HAS_TRITON", "interpreting", "tl", "triton"]
