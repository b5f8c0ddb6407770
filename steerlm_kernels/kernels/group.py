"""Triton kernel of SteerLM 2.0's group (per-prompt) ops, and its launchers: softmax within
consecutive groups, and the fused baseline / weight / KL computation of the baseline phase.

``group_softmax(x[B], cu_groups[G+1]) -> y[B]``: softmax of each group ``x[cu[g]:cu[g+1]]``.

``steerlm2_weights(seq_nll, log_q, ws, cu_groups) -> (weight[B], baseline[B], kl[G])``:
    ``baseline = group_softmax(-seq_nll - log_q)``, ``weight = ws - baseline``,
    ``kl[g] = sum_{i in g} (ws_i + 1e-8) * log((ws_i + 1e-8) / (baseline_i + 1e-8))`` (NeMo's
    epsilons); the caller takes ``distance = kl.mean()``.

These are O(B) ops (B = responses per step, tens to thousands): the point of the Triton kernel is
one launch instead of a dozen small PyTorch ops, not bandwidth. Group boundaries are passed as
offsets ``cu_groups`` (int64, on the device) so that groups may have different sizes. The custom
ops and their autograd live in :mod:`steerlm_kernels.ops.group`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steerlm_kernels.kernels._triton import tl, triton


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


def group_softmax(x: Tensor, cu_groups: Tensor, max_group: int) -> Tensor:
    y = torch.empty_like(x, dtype=torch.float32)
    n_groups = cu_groups.shape[0] - 1
    if n_groups > 0:
        _group_softmax_kernel[(n_groups,)](x, x, x, cu_groups, y, y, y, BLOCK=_block(max_group), STEERLM=False)
    return y


def steerlm2_weights(
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
# Ahead-of-time compile variants (checked by steerlm_kernels.kernels.aot / tests/test_triton_compile.py)
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
