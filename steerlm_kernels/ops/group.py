"""Custom ops and autograd of SteerLM 2.0's group (per-prompt) ops.

``group_softmax_op(x[B], cu_groups[G+1], max_group, backend) -> y[B]``: softmax within each group
``x[cu[g]:cu[g+1]]``, differentiable w.r.t. ``x``.

``steerlm2_weights_op(seq_nll, log_q, ws, cu_groups, max_group, backend) -> (weight[B], baseline[B], kl[G])``:
the fused baseline phase (not differentiable: SteerLM treats the weights as constants).

Both run the backend's kernels (:func:`steerlm_kernels.registry.backend_kernels`); ``max_group``
sizes the Triton launch. Group boundaries are int64 offsets on the device, so groups may have
different sizes.

The public functions go through the ``*_by_sizes`` forms below, which take the group structure as
given by the user (a tensor of group sizes, or NeMo's per-item form) and turn it into offsets
INSIDE the op (:func:`steerlm_kernels.validation.group_offsets`: one small host copy of the sizes,
a device sync for CUDA sizes, as before). ``torch.compile`` then sees an opaque op whose output
shapes are those of the inputs: ``num_responses`` as a tensor traces with ``fullgraph=True``
(computing the offsets in the traced Python would branch on the tensor's values: "Could not
guard on data-dependent expression"). Bad group structures still raise ``ValueError`` /
``TypeError`` naming the argument, at run time, from inside the op.

``torch.func``: :class:`SegmentSoftmaxFunction` is a setup_context-style autograd Function with
``generate_vmap_rule``, so ``torch.func.grad`` / ``vjp`` / ``vmap`` (also ``vmap`` of ``grad``)
work for ``segment_softmax``; ``steerlm2_weights`` is not differentiable (constants for SteerLM)
and runs under ``vmap`` (one call per batch element). The cross-entropy ops' Functions are not
setup_context-style: ``torch.func`` transforms over them raise PyTorch's "must override the
setup_context staticmethod" ``RuntimeError``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steerlm_kernels import registry
from steerlm_kernels.kernels.reference import segment_ids
from steerlm_kernels.validation import group_offsets


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
    y, cu_groups = ctx.saved_tensors
    return _softmax_grad(y, grad_y, cu_groups), None, None, None


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


# --------------------------------------------------------------------------------------------
# the group structure as the user gives it (sizes or per-item), converted inside the ops
# --------------------------------------------------------------------------------------------


def _softmax_grad(y: Tensor, grad_y: Tensor, cu_groups: Tensor) -> Tensor:
    """``d softmax``: ``y * (g - sum_group(g * y))``, float32."""
    gy = grad_y.float() * y
    seg = segment_ids(cu_groups, y.shape[0])
    return gy - y * torch.segment_reduce(gy, "sum", lengths=cu_groups.diff(), unsafe=True)[seg]


@torch.library.custom_op("steerlm_kernels::group_softmax_by_sizes", mutates_args=())
def group_softmax_by_sizes_op(x: Tensor, sizes: Tensor, name: str, per_item: bool,
                              backend: str) -> tuple[Tensor, Tensor]:
    """Softmax within consecutive groups of ``x [B]`` given by ``sizes`` (group sizes, or per-item
    when ``per_item``; checked, errors name ``name``) -> ``(y [B] float32, group id of each item
    [B] int64)``; the ids let the backward run in plain tensor ops of static shapes."""
    cu, max_group = group_offsets(sizes, x.shape[0], x.device, name, per_item=per_item)
    y = registry.backend_kernels(backend).group_softmax(x.contiguous(), cu, max_group)
    return y, segment_ids(cu, x.shape[0]).to(torch.int64)


@group_softmax_by_sizes_op.register_fake
def _(x, sizes, name, per_item, backend):
    return torch.empty_like(x, dtype=torch.float32), torch.empty_like(x, dtype=torch.int64)


@torch.library.register_vmap("steerlm_kernels::group_softmax_by_sizes")
def _(info, in_dims, x, sizes, name, per_item, backend):
    """``vmap`` over ``x`` with one group structure: the K rows are K * G groups of one call
    (the sizes tiled K times; group ids made per-row). Per-row structures: one call per row."""
    x_dim, s_dim = in_dims[0], in_dims[1]
    k = info.batch_size
    xs = x.movedim(x_dim, 0) if x_dim is not None else x.expand(k, *x.shape)
    if s_dim is not None:
        per_row = [group_softmax_by_sizes_op(xs[i], sizes.movedim(s_dim, 0)[i], name, per_item, backend)
                   for i in range(k)]
        return (torch.stack([y for y, _ in per_row]), torch.stack([g for _, g in per_row])), (0, 0)
    b = xs.shape[1]
    y, seg = group_softmax_by_sizes_op(xs.reshape(-1), sizes.repeat(k), name, per_item, backend)
    seg = seg.view(k, b)
    return (y.view(k, b), seg - seg[:, :1]), (0, 0)


class SegmentSoftmaxFunction(torch.autograd.Function):
    """``group_softmax_by_sizes_op`` with its backward ``y * (g - sum_group(g * y))`` in plain
    tensor ops (group sums by ``index_add`` over the ``[B]`` group ids: static shapes);
    setup_context style with a generated vmap rule, so that ``torch.func`` transforms compose."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, sizes: Tensor, name: str, per_item: bool, backend: str) -> tuple[Tensor, Tensor]:
        return group_softmax_by_sizes_op(x, sizes, name, per_item, backend)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        y, seg = output
        ctx.mark_non_differentiable(seg)
        ctx.save_for_backward(y, seg)

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_seg: Tensor | None):
        y, seg = ctx.saved_tensors
        gy = grad_y.float() * y
        sums = torch.zeros_like(gy).index_add(0, seg, gy)
        return gy - y * sums.index_select(0, seg), None, None, None, None


@torch.library.custom_op("steerlm_kernels::steerlm2_weights_by_sizes", mutates_args=())
def steerlm2_weights_by_sizes_op(
    seq_nll: Tensor, log_q: Tensor, ws: Tensor, sizes: Tensor, name: str, per_item: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weight [B], baseline [B], distance 0-d)`` float32: :func:`steerlm2_weights_op` with the
    group structure given by ``sizes`` and the mean of the per-group KL (0 without groups)."""
    cu, max_group = group_offsets(sizes, seq_nll.shape[0], seq_nll.device, name, per_item=per_item)
    weight, baseline, kl = registry.backend_kernels(backend).steerlm2_weights(
        seq_nll.contiguous(), log_q.contiguous(), ws.contiguous(), cu, max_group
    )
    # No groups (B = 0): no divergence to average; 0 rather than the NaN of an empty mean.
    distance = kl.mean() if kl.numel() else kl.new_zeros(())
    return weight, baseline, distance


@steerlm2_weights_by_sizes_op.register_fake
def _(seq_nll, log_q, ws, sizes, name, per_item, backend):
    b = torch.empty_like(seq_nll, dtype=torch.float32)
    return b, torch.empty_like(b), b.new_empty(())
