"""Benchmark section "dist": what vocabulary-parallel cross entropy communicates, ours against Megatron's.

``tp`` processes on this machine (gloo, CPU tensors; the counts do not depend on the device) each hold
a shard ``[s, b, V/tp]`` of the logits and call, once forward and once backward,

``ours``      :func:`steerlm_kernels.megatron.vocab_parallel_cross_entropy` (the auto backend):
              one ``all_gather`` of ``3N`` float32 per rank (local row max, log-sum-exp relative
              to it, target logit), preceded by the shape check: one ``all_reduce(MAX)`` of 4
              int64 (rows and shard width, and their negations); nothing in the backward;
``megatron``  megatron-core's own ``vocab_parallel_cross_entropy`` (when installed; run with
              ``parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)``): three
              ``all_reduce`` of ``N`` float32 (max, target logit, sum of exponentials).

Every ``torch.distributed`` collective is wrapped while the call runs, so the rows report what was
really issued: the number of collectives and the bytes of the tensors handed to them, plus the bytes
each rank sends under the ring algorithms NCCL and gloo use (all_reduce of ``M`` bytes:
``2·(tp-1)/tp·M``; all_gather of ``M`` bytes per rank: ``(tp-1)·M``). Time per forward+backward
(median) is on CPU gloo over loopback: indicative only, not an interconnect measurement.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from steerlm_kernels.bench.harness import error_text

#: (name in torch.distributed, ring bytes SENT per rank for a payload of m bytes in a group of tp)
COLLECTIVES: dict[str, Callable[[int, int], float]] = {
    "all_reduce": lambda m, tp: 2.0 * (tp - 1) / tp * m,
    "all_gather_into_tensor": lambda m, tp: float((tp - 1) * m),  # m = this rank's input bytes
    "all_gather_single": lambda m, tp: float((tp - 1) * m),
    "all_gather": lambda m, tp: float((tp - 1) * m),
    "reduce_scatter_tensor": lambda m, tp: (tp - 1) / tp * m,  # m = this rank's input bytes
    "broadcast": lambda m, tp: float(m),
}


def _payload(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes of the tensor a rank contributes to collective ``name``."""
    if name in ("all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor"):
        t = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("input"))
    elif name == "all_gather":
        t = args[1] if len(args) > 1 else kwargs["tensor"]
    else:
        t = args[0] if args else kwargs["tensor"]
    return t.numel() * t.element_size()


class CollectiveCounter:
    """Context manager: counts the collectives issued through ``torch.distributed`` and their bytes."""

    def __init__(self, tp: int) -> None:
        self.tp = tp
        self.calls: list[tuple[str, int]] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> CollectiveCounter:
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            @functools.wraps(original)
            def wrapper(*args: Any, _name: str = name, _orig: Any = original, **kwargs: Any) -> Any:
                self.calls.append((_name, _payload(_name, args, kwargs)))
                return _orig(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)

    @property
    def payload_bytes(self) -> int:
        return sum(m for _, m in self.calls)

    @property
    def ring_bytes_sent(self) -> float:
        return sum(COLLECTIVES[name](m, self.tp) for name, m in self.calls)


def _worker(rank: int, world: int, port: int, s: int, b: int, v: int, repeats: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    import steerlm_kernels as sk

    g = torch.Generator().manual_seed(0)
    v_local = v // world
    logits = (torch.randn(s, b, v, generator=g) * 2)[..., rank * v_local:(rank + 1) * v_local].contiguous()
    target = torch.randint(0, v_local * world, (s, b), generator=g)
    impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "ours": lambda x: sk.megatron.vocab_parallel_cross_entropy(x, target, process_group=dist.group.WORLD),
    }
    try:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy as megatron_ce

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        impls["megatron"] = lambda x: megatron_ce(x, target)
        have_megatron = ""
    except Exception as exc:  # not installed, or an incompatible version
        have_megatron = error_text(exc, 200)
    rows = []
    losses = {}
    for name, fn in impls.items():
        def step(fn: Callable[[torch.Tensor], torch.Tensor] = fn) -> torch.Tensor:
            x = logits.clone().requires_grad_(True)
            loss = fn(x)
            loss.sum().backward()
            return loss.detach()

        step()  # warm-up
        counters = []
        for phase in ("forward", "backward"):
            x = logits.clone().requires_grad_(True)
            if phase == "forward":
                with CollectiveCounter(world) as c:
                    loss = fn(x)
                losses[name] = loss.detach().float()
            else:
                loss = fn(x)
                with CollectiveCounter(world) as c:
                    loss.sum().backward()
            counters.append(c)
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append({
            "impl": name, "tp": world, "n": s * b, "v": v,
            "fwd_collectives": [k for k, _ in counters[0].calls], "bwd_collectives": [k for k, _ in counters[1].calls],
            "payload_bytes": counters[0].payload_bytes + counters[1].payload_bytes,
            "ring_bytes_sent": counters[0].ring_bytes_sent + counters[1].ring_bytes_sent,
            "median_ms": statistics.median(times),
        })
    if "megatron" in losses:
        err = ((losses["ours"] - losses["megatron"]).abs().max() / losses["megatron"].abs().max()).item()
        for r in rows:
            r["loss_rel_err_vs_megatron"] = err
    if rank == 0:
        import json

        Path(out_dir, "dist.json").write_text(json.dumps({"rows": rows, "megatron": have_megatron}))
    if "megatron" in impls:
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _worker_then_exit(rank: int, *args: Any) -> None:
    """:func:`_worker`, then leave at once with status 0 (its results are written and its process
    group destroyed): gloo's teardown at interpreter exit sometimes calls std::terminate (SIGABRT),
    which would turn a finished measurement into a failed spawn. An exception still fails it."""
    _worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_dist(tps: tuple[int, ...] = (2, 4), s: int = 512, b: int = 2, v: int = 32000, repeats: int = 5) -> dict:
    """Spawn each ``tp`` group once; ``{"rows": [...], "megatron": "" or why not}``."""
    import json

    import torch.multiprocessing as mp

    out: dict[str, Any] = {"rows": [], "megatron": "", "n": s * b, "v": v}
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for tp in tps:
            if v % tp:
                raise ValueError(f"V={v} is not divisible by tp={tp}")
            with tempfile.TemporaryDirectory() as tmp:
                mp.start_processes(_worker_then_exit, args=(tp, _free_port(), s, b, v, repeats, tmp), nprocs=tp,
                                   start_method="spawn", join=True)
                data = json.loads(Path(tmp, "dist.json").read_text())
            out["rows"] += data["rows"]
            out["megatron"] = data["megatron"]
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    return out


def markdown(result: dict) -> list[str]:
    """The section's table."""
    rows = result.get("rows") or []
    out = ["### Vocabulary-parallel cross entropy (`dist`): communication per call", "",
           f"N={result.get('n')} tokens, V={result.get('v')}, float32 shards `[s, b, V/tp]`, forward + backward, "
           "gloo on this machine's loopback (times indicative only). Collectives counted by wrapping "
           "`torch.distributed` during the call; ring bytes sent per rank: all_reduce 2·(tp−1)/tp·M, "
           "all_gather (tp−1)·M.", ""]
    if result.get("error"):
        return out + [f"**ERROR** {result['error']}"]
    if result.get("megatron"):
        out.append(f"megatron-core not run: {result['megatron']}")
        out.append("")
    out += ["| tp | implementation | collectives (fwd / bwd) | payload bytes per rank | ring bytes sent per rank "
            "| vs Megatron | median ms | loss rel err vs Megatron |", "|" + "---|" * 8]
    by = {(r["tp"], r["impl"]): r for r in rows}
    for r in rows:
        meg = by.get((r["tp"], "megatron"))
        ratio = f"{r['ring_bytes_sent'] / meg['ring_bytes_sent']:.2f}×" if meg and meg["ring_bytes_sent"] else "–"
        err = r.get("loss_rel_err_vs_megatron")
        fwd = ", ".join(r["fwd_collectives"]) or "none"
        bwd = ", ".join(r["bwd_collectives"]) or "none"
        out.append(f"| {r['tp']} | {r['impl']} | {fwd} / {bwd} | {r['payload_bytes']:,} | {r['ring_bytes_sent']:,.0f} "
                   f"| {ratio} | {r['median_ms']:.1f} | {'–' if err is None else f'{err:.1e}'} |")
    return out
