"""Benchmark section "train": one full SteerLM 2.0 training step on a Hugging Face Llama at Llama 3's vocabulary.

Work: a batch of ``B`` responses (``G`` groups of ``B / G``) of ``S`` tokens (the first quarter a
prompt, loss-masked out), under a ``LlamaForCausalLM`` built from its config (vocabulary ``V =
128,256``; CPU: ``H = 256``, 2 layers, float32; GPU: ``H = 4096``, 1 layer, bfloat16). One step =
phase 1 (baseline: forward only, per-response NLL, group softmax, weights, distance), phase 2
(forward + backward of NeMo's weighted loss in ``B / mbs`` micro-batches) and an SGD step, at
micro-batch sizes ``mbs`` in {1, 2, 4, 8} (both phases' micro-batches):

``ours fused``        :meth:`GPTSteerLMModel.from_hf` on the fused-linear path (what ``train`` runs):
                      the final hidden states and the LM head into ``sk.linear_sequence_nll`` /
                      ``sk.linear_weighted_sequence_loss`` inside the model's forward; no ``[N, V]``
                      logits in either phase.
``ours logits``       the same wrapper on the logits path: the model's logits ``[mbs, S, V]`` into
                      ``sk.sequence_nll`` / ``sk.weighted_sequence_loss`` (no float32 copy).
``NeMo-style eager``  the model's logits, ``log_softmax`` in float32, ``gather``, masked sums; the group
                      softmax / KL in torch (what NeMo-Aligner's ``GPTSteerLMModel`` does).

Each (implementation, micro-batch size) runs in its own process (a fresh heap: the peak is that
row's alone): step 1 measures the peak extra memory
(:func:`~steerlm_kernels.memory.measure_extra_memory`: RSS high-water mark on CPU, the caching
allocator's peak on CUDA) above the model and its gradient buffers (allocated and zeroed before the
step and kept, as a loop with ``zero_grad(set_to_none=False)`` or DDP's bucket views keeps them:
the same ``4 x parameters`` bytes for every implementation, not the loss path's) and gives the loss
and distance compared across rows; step 2 is timed. ``--memory-budget MiB``: the largest
micro-batch size whose peak fits.

Byte model (per micro-batch of ``n = mbs * S`` rows, ``e`` bytes per element of the model dtype):
eager holds the logits (``e n V``), their float32 log-softmax (``4 n V``) and in backward the
float32 gradient of that and the logits' gradient (``4 n V + e n V``): about ``(8 + 2e) n V``, i.e.
``16 n V`` in float32 (2 GiB at ``n = 512``); ours logits holds the logits and their gradient
(``2 e n V``, ``8 n V`` in float32); ours fused holds one chunk of ``chunk_rows x V`` float32 logits
(on CPU ``min(H, 64 MiB / 4V)`` rows: 130 rows, 64 MiB here), the hidden states' gradient and the
head-weight-sized gradient the fused loss computes in its forward (``4 V H``, scaled in place in
backward, no zero-filled twin): independent of ``n`` beyond the activations. Time: each chunk's
``grad_W`` GEMM reads and writes that ``[V, H]`` gradient (``8 V H`` bytes per chunk), so fewer, larger
chunks (up to ``H`` rows) move it less often (32 MiB chunks, 64 rows, moved it twice as often). SPEC targets on CPU:
fused <= 0.35x eager's peak extra memory and >= 1.5x its tokens/s at every micro-batch size.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from steerlm_kernels.bench.harness import device_name, error_text, row_timeout, sync
from steerlm_kernels.memory import measure_extra_memory

__all__ = ["CPU", "GPU", "IMPLS", "QUICK", "eager_step", "largest_fitting", "make_batch", "markdown", "run_train",
           "run_variant"]

#: Shapes: vocabulary, hidden size, layers, dtype, tokens per response, groups x responses, micro-batch sizes.
CPU: dict[str, Any] = {"v": 128256, "h": 256, "layers": 2, "dtype": "fp32", "s": 512, "groups": 2, "responses": 4,
                       "mbs": [1, 2, 4, 8]}
GPU: dict[str, Any] = {"v": 128256, "h": 4096, "layers": 1, "dtype": "bf16", "s": 4096, "groups": 2, "responses": 4,
                       "mbs": [1, 2, 4, 8]}
QUICK: dict[str, Any] = {"v": 500, "h": 32, "layers": 1, "dtype": "fp32", "s": 16, "groups": 2, "responses": 2,
                         "mbs": [1, 2]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS: tuple[str, ...] = ("NeMo-style eager", "ours logits", "ours fused")
LR = 1e-3


def make_model(cfg: dict[str, Any], device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The benchmark's Llama (random weights from ``seed``), in training mode."""
    from steerlm_kernels.steerlm2.models.hf_models import build_tiny

    h = cfg["h"]
    heads = max(1, h // 64)
    model, _ = build_tiny(seed, vocab_size=cfg["v"], hidden_size=h, num_attention_heads=heads,
                          num_key_value_heads=heads, intermediate_size=4 * h if h <= 1024 else 14336,
                          num_hidden_layers=cfg["layers"], max_position_embeddings=max(4096, cfg["s"]))
    return model.to(device=device, dtype=DTYPES[cfg["dtype"]]).train()


def make_batch(cfg: dict[str, Any], device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """A SteerLM 2.0 batch (NeMo's keys) of ``groups x responses`` random responses of ``s`` tokens."""
    gen = torch.Generator().manual_seed(seed + 1)
    b, s, v, n = cfg["groups"] * cfg["responses"], cfg["s"], cfg["v"], cfg["responses"]
    tokens = torch.randint(0, v, (b, s), generator=gen)
    mask = torch.ones(b, s)
    mask[:, : s // 4] = 0
    mask[:, -1] = 0
    ws = torch.rand(b, generator=gen) + 0.1
    ws = ws / ws.view(-1, n).sum(1).repeat_interleave(n)
    log_q = -float(mask[0].sum()) * math.log(v) * (1 + 0.01 * torch.randn(b, generator=gen))
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": mask,
             "attention_mask": torch.ones_like(tokens), "ws": ws, "log(Q(y|a,x))": log_q,
             "num_responses": torch.full((b,), n)}
    return {k: x.to(device) for k, x in batch.items()}


def _eager_nll(model: torch.nn.Module, mb: dict[str, Tensor]) -> Tensor:
    logits = model(input_ids=mb["tokens"], attention_mask=mb["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, mb["labels"].unsqueeze(-1)).squeeze(-1)
    return -(tok * mb["loss_mask"]).sum(-1)


def eager_step(model: torch.nn.Module, batch: dict[str, Tensor], mbs: int) -> tuple[float, float]:
    """NeMo-style step (gradient accumulated, no optimizer): ``(loss, distance)``."""
    b = batch["tokens"].shape[0]
    n = int(batch["num_responses"][0])
    chunks = [{k: x[i:i + mbs] for k, x in batch.items()} for i in range(0, b, mbs)]
    model.eval()
    with torch.no_grad():
        nll = torch.cat([_eager_nll(model, c) for c in chunks])
    model.train()
    base = torch.softmax((-nll - batch["log(Q(y|a,x))"].float()).view(-1, n), dim=1)
    ws = batch["ws"].float().view(-1, n)
    distance = ((ws + 1e-8) * torch.log((ws + 1e-8) / (base + 1e-8))).sum(1).mean()
    weight = (ws - base).reshape(-1)
    m = len(chunks)
    tokens = batch["loss_mask"].float().sum(-1).view(-1, n).mean(1).repeat_interleave(n)
    norm = tokens * ((b // n) / m)
    losses = []
    for i, c in zip(range(0, b, mbs), chunks):
        loss = (weight[i:i + mbs] * _eager_nll(model, c) / norm[i:i + mbs]).sum()
        (loss / m).backward()
        losses.append(loss.detach())
    return float(torch.stack(losses).mean()), float(distance)


def _step_fn(impl: str, model: torch.nn.Module, batch: dict[str, Tensor], mbs: int) -> Callable[[], tuple]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for p in model.parameters():  # the gradient buffers exist before the step and are kept (module notes)
        p.grad = torch.zeros_like(p)
    if impl == "NeMo-style eager":
        def run() -> tuple[float, float]:
            return eager_step(model, batch, mbs)
    else:
        from steerlm_kernels.steerlm2.models.model import GPTSteerLMModel

        cfg = {"steerlm2": {"forward_micro_batch_size": mbs, "micro_batch_size": mbs}}
        wrapper = GPTSteerLMModel.from_hf(model, cfg, "fused" if impl == "ours fused" else "logits", probe=False)

        def run() -> tuple[float, float]:
            loss, metrics = wrapper.get_loss_and_metrics(batch)
            return loss, metrics["distance"]

    def step() -> tuple[float, float]:
        out = run()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return out

    return step


def run_variant(impl: str, mbs: int, cfg: dict[str, Any], device: torch.device, seed: int = 0) -> dict[str, Any]:
    """One row in this process: step 1 measured for memory (and its loss / distance), step 2 timed."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    torch.manual_seed(seed)
    model = make_model(cfg, device, seed)
    batch = make_batch(cfg, device, seed)
    step = _step_fn(impl, model, batch, mbs)
    extra, (loss, distance) = measure_extra_memory(step, device)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = batch["tokens"].numel()
    return {"impl": impl, "mbs": mbs, "step_ms": 1e3 * seconds, "tokens_per_s": tokens / seconds,
            "cpu_s": cpu, "extra_mib": extra, "loss": loss, "distance": distance}


def _in_subprocess(impl: str, mbs: int, cfg: dict[str, Any], device: torch.device, seed: int,
                   timeout: float) -> dict[str, Any]:
    spec = json.dumps({"impl": impl, "mbs": mbs, "cfg": cfg, "device": str(device), "seed": seed})
    run = subprocess.run([sys.executable, "-m", "steerlm_kernels.bench.train_step", spec], capture_output=True,
                         text=True, timeout=timeout)
    lines = [x for x in run.stdout.splitlines() if x.startswith("{")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"exit {run.returncode}: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1])


def largest_fitting(rows: list[dict[str, Any]], impl: str, budget_mib: float) -> int | None:
    """The largest micro-batch size of ``impl`` whose measured peak extra memory is <= ``budget_mib``."""
    fits = [r["mbs"] for r in rows if r["impl"] == impl and r.get("extra_mib") is not None
            and r["extra_mib"] <= budget_mib]
    return max(fits) if fits else None


def run_train(device: torch.device, *, quick: bool = False, shape: dict[str, Any] | None = None, seed: int = 0,
              memory_budget: float | None = None, isolate: bool = True, timeout: float = 1800.0,
              deadline: float | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the section; returns ``{"shape", "device", "rows": [{impl, mbs, step_ms, tokens_per_s,
    extra_mib, loss, distance, loss_rel_diff, distance_rel_diff, memory_vs_eager, speed_vs_eager}],
    "agrees", "fits", "targets_met"}`` (see :func:`markdown`).

    ``deadline`` (a ``time.perf_counter()`` value, the suite's ``--budget``): no row starts after it (such a
    row is ``{impl, mbs, skipped}``) and a row's process is given at most the time left (at least 30 s)."""
    cfg = dict(QUICK if quick else (GPU if device.type == "cuda" else CPU))
    cfg.update(shape or {})
    log(f"train: one SteerLM 2.0 step, Llama V={cfg['v']}, H={cfg['h']}, {cfg['layers']} layer(s), {cfg['dtype']}, "
        f"{cfg['groups']} groups x {cfg['responses']} responses x {cfg['s']} tokens, micro-batches {cfg['mbs']}, "
        f"on {device_name(device)}")
    rows: list[dict[str, Any]] = []
    for mbs in cfg["mbs"]:
        for impl in IMPLS:
            limit = row_timeout(timeout, deadline)
            if limit is None:
                rows.append({"impl": impl, "mbs": mbs, "skipped": "not run: --budget spent"})
                continue
            try:
                row = (_in_subprocess(impl, mbs, cfg, device, seed, limit) if isolate
                       else run_variant(impl, mbs, cfg, device, seed))
            except Exception as exc:  # noqa: BLE001 - a failing row is reported in its row
                row = {"impl": impl, "mbs": mbs, "error": error_text(exc, 200)}
            rows.append(row)
            log(f"train: mbs {mbs} {impl}: " + (row["error"] if "error" in row else
                f"{row['step_ms']:.0f} ms, {row['tokens_per_s']:.0f} tokens/s, extra {row['extra_mib']} MiB"))
    agrees = True
    tol = 1e-4 if cfg["dtype"] == "fp32" else 3e-2
    for r in rows:
        ref = next((x for x in rows if x["mbs"] == r["mbs"] and x["impl"] == IMPLS[0] and "error" not in x
                    and "skipped" not in x), None)
        if "skipped" in r:  # not run (--budget): says nothing about agreement
            continue
        if "error" in r or ref is None:
            agrees = agrees and "error" not in r
            continue
        # relative to max(|value|, 1): the loss sum_i (ws_i - baseline_i) nll_i / norm_i is near 0 (weights sum to 0)
        r["loss_rel_diff"] = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1.0)
        r["distance_rel_diff"] = abs(r["distance"] - ref["distance"]) / max(abs(ref["distance"]), 1.0)
        agrees = agrees and r["loss_rel_diff"] <= tol and r["distance_rel_diff"] <= tol
        r["speed_vs_eager"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["cpu_vs_eager"] = ref["cpu_s"] / r["cpu_s"] if r.get("cpu_s") and ref.get("cpu_s") else None
        if r["extra_mib"] is not None and ref["extra_mib"]:
            r["memory_vs_eager"] = r["extra_mib"] / ref["extra_mib"]
    fused = [r for r in rows if r["impl"] == "ours fused" and "memory_vs_eager" in r]
    targets = (bool(fused) and len(fused) == len(cfg["mbs"]) and device.type == "cpu"
               and all(r["memory_vs_eager"] <= 0.35 and r["speed_vs_eager"] >= 1.5 for r in fused))
    cpu_targets = (bool(fused) and len(fused) == len(cfg["mbs"]) and device.type == "cpu"
                   and all(r["memory_vs_eager"] <= 0.35 and (r.get("cpu_vs_eager") or 0) >= 1.5 for r in fused))
    fits = None if memory_budget is None else {i: largest_fitting(rows, i, memory_budget) for i in IMPLS}
    return {"shape": cfg, "device": device_name(device), "rows": rows, "agrees": agrees, "tolerance": tol,
            "memory_budget_mib": memory_budget, "fits": fits, "targets_met": targets if device.type == "cpu" else None,
            "targets_met_cpu_time": cpu_targets if device.type == "cpu" else None}


def markdown(result: dict[str, Any]) -> list[str]:
    """The section's table (lines)."""
    title = "#### SteerLM 2.0 training step (`bench --sections train`)"
    if "error" in result:
        return [title, "", f"Failed: {result['error']}"]
    c = result["shape"]
    lines = [
        f"{title}, {result['device']}", "",
        f"Llama from config, V={c['v']:,}, H={c['h']}, {c['layers']} layer(s), {c['dtype']}; "
        f"{c['groups']} groups x {c['responses']} responses x {c['s']} tokens per step; both phases + SGD step; "
        f"each row in its own process. Loss / distance vs eager within {result['tolerance']:.0e} "
        "(relative to max(|value|, 1)): "
        + ("yes" if result["agrees"] else "**NO**") + ".", "",
        "| mbs | implementation | step ms | tokens/s | vs eager | CPU s | vs eager | peak extra MiB | vs eager "
        "| loss | distance | loss rel diff | distance rel diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r or "skipped" in r:
            what = f"error: {r['error']}" if "error" in r else r["skipped"]
            lines.append(f"| {r['mbs']} | {r['impl']} | {what} | | | | | | | | | | |")
            continue
        extra = "n/a" if r["extra_mib"] is None else f"{r['extra_mib']:,.0f}"
        mem = r.get("memory_vs_eager")
        lines.append(
            f"| {r['mbs']} | {r['impl']} | {r['step_ms']:,.0f} | {r['tokens_per_s']:,.0f} | "
            f"{r.get('speed_vs_eager', float('nan')):.2f}x | {r.get('cpu_s', float('nan')):.1f} | "
            f"{r.get('cpu_vs_eager') or float('nan'):.2f}x | {extra} | {'n/a' if mem is None else f'{mem:.2f}x'} | "
            f"{r['loss']:.6g} | {r['distance']:.6g} | {r.get('loss_rel_diff', float('nan')):.1e} | "
            f"{r.get('distance_rel_diff', float('nan')):.1e} |")
    if result.get("fits"):
        lines += ["", f"Largest micro-batch within {result['memory_budget_mib']:,.0f} MiB: "
                  + ", ".join(f"{k}: {'none' if v is None else v}" for k, v in result["fits"].items()) + "."]
    if result.get("targets_met") is not None:
        lines += ["", "CPU targets (fused <= 0.35x eager's memory, >= 1.5x its tokens/s at every size): "
                  + ("met" if result["targets_met"] else "**not met**") + "; with the speed in process CPU time "
                  "(robust to other processes' load on a shared machine): "
                  + ("met" if result.get("targets_met_cpu_time") else "**not met**") + "."]
    return lines


def _main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    row = run_variant(spec["impl"], spec["mbs"], spec["cfg"], torch.device(spec["device"]), spec["seed"])
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
