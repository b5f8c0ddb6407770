"""Drop-in replacement for Megatron-core's ``vocab_parallel_cross_entropy``.

``from steerlm_kernels.megatron import vocab_parallel_cross_entropy`` takes Megatron's signature
and ``[s, b, v/tp]`` layout, and the tensor-parallel group from megatron-core's
``parallel_state`` when it is initialised. It communicates once per call (Megatron: three
all-reduces) and never modifies the logits (Megatron subtracts the max in place on fp32 input).
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor

from steerlm_kernels.api import token_nll

_FROM_MEGATRON = object()


def tensor_parallel_group() -> Any:
    """megatron-core's tensor-parallel group when initialised with more than one rank, else None.

    megatron-core is never imported here: if the caller has not imported its ``parallel_state``,
    it cannot have been initialised (and importing megatron-core is slow and noisy)."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is None:
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: Tensor,
    target: Tensor,
    label_smoothing: float = 0.0,
    *,
    process_group: Any = _FROM_MEGATRON,
    softcap: float | None = None,
    logit_scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Per-token cross entropy of vocabulary-parallel logits, as Megatron's function.

    Args:
        vocab_parallel_logits: ``[s, b, V/tp]`` (any leading shape), this rank's contiguous shard.
        target: ``[s, b]`` global token ids (int64 / int32), replicated over the group.
        label_smoothing: only 0.0 is supported (Megatron's smoothed loss uses the local shard's
            vocabulary under TP, so it differs by rank; we do not reproduce that).
        process_group: defaults to megatron-core's tensor-parallel group (None when megatron-core
            is absent or uninitialised: a single shard holding the whole vocabulary).
        softcap, logit_scale: logit transforms applied inside the kernels (not in Megatron's
            signature; keyword-only extensions): ``z' = softcap * tanh(logit_scale * z / softcap)``,
            see :func:`steerlm_kernels.token_nll`.

    Returns:
        float32 ``[s, b]`` loss, differentiable w.r.t. the logits.
    """
    if label_smoothing != 0.0:
        raise NotImplementedError("label_smoothing: only 0.0 is supported")
    group = tensor_parallel_group() if process_group is _FROM_MEGATRON else process_group
    return token_nll(vocab_parallel_logits, target, process_group=group, softcap=softcap, logit_scale=logit_scale,
                     backend=backend)
