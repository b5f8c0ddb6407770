"""Side-by-side CPU check of the ``cpp`` backend against eager PyTorch and ``torch.compile``.

Run: ``python benchmarks/cpu_cpp_check.py [--n 2048] [--v 32000] [--reps 7]``.

Work (SPEC "Performance", CPU): bf16 logits ``[B, S, V]`` with ``B*S = N``, a loss mask hiding
the first ``--prompt-frac`` of each sequence (default 0: every token counts, the cpp backend's
worst case, since it skips masked tokens), per-sequence masked NLL.

* baseline phase (forward, no grad): eager = ``F.cross_entropy(logits.float(), labels,
  reduction="none")``, mask, per-sequence sum; compile = ``torch.compile`` of that function;
  cpp = ``sk.sequence_nll(..., backend="cpp")`` under ``torch.no_grad()``.
* training phase (forward + backward): the weighted loss ``sum_b w_b * nll_b / norm_b``, then
  ``backward()`` into the bf16 logits; cpp = ``sk.weighted_sequence_loss(..., backend="cpp")``,
  also with ``inplace_backward=True``.

Prints median milliseconds (repetitions interleaved across rows), the speed-up of each row over
torch.compile and eager, and the
extra peak resident memory of one call (Linux: VmHWM after resetting it via clear_refs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import steerlm_kernels as sk


def rss_mib(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (None where /proc is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_extra_mib(fn: Callable[[], object]) -> float | None:
    """Extra peak RSS of one call of ``fn`` over the RSS before it (None if not measurable)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = rss_mib("VmRSS")
    fn()
    peak = rss_mib("VmHWM")
    return None if before is None or peak is None else peak - before


def timed_ms(fn: Callable[[], object], setup: Callable[[], object] | None) -> float:
    """Wall time of one call of ``fn`` in milliseconds; ``setup`` runs first, untimed."""
    if setup is not None:
        setup()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048, help="tokens N = B*S")
    ap.add_argument("--v", type=int, default=32000, help="vocabulary V")
    ap.add_argument("--seqs", type=int, default=8, help="sequences B")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--prompt-frac", type=float, default=0.0, help="masked-out share of each sequence")
    args = ap.parse_args()
    B, V = args.seqs, args.v
    S = args.n // B
    torch.manual_seed(0)
    base = torch.randn(B, S, V).mul_(2).bfloat16()
    labels = torch.randint(0, V, (B, S))
    mask = torch.ones(B, S)
    mask[:, : int(S * args.prompt_frac)] = 0
    weight = torch.randn(B)
    norm = mask.sum(1)

    def eager_seq_nll(logits: torch.Tensor) -> torch.Tensor:
        tok = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        return (tok.view(B, S) * mask).sum(1)

    def eager_loss(logits: torch.Tensor) -> torch.Tensor:
        return (weight * eager_seq_nll(logits) / norm).sum()

    compiled_seq_nll = torch.compile(eager_seq_nll)
    compiled_loss = torch.compile(eager_loss)
    state: dict[str, torch.Tensor] = {}

    def fresh_leaf() -> None:  # logits that require grad, no stale .grad
        state["x"] = base.clone().requires_grad_(True)

    def train(loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            loss_fn(state["x"]).backward()

        return run

    def cpp_loss(inplace: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: sk.weighted_sequence_loss(
            x, labels, mask, weight, norm, backend="cpp", inplace_backward=inplace
        )

    def no_grad(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn(base)

        return run

    # correctness sanity check before timing
    with torch.no_grad():
        ref = eager_seq_nll(base)
        got = sk.sequence_nll(base, labels, mask, backend="cpp")
    assert torch.allclose(ref, got, rtol=1e-4, atol=1e-2), (ref, got)

    rows: list[tuple[str, str, Callable[[], None], Callable[[], None] | None]] = [
        ("baseline (fwd, no grad)", "eager", no_grad(eager_seq_nll), None),
        ("baseline (fwd, no grad)", "torch.compile", no_grad(compiled_seq_nll), None),
        ("baseline (fwd, no grad)", "cpp", no_grad(lambda x: sk.sequence_nll(x, labels, mask, backend="cpp")), None),
        ("training (fwd+bwd)", "eager", train(eager_loss), fresh_leaf),
        ("training (fwd+bwd)", "torch.compile", train(compiled_loss), fresh_leaf),
        ("training (fwd+bwd)", "cpp", train(cpp_loss(False)), fresh_leaf),
        ("training (fwd+bwd)", "cpp inplace_backward", train(cpp_loss(True)), fresh_leaf),
    ]
    # Round-robin repetitions (one call of every row per round, after a warm-up round), so that
    # load from other processes on a shared machine hits every row alike; medians reported.
    times: dict[tuple[str, str], list[float]] = {(phase, impl): [] for phase, impl, _, _ in rows}
    for rnd in range(args.reps + 1):
        for phase, impl, fn, setup in rows:
            ms = timed_ms(fn, setup)
            if rnd:
                times[(phase, impl)].append(ms)
            state.clear()
    results: dict[tuple[str, str], tuple[float, float | None]] = {}
    for phase, impl, fn, setup in rows:
        if setup is not None:
            setup()
        results[(phase, impl)] = (statistics.median(times[(phase, impl)]), peak_extra_mib(fn))
        state.clear()

    from steerlm_kernels.kernels import cpp

    print(f"N={args.n} (B={B}, S={S}), V={V}, bf16 logits, masked share {args.prompt_frac:.2f}, "
          f"threads={torch.get_num_threads()}, cpp SIMD={cpp.simd()}")
    print(f"{'phase':<25}{'impl':<22}{'median ms':>10}{'vs compile':>12}{'vs eager':>10}{'+peak MiB':>11}")
    for (phase, impl), (ms, mem) in results.items():
        comp, eager = results[(phase, "torch.compile")][0], results[(phase, "eager")][0]
        mem_s = f"{mem:.0f}" if mem is not None else "n/a"
        print(f"{phase:<25}{impl:<22}{ms:>10.1f}{comp / ms:>11.2f}x{eager / ms:>9.2f}x{mem_s:>11}")


if __name__ == "__main__":
    main()
