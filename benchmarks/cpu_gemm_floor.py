"""The matmul floor of a fused-linear training step on CPU, chunk by chunk as the fused losses run it.

Run: ``.venv/bin/python benchmarks/cpu_gemm_floor.py [--n 1024 --v 128256 --h 256 --chunk 256 --reps 10]``.
Per chunk of ``--chunk`` rows, the three matmuls every exact implementation must do - logits
``h @ W.T``, ``grad_h = G @ W`` and ``grad_W += G.T @ h`` - in float32 into preallocated outputs (no
allocation, no page faults: the floor, not a fused loss), timed over all ``N / chunk`` chunks; prints
the best of ``--reps`` in milliseconds and the GFLOP/s (``6 N H V`` flops).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--v", type=int, default=128256)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(a.n, a.h, generator=gen)
    w = torch.randn(a.v, a.h, generator=gen) / a.h ** 0.5
    g = torch.randn(a.chunk, a.v, generator=gen)
    logits, grad_h, grad_w = torch.empty(a.chunk, a.v), torch.empty(a.chunk, a.h), torch.zeros(a.v, a.h)

    def step() -> None:
        for start in range(0, a.n, a.chunk):
            x = h[start:start + a.chunk]
            rows = x.shape[0]
            torch.mm(x, w.T, out=logits[:rows])
            torch.mm(g[:rows], w, out=grad_h[:rows])
            grad_w.addmm_(g[:rows].T, x)

    step()
    best = min(_timed(step) for _ in range(a.reps))
    print(f"N={a.n} V={a.v} H={a.h} chunk={a.chunk} fp32, {torch.get_num_threads()} threads: 3 matmuls "
          f"{1e3 * best:.1f} ms ({6 * a.n * a.h * a.v / best / 1e9:.0f} GFLOP/s)")


def _timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
