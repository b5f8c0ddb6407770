"""Op families: each module holds its Triton kernels, custom-op registration and autograd.

* :mod:`.cross_entropy` - token NLL forward (online log-sum-exp) and one-pass backward.
* :mod:`.segment` - deterministic per-sequence sums of packed token vectors.
* :mod:`.reference` - the ``torch`` backend (chunked plain PyTorch) of the same primitives.
* :mod:`.cpp` - the ``cpp`` backend: thin wrappers of the compiled ``steerlm_kernels._C``.
"""
