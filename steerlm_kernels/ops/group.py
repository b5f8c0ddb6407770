"""Group (per-prompt) ops of SteerLM 2.0: softmax within consecutive groups, and the fused
baseline / weight / KL computation of the baseline phase.

``group_softmax(x[B], cu_groups[G+1]) -> y[B]``: softmax of each group ``x[cu[g]:cu[g+1]]``.

``steerlm2_weights(seq_nll, log_q, ws, cu_groups) -> (weight[B], baseline[B], kl[G])``:
    ``baseline = group_softmax(-seq_nll - log_q)``, ``weight = ws - baseline``,
    ``kl[g] = sum_{i in g} (ws_i + 1e-8) * log((ws_i + 1e-8) / (baseline_i + 1e-8))`` (NeMo's
    epsilons); the caller takes ``distance = kl.mean()``.

These are O(B) ops (B = responses per step, tens to thousands): the point of the Triton kernel is
one launch instead of a dozen small PyTorch ops, not bandwidth. Group boundaries are passed as
offsets ``cu_groups`` (int64, on the device) so that groups may have different sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steerlm_kernels import registry
from steerlm_kernels.ops._triton import tl, triton

EPS = 1e-8


@triton.jit
def _group_softmax_kernel(
    x_ptr,  # *fp32 [B]: group logits (for the SteerLM form: -seq_nll - log_q, formed in-kernel)
    log_q_ptr,  # *fp32 [B] (read only when STEERLM)
    ws_ptr,  # *fp32 [B] (read only when STEERLM)
    cu_ptr,  # *i64 [G + 1]
    y_ptr,  # *fp32 [B] out: softmax (the baseline)
    weight_ptr,  # *fp32 [B] out: ws - baseline (written only when STEERLM)
    kl_ptr,  # *fp32 [G] out: per-group KL(ws || baseline) (written only when STEERLM)
    BLOCK: tl.constexpr,  # >= the largest group
    STEERLM: tl.constexpr,
):
    """One program = one group, held whole in registers (BLOCK = next power of two of the
    largest group: responses per prompt are few, so one tile always suffices)."""
    g = tl.program_id(0)
    start = tl.load(cu_ptr + g)
    end = tl.load(cu_ptr + g + 1)
    idx = start + tl.arange(0, BLOCK)
    inside = idx < end
    x = tl.load(x_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    if STEERLM:
        # x holds seq_nll: the baseline logits are -nll - log Q'(y|a,x)
        x = -x - tl.load(log_q_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    x = tl.where(inside, x, float("-inf"))
    m = tl.max(x, axis=0)
    e = tl.where(inside, tl.exp(x - m), 0.0)
    y = e / tl.sum(e, axis=0)
    tl.store(y_ptr + idx, y, mask=inside)
    if STEERLM:
        ws = tl.load(ws_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        tl.store(weight_ptr + idx, ws - y, mask=inside)
        p = ws + 1e-8
        kl = tl.where(inside, p * tl.log(p / (y + 1e-8)), 0.0)
        tl.store(kl_ptr + g, tl.sum(kl, axis=0))


def _block(max_group: int) -> int:
    return max(16, triton.next_power_of_2(max_group))


def triton_group_softmax(x: Tensor, cu_groups: Tensor, max_group: int) -> Tensor:
    y = torch.empty_like(x, dtype=torch.float32)
    n_groups = cu_groups.shape[0] - 1
    if n_groups > 0:
        _group_softmax_kernel[(n_groups,)](x, x, x, cu_groups, y, y, y, BLOCK=_block(max_group), STEERLM=False)
    return y


def triton_steerlm2_weights(
    seq_nll: Tensor, log_q: Tensor, ws: Tensor, cu_groups: Tensor, max_group: int
) -> tuple[Tensor, Tensor, Tensor]:
    n_groups = cu_groups.shape[0] - 1
    baseline = torch.empty_like(seq_nll, dtype=torch.float32)
    weight = torch.empty_like(baseline)
    kl = torch.empty(n_groups, dtype=torch.float32, device=seq_nll.device)
    if n_groups > 0:
        _group_softmax_kernel[(n_groups,)](
            seq_nll, log_q, ws, cu_groups, baseline, weight, kl, BLOCK=_block(max_group), STEERLM=True
        )
    return weight, baseline, kl


# --------------------------------------------------------------------------------------------
# torch reference (the cpp backend's kernels are csrc/cpu_kernels.cpp, via ops/cpp.py)
# --------------------------------------------------------------------------------------------


def _segment_ids(cu_groups: Tensor, n: int) -> Tensor:
    """``[n]`` int64: the group of each item (groups are non-empty and cover ``[0, n)``)."""
    lengths = cu_groups.diff()
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_groups.device), lengths,
                                   output_size=n)


def torch_group_softmax(x: Tensor, cu_groups: Tensor, max_group: int) -> Tensor:
    lengths = cu_groups.diff()
    xf = x.float()
    seg = _segment_ids(cu_groups, x.shape[0])
    m = torch.segment_reduce(xf, "max", lengths=lengths, unsafe=True)
    e = torch.exp(xf - m[seg])
    return e / torch.segment_reduce(e, "sum", lengths=lengths, unsafe=True)[seg]


def torch_steerlm2_weights(
    seq_nll: Tensor, log_q: Tensor, ws: Tensor, cu_groups: Tensor, max_group: int
) -> tuple[Tensor, Tensor, Tensor]:
    baseline = torch_group_softmax(-seq_nll.float() - log_q.float(), cu_groups, max_group)
    ws = ws.float()
    p = ws + EPS
    kl = torch.segment_reduce(p * torch.log(p / (baseline + EPS)), "sum", lengths=cu_groups.diff(), unsafe=True)
    return ws - baseline, baseline, kl


# --------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("steerlm_kernels::group_softmax", mutates_args=())
def group_softmax(x: Tensor, cu_groups: Tensor, max_group: int, backend: str) -> Tensor:
    """Softmax within consecutive groups; ``x [B]`` -> float32 ``[B]``."""
    return registry.get(backend).group_softmax(x.contiguous(), cu_groups, max_group)


@group_softmax.register_fake
def _(x, cu_groups, max_group, backend):
    return torch.empty_like(x, dtype=torch.float32)


def _group_softmax_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output, inputs[1])


def _group_softmax_backward(ctx, grad_y: Tensor):
    # d softmax: y * (g - sum_group(g * y))
    y, cu_groups = ctx.saved_tensors
    gy = grad_y.float() * y
    lengths = cu_groups.diff()
    seg = _segment_ids(cu_groups, y.shape[0])
    return gy - y * torch.segment_reduce(gy, "sum", lengths=lengths, unsafe=True)[seg], None, None, None


group_softmax.register_autograd(_group_softmax_backward, setup_context=_group_softmax_setup)


@torch.library.custom_op("steerlm_kernels::steerlm2_weights", mutates_args=())
def steerlm2_weights(
    seq_nll: Tensor, log_q: Tensor, ws: Tensor, cu_groups: Tensor, max_group: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weight [B], baseline [B], kl [G])`` float32; see the module docstring."""
    return registry.get(backend).steerlm2_weights(
        seq_nll.contiguous(), log_q.contiguous(), ws.contiguous(), cu_groups, max_group
    )


@steerlm2_weights.register_fake
def _(seq_nll, log_q, ws, cu_groups, max_group, backend):
    b = torch.empty_like(seq_nll, dtype=torch.float32)
    return b, torch.empty_like(b), seq_nll.new_empty(cu_groups.shape[0] - 1, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile variants (checked by steerlm_kernels._aot / tests/test_triton_compile.py)
# --------------------------------------------------------------------------------------------

_GROUP_SIGNATURE = {
    "x_ptr": "*fp32", "log_q_ptr": "*fp32", "ws_ptr": "*fp32", "cu_ptr": "*i64", "y_ptr": "*fp32",
    "weight_ptr": "*fp32", "kl_ptr": "*fp32", "BLOCK": "constexpr", "STEERLM": "constexpr",
}

AOT_SPECS: dict[str, list[dict]] = {
    "_group_softmax_kernel": [
        {
            "signature": _GROUP_SIGNATURE,
            "constexprs": {"BLOCK": block, "STEERLM": steerlm},
            "num_warps": 4,
            "divisible_by_16": ["x_ptr", "log_q_ptr", "ws_ptr", "cu_ptr", "y_ptr", "weight_ptr", "kl_ptr"],
            "note": f"BLOCK={block} STEERLM={steerlm}",
        }
        for block in (16, 1024)
        for steerlm in (False, True)
    ],
}
