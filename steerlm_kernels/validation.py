"""Argument checks shared by the public API. Every check names the offending argument.

Shape and dtype checks are static (free, and traced away by ``torch.compile``). Checks that need
the tensors' values go through :func:`check_values`: on CPU tensors they raise the named Python
exception at once; on CUDA tensors and under ``torch.compile`` they become a device-side assert
(``torch._assert_async``), so the hot path never waits for the GPU.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LABEL_DTYPES = (torch.int64, torch.int32)
INDEX_DTYPES = (torch.int64, torch.int32)


def check_values(ok: Tensor, exc: type[Exception], message: str) -> None:
    """Raise ``exc(message)`` unless the boolean scalar ``ok`` is true (see module docstring)."""
    if torch.compiler.is_compiling() or ok.device.type != "cpu":
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise exc(message)


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_rows_input(name: str, value: object, last: str) -> Tensor:
    """``value`` (``logits`` or ``hidden``): ``[N, last]`` or ``[B, S, last]``, float32 / bfloat16 /
    float16, with a non-empty last dimension (the vocabulary ``V`` or the hidden size ``H``)."""
    value = check_tensor(name, value)
    if value.dtype not in LOGITS_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {value.dtype}")
    if value.dim() < 2:
        raise ValueError(f"{name} must be [N, {last}] or [B, S, {last}], got shape {tuple(value.shape)}")
    if value.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty last dimension ({last}), got shape {tuple(value.shape)}")
    return value


def check_logits(logits: object) -> Tensor:
    return check_rows_input("logits", logits, "V")


def check_labels(labels: object, rows_of: Tensor, rows_name: str = "logits") -> Tensor:
    """``labels`` must be int32/int64, on the device of ``rows_of`` (``logits`` or ``hidden``),
    with one label per row: shape ``rows_of.shape[:-1]``, or any shape with as many elements when
    ``rows_of`` is 2-D."""
    labels = check_tensor("labels", labels)
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.device != rows_of.device:
        raise ValueError(f"labels is on {labels.device} but {rows_name} is on {rows_of.device}")
    rows = rows_of.shape[:-1]
    if labels.shape != rows and not (rows_of.dim() == 2 and labels.numel() == rows[0]):
        raise ValueError(
            f"labels must have shape {tuple(rows)} ({rows_name}.shape[:-1]), got {tuple(labels.shape)}"
        )
    return labels


def rows_may_overlap(x: Tensor) -> bool:
    """Can two rows of ``x [N, V]`` (unit column stride) share memory? Decided from the sizes and
    strides alone (nothing is read): with more than one row, a row stride below ``V`` (an expanded
    view has stride 0) makes neighbouring rows overlap. Writing a gradient in place over such a
    view cannot be right, so the in-place backward is not used for it."""
    n_rows, n_cols = x.shape
    return n_rows > 1 and n_cols > 0 and abs(x.stride(0)) < n_cols


def check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def check_loss_mask(loss_mask: object, labels: Tensor) -> Tensor | None:
    if loss_mask is None:
        return None
    loss_mask = check_tensor("loss_mask", loss_mask)
    if loss_mask.dtype.is_complex:
        raise TypeError(f"loss_mask must be bool, integer or floating point, got {loss_mask.dtype}")
    if loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask must have the shape of labels {tuple(labels.shape)}, got {tuple(loss_mask.shape)}")
    if loss_mask.device != labels.device:
        raise ValueError(f"loss_mask is on {loss_mask.device} but labels is on {labels.device}")
    return loss_mask


def check_cu_seqlens(cu_seqlens: object, n_tokens: int, device: torch.device) -> Tensor:
    """``cu_seqlens [B+1]``: integer, starts at 0, non-decreasing, ends at ``n_tokens``."""
    cu_seqlens = check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in INDEX_DTYPES:
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D [B + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but logits is on {device}")
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == n_tokens) & (cu_seqlens.diff() >= 0).all()
    check_values(
        ok, ValueError, f"cu_seqlens must start at 0, be non-decreasing and end at the number of tokens ({n_tokens})"
    )
    return cu_seqlens


def count_sequences(labels: Tensor, cu_seqlens: Any) -> int:
    """Number of sequences ``B``: ``len(cu_seqlens) - 1`` when packed, else ``labels.shape[0]``."""
    if cu_seqlens is not None:
        return check_tensor("cu_seqlens", cu_seqlens).shape[0] - 1
    return labels.shape[0] if labels.dim() >= 1 else 0


def check_sequences(labels: Any, cu_seqlens: Any) -> Tensor | None:
    """Sequence structure: dense ``[B, S]`` labels, or packed ``[T]`` labels with ``cu_seqlens``."""
    labels = check_tensor("labels", labels)
    if cu_seqlens is not None:
        if labels.dim() != 1:
            raise ValueError(f"with cu_seqlens, labels must be 1-D [T] (packed), got shape {tuple(labels.shape)}")
        return check_cu_seqlens(cu_seqlens, labels.shape[0], labels.device)
    if labels.dim() < 2:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} hold no sequence dimension: pass [B, S] labels "
            "or packed [T] labels with cu_seqlens"
        )
    return None


def check_label_range(labels: Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels must lie in ``[0, vocab_size)`` or equal ``ignore_index`` (``IndexError``)."""
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise IndexError(
                f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; found {first} "
                f"({int(bad.sum())} bad labels)"
            )
    else:
        torch._assert_async(~bad.any(), f"labels out of range [0, {vocab_size}) (IndexError)")


def check_weight(weight: object, n_seq: int, device: torch.device) -> Tensor:
    weight = check_tensor("weight", weight)
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.shape != (n_seq,):
        raise ValueError(f"weight must have shape [{n_seq}] (one per sequence), got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but logits is on {device}")
    return weight


def check_normalizer(normalizer: object, weight: Tensor) -> Tensor:
    """``normalizer``: a float, or a ``[B]`` (or 0-d) floating / integer tensor. Floats and tensors
    are checked the same way: finite and positive wherever ``weight`` is non-zero (NeMo's mean
    number of loss tokens); where ``weight`` is 0 any value is allowed (0 included) and the
    sequence contributes exactly 0. A float applies to every sequence, so it must be finite and
    positive. NaN, inf, 0 and negative values raise ``ValueError`` (a device-side assert on CUDA)."""
    if isinstance(normalizer, bool):
        raise TypeError("normalizer must be a float or a tensor, got bool")
    if isinstance(normalizer, (int, float)):
        if not (0.0 < float(normalizer) < float("inf")):
            raise ValueError(f"normalizer must be finite and positive, got {normalizer}")
        return torch.full_like(weight, float(normalizer), dtype=torch.float32)
    normalizer = check_tensor("normalizer", normalizer)
    if not (normalizer.dtype.is_floating_point or normalizer.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"normalizer must be a float or a floating-point tensor, got {normalizer.dtype}")
    if normalizer.shape not in ((), weight.shape):
        raise ValueError(
            f"normalizer must be a float or have shape {tuple(weight.shape)}, got {tuple(normalizer.shape)}"
        )
    if normalizer.device != weight.device:
        raise ValueError(f"normalizer is on {normalizer.device} but weight is on {weight.device}")
    normalizer = normalizer.float().expand(weight.shape)
    good = (normalizer > 0) & (normalizer < float("inf"))
    check_values(
        (good | (weight == 0)).all(),
        ValueError,
        "normalizer must be finite and positive where weight is non-zero (found 0, a negative value, NaN or inf)",
    )
    return normalizer


def check_vector(name: str, value: object, length: int | None = None, device: torch.device | None = None) -> Tensor:
    """A 1-D floating-point tensor (of ``length`` elements on ``device`` when given)."""
    value = check_tensor(name, value)
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {tuple(value.shape)}")
    if length is not None and value.shape[0] != length:
        raise ValueError(f"{name} must have {length} elements (one per response), got {value.shape[0]}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device}, expected {device}")
    return value


def group_offsets(
    sizes: object, total: int, device: torch.device, name: str, per_item: bool = False
) -> tuple[Tensor, int]:
    """Turn a group structure into ``(cu_groups [G+1] int64 on device, largest group)``.

    ``sizes``: an int (all groups that size), a 1-D integer tensor of group sizes summing to
    ``total``, or, when ``per_item``, NeMo's per-item form (``[total]``, each item holding its
    group's size, groups consecutive). Read on the host: the group structure shapes the launch.
    """
    if isinstance(sizes, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got bool")
    if isinstance(sizes, int):
        if sizes <= 0:
            raise ValueError(f"{name} must be positive, got {sizes}")
        if total % sizes:
            raise ValueError(f"{name}={sizes} does not divide the batch of {total}")
        groups = torch.full((total // sizes,), sizes, dtype=torch.int64)
    else:
        sizes = check_tensor(name, sizes)
        if sizes.dtype.is_floating_point or sizes.dtype.is_complex or sizes.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {sizes.dtype}")
        if sizes.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(sizes.shape)}")
        values = sizes.detach().to("cpu", torch.int64)  # one small copy; checks vectorised (B can be 1e6)
        if values.numel() and int(values.min()) <= 0:
            raise ValueError(f"{name} must hold positive group sizes, got {int(values.min())}")
        if int(values.sum()) == total:
            groups = values
        elif per_item and values.numel() == total:
            # Vectorised: a group holds one value, so runs of equal values are whole groups of that
            # size back to back; a run of value n and length L is L/n groups, and L % n != 0 is an error.
            run_values, run_lengths = torch.unique_consecutive(values, return_counts=True)
            broken = (run_lengths % run_values).nonzero()
            if broken.numel():
                r = int(broken[0, 0])
                item = int(run_lengths[:r].sum()) + int(run_lengths[r] // run_values[r] * run_values[r])
                raise ValueError(
                    f"{name} in per-item form must hold each group's size on each of its "
                    f"consecutive items; item {item} breaks that"
                )
            groups = torch.repeat_interleave(run_values, run_lengths // run_values)
        else:
            raise ValueError(f"{name} sums to {int(values.sum())} but the batch has {total} items")
    cu = torch.zeros(groups.numel() + 1, dtype=torch.int64)
    torch.cumsum(groups, 0, out=cu[1:])
    return cu.to(device), max(int(groups.max()) if groups.numel() else 1, 1)


# ------------------------------------------------------------------------------------------------
# fused linear (hidden states + LM head), appended for steerlm_kernels.api_linear
# ------------------------------------------------------------------------------------------------


def check_hidden(hidden: object) -> Tensor:
    return check_rows_input("hidden", hidden, "H")


def check_lm_head(weight: object, bias: object, hidden: Tensor) -> tuple[Tensor, Tensor | None]:
    """``lm_head_weight [V, H]`` and ``bias [V]`` (or None): ``hidden``'s dtype, device and ``H``."""
    weight = check_tensor("lm_head_weight", weight)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"lm_head_weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"lm_head_weight must be 2-D [V, H] with V >= 1, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"lm_head_weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is None:
        return weight, None
    bias = check_tensor("bias", bias)
    if bias.dtype != hidden.dtype:
        raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}] (one per vocabulary row), got {tuple(bias.shape)}")
    if bias.device != hidden.device:
        raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    return weight, bias


def check_chunk_size(chunk_size: object) -> int:
    """``chunk_size``: None (automatic, returned as 0) or a positive int of rows."""
    if chunk_size is None:
        return 0
    check_int("chunk_size", chunk_size)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    return chunk_size  # type: ignore[return-value]


def check_logit_transform(softcap: object, logit_scale: object) -> tuple[float | None, float | None]:
    """``(softcap, logit_scale)`` as Python floats or None, for ``z' = softcap * tanh(logit_scale *
    z / softcap)`` (scale first, then cap; either may be None).

    ``softcap``: None or a finite positive real number (Gemma 2/3's ``final_logit_softcapping``).
    ``logit_scale``: None or a finite positive real number (Cohere's ``logit_scale``; Granite's
    ``1 / logits_scaling``). A negative scale would reverse the vocabulary's order (no model does
    that; it is taken as a sign bug) and 0 would make every distribution uniform: both are refused.
    A scale of exactly 1 is the identity and is returned as None (the untransformed kernels run).
    bools, tensors and strings raise ``TypeError``; non-finite or non-positive values ``ValueError``.
    """
    out: list[float | None] = []
    for name, value in (("softcap", softcap), ("logit_scale", logit_scale)):
        if value is None:
            out.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number or None, got {type(value).__name__}")
        x = float(value)
        if not math.isfinite(x) or x <= 0.0:
            raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        out.append(x)
    softcap_f, scale_f = out
    return softcap_f, None if scale_f == 1.0 else scale_f
