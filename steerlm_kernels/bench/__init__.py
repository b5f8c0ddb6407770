"""The benchmark wing: ``steerlm-kernels bench`` and the peers' agreement check.

It uses the library only through its public API (``import steerlm_kernels as sk``) and
:mod:`steerlm_kernels.registry`; ``import steerlm_kernels`` never imports it.

Modules (each imports only those above it in this list, and the library):

``harness``      timing, peak extra memory, the result :class:`~.harness.Row`, value / gradient checks,
                 table cells, the random SteerLM-like batch shared by ``ce`` and ``linear``
``peers``        adapters for Liger-Kernel and Cut Cross-Entropy, one function per peer and entry point
``peers_check``  the peers' agreement with our values (``python -m steerlm_kernels.bench.peers_check``)
``ce``           section "ce": logits in (baseline / train / in-place phases)
``linear``       section "linear": hidden states in, the fused linear losses
``group``        section "group": ``steerlm2_weights`` and ``segment_softmax``
``dist``         section "dist": collectives and bytes of vocabulary-parallel cross entropy
``score``        section "score": ``steerlm-kernels score``'s engine against the plain Hugging Face loop
``config``       the command's options and their device-dependent defaults
``report``       the markdown tables and the PNG plots
``suite``        the command: every section over its grid, JSON / markdown / plots
``summary``      the summary table that ends ``make gpu-check`` (standard library only, nothing of the
                 package: it runs by path where torch is missing)
"""
