"""steerlm_kernels: fused kernels for SteerLM 2.0 and weighted per-sequence NLL training.

Public API (see SPEC and each docstring)::

    import steerlm_kernels as sk
    sk.token_nll(logits, labels)                         # [B, S] float32
    sk.sequence_nll(logits, labels, loss_mask)           # [B]    float32
    sk.weighted_sequence_loss(logits, labels, loss_mask, weight, normalizer)  # scalar
    sk.steerlm2_weights(seq_nll, log_q, ws, num_responses)  # (weight, baseline, distance)
    sk.backends()                                        # what can run here, and why not
    sk.linear_weighted_sequence_loss(hidden, lm_head_weight, labels, loss_mask, weight, normalizer)
    sk.linear_cross_entropy(hidden, lm_head_weight, target, reduction="mean")  # drop-in losses
    sk.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-4)
    sk.linear_token_logprobs(hidden, lm_head_weight, labels, temperature=0.7, return_entropy=True)
    sk.nn.SequenceNLL(), sk.nn.WeightedSequenceLoss()    # module forms
    sk.megatron.vocab_parallel_cross_entropy(...)
    sk.GPTSteerLMModel(model, cfg).get_loss_and_metrics(batch, forward_only=False)  # the application,
    sk.data.SteerLM2Dataset(path)                        # loaded on first access (steerlm_kernels.steerlm2)
"""

from steerlm_kernels import megatron, nn
from steerlm_kernels.api import (
    SteerLM2Weights,
    segment_softmax,
    sequence_nll,
    steerlm2_weights,
    token_nll,
    weighted_sequence_loss,
)
from steerlm_kernels.api_dropin import cross_entropy, linear_cross_entropy, linear_token_logprobs
from steerlm_kernels.api_linear import linear_sequence_nll, linear_weighted_sequence_loss
from steerlm_kernels.registry import BACKENDS, BackendStatus, backends

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "GPTSteerLMModel",
    "__version__",
    "backends",
    "cross_entropy",
    "data",
    "linear_cross_entropy",
    "linear_sequence_nll",
    "linear_token_logprobs",
    "linear_weighted_sequence_loss",
    "megatron",
    "nn",
    "SteerLM2Weights",
    "segment_softmax",
    "sequence_nll",
    "steerlm2_weights",
    "token_nll",
    "weighted_sequence_loss",
]

#: The SteerLM 2.0 application's names kept here for compatibility, imported on first access so
#: that ``import steerlm_kernels`` loads the kernel library only: name -> (module, attribute or None).
_APPLICATION = {
    "GPTSteerLMModel": ("steerlm_kernels.steerlm2.models.model", "GPTSteerLMModel"),
    "data": ("steerlm_kernels.steerlm2.training.data", None),
}


def __getattr__(name: str):
    if name not in _APPLICATION:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module_name, attr = _APPLICATION[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_APPLICATION))
