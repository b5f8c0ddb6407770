"""The backends' kernels: the bottom layer, importing nothing of the package above it.

* Triton kernels and their launchers, one module per op family: :mod:`.cross_entropy`,
  :mod:`.segment`, :mod:`.group`, :mod:`.linear_tiles` (each declares its ``AOT_SPECS``,
  compiled for sm_80 / sm_90 by :mod:`.aot`).
* :mod:`.cpp` - the ``cpp`` backend: thin wrappers of the compiled ``steerlm_kernels._C``.
* :mod:`.cuda` - the ``cuda`` backend: the hand-written CUDA kernels (``csrc/*.cu``) of an
  extension built with CUDA.
* :mod:`.reference` - the ``torch`` backend: plain PyTorch, the one torch reference of every op.

:mod:`steerlm_kernels.registry` collects them per backend.
"""
