"""CPU benchmark of the fused linear losses against eager PyTorch, ``F.linear_cross_entropy`` and
the bare matmuls.

Run: ``python benchmarks/linear_cpu.py [--n 2048] [--v 32000] [--h 512] [--dtype bf16] [--reps 3]``.

Work: hidden ``[N, H]`` (``B = 8`` sequences of ``N / 8`` tokens), LM head ``[V, H]``, every
token counted (the worst case: our CPU path skips masked tokens). Rows:

* ``ours weighted fwd+bwd``: ``linear_weighted_sequence_loss(...).backward()`` (cpp backend):
  one logits matmul per chunk, gradient formed in the forward: three matmuls in all.
* ``ours seq-nll fwd+bwd``: ``linear_sequence_nll(...)`` with an upstream gradient: the backward
  recomputes the logits (four matmuls).
* ``ours no-grad``: ``linear_sequence_nll`` under ``torch.no_grad()`` (baseline phase, one matmul).
* ``F.linear_cross_entropy``: PyTorch's own fused op (chunked with ``LinearCrossEntropyOptions()``,
  and its reference path ``options=None``), ``reduction="sum"`` (same work; not per sequence).
* ``eager``: ``F.linear`` then ``F.cross_entropy(logits.float(), reduction="none")``, mask,
  per-sequence sum, weighted sum.
* ``3 matmuls`` / ``1 matmul``: ``h @ W.T``, ``G @ W``, ``G.T @ h`` in the input dtype with a
  preallocated ``G`` and outputs: the floor of any exact implementation (SPEC target: within 1.2x).

Prints median milliseconds and the extra peak resident memory of one call (VmHWM after
``clear_refs``, glibc's mmap threshold pinned low so freed buffers leave RSS).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from steerlm_kernels import memory
from steerlm_kernels.api_linear import linear_sequence_nll, linear_weighted_sequence_loss

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``fn`` in milliseconds over ``reps`` runs after one warm-up."""
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i:
            times.append(dt * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048, help="tokens (rows)")
    p.add_argument("--v", type=int, default=32000, help="vocabulary")
    p.add_argument("--h", type=int, default=512, help="hidden size")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backend", default="cpp", help="our backend (cpp / torch)")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per logits chunk (default: 256 MiB)")
    p.add_argument("--skip-eager", action="store_true", help="skip the eager and F.linear_cross_entropy rows")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    dt = DTYPES[args.dtype]
    n, v, h, b = args.n, args.v, args.h, 8
    hidden = torch.randn(n, h).to(dt)
    weight = (torch.randn(v, h) / h**0.5).to(dt)
    labels = torch.randint(0, v, (n,))
    cu = torch.arange(0, n + 1, n // b)
    cu[-1] = n
    mask = torch.ones(n)
    seq_w = torch.randn(b)
    norm = torch.full((b,), float(n // b))
    opts = {"backend": args.backend, "chunk_size": args.chunk_size}
    memory.pin_malloc_mmap_threshold()

    def leaves():
        return hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    rows: list[tuple[str, float, float | None]] = []

    def record(name: str, make: Callable[[], Callable[[], object]]) -> float:
        ms = median_ms(lambda: make()(), args.reps)
        extra, _ = memory.measure_extra_memory(make(), torch.device("cpu"))
        rows.append((name, ms, extra))
        print(f"  {name}: {ms:.1f} ms", flush=True)
        return ms

    def ours_weighted():
        hh, ww = leaves()
        return lambda: linear_weighted_sequence_loss(hh, ww, labels, mask, seq_w, norm, cu_seqlens=cu,
                                                     **opts).backward()

    def ours_seq():
        hh, ww = leaves()
        up = torch.randn(b)
        return lambda: (linear_sequence_nll(hh, ww, labels, mask, cu_seqlens=cu, **opts) * up).sum().backward()

    def ours_nograd():
        def run():
            with torch.no_grad():
                return linear_sequence_nll(hidden, weight, labels, mask, cu_seqlens=cu, **opts)
        return run

    def three_matmuls():
        g = torch.randn(n, v).to(dt)
        logits, gh, gw = torch.empty(n, v, dtype=dt), torch.empty(n, h, dtype=dt), torch.empty(v, h, dtype=dt)

        def run():
            torch.mm(hidden, weight.T, out=logits)
            torch.mm(g, weight, out=gh)
            torch.mm(g.T, hidden, out=gw)
        return run

    def one_matmul():
        logits = torch.empty(n, v, dtype=dt)
        return lambda: torch.mm(hidden, weight.T, out=logits)

    def eager():
        hh, ww = leaves()

        def run():
            logits = F.linear(hh, ww)
            nll = F.cross_entropy(logits.float(), labels, reduction="none") * mask
            seq = torch.segment_reduce(nll, "sum", lengths=cu.diff())
            (seq_w / norm * seq).sum().backward()
        return run

    def torch_lce(chunked: bool):
        def make():
            hh, ww = leaves()
            options = torch.nn.LinearCrossEntropyOptions() if chunked else None
            return lambda: (F.linear_cross_entropy(hh, ww, labels, reduction="sum", options=options)).backward()
        return make

    print(f"N={n} V={v} H={h} dtype={args.dtype} backend={args.backend} threads={torch.get_num_threads()}", flush=True)
    t3 = record("3 matmuls (h@W.T, G@W, G.T@h)", three_matmuls)
    t1 = record("1 matmul (h@W.T)", one_matmul)
    tw = record("ours weighted fwd+bwd", ours_weighted)
    ts = record("ours seq-nll fwd+bwd", ours_seq)
    tn = record("ours no-grad (baseline phase)", ours_nograd)
    if not args.skip_eager:
        record("eager F.linear + F.cross_entropy fwd+bwd", eager)
        if hasattr(F, "linear_cross_entropy"):
            record("F.linear_cross_entropy chunked fwd+bwd", torch_lce(True))
            record("F.linear_cross_entropy options=None fwd+bwd", torch_lce(False))
    print()
    print(f"| N={n} V={v} H={h} {args.dtype} | median ms | extra peak MiB |")
    print("|---|---:|---:|")
    for name, ms, extra in rows:
        print(f"| {name} | {ms:.1f} | {'-' if extra is None else f'{extra:.0f}'} |")
    print()
    print(f"ours weighted fwd+bwd / 3 matmuls = {tw / t3:.2f}x  (target <= 1.2)")
    print(f"ours seq-nll fwd+bwd / 3 matmuls = {ts / t3:.2f}x  (4 matmuls of work)")
    print(f"ours no-grad / 1 matmul = {tn / t1:.2f}x")
    print(f"logits [N, V] float32 would be {n * v * 4 / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
