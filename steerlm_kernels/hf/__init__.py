"""Hugging Face / TRL integration: a room above the kernel library, below the SteerLM 2.0 application.

* :mod:`steerlm_kernels.hf.heads` - what a ``*ForCausalLM`` computes its logits from: the final
  hidden states and the LM head (tied or not, with or without bias) and the logit transforms its
  config declares (soft-capping, scaling); the reason when the fused path cannot serve a model.
* :mod:`steerlm_kernels.hf.patch` - ``patch(model)`` / ``unpatch(model)``: the causal-LM loss through
  :func:`steerlm_kernels.linear_cross_entropy`, never materialising the logits while training.
* :mod:`steerlm_kernels.hf.trl` - adapters for TRL's per-token log-probabilities (DPO, GRPO).

Imports only the kernel library (and transformers / trl, lazily where optional).
"""

from steerlm_kernels.hf.patch import is_patched, patch, unpatch

__all__ = ["is_patched", "patch", "unpatch"]
