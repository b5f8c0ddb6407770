"""Benchmark section "dropin": the drop-in loss in a Hugging Face ``Trainer`` step and as a bare op.

Work: a ``LlamaForCausalLM`` built from its config at Llama 3's vocabulary ``V = 128,256`` (CPU: ``H =
256``, 2 layers, float32; GPU: ``H = 4096``, 1 layer, bfloat16), a batch of ``B x S`` random tokens whose
first quarter is a prompt (labels ``-100``), the causal shift inside the loss.

Part 1, ``trainer``: one SFT step of the Hugging Face ``Trainer`` (``training_step``: forward with
``labels`` and ``num_items_in_batch``, backward; then the SGD step):

``HF unpatched``    the model's own ``ForCausalLMLoss`` on its ``[B, S, V]`` logits.
``sk patch``        :func:`steerlm_kernels.hf.patch` (``sk.linear_cross_entropy`` inside the forward).
``liger``           Liger-Kernel's ``apply_liger_kernel_to_llama(fused_linear_cross_entropy=True)`` (the loss
                    only: rope / RMSNorm / SwiGLU left alone so that only the head differs). Triton: CUDA only.
``cce patch``       Cut Cross-Entropy's ``cce_patch(model)``, where installed (the PyPI 25.1.1 wheel ships no
                    ``cut_cross_entropy.transformers``: reported as not available).
``torch lce``       ``F.linear_cross_entropy`` (torch >= 2.13, chunked: :func:`torch_lce_options`) run
                    in place of ours through the same patch (the peer that runs everywhere).
``cce``             CCE's ``linear_cross_entropy`` (Triton ``impl="cce"`` on CUDA, its ``impl="torch_compile"``
                    elsewhere; ``filter_eps=None``: exact gradients) through the same patch.

Part 2, ``op``: the loss alone, forward + backward on ``hidden [N, H]`` and ``weight [V, H]`` (``N = B x S``):
``eager`` (``F.linear`` + ``F.cross_entropy``), ``ours`` (``sk.linear_cross_entropy`` with hf.patch's chunk:
:func:`steerlm_kernels.hf.patch.default_chunk_rows`), ``torch lce``,
``liger`` (``liger_fused_linear_cross_entropy``), ``cce``. Agreement: loss and a random projection of each
gradient against a float64 chunked reference (the projection ``sum(g * R) / ||g_ref||`` estimates the
relative gradient error).

Each row runs in its own process (a fresh heap; class-level patches stay there): a first step (warm-up, and
the values compared for agreement: every row starts from the same weights), a step measured for peak extra
memory (:func:`steerlm_kernels.memory.measure_extra_memory`; gradients already allocated), then timed steps
(the best of ``repeats`` by wall time; ``cpu_ms`` is that step's process CPU time, which a loaded shared
machine inflates less).

Byte model (``n = B x S`` rows, float32 logits): the unpatched head holds the logits (``4 n V``, plus the
``e n V`` model-dtype copy on GPU), their log-softmax (``4 n V``) and in backward its gradient and the
logits' (``8 n V``): about ``16 n V`` bytes (8.4 GB at ``n = 1024``, ``V = 128,256`` ... in fp32 peaks near
``12 n V`` as buffers are freed); ``torch lce`` and Liger hold a chunk of logits and the full ``[n, H]`` /
``[V, H]`` gradients computed in forward; ours holds one ``chunk_rows x V`` float32 chunk (256 MiB by
default) and the gradients. SPEC target on CPU: at most the memory of the best peer and at least 1.2x the
tokens/s of the best peer that runs there (peers: Liger, CCE, ``F.linear_cross_entropy``).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from steerlm_kernels.bench.harness import device_name, error_text, row_timeout, sync
from steerlm_kernels.memory import measure_extra_memory

__all__ = ["CPU", "GPU", "OP_IMPLS", "PEERS", "QUICK", "TRAINER_IMPLS", "evaluate_targets", "fill_agreement",
           "markdown", "peer_loss", "reference_loss_grads", "run_dropin", "run_row", "torch_lce_options", "why_not"]

CPU: dict[str, Any] = {"v": 128256, "h": 256, "layers": 2, "dtype": "fp32", "b": 2, "s": 512, "repeats": 5}
GPU: dict[str, Any] = {"v": 128256, "h": 4096, "layers": 1, "dtype": "bf16", "b": 4, "s": 4096, "repeats": 3}
QUICK: dict[str, Any] = {"v": 500, "h": 32, "layers": 1, "dtype": "fp32", "b": 2, "s": 16, "repeats": 1}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAINER_IMPLS: tuple[str, ...] = ("HF unpatched", "sk patch", "liger", "cce patch", "torch lce", "cce")
OP_IMPLS: tuple[str, ...] = ("eager", "ours", "torch lce", "liger", "cce")
#: The rows the targets compare ours with (the baselines "HF unpatched" / "eager" are not peers).
PEERS: tuple[str, ...] = ("liger", "cce patch", "torch lce", "cce")
OURS = {"trainer": "sk patch", "op": "ours"}
BASE = {"trainer": "HF unpatched", "op": "eager"}


def why_not(impl: str, device: torch.device) -> str:
    """Why ``impl`` cannot run on ``device`` here ("" when it can)."""
    import importlib.util

    if impl in ("liger", "cce", "cce patch"):
        module = "liger_kernel" if impl == "liger" else "cut_cross_entropy"
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed"
    if impl == "cce patch" and importlib.util.find_spec("cut_cross_entropy.transformers") is None:
        return "cut_cross_entropy has no transformers module (cce_patch): the PyPI 25.1.1 wheel ships without it"
    if impl == "liger" and device.type != "cuda":
        return "Liger's kernels are Triton: CUDA only (the interpreter is for agreement, not time)"
    if impl == "torch lce" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy chunking (torch >= 2.13)"
    return ""


# ------------------------------------------------------------------------------------------------
# losses with hf.patch's semantics (mean over non-ignored targets or / num_items, causal shift)
# ------------------------------------------------------------------------------------------------


def _cce_impl(device: torch.device) -> str:
    return "cce" if device.type == "cuda" else "torch_compile"


def torch_lce_options(hidden: Tensor) -> Any:
    """``F.linear_cross_entropy``'s chunking: its defaults on CUDA; on CPU ``batch_chunk_size=256`` (its ``"auto"``
    chunking took 43 s for one forward at N=1024, H=256, V=16,000 on this 2-core machine, 256-row chunks 8 s)."""
    if hidden.device.type == "cuda":
        return torch.nn.LinearCrossEntropyOptions()
    return torch.nn.LinearCrossEntropyOptions(batch_chunk_size=256)


def peer_loss(impl: str, hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    """Sum over the non-ignored rows of ``hidden [n, H]`` / ``target [n]`` by a peer (float32 scalar)."""
    if impl == "eager":
        return F.cross_entropy(F.linear(hidden, weight).float(), target, reduction="sum")
    if impl == "torch lce":
        options = torch_lce_options(hidden)
        return F.linear_cross_entropy(hidden, weight, target, reduction="sum", options=options).float()
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(hidden, weight, target, reduction="sum").float()
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce

        return cce(hidden, weight, target, reduction="sum", filter_eps=None, impl=_cce_impl(hidden.device)).float()
    if impl in ("ours", "sk patch"):
        import steerlm_kernels as sk

        return sk.linear_cross_entropy(hidden, weight, target, reduction="sum")
    raise ValueError(f"impl must be one of {OP_IMPLS}, got {impl!r}")


def _patched_loss(impl: str) -> Callable[..., Tensor]:
    """``sk.linear_cross_entropy``'s signature (as hf.patch calls it) computed by ``impl``."""

    def loss(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *, ignore_index: int = -100,
             shift: bool = False, num_items: Any = None, **_: Any) -> Tensor:
        if bias is not None:
            raise ValueError(f"{impl}: the benchmark's Llama has no head bias")
        if shift:
            hidden, target = hidden[..., :-1, :], target[..., 1:]
        hidden, target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
        keep = target != ignore_index
        total = peer_loss(impl, hidden[keep], weight, target[keep])
        count = keep.sum() if num_items is None else torch.as_tensor(num_items, device=total.device)
        return total / count.clamp(min=1)

    return loss


# ------------------------------------------------------------------------------------------------
# rows
# ------------------------------------------------------------------------------------------------


def make_tokens(cfg: dict[str, Any], device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(input_ids [B, S], labels [B, S])``: random tokens, the first quarter of each row a prompt (-100)."""
    gen = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(0, cfg["v"], (cfg["b"], cfg["s"]), generator=gen)
    labels = ids.clone()
    labels[:, : cfg["s"] // 4] = -100
    return ids.to(device), labels.to(device)


def _projection(grads: list[Tensor], seed: int) -> tuple[float, float]:
    """``(sum(g * R), ||g||)`` over the concatenated gradients, ``R`` standard normal (float32) from ``seed``;
    sums in float64."""
    gen = torch.Generator().manual_seed(seed)
    proj, sq = 0.0, 0.0
    for g in grads:
        r = torch.randn(g.shape, generator=gen)
        g = g.detach().cpu()
        proj += float((g.float() * r).sum(dtype=torch.float64))
        sq += float(g.double().square().sum())
    return proj, sq ** 0.5


@contextlib.contextmanager
def _loss_in_patch(loss: Callable[..., Tensor] | None) -> Iterator[None]:
    """hf.patch's ``linear_cross_entropy`` replaced by ``loss`` for the block (None: unchanged)."""
    module = sys.modules["steerlm_kernels.hf.patch"]  # the module (steerlm_kernels.hf.patch is the function)
    saved = module.linear_cross_entropy
    if loss is not None:
        module.linear_cross_entropy = loss
    try:
        yield
    finally:
        module.linear_cross_entropy = saved


def _trainer_step(impl: str, cfg: dict[str, Any], device: torch.device, seed: int) -> Callable[[bool], dict]:
    import transformers

    from steerlm_kernels.bench.train_step import make_model
    from steerlm_kernels.hf import patch

    model = make_model(cfg, device, seed)
    loss_fn = _patched_loss(impl) if impl in ("torch lce", "cce") else None  # the row's loss inside the patch
    if impl in ("sk patch", "torch lce", "cce"):
        patch(model)
    elif impl == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=False, swiglu=False, rms_norm=False, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
    elif impl == "cce patch":
        from cut_cross_entropy.transformers import cce_patch

        model = cce_patch(model)
    ids, labels = make_tokens(cfg, device, seed)
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="sk-dropin-"), per_device_train_batch_size=cfg["b"], max_steps=3,
        optim="sgd", learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=device.type == "cpu",
        bf16=False, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[inputs])
    trainer.create_optimizer_and_scheduler(num_training_steps=3)
    num_items = (labels[:, 1:] != -100).sum()

    def step(measure: bool) -> dict:
        with _loss_in_patch(loss_fn):
            loss = trainer.training_step(model, dict(inputs), num_items)
        out = {}
        if measure:
            out["loss"] = float(loss.detach())
            out["grad_proj"], out["grad_norm"] = _projection([p.grad for p in model.parameters()], seed)
        trainer.optimizer.step()
        model.zero_grad(set_to_none=False)  # gradients stay allocated: the measured step holds no new ones
        return out

    return step


def _op_step(impl: str, cfg: dict[str, Any], device: torch.device, seed: int) -> Callable[[bool], dict]:
    dtype = DTYPES[cfg["dtype"]]
    gen = torch.Generator().manual_seed(seed + 11)
    n, h = cfg["b"] * cfg["s"], cfg["h"]
    hidden = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(cfg["v"], h, generator=gen) / h ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    _, labels = make_tokens(cfg, device, seed)
    target = labels.reshape(-1)
    keep = target != -100
    count = keep.sum()

    def step(measure: bool) -> dict:
        if impl == "ours":
            import steerlm_kernels as sk
            from steerlm_kernels.hf.patch import default_chunk_rows

            loss = sk.linear_cross_entropy(hidden, weight, target, chunk_size=default_chunk_rows(weight))
        else:
            loss = peer_loss(impl, hidden[keep], weight, target[keep]) / count
        loss.backward()
        out = {}
        if measure:
            out["loss"] = float(loss.detach())
            out["grad_proj"], out["grad_norm"] = _projection([hidden.grad, weight.grad], seed)
        hidden.grad = weight.grad = None
        return out

    return step


def reference_loss_grads(cfg: dict[str, Any], seed: int = 0, chunk: int | None = None,
                         device: torch.device | str = "cpu") -> dict[str, float]:
    """The op part's float64 reference on ``device`` (chunks of ``chunk`` rows: default 128 on CPU, 2048 on
    CUDA): ``{loss, grad_proj, grad_norm}`` of the op rows' inputs (the same values in every dtype)."""
    device = torch.device(device)
    chunk = chunk or (2048 if device.type == "cuda" else 128)
    gen = torch.Generator().manual_seed(seed + 11)
    n, h = cfg["b"] * cfg["s"], cfg["h"]
    dtype = DTYPES[cfg["dtype"]]
    hidden = torch.randn(n, h, generator=gen).to(dtype).to(device=device, dtype=torch.float64)
    weight = (torch.randn(cfg["v"], h, generator=gen) / h ** 0.5).to(dtype).to(device=device, dtype=torch.float64)
    target = make_tokens(cfg, device, seed)[1].reshape(-1)
    count = int((target != -100).sum())
    total, g_h, g_w = 0.0, torch.zeros_like(hidden), torch.zeros_like(weight)
    for i in range(0, n, chunk):
        y = target[i:i + chunk]
        keep = y != -100
        hs, ys = hidden[i:i + chunk][keep], y[keep]
        if not len(ys):
            continue
        z = hs @ weight.T
        lse = torch.logsumexp(z, -1)
        total += float((lse - z.gather(1, ys[:, None]).squeeze(1)).sum())
        gz = torch.softmax(z, -1)
        gz[torch.arange(len(ys), device=device), ys] -= 1
        gz /= count
        g_h[i:i + chunk][keep] = gz @ weight
        g_w += gz.T @ hs
    proj, norm = _projection([g_h, g_w], seed)
    return {"loss": total / count, "grad_proj": proj, "grad_norm": norm}


def run_row(part: str, impl: str, cfg: dict[str, Any], device: torch.device, seed: int = 0) -> dict[str, Any]:
    """One row in this process: warm-up, a step measured for memory and agreement, timed steps (best of)."""
    reason = why_not(impl, device)
    if reason:
        return {"part": part, "impl": impl, "skipped": reason}
    torch.manual_seed(seed)
    step = (_trainer_step if part == "trainer" else _op_step)(impl, cfg, device, seed)
    # warm-up (allocations, CCE's torch_compile compilation, autotuning) and agreement: the first step, from the
    # same weights in every row
    out = step(True)
    extra, _ = measure_extra_memory(lambda: step(False), device)
    times, cpu = [], []
    for _ in range(cfg["repeats"]):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step(False)
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    seconds = min(times)
    tokens = cfg["b"] * cfg["s"]
    # cpu_ms: this process's CPU time (all threads) of the fastest step: the work, robust to a loaded machine
    return {"part": part, "impl": impl, "step_ms": 1e3 * seconds, "tokens_per_s": tokens / seconds,
            "cpu_ms": 1e3 * cpu[times.index(seconds)], "extra_mib": extra, **out}


def _in_subprocess(part: str, impl: str, cfg: dict[str, Any], device: torch.device, seed: int,
                   timeout: float) -> dict[str, Any]:
    spec = json.dumps({"part": part, "impl": impl, "cfg": cfg, "device": str(device), "seed": seed})
    run = subprocess.run([sys.executable, "-m", "steerlm_kernels.bench.dropin", spec], capture_output=True,
                         text=True, timeout=timeout)
    lines = [x for x in run.stdout.splitlines() if x.startswith("{")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"exit {run.returncode}: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1])


def fill_agreement(rows: list[dict[str, Any]], part: str, ref: dict[str, float] | None, tol: float) -> bool:
    """Fill ``loss_rel_diff`` / ``grad_rel_diff`` (vs ``ref``, or vs the part's baseline row) and the ratios."""
    done = [r for r in rows if r["part"] == part and "loss" in r]
    base = next((r for r in done if r["impl"] == BASE[part]), None)
    ref = ref or base
    agrees = all("error" not in r for r in rows if r["part"] == part)
    for r in done:
        if ref is not None:
            r["loss_rel_diff"] = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
            r["grad_rel_diff"] = abs(r["grad_proj"] - ref["grad_proj"]) / max(ref["grad_norm"], 1e-30)
            agrees = agrees and r["loss_rel_diff"] <= tol and r["grad_rel_diff"] <= tol
        if base is not None:
            r["speed_vs_base"] = r["tokens_per_s"] / base["tokens_per_s"]
            if r["extra_mib"] is not None and base["extra_mib"]:
                r["memory_vs_base"] = r["extra_mib"] / base["extra_mib"]
    return agrees


def evaluate_targets(rows: list[dict[str, Any]], part: str) -> dict[str, Any]:
    """SPEC's CPU targets for ``part``: ours at most the least peak extra memory of the peers that ran and at
    least 1.2x the fastest one's tokens/s. ``{"met": bool | None, "speed_vs_best_peer", "best_peer",
    "memory_vs_least_peer"}`` (``met`` None with ``why`` when ours or every peer did not run)."""
    ours = next((r for r in rows if r["part"] == part and r["impl"] == OURS[part] and "loss" in r), None)
    peers = [r for r in rows if r["part"] == part and r["impl"] in PEERS and "loss" in r]
    if ours is None or not peers:
        return {"met": None, "why": "no peer ran" if ours is not None else "ours did not run"}
    fastest = max(peers, key=lambda r: r["tokens_per_s"])
    mems = [r["extra_mib"] for r in peers if r["extra_mib"] is not None]
    speed = ours["tokens_per_s"] / fastest["tokens_per_s"]
    mem_ok = ours["extra_mib"] is not None and bool(mems) and ours["extra_mib"] <= min(mems)
    return {"met": bool(mem_ok and speed >= 1.2), "speed_vs_best_peer": speed, "best_peer": fastest["impl"],
            "memory_vs_least_peer": None if not mems or ours["extra_mib"] is None else ours["extra_mib"] / min(mems)}


def run_dropin(device: torch.device, *, quick: bool = False, shape: dict[str, Any] | None = None, seed: int = 0,
               parts: tuple[str, ...] = ("trainer", "op"), isolate: bool = True, timeout: float = 1800.0,
               deadline: float | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the section; returns ``{"shape", "device", "rows": [{part, impl, step_ms, tokens_per_s, extra_mib,
    loss, grad_proj, grad_norm, loss_rel_diff, grad_rel_diff, speed_vs_base, memory_vs_base} | {part, impl,
    skipped | error}], "agrees", "targets": {part: {met, speed_vs_best_peer, best_peer, memory_vs_least_peer}}}``.

    ``deadline`` (a ``time.perf_counter()`` value, the suite's ``--budget``): no row starts after it (such a row
    is skipped, "--budget spent") and a row's process is given at most the time left (at least 30 s)."""
    cfg = dict(QUICK if quick else (GPU if device.type == "cuda" else CPU))
    cfg.update(shape or {})
    log(f"dropin: Llama V={cfg['v']}, H={cfg['h']}, {cfg['layers']} layer(s), {cfg['dtype']}, "
        f"{cfg['b']} x {cfg['s']} tokens, on {device_name(device)}")
    rows: list[dict[str, Any]] = []
    for part in parts:
        for impl in TRAINER_IMPLS if part == "trainer" else OP_IMPLS:
            limit = row_timeout(timeout, deadline)
            if limit is None:
                rows.append({"part": part, "impl": impl, "skipped": "--budget spent"})
                continue
            try:
                row = (_in_subprocess(part, impl, cfg, device, seed, limit) if isolate and not why_not(impl, device)
                       else run_row(part, impl, cfg, device, seed))
            except Exception as exc:  # noqa: BLE001 - a failing row is reported in its row
                row = {"part": part, "impl": impl, "error": error_text(exc, 200)}
            rows.append(row)
            log(f"dropin: {part} {impl}: " + (row.get("skipped") or row.get("error") or
                f"{row['step_ms']:.0f} ms, {row['tokens_per_s']:.0f} tokens/s, extra {row['extra_mib']} MiB"))
    tol = 1e-4 if cfg["dtype"] == "fp32" else 3e-2
    ref = reference_loss_grads(cfg, seed, device=device) if "op" in parts else None
    agrees = all([fill_agreement(rows, part, ref if part == "op" else None, tol) for part in parts])  # fill each
    targets = {part: evaluate_targets(rows, part) for part in parts}
    return {"shape": cfg, "device": device_name(device), "rows": rows, "agrees": agrees, "tolerance": tol,
            "reference": ref, "targets": targets}


def markdown(result: dict[str, Any]) -> list[str]:
    """The section's tables (lines)."""
    title = "#### Drop-in: Hugging Face Trainer step and the loss op (`bench --sections dropin`)"
    if "error" in result:
        return [title, "", f"Failed: {result['error']}"]
    c = result["shape"]
    lines = [f"{title}, {result['device']}", "",
             f"Llama from config, V={c['v']:,}, H={c['h']}, {c['layers']} layer(s), {c['dtype']}, {c['b']} x {c['s']} "
             f"tokens (first quarter prompt); each row in its own process, best of {c['repeats']}. Agreement (loss, "
             f"gradient projection) within {result['tolerance']:.0e}: " + ("yes" if result["agrees"] else "**NO**")
             + " (trainer: vs HF unpatched; op: vs a float64 reference)."]
    names = {"trainer": "Trainer SFT step (forward + backward + SGD)", "op": "loss op (forward + backward)"}
    for part in result["targets"]:
        lines += ["", f"**{names[part]}**", "",
                  "| implementation | step ms | CPU ms | tokens/s | vs base | peak extra MiB | vs base | loss rel diff "
                  "| grad rel diff |", "|---|---|---|---|---|---|---|---|---|"]
        for r in (x for x in result["rows"] if x["part"] == part):
            if "loss" not in r:
                lines.append(f"| {r['impl']} | {'not run: ' + r['skipped'] if 'skipped' in r else 'error: '}"
                             f"{r.get('error', '')} | | | | | | | |")
                continue
            extra = "n/a" if r["extra_mib"] is None else f"{r['extra_mib']:,.1f}"
            mem = r.get("memory_vs_base")
            cpu_ms = r.get("cpu_ms")
            lines.append(f"| {r['impl']} | {r['step_ms']:,.0f} | {'n/a' if cpu_ms is None else f'{cpu_ms:,.0f}'} | "
                         f"{r['tokens_per_s']:,.0f} | "
                         f"{r.get('speed_vs_base', float('nan')):.2f}x | {extra} | "
                         f"{'n/a' if mem is None else f'{mem:.2f}x'} | {r.get('loss_rel_diff', float('nan')):.1e} | "
                         f"{r.get('grad_rel_diff', float('nan')):.1e} |")
        t = result["targets"][part]
        if t.get("met") is None:
            lines += ["", f"Targets: not evaluated ({t['why']})."]
        else:
            mem = t["memory_vs_least_peer"]
            verdict = "met" if t["met"] else "**not met**"
            lines += ["", f"Targets (<= the least peer memory, >= 1.2x the fastest peer's tokens/s): {verdict} - "
                      f"{t['speed_vs_best_peer']:.2f}x {t['best_peer']}'s tokens/s, memory "
                      f"{'n/a' if mem is None else f'{mem:.2f}x'} the least peer's."]
    return lines


def _main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    row = run_row(spec["part"], spec["impl"], spec["cfg"], torch.device(spec["device"]), spec["seed"])
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
