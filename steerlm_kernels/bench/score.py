"""Benchmark section "score": ``steerlm-kernels score``'s engine against the plain Hugging Face loop.

Work: summed log-probabilities of ``R`` responses (``P`` prompt tokens + ``Y`` response tokens
each; the response tokens are scored) under a causal LM whose LM head dominates - a small Llama
built from its config (hidden size ``H``, 1 layer on CPU, 2 on GPU) with a vocabulary ``V >= 32k`` - in padded
batches of at most ``T`` tokens, the same batches for both implementations:

``plain HF loop``  what users write: ``model(...).logits`` (``[B, S, V]``), ``log_softmax`` in
                   float32, ``gather`` of the next tokens, masked sum.
``ours``           :func:`steerlm_kernels.steerlm2.models.logprobs.score_batch` (the ``score`` command's
                   code): final hidden states from the base model, the rows predicting a scored
                   token packed, ``sk.linear_sequence_nll`` with the LM-head weight by chunks of
                   rows - no ``[tokens, V]`` tensor.

Columns: median seconds over the repeats, tokens/s (all ``R (P + Y)`` tokens / median time),
peak extra memory of one call (:func:`~steerlm_kernels.memory.measure_extra_memory`: RSS
high-water mark on CPU, the caching allocator's peak on CUDA), both as ratios to the plain loop,
and the largest difference of the sums against the plain loop. SPEC target on CPU: >= 2x the
tokens/s and <= 1/4 of the peak extra memory.

Byte model of the part that differs (per scored-or-not token, logits of ``V`` entries): the plain
loop writes the logits (4 B/elem in float32), reads them and writes the float32 log-softmax
(8 B/elem) and holds both (8 B/elem of memory); ours writes and reads one chunk of float32 logits
per scored row only (prompt rows never meet the LM head) and holds ``chunk_rows x V`` of them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from steerlm_kernels.bench.harness import device_name, error_text, sync
from steerlm_kernels.memory import measure_extra_memory
from steerlm_kernels.steerlm2.models.hf_models import build_tiny
from steerlm_kernels.steerlm2.models.logprobs import SpanScorer, plan_batches, score_batch

__all__ = ["CPU", "GPU", "QUICK", "ScoreWorkload", "make_score_workload", "markdown", "plain_hf_batch",
           "run_score"]

#: Shapes: vocabulary, hidden size, responses, prompt / response tokens, token budget per batch.
CPU: dict[str, Any] = {"v": 32000, "h": 64, "layers": 1, "responses": 64, "prompt": 48, "response": 80,
                       "budget": 2048, "dtype": "fp32", "repeats": 3}
GPU: dict[str, Any] = {"v": 128256, "h": 1024, "layers": 2, "responses": 512, "prompt": 256, "response": 256,
                       "budget": 16384, "dtype": "bf16", "repeats": 5}
QUICK: dict[str, Any] = {"v": 1000, "h": 32, "layers": 1, "responses": 8, "prompt": 6, "response": 10, "budget": 64,
                         "dtype": "fp32", "repeats": 1}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ScoreWorkload:
    """The model and the sequences ``(ids, start)`` to score."""

    model: nn.Module
    seqs: list[tuple[list[int], int]]
    budget: int
    v: int
    h: int
    dtype: torch.dtype

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.seqs)


def make_score_workload(v: int, h: int, responses: int, prompt: int, response: int, budget: int,
                        device: torch.device, dtype: torch.dtype, seed: int = 0, layers: int = 1) -> ScoreWorkload:
    """A Llama of ``layers`` layers, hidden size ``h`` and vocabulary ``v`` (random weights from
    ``seed``) and ``responses`` random sequences of ``prompt + response`` tokens."""
    heads = max(1, h // 32)
    model, _ = build_tiny(seed, vocab_size=v, hidden_size=h, num_attention_heads=heads, num_key_value_heads=heads,
                          intermediate_size=4 * h, num_hidden_layers=layers)
    model = model.to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(responses):
        ids = torch.randint(0, v, (prompt + response,), generator=gen).tolist()
        seqs.append((ids, prompt))
    return ScoreWorkload(model, seqs, budget, v, h, dtype)


@torch.no_grad()
def plain_hf_batch(model: nn.Module, seqs: Sequence[tuple[Sequence[int], int]], pad_id: int = 0) -> list[float]:
    """The plain Hugging Face scoring loop on one padded batch: logits, float32 log_softmax, gather,
    masked sum (what users write)."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in seqs)
    inp = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros_like(inp)
    mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for i, (ids, start) in enumerate(seqs):
        inp[i, : len(ids)] = torch.as_tensor(ids)
        att[i, : len(ids)] = 1
        mask[i, start - 1 : len(ids) - 1] = 1
    inp, att, mask = inp.to(device), att.to(device), mask.to(device)
    logits = model(input_ids=inp, attention_mask=att).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, inp[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1).double().cpu().tolist()


def _run_all(w: ScoreWorkload, batch_fn: Callable[[list[tuple[list[int], int]]], list[float]]) -> list[float]:
    out = [0.0] * len(w.seqs)
    for batch in plan_batches([len(ids) for ids, _ in w.seqs], w.budget):
        for i, value in zip(batch, batch_fn([w.seqs[i] for i in batch])):
            out[i] = value
    return out


def _time(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def run_score(device: torch.device, *, quick: bool = False, shape: dict[str, Any] | None = None, seed: int = 0,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the section; returns ``{"shape", "device", "rows": [{impl, median_s, tokens_per_s,
    extra_mib, ...}], "max_abs_diff", ...}`` (see :func:`markdown`)."""
    cfg = dict(QUICK if quick else (GPU if device.type == "cuda" else CPU))
    cfg.update(shape or {})
    dtype = DTYPES[cfg["dtype"]]
    w = make_score_workload(cfg["v"], cfg["h"], cfg["responses"], cfg["prompt"], cfg["response"], cfg["budget"],
                            device, dtype, seed, cfg["layers"])
    scorer = SpanScorer(w.model, 0, "fused")
    impls: dict[str, Callable[[], list[float]]] = {
        "plain HF loop": lambda: _run_all(w, lambda b: plain_hf_batch(w.model, b)),
        "ours (score)": lambda: _run_all(w, lambda b: score_batch(scorer, b)),
    }
    log(f"score: V={w.v}, H={w.h}, {len(w.seqs)} responses x {cfg['prompt']}+{cfg['response']} tokens, "
        f"{cfg['budget']} tokens per batch, {cfg['dtype']}, on {device_name(device)}")
    rows: list[dict[str, Any]] = []
    values: dict[str, Tensor] = {}
    for name, fn in impls.items():
        try:
            fn()  # warm-up (first-call costs)
            extra, out = measure_extra_memory(fn, device)
            values[name] = torch.tensor(out, dtype=torch.float64)
            times = _time(fn, device, cfg["repeats"])
            med = statistics.median(times)
            rows.append({"impl": name, "median_s": med, "times_s": times, "tokens_per_s": w.tokens / med,
                         "extra_mib": extra})
        except Exception as exc:  # noqa: BLE001 - a failing comparator is reported in its row
            rows.append({"impl": name, "error": error_text(exc, 200)})
        log(f"score: {name}: " + (f"{rows[-1]['median_s']:.3f} s, extra {rows[-1]['extra_mib']} MiB"
                                  if "error" not in rows[-1] else rows[-1]["error"]))
    base = rows[0] if "error" not in rows[0] else None
    for r in rows:
        if base is not None and "error" not in r:
            r["speedup"] = base["median_s"] / r["median_s"]
            be, re_ = base["extra_mib"], r["extra_mib"]
            r["memory_ratio"] = re_ / be if be and re_ is not None else None
    diff = None
    if len(values) == 2:
        a, b = values.values()
        diff = float((a - b).abs().max())
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    scale = float(next(iter(values.values())).abs().max()) if values else 1.0
    return {"shape": cfg, "device": device_name(device), "tokens": w.tokens, "rows": rows, "max_abs_diff": diff,
            "agrees": diff is not None and diff <= tol * max(1.0, scale)}


def markdown(result: dict[str, Any]) -> list[str]:
    """The section's table (lines)."""
    if "error" in result:
        return ["#### Scoring (`steerlm-kernels score`) against the plain Hugging Face loop", "",
                f"Failed: {result['error']}"]
    c = result["shape"]
    lines = [
        f"#### Scoring (`steerlm-kernels score`) against the plain Hugging Face loop, {result['device']}",
        "",
        f"{c['responses']} responses x ({c['prompt']} prompt + {c['response']} scored tokens) = "
        f"{result['tokens']:,} tokens, Llama with V={c['v']:,}, H={c['h']}, {c['layers']} layer(s), {c['dtype']}, "
        f"batches of <= {c['budget']:,} tokens (the same for both). Max |difference| of the sums: "
        + ("n/a" if result["max_abs_diff"] is None else f"{result['max_abs_diff']:.2e}")
        + ("" if result["agrees"] else " **MISMATCH**") + ".",
        "",
        "| implementation | median s | tokens/s | vs plain | peak extra MiB | vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['impl']} | error: {r['error']} | | | | |")
            continue
        extra = "n/a" if r["extra_mib"] is None else f"{r['extra_mib']:.0f}"
        mem = r.get("memory_ratio")
        lines.append(f"| {r['impl']} | {r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r.get('speedup', 1.0):.2f}x | {extra} | {'n/a' if mem is None else f'{mem:.2f}'} |")
    return lines
