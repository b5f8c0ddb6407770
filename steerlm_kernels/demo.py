"""``steerlm-kernels demo``: our fused loss beside eager PyTorch on one random SteerLM-like batch.

Only the public API (``import steerlm_kernels as sk``) and torch: the demo builds its own batch
(bfloat16 logits ``[B*S, V]``, a loss mask hiding a 15-35 % prompt-like prefix of each sequence,
signed SteerLM weights per group of up to 4 responses, the group's mean token count as normalizer),
times each phase (median of ``repeats`` calls after one warm-up call, which is also checked against
eager), and measures the peak extra memory of a call (median of 3): CUDA's allocator peak, or on
CPU the process's resident-set high-water mark (``/proc/self/clear_refs``, glibc's mmap threshold
pinned low during the measurement so freed buffers leave the resident set).
The full tables (``torch.compile``, every backend, the in-place backward, bandwidth):
``steerlm-kernels bench``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import steerlm_kernels as sk
from steerlm_kernels.memory import MIB, malloc_steady_state, measure_extra_memory

VALUE_TOL = 1e-4
GRAD_TOL = 1e-2  # bfloat16 gradients


def make_batch(n: int, v: int, s: int, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """bfloat16 logits ``[n, v]`` and the labels / loss mask / weights / normalizers of ``n / s`` sequences."""
    b = n // s
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (b, s), generator=gen)
    prompt = (s * (0.15 + 0.2 * torch.rand(b, generator=gen))).round().long()
    loss_mask = (torch.arange(s)[None, :] >= prompt[:, None]).float()
    group = next(g for g in (4, 2, 1) if b % g == 0)
    ws, baseline = torch.softmax(torch.randn(2, b // group, group, generator=gen), dim=-1)
    tokens = loss_mask.sum(1).view(-1, group).mean(1, keepdim=True).expand(-1, group).reshape(b)
    logits = torch.empty(n, v, dtype=torch.bfloat16)
    for start in range(0, n, 256):  # no [n, v] float32 temporary
        rows = logits[start:start + 256]
        rows.copy_(torch.randn(rows.shape, generator=gen).mul_(2.0))
    batch = {"logits": logits, "labels": labels, "loss_mask": loss_mask, "weight": (ws - baseline).reshape(b),
             "normalizer": tokens.clamp_min(1.0)}
    return {k: x.to(device) for k, x in batch.items()}


def eager_sequence_nll(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """What a user writes: float32 cross entropy of every token, masked, summed per sequence."""
    tok = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), reduction="none")
    return (tok.view(labels.shape) * loss_mask).sum(-1)


def _calls(batch: dict[str, Tensor], backend: str | None) -> dict[str, Callable[[Tensor], Any]]:
    """``{phase: call(logits) -> value (baseline) or (loss, grad) (train)}``; eager when backend is None."""
    labels, mask, weight, normalizer = batch["labels"], batch["loss_mask"], batch["weight"], batch["normalizer"]
    b, s = labels.shape

    def seq_nll(x: Tensor) -> Tensor:
        if backend is None:
            return eager_sequence_nll(x, labels, mask)
        return sk.sequence_nll(x.view(b, s, -1), labels, mask, backend=backend)

    def loss(x: Tensor) -> Tensor:
        if backend is None:
            return (weight * eager_sequence_nll(x, labels, mask) / normalizer).sum()
        return sk.weighted_sequence_loss(x.view(b, s, -1), labels, mask, weight, normalizer, backend=backend)

    def baseline(x: Tensor) -> Tensor:
        with torch.no_grad():
            return seq_nll(x)

    def train(x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.detach().requires_grad_(True)
        value = loss(x)
        (grad,) = torch.autograd.grad(value, x)
        return value.detach(), grad

    return {"baseline": baseline, "train": train}


def _measure(call: Callable[[Tensor], Any], logits: Tensor, repeats: int) -> dict[str, Any]:
    """First call's output, median ms of ``repeats`` calls, median peak extra MiB of 3 calls (or the error)."""
    device = logits.device
    try:
        first = call(logits)
        mem = [measure_extra_memory(lambda: call(logits), device)[0] for _ in range(3)]
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = call(logits)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
            del out
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    extra = None if any(m is None for m in mem) else statistics.median(mem)  # type: ignore[type-var]
    return {"first": first, "ms": statistics.median(times), "extra_mib": extra, "error": None}


def _rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().float().reshape(-1), b.detach().float().reshape(-1)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _frobenius_rel_err(g: Tensor, ref: Tensor) -> float:
    """``||g - ref|| / ||ref||`` in float32."""
    g, ref = g.float(), ref.float()
    return (torch.linalg.vector_norm(g - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else f"{x:{spec}}"


def _fmt_err(x: float | None) -> str:
    return "–" if x is None else ("0" if x == 0 else f"{x:.1e}")


def demo(n: int = 2048, v: int = 32000, s: int = 512, repeats: int = 3) -> int:
    """Our fused loss beside eager PyTorch on one random batch: values, time and memory ratios."""
    malloc_steady_state()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    auto = sk.registry.resolve("auto", device)
    batch = make_batch(n, v, s, device)
    logits, mask = batch["logits"], batch["loss_mask"]
    b = mask.shape[0]
    print(f"A random SteerLM-like batch on {device.type.upper()}: {b} responses × {s} tokens, vocabulary "
          f"{v}, bfloat16 logits ({logits.numel() * logits.element_size() / MIB:.0f} MiB), "
          f"{(mask == 0).float().mean().item():.0%} prompt tokens masked.")
    print(f"Fused loss: steerlm_kernels, backend auto -> {auto!r}.  Reference: eager PyTorch "
          "(F.cross_entropy on logits.float(), mask, per-sequence sum).")
    impls = {"eager PyTorch": _calls(batch, None), f"sk backend={auto} (auto)": _calls(batch, auto)}
    ok = True
    for phase, title in (("baseline", "Phase 1, baseline (no grad): per-sequence NLL"),
                         ("train", "Phase 2, training: weighted loss forward + backward")):
        (e_title, e_calls), (o_title, o_calls) = impls.items()
        e_row, o_row = _measure(e_calls[phase], logits, repeats), _measure(o_calls[phase], logits, repeats)
        print(f"\n{title}")
        for name, r in ((e_title, e_row), (o_title, o_row)):
            if r["error"]:
                print(f"  {name:22s} ERROR {r['error']}")
                continue
            print(f"  {name:22s} {r['ms']:8.1f} ms   +{_fmt(r['extra_mib'], '.0f')} MiB extra memory")
        if e_row["error"] or o_row["error"]:
            ok = False
            continue
        speed = e_row["ms"] / o_row["ms"]
        e_mib, o_mib = e_row["extra_mib"], o_row["extra_mib"]
        mem = ""
        if e_mib is not None and o_mib is not None:
            mem = (f", {e_mib / max(o_mib, 1.0):.0f}× less extra memory" if o_mib >= 1.0
                   else f", extra memory {o_mib:.1f} MiB vs {e_mib:.0f} MiB")
        print(f"  -> {speed:.1f}× faster{mem}")
        ref, out = e_row["first"], o_row["first"]
        if phase == "baseline":
            value_err, grad_err = _rel_err(out, ref), None
            vals = ", ".join(f"{x:.2f}" for x in ref[:4].tolist())
            print(f"  per-sequence NLL (first {min(4, b)}): {vals}")
        else:
            value_err = _rel_err(out[0], ref[0])
            grad_err = _frobenius_rel_err(out[1], ref[1])
            print(f"  loss: eager {ref[0].item():.6f}, fused {out[0].item():.6f}; "
                  f"gradient rel err {_fmt_err(grad_err)}")
        agrees = value_err <= VALUE_TOL and (grad_err is None or grad_err <= GRAD_TOL)
        print(f"  values {'agree' if agrees else 'DISAGREE'} with eager (rel err {_fmt_err(value_err)})")
        ok = ok and agrees
    print("\nFull table (torch.compile, every backend, in-place backward, bandwidth): steerlm-kernels bench")
    return 0 if ok else 1

