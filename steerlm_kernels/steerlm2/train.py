"""``steerlm-kernels train``: SteerLM 2.0 training on a JSONL file and a causal LM.

With no arguments it runs an embedded default - the bundled sample data
(:func:`~steerlm_kernels.steerlm2.records.sample_data_path`) and a
:class:`~steerlm_kernels.steerlm2.tiny_lm.TinyCausalLM` with the byte tokenizer, on CPU, in about a
minute - printing loss, distance and tokens/s per step with a progress bar, then a summary. It
writes ``metrics.json`` and (when matplotlib is installed: ``pip install 'steerlm-kernels[plot]'``)
``metrics.png`` to ``--output``.

Each step takes ``--groups-per-step`` whole prompt groups, runs
:meth:`GPTSteerLMModel.get_loss_and_metrics` (baseline phase, then the weighted loss with
gradient accumulation over micro-batches) and one AdamW step (gradient norm clipped to 1).
The ``distance`` of a step is ``KL(ws || baseline)`` of the model *before* that step's update.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["DEFAULTS", "add_arguments", "load_model", "run"]

#: The embedded default run, tuned on the bundled sample: the mean distance of the last steps falls
#: to about a tenth of the first step's (below half after 60 steps already); about 15 s on 2 idle
#: CPU cores, a minute or more when the cores are shared. The learning rate is constant, so a run
#: with fewer ``--steps`` is exactly a prefix of the default run.
DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "steps": 120,
    "lr": 3e-3,
    "groups_per_step": 8,
    "micro_batch_size": 16,
    "forward_micro_batch_size": 32,
    "max_seq_length": 512,
    "seed": 0,
    "backend": "auto",
    "device": "auto",
}
#: Number of final steps whose mean distance the summary compares with the first step's.
LAST_STEPS = 5


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` options to ``parser`` (a sub-command parser); returns it."""
    d = DEFAULTS
    parser.description = ("SteerLM 2.0 training on a JSONL file and a causal LM; with no arguments, the bundled "
                          "sample and a tiny model on CPU (about a minute).")
    parser.add_argument("--data", default=None,
                        help="SteerLM 2.0 JSONL file (default: the bundled sample, 40 prompts)")
    parser.add_argument("--model", default=d["model"],
                        help="a Hugging Face model directory (AutoModelForCausalLM + AutoTokenizer; needs "
                             "transformers) or a built-in tiny model: tiny, small (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=d["lr"], help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--groups-per-step", type=int, default=d["groups_per_step"],
                        help="prompt groups (with all their responses) per step (default: %(default)s)")
    parser.add_argument("--micro-batch-size", type=int, default=d["micro_batch_size"],
                        help="responses per training micro-batch (cfg.steerlm2.micro_batch_size; "
                             "default: %(default)s)")
    parser.add_argument("--forward-micro-batch-size", type=int, default=d["forward_micro_batch_size"],
                        help="responses per baseline-phase forward (cfg.steerlm2.forward_micro_batch_size; "
                             "default: %(default)s)")
    parser.add_argument("--max-seq-length", type=int, default=d["max_seq_length"],
                        help="longest sequence; longer groups are dropped, never truncated (default: %(default)s)")
    parser.add_argument("--device", default=d["device"],
                        help="torch device; auto = cpu for the built-in tiny models, else cuda when available")
    parser.add_argument("--backend", default=d["backend"], choices=("auto", "triton", "cpp", "torch"),
                        help="kernel backend (default: %(default)s)")
    parser.add_argument("--output", default=None, help="output directory (default: runs/<timestamp>)")
    parser.add_argument("--seed", type=int, default=d["seed"], help="seed of the model init and data order")
    return parser


def _fail(message: str) -> int:
    print(f"steerlm-kernels train: error: {message}", file=sys.stderr)
    return 2


def load_model(spec: str, device: torch.device, seed: int, max_seq_len: int) -> tuple[nn.Module, Any, str]:
    """Build the model and its tokenizer from ``spec``.

    ``spec``: a built-in name of :data:`steerlm_kernels.steerlm2.tiny_lm.TINY_CONFIGS` (byte tokenizer,
    deterministic init from ``seed``, ``max_seq_len`` learned positions) or a Hugging Face model
    directory (loaded in float32). Returns ``(model on device, tokenizer, description)``.
    """
    from steerlm_kernels.steerlm2.tiny_lm import TINY_CONFIGS, TinyCausalLM
    from steerlm_kernels.steerlm2.tokenization import ByteTokenizer

    if spec in TINY_CONFIGS:
        tok = ByteTokenizer()
        cfg = TINY_CONFIGS[spec]
        model = TinyCausalLM(tok.vocab_size, max_seq_len=max_seq_len, seed=seed, **cfg)
        desc = f"TinyCausalLM '{spec}' ({', '.join(f'{k}={v}' for k, v in cfg.items())}), byte tokenizer"
        return model.to(device), tok, desc
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"--model {spec!r} is neither a built-in model ({', '.join(TINY_CONFIGS)}) nor a directory")
    try:
        import transformers
    except ImportError:
        raise ValueError(f"--model {spec!r} is a Hugging Face directory: pip install transformers") from None
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    return model.to(device=device, dtype=torch.float32), tok, f"{type(model).__name__} from {path}"


class _Progress:
    """A dependency-free progress line per step: ``[#####-----] k/n`` with metrics and ETA."""

    def __init__(self, total: int, width: int = 24) -> None:
        self.total = total
        self.width = width
        self.start = time.perf_counter()

    def step(self, k: int, text: str) -> None:
        done = round(self.width * k / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / k * (self.total - k) if k else 0.0
        digits = len(str(self.total))
        print(f"[{'#' * done}{'-' * (self.width - done)}] {k:>{digits}}/{self.total} {text} "
              f"| {elapsed:5.1f}s eta {eta:4.0f}s", flush=True)


def _plot(steps: list[dict[str, float]], path: Path, title: str) -> str | None:
    """Write the loss / distance curves to ``path``; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'steerlm-kernels[plot]')"
    xs = [s["step"] for s in steps]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(xs, [s["loss"] for s in steps], color="tab:blue")
    ax1.set_ylabel("loss")
    ax1.axhline(0.0, color="grey", lw=0.5)
    ax2.plot(xs, [s["distance"] for s in steps], color="tab:red")
    ax2.set_ylabel("distance KL(ws || baseline)")
    ax2.set_xlabel("step")
    ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _resolve_device(name: str, model_spec: str) -> torch.device:
    from steerlm_kernels.steerlm2.tiny_lm import TINY_CONFIGS

    if name == "auto":
        if model_spec in TINY_CONFIGS or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda")
    return torch.device(name)


def run(ns: argparse.Namespace) -> int:
    """Run the ``train`` sub-command with the parsed options; returns the exit status."""
    from steerlm_kernels.steerlm2.data import GroupBatchSampler, SteerLM2Dataset, sample_data_path
    from steerlm_kernels.steerlm2.model import GPTSteerLMModel

    for name in ("steps", "groups_per_step", "micro_batch_size", "forward_micro_batch_size", "max_seq_length"):
        if getattr(ns, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be positive, got {getattr(ns, name)}")
    if not (ns.lr > 0 and math.isfinite(ns.lr)):
        return _fail(f"--lr must be positive, got {ns.lr}")
    try:
        device = _resolve_device(ns.device, ns.model)
    except RuntimeError as exc:
        return _fail(f"--device: {exc}")
    out_dir = Path(ns.output) if ns.output else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    torch.manual_seed(ns.seed)

    try:
        model, tokenizer, model_desc = load_model(ns.model, device, ns.seed, ns.max_seq_length)
        data_path = ns.data if ns.data is not None else sample_data_path()
        dataset = SteerLM2Dataset(data_path, tokenizer=tokenizer, max_seq_length=ns.max_seq_length)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))

    cfg = {"steerlm2": {"forward_micro_batch_size": ns.forward_micro_batch_size,
                        "micro_batch_size": ns.micro_batch_size}}
    wrapper = GPTSteerLMModel(model, cfg, backend=ns.backend)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=ns.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sampler = GroupBatchSampler(dataset, groups_per_step=min(ns.groups_per_step, len(dataset)), shuffle=True,
                                seed=ns.seed, drop_last=True)

    print(f"model: {model_desc}, {n_params / 1e6:.2f}M parameters, on {device}, backend {ns.backend}")
    print(f"data: {dataset.source}: {len(dataset)} prompt groups, {dataset.num_responses_total} responses"
          + (f" ({dataset.num_dropped} groups dropped: too long)" if dataset.num_dropped else ""))
    print(f"steps {ns.steps} x {sampler.groups_per_step} groups, lr {ns.lr}, micro-batches "
          f"{ns.forward_micro_batch_size} (baseline) / {ns.micro_batch_size} (training), threads "
          f"{torch.get_num_threads()}, output {out_dir}")

    history: list[dict[str, float]] = []
    progress = _Progress(ns.steps)
    t_start = time.perf_counter()
    batches = iter(())
    for step in range(1, ns.steps + 1):
        indices = next(batches, None)
        if indices is None:
            batches = iter(sampler)
            indices = next(batches)
        batch = dataset.collate_fn([dataset[i] for i in indices])
        t0 = time.perf_counter()
        loss, metrics = wrapper.get_loss_and_metrics(batch, forward_only=False)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        tokens = int(batch["attention_mask"].sum())
        record = {"step": step, "loss": loss, "distance": metrics["distance"], "grad_norm": grad_norm,
                  "responses": int(batch["tokens"].shape[0]), "tokens": tokens, "seconds": seconds,
                  "tokens_per_s": tokens / seconds}
        history.append(record)
        progress.step(step, f"loss {loss:+.4f}  distance {metrics['distance']:7.4f}  {tokens / seconds:7.0f} tok/s")
        if not math.isfinite(loss):
            print("stopping: the loss is not finite", file=sys.stderr)
            break
    total = time.perf_counter() - t_start

    first = history[0]["distance"]
    last = history[-LAST_STEPS:]
    last_mean = sum(s["distance"] for s in last) / len(last)
    summary = {
        "steps": len(history),
        "seconds": total,
        "first_distance": first,
        "last_distance_mean": last_mean,
        "last_steps": len(last),
        "distance_ratio": last_mean / first if first else float("nan"),
        "final_loss": history[-1]["loss"],
        "tokens": sum(s["tokens"] for s in history),
        "tokens_per_s": sum(s["tokens"] for s in history) / total,
    }
    config = {k: (str(x) if isinstance(x, Path) else x) for k, x in vars(ns).items() if k != "func"}
    config.update(data=str(dataset.source), output=str(out_dir), device=str(device), parameters=n_params)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "metrics.json"
    json_path.write_text(json.dumps({"config": config, "summary": summary, "steps": history}, indent=1) + "\n")
    png_path = out_dir / "metrics.png"
    why_not = _plot(history, png_path, f"SteerLM 2.0: {Path(ns.model).name} on {Path(dataset.source).name}")

    print()
    print(f"done: {len(history)} steps in {total:.1f}s ({summary['tokens_per_s']:.0f} tokens/s)")
    print(f"distance: first step {first:.4f} -> mean of the last {len(last)} steps {last_mean:.4f} "
          f"({summary['distance_ratio']:.2f}x)")
    print(f"loss: first step {history[0]['loss']:+.4f} -> last step {history[-1]['loss']:+.4f}")
    print(f"wrote {json_path}")
    print(f"wrote {png_path}" if why_not is None else f"no plot: {why_not}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m steerlm_kernels.steerlm2.train [options]``."""
    parser = add_arguments(argparse.ArgumentParser(prog="steerlm-kernels train"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
