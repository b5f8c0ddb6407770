"""Why the CPU fused-linear benchmark runs in float32 by default: this torch's CPU GEMMs by dtype.

Run: ``.venv/bin/python benchmarks/cpu_gemm_dtypes.py [--n 1024 --v 32000 --h 256]``. Times the three
matmuls of a fused-linear training step (``h @ W.T``, ``G @ W``, ``G.T @ h``) once each after one
warm-up, in bfloat16 and in float32, and prints milliseconds and the bf16 / fp32 ratio.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--h", type=int, default=256)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    times: dict[str, dict[torch.dtype, float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        h, w, g = (torch.randn(a.n, a.h).to(dtype), torch.randn(a.v, a.h).to(dtype),
                   torch.randn(a.n, a.v).to(dtype))
        for name, x, y in (("h @ W.T", h, w.T), ("G @ W", g, w), ("G.T @ h", g.T, h)):
            torch.mm(x, y)
            t0 = time.perf_counter()
            torch.mm(x, y)
            times.setdefault(name, {})[dtype] = (time.perf_counter() - t0) * 1e3
    print(f"N={a.n} V={a.v} H={a.h}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| matmul | float32 ms | bfloat16 ms | bf16 / fp32 |\n|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t[torch.float32]:.1f} | {t[torch.bfloat16]:.1f} | "
              f"{t[torch.bfloat16] / t[torch.float32]:.1f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
