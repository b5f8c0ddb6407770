"""``nn.Module`` forms of the losses (hold the keyword options; forward takes the tensors).

Every module takes the logit transforms ``softcap`` / ``logit_scale`` of its function (checked
when the module is built).

The fused linear modules take the LM head in ``forward`` (``lm_head.weight``, optionally
``lm_head.bias``) rather than owning it, so that the model keeps its parameters where its
optimizer and sharding expect them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from steerlm_kernels import api, api_linear
from steerlm_kernels import validation as v

__all__ = ["LinearSequenceNLL", "LinearWeightedSequenceLoss", "SequenceNLL", "TokenNLL", "WeightedSequenceLoss"]


def _transform_repr(softcap: float | None, logit_scale: float | None) -> str:
    return (f", softcap={softcap}" if softcap is not None else "") + (
        f", logit_scale={logit_scale}" if logit_scale is not None else "")


class TokenNLL(nn.Module):
    """``forward(logits, labels) -> nll`` of the labels' shape; see :func:`steerlm_kernels.token_nll`."""

    def __init__(self, ignore_index: int = -100, *, inplace_backward: bool = False, check_labels: bool = True,
                 process_group: Any = None, softcap: float | None = None, logit_scale: float | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        v.check_logit_transform(softcap, logit_scale)  # refused at construction, naming the argument
        self.ignore_index = ignore_index
        self.inplace_backward = inplace_backward
        self.check_labels = check_labels
        self.process_group = process_group
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.backend = backend

    def _transform(self) -> dict[str, Any]:
        return {"softcap": self.softcap, "logit_scale": self.logit_scale}

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return api.token_nll(
            logits, labels, ignore_index=self.ignore_index, process_group=self.process_group,
            check_labels=self.check_labels, inplace_backward=self.inplace_backward, backend=self.backend,
            **self._transform(),
        )

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, inplace_backward={self.inplace_backward}, backend={self.backend!r}"
                + _transform_repr(self.softcap, self.logit_scale))


class SequenceNLL(TokenNLL):
    """``forward(logits, labels, loss_mask=None, cu_seqlens=None) -> [B]``; see
    :func:`steerlm_kernels.sequence_nll`."""

    def __init__(self, ignore_index: int = -100, *, cp_group: Any = None, **kwargs: Any) -> None:
        super().__init__(ignore_index, **kwargs)
        self.cp_group = cp_group

    def forward(self, logits: Tensor, labels: Tensor, loss_mask: Tensor | None = None,
                cu_seqlens: Tensor | None = None) -> Tensor:
        return api.sequence_nll(
            logits, labels, loss_mask, ignore_index=self.ignore_index, cu_seqlens=cu_seqlens,
            process_group=self.process_group, cp_group=self.cp_group, check_labels=self.check_labels,
            inplace_backward=self.inplace_backward, backend=self.backend, **self._transform(),
        )


class WeightedSequenceLoss(SequenceNLL):
    """``forward(logits, labels, loss_mask, weight, normalizer, cu_seqlens=None) -> scalar``; see
    :func:`steerlm_kernels.weighted_sequence_loss`."""

    def forward(self, logits: Tensor, labels: Tensor, loss_mask: Tensor | None, weight: Tensor,  # type: ignore[override]
                normalizer: Tensor | float, cu_seqlens: Tensor | None = None) -> Tensor:
        return api.weighted_sequence_loss(
            logits, labels, loss_mask, weight, normalizer, ignore_index=self.ignore_index,
            cu_seqlens=cu_seqlens, process_group=self.process_group, cp_group=self.cp_group,
            check_labels=self.check_labels, inplace_backward=self.inplace_backward, backend=self.backend,
            **self._transform(),
        )


class LinearSequenceNLL(nn.Module):
    """``forward(hidden, lm_head_weight, labels, loss_mask=None, cu_seqlens=None, bias=None) -> [B]``;
    see :func:`steerlm_kernels.linear_sequence_nll`."""

    def __init__(self, ignore_index: int = -100, *, chunk_size: int | None = None, check_labels: bool = True,
                 process_group: Any = None, cp_group: Any = None, softcap: float | None = None,
                 logit_scale: float | None = None, backend: str = "auto") -> None:
        super().__init__()
        v.check_logit_transform(softcap, logit_scale)
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.check_labels = check_labels
        self.process_group = process_group
        self.cp_group = cp_group
        self.backend = backend

    def _options(self) -> dict[str, Any]:
        return {
            "ignore_index": self.ignore_index, "process_group": self.process_group, "cp_group": self.cp_group,
            "check_labels": self.check_labels, "chunk_size": self.chunk_size, "backend": self.backend,
            "softcap": self.softcap, "logit_scale": self.logit_scale,
        }

    def forward(self, hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, loss_mask: Tensor | None = None,
                cu_seqlens: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        return api_linear.linear_sequence_nll(
            hidden, lm_head_weight, labels, loss_mask, bias=bias, cu_seqlens=cu_seqlens, **self._options()
        )

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, chunk_size={self.chunk_size}, backend={self.backend!r}"
                + _transform_repr(self.softcap, self.logit_scale))


class LinearWeightedSequenceLoss(LinearSequenceNLL):
    """``forward(hidden, lm_head_weight, labels, loss_mask, weight, normalizer, cu_seqlens=None,
    bias=None) -> scalar``; see :func:`steerlm_kernels.linear_weighted_sequence_loss`."""

    def forward(self, hidden: Tensor, lm_head_weight: Tensor, labels: Tensor,  # type: ignore[override]
                loss_mask: Tensor | None, weight: Tensor, normalizer: Tensor | float,
                cu_seqlens: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        return api_linear.linear_weighted_sequence_loss(
            hidden, lm_head_weight, labels, loss_mask, weight, normalizer, bias=bias, cu_seqlens=cu_seqlens,
            **self._options(),
        )
