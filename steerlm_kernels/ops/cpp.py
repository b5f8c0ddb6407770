"""The ``cpp`` backend: thin wrappers of the compiled extension ``steerlm_kernels._C``.

Importing this module fails with ``ImportError`` when the extension is not built; the dispatcher
(:mod:`steerlm_kernels._dispatch`) reports that as "cpp: extension not built".
"""

from __future__ import annotations

from torch import Tensor

from steerlm_kernels import _C  # noqa: F401  (ImportError when not built)


def ce_forward(logits: Tensor, labels: Tensor, vocab_start: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    raise NotImplementedError


def ce_backward(
    logits: Tensor, labels: Tensor, lse: Tensor, coef: Tensor, vocab_start: int, ignore_index: int, out: Tensor
) -> None:
    raise NotImplementedError


def segment_sum(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    raise NotImplementedError
