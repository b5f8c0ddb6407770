"""Custom ops and autograd of SteerLM 2.0's group (per-prompt) ops.

``group_softmax_op(x[B], cu_groups[G+1], max_group, backend) -> y[B]``: softmax within each group
``x[cu[g]:cu[g+1]]``, differentiable w.r.t. ``x``.

``steerlm2_weights_op(seq_nll, log_q, ws, cu_groups, max_group, backend) -> (weight[B], baseline[B], kl[G])``:
the fused baseline phase (not differentiable: SteerLM treats the weights as constants).

Both run the backend's kernels (:func:`steerlm_kernels.registry.backend_kernels`); ``max_group``
sizes the Triton launch. Group boundaries are int64 offsets on the device, so groups may have
different sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steerlm_kernels import registry
from steerlm_kernels.kernels.reference import segment_ids


@torch.library.custom_op("steerlm_kernels::group_softmax", mutates_args=())
def group_softmax_op(x: Tensor, cu_groups: Tensor, max_group: int, backend: str) -> Tensor:
    """Softmax within consecutive groups; ``x [B]`` -> float32 ``[B]``."""
    return registry.backend_kernels(backend).group_softmax(x.contiguous(), cu_groups, max_group)


@group_softmax_op.register_fake
def _(x, cu_groups, max_group, backend):
    return torch.empty_like(x, dtype=torch.float32)


def _group_softmax_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output, inputs[1])


def _group_softmax_backward(ctx, grad_y: Tensor):
    # d softmax: y * (g - sum_group(g * y))
    y, cu_groups = ctx.saved_tensors
    gy = grad_y.float() * y
    lengths = cu_groups.diff()
    seg = segment_ids(cu_groups, y.shape[0])
    return gy - y * torch.segment_reduce(gy, "sum", lengths=lengths, unsafe=True)[seg], None, None, None


group_softmax_op.register_autograd(_group_softmax_backward, setup_context=_group_softmax_setup)


@torch.library.custom_op("steerlm_kernels::steerlm2_weights", mutates_args=())
def steerlm2_weights_op(
    seq_nll: Tensor, log_q: Tensor, ws: Tensor, cu_groups: Tensor, max_group: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weight [B], baseline [B], kl [G])`` float32; see the module docstring."""
    return registry.backend_kernels(backend).steerlm2_weights(
        seq_nll.contiguous(), log_q.contiguous(), ws.contiguous(), cu_groups, max_group
    )


@steerlm2_weights_op.register_fake
def _(seq_nll, log_q, ws, cu_groups, max_group, backend):
    b = torch.empty_like(seq_nll, dtype=torch.float32)
    return b, torch.empty_like(b), seq_nll.new_empty(cu_groups.shape[0] - 1, dtype=torch.float32)
