"""The peers' agreement with our values: ``python -m steerlm_kernels.bench.peers_check``.

:func:`check` compares each available peer (:mod:`steerlm_kernels.bench.peers`) with our public
functions and with a float64 PyTorch reference; :func:`markdown` renders its rows;
``python -m steerlm_kernels.bench.peers_check [--device cpu|cuda] [--json FILE]`` prints the table
(on CPU it re-runs itself in a subprocess with ``TRITON_INTERPRET=1`` when that is not set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from steerlm_kernels.bench import peers as adapters
from steerlm_kernels.bench.peers import PEERS, available, check_peer, interpreting

__all__ = ["TOLERANCES", "check", "main", "markdown"]

#: agreement tolerance per dtype: relative error (see :func:`check`)
TOLERANCES: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}

_CHECK_SHAPE = {"n": 37, "v": 1003, "h": 48}  # deliberately not multiples of any block size
_IGNORED_FRACTION = 0.2


def _max_rel(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max|b|`` in float64 (``inf`` when ``b`` is all zeros but ``a`` is not)."""
    a, b = a.detach().double(), b.detach().double()
    num, den = (a - b).abs().max().item(), b.abs().max().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _frob_rel(a: Tensor, b: Tensor) -> float:
    """``||a - b||_F / ||b||_F`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    num, den = torch.linalg.vector_norm(a - b).item(), torch.linalg.vector_norm(b).item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _reference_nll(logits64: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0)
    nll = torch.logsumexp(logits64, dim=-1) - logits64.gather(1, safe[:, None])[:, 0]
    return nll.masked_fill(ignored, 0.0)


def _values_and_grads(fn: Callable[..., Tensor], inputs: Sequence[Tensor], coef: Tensor,
                      with_grad: bool) -> tuple[Tensor, list[Tensor]]:
    """Run ``fn`` on fresh leaf copies of ``inputs``; return its values and, when ``with_grad``, the
    gradients of ``sum(coef * values)`` w.r.t. each input. Fresh copies: Liger overwrites its logits."""
    leaves = [x.detach().clone().requires_grad_(with_grad) for x in inputs]
    if not with_grad:
        with torch.no_grad():
            return fn(*leaves).detach(), []
    out = fn(*leaves)
    grads = torch.autograd.grad((out.double() * coef).sum(), leaves)
    return out.detach(), [g.detach() for g in grads]


def _check_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    if device.type == "cpu":
        return (torch.float32, torch.float16)  # the interpreter's bfloat16 is garbage
    return (torch.float32, torch.bfloat16, torch.float16)


def _ours_backend(device: torch.device) -> str:
    from steerlm_kernels import registry

    try:
        return registry.resolve("auto", device)
    except ValueError as exc:
        return f"? ({exc})"


def check(
    device: str | torch.device = "cpu", seed: int = 0, peers: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Compare every available peer with our public functions and with a float64 reference.

    For each available peer (see :func:`available`) and each adapter it has (``token_nll``: Liger
    only; ``linear_token_nll``: both, Liger with a bias, CCE without as it has none), at
    ``N=37, V=1003, H=48`` (not multiples of any block size) with about 20 % ignored labels,
    in float32 and float16 (CPU, through Triton's interpreter, whose bfloat16 is broken) or float32,
    bfloat16 and float16 (CUDA): the peer's per-token NLL, and the gradients of ``sum(c * nll)`` (``c`` random signed
    ``[N]``) w.r.t. the logits (or hidden, weight and bias), compared with

    * a float64 PyTorch reference computed from the same (rounded) inputs, and
    * ours: ``steerlm_kernels.token_nll(logits, labels)`` and, per token,
      ``steerlm_kernels.linear_sequence_nll(hidden[:, None], weight, labels[:, None], bias=bias)``
      (sequences of length 1), ``backend="auto"`` (``"cpp"`` on CPU when built, ``"triton"`` on CUDA).

    Args:
        device: ``"cpu"`` (needs ``TRITON_INTERPRET=1`` set before the peers are imported; see
            :func:`main`) or ``"cuda"``.
        seed: seeds the random inputs.
        peers: restrict to these peers (default: all of :data:`PEERS`).

    Returns:
        one dict per (peer, op, dtype): ``peer, op, n, v, h, dtype`` (``h`` is 0 for ``token_nll``),
        ``value_rel_err`` (``max|peer - ref| / max|ref|``), ``grad_rel_err`` (Frobenius
        ``||peer - ref|| / ||ref||``, the max over the differentiated inputs; ``None`` when the peer
        cannot differentiate at that dtype, see ``note``), ``value_rel_err_ours`` / ``grad_rel_err_ours``
        (the same against ours), ``tol`` (1e-4 float32, 2e-2 bfloat16, 5e-3 float16), ``agrees`` (every
        error present is finite and ``<= tol``), ``error`` (``"Type: message"`` when the peer raised
        or gave non-finite values, else ``""``), ``note``, ``bias``, ``ours`` (our backend).
        Unavailable peers give no rows (nothing is allocated when no peer is available).
    """
    import steerlm_kernels as sk

    dev = torch.device(device)
    names = PEERS if peers is None else tuple(peers)
    for p in names:
        check_peer(p)
    why = available(dev)
    if all(why[p] for p in names):
        return []
    ours_backend = _ours_backend(dev)
    n, v, h = _CHECK_SHAPE["n"], _CHECK_SHAPE["v"], _CHECK_SHAPE["h"]
    ignore_index = -100

    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < _IGNORED_FRACTION] = ignore_index
    labels = labels.to(dev)
    coef = torch.randn(n, generator=gen, dtype=torch.float64).to(dev)
    logits32 = (3.0 * torch.randn(n, v, generator=gen)).to(dev)
    hidden32 = torch.randn(n, h, generator=gen).to(dev)
    weight32 = (torch.randn(v, h, generator=gen) * (2.0 / math.sqrt(h))).to(dev)
    bias32 = (0.5 * torch.randn(v, generator=gen)).to(dev)

    rows: list[dict[str, Any]] = []
    for peer in names:
        if why[peer]:
            continue
        cases: list[tuple[str, bool]] = [("linear_token_nll", peer == "liger")]
        if peer == "liger":
            cases.insert(0, ("token_nll", False))
        for op, use_bias in cases:
            # looked up here, by name: a test may replace an adapter in the peers module
            adapter = (adapters.token_nll_adapter if op == "token_nll" else adapters.linear_token_nll_adapter)(peer)
            for dtype in _check_dtypes(dev):
                tol = TOLERANCES[dtype]
                if op == "token_nll":
                    inputs = [logits32.to(dtype)]
                    peer_fn: Callable[..., Tensor] = lambda x, _f=adapter: _f(x, labels)
                    ours_fn: Callable[..., Tensor] = lambda x: sk.token_nll(x, labels, ignore_index=ignore_index)
                    ref_fn: Callable[..., Tensor] = lambda x: _reference_nll(x, labels, ignore_index)
                else:
                    inputs = [hidden32.to(dtype), weight32.to(dtype)] + ([bias32.to(dtype)] if use_bias else [])
                    peer_fn = lambda hh, ww, *bb, _f=adapter: _f(hh, ww, labels, *bb)
                    ours_fn = lambda hh, ww, *bb: sk.linear_sequence_nll(
                        hh[:, None], ww, labels[:, None], bias=bb[0] if bb else None, ignore_index=ignore_index)
                    ref_fn = lambda hh, ww, *bb: _reference_nll(hh @ ww.T + (bb[0] if bb else 0), labels, ignore_index)
                with_grad = not (peer == "cce" and dtype == torch.float32)
                note = "" if with_grad else "values only: CCE's backward requires bf16/fp16 hidden states"
                if peer == "cce" and dev.type == "cpu":
                    note = "; ".join(filter(None, [note, "interpreter lacks libdevice.log1p: numpy's supplied"]))
                row: dict[str, Any] = {
                    "peer": peer, "op": op, "n": n, "v": v, "h": h if op != "token_nll" else 0,
                    "dtype": str(dtype).removeprefix("torch."), "value_rel_err": None, "grad_rel_err": None,
                    "value_rel_err_ours": None, "grad_rel_err_ours": None, "tol": tol, "agrees": False,
                    "error": "", "note": note, "bias": use_bias, "ours": ours_backend,
                }
                rows.append(row)
                ref_val, ref_grads = _values_and_grads(ref_fn, [x.double() for x in inputs], coef, True)
                our_val, our_grads = _values_and_grads(ours_fn, inputs, coef, with_grad)
                try:
                    val, grads = _values_and_grads(peer_fn, inputs, coef, with_grad)
                except Exception as exc:
                    last = (str(exc).strip().splitlines() or [""])[-1]  # interpreter errors nest tracebacks
                    row["error"] = f"{type(exc).__name__}: {last}"
                    continue
                errs = {
                    "value_rel_err": _max_rel(val, ref_val),
                    "value_rel_err_ours": _max_rel(val, our_val),
                    "grad_rel_err": max((_frob_rel(g, r) for g, r in zip(grads, ref_grads)), default=None),
                    "grad_rel_err_ours": max((_frob_rel(g, o) for g, o in zip(grads, our_grads)), default=None),
                }
                present = [e for e in errs.values() if e is not None]
                for key, err in errs.items():
                    row[key] = _finite(err)
                if not all(math.isfinite(e) for e in present) or not bool(torch.isfinite(val).all()):
                    row["error"] = "non-finite values or gradients"
                row["agrees"] = not row["error"] and all(e <= tol for e in present)
    return rows


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.1e}"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of :func:`check`'s rows (errors relative; ``—`` where not measured)."""
    lines = [
        "| peer | op | dtype | N×V(×H) | value err vs fp64 | grad err vs fp64 | value err vs ours | grad err vs ours "
        "| tol | agrees | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        op = r["op"] + (" +bias" if r.get("bias") else "")
        shape = f"{r['n']}×{r['v']}" + (f"×{r['h']}" if r["h"] else "")
        notes = "; ".join(filter(None, [r.get("error", ""), r.get("note", ""),
                                        f"ours: {r['ours']}" if r.get("ours") else ""]))
        lines.append(
            f"| {r['peer']} | {op} | {r['dtype']} | {shape} | {_fmt(r['value_rel_err'])} "
            f"| {_fmt(r['grad_rel_err'])} | {_fmt(r['value_rel_err_ours'])} | {_fmt(r['grad_rel_err_ours'])} "
            f"| {r['tol']:g} | {'yes' if r['agrees'] else '**NO**'} | {notes} |"
        )
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("liger-kernel", "cut-cross-entropy", "triton", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m steerlm_kernels.bench.peers_check [--device cpu|cuda] [--seed S] [--json FILE]``.

    Prints why each unavailable peer is unavailable and the agreement table; ``--json`` writes
    ``{"device", "versions", "available", "rows"}``. On CPU without ``TRITON_INTERPRET=1`` in the
    environment it re-runs itself in a subprocess with it set (the caller's process is never
    switched to the interpreter) and returns that exit status.

    Returns:
        1 when an available peer disagrees (or raised), else 0 (also when no peer is available).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m steerlm_kernels.bench.peers_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(args_list)

    if args.device == "cpu" and not interpreting():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "steerlm_kernels.bench.peers_check", *args_list]
        return subprocess.run(cmd, env=env).returncode

    if interpreting():  # numpy warnings from the interpreter's exp/log of masked-out lanes (as pyproject's)
        for message in ("divide by zero encountered", "invalid value encountered", "overflow encountered"):
            warnings.filterwarnings("ignore", message=message, category=RuntimeWarning)
    why = available(args.device)
    for peer, reason in why.items():
        if reason:
            print(f"{peer}: unavailable: {reason}")
    rows = check(args.device, seed=args.seed)
    if args.device == "cpu":
        mode = "CPU tensors through Triton's interpreter"
    else:
        mode = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"peers vs float64 reference and steerlm_kernels ({mode})")
    if rows:
        print(markdown(rows))
    else:
        print("(no peer available: nothing compared)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "versions": _versions(), "available": why, "rows": rows}, f, indent=1)
    return 1 if any(not r["agrees"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
