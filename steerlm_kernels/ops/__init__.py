"""Custom ops and autograd, one module per op family (above the backend registry).

* :mod:`.cross_entropy` - token NLL from the logits: forward and one-pass backward (in place too).
* :mod:`.segment` - deterministic per-sequence sums of packed token vectors.
* :mod:`.group` - SteerLM 2.0's group softmax and baseline / weight / KL.
* :mod:`.linear_cross_entropy` - fused linear cross entropy (custom ops + autograd), running
  :mod:`.linear_chunks` (chunks of rows: library GEMMs + the backend's CE kernels) or the Triton
  tile kernels.
* :mod:`.dropin` - per-token ``(nll, lse, zsum)`` autograd of the drop-in cross entropies.
* :mod:`.token_logprobs` - per-token log-probabilities and entropy from hidden states.

Every op takes the resolved backend name and runs that backend's kernels
(:func:`steerlm_kernels.registry.backend_kernels`).
"""
