"""Adapters for the peers our users compare us with, and an agreement check against them.

Peers (optional; ``pip install --no-deps "steerlm-kernels[peers]"`` pins them, or
``pip install --no-deps liger-kernel==0.8.5 cut-cross-entropy==25.1.1``; ``--no-deps`` keeps pip
away from torch/triton):

``liger``  Liger-Kernel (``liger_kernel``, LinkedIn): a Triton cross entropy on logits and a fused
           linear cross entropy (chunked cuBLAS matmuls + that Triton kernel).
``cce``    Apple's Cut Cross-Entropy (``cut_cross_entropy``): Triton kernels that never hold the
           logits. It has only a fused-linear entry point (hidden states and classifier in).

Every adapter returns the per-token NLL as float32 ``[N]`` (0 at ``ignore_index`` labels),
differentiable through autograd w.r.t. its floating-point inputs (exceptions documented below),
so the benchmark can time the peers through the same calls it uses for us.

Both peers are Triton code: they need CUDA tensors, or CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` in the environment before the peer is first imported; the interpreter is
chosen when a kernel is decorated). Under the interpreter only agreement is meaningful, never time,
and only float32 / float16: Triton 3.9's interpreter holds bfloat16 values as raw 16-bit integers,
so bfloat16 arithmetic there is garbage.

``check()`` compares each available peer with our public functions and with a float64 PyTorch
reference; ``python -m steerlm_kernels.peers [--device cpu|cuda] [--json FILE]`` prints the table
(on CPU it re-runs itself in a subprocess with ``TRITON_INTERPRET=1`` when that is not set).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["PEERS", "available", "check", "linear_token_nll", "main", "markdown", "token_nll"]

PEERS: tuple[str, ...] = ("liger", "cce")

#: peer -> (importable module, pinned distribution)
_PACKAGES: dict[str, tuple[str, str]] = {
    "liger": ("liger_kernel", "liger-kernel==0.8.5"),
    "cce": ("cut_cross_entropy", "cut-cross-entropy==25.1.1"),
}

#: agreement tolerance per dtype: relative error (see :func:`check`)
TOLERANCES: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}

_CHECK_SHAPE = {"n": 37, "v": 1003, "h": 48}  # deliberately not multiples of any block size
_IGNORED_FRACTION = 0.2


# --------------------------------------------------------------------------------------------
# availability


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _peer_kernels(peer: str) -> list[Any]:
    """The peer's Triton kernel objects (imports the peer)."""
    if peer == "liger":
        from liger_kernel.ops import cross_entropy

        return [cross_entropy.liger_cross_entropy_kernel]
    from cut_cross_entropy import cce_backward, cce_lse_forward, indexed_dot

    return [cce_lse_forward._cce_lse_forward_kernel, indexed_dot._indexed_neg_dot_forward_kernel,
            cce_backward._cce_backward_kernel]


def _is_interpreted(kernel: Any) -> bool:
    """Whether a (possibly autotuner/heuristics-wrapped) Triton kernel runs in the interpreter."""
    for _ in range(8):
        if type(kernel).__name__ == "InterpretedFunction":
            return True
        if not hasattr(kernel, "fn"):
            return False
        kernel = kernel.fn
    return False


def _why_unavailable(peer: str, device: torch.device) -> str:
    module, pin = _PACKAGES[peer]
    if importlib.util.find_spec(module) is None:
        return f"not installed (pip install --no-deps {pin!r})"
    if importlib.util.find_spec("triton") is None:
        return "triton is not importable (the peer is Triton code)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
    elif device.type == "cpu":
        if not _interpreting():
            # Importing the peer now would decorate its kernels for a GPU for the whole process.
            return ("needs CUDA tensors; CPU tensors only under Triton's interpreter "
                    "(TRITON_INTERPRET=1 set before the peer is imported)")
    else:
        return f"runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {device.type}"
    try:
        kernels = _peer_kernels(peer)
    except Exception as exc:  # a broken install, an incompatible triton/torch
        return f"import failed ({type(exc).__name__}: {exc})"
    if device.type == "cpu" and not all(_is_interpreted(k) for k in kernels):
        return ("imported before TRITON_INTERPRET=1 was set: its kernels are compiled for a GPU in this process "
                "(run `python -m steerlm_kernels.peers --device cpu`, a fresh process)")
    return ""


def available(device: str | torch.device | None = None) -> dict[str, str]:
    """Which peers can run here, and why not.

    Args:
        device: the device of the tensors the peers would get; default CUDA when available, else CPU.
            On CPU a peer is usable only when ``TRITON_INTERPRET=1`` is set (and was set before the
            peer was first imported). Nothing is imported on CPU when it is not set.

    Returns:
        ``{peer: ""}`` for each usable peer, ``{peer: reason}`` otherwise (not installed, no CUDA
        device, needs the interpreter, import failure), for every name in :data:`PEERS`.
    """
    dev = _resolve_device(device)
    return {peer: _why_unavailable(peer, dev) for peer in PEERS}


def _check_peer(peer: Any) -> None:
    if peer not in PEERS:
        raise ValueError(f"peer must be one of {PEERS}, got {peer!r}")


# --------------------------------------------------------------------------------------------
# adapters


def token_nll(peer: str, logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Per-token NLL ``-log softmax(logits)[label]`` by a peer's cross entropy on logits.

    Args:
        peer: ``"liger"`` (``"cce"`` has no logits-input cross entropy: ``ValueError``).
        logits: ``[N, V]`` float32 / bfloat16 / float16 (CUDA, or CPU under the interpreter).
            **Liger overwrites it**: its kernel writes the gradient into the logits' storage during
            the forward (when ``logits.requires_grad``) and zeroes the rows of ignored tokens even
            without grad. Pass a tensor you do not need afterwards (a copy, or logits nothing else
            saved for backward); Liger does this behind autograd's back (no version-counter bump).
        labels: ``[N]`` int64; ``ignore_index`` contributes 0. Liger asserts that the other labels
            lie in ``[0, V)`` (a host sync).
        ignore_index: the ignored label value (default -100).

    Returns:
        float32 ``[N]``, 0 at ignored tokens; differentiable w.r.t. ``logits`` (Liger's own
        per-token loss is of the logits' dtype, so bf16/fp16 values are rounded to that dtype
        before the cast to float32). Liger's backward multiplies its stored gradient by the
        upstream ``[N]`` gradient (one more ``[N, V]`` tensor).

    Raises:
        ValueError: unknown peer, ``peer="cce"``, or logits that are not 2-D.
    """
    _check_peer(peer)
    if peer == "cce":
        raise ValueError(
            "cce: Cut Cross-Entropy has no cross entropy on precomputed logits, only the fused "
            "linear one (hidden states and classifier in): use linear_token_nll('cce', ...)"
        )
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V] and labels [N]; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    from liger_kernel.transformers.functional import liger_cross_entropy

    loss = liger_cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    return loss.float()


@contextlib.contextmanager
def _cce_interpreter_log1p() -> Iterator[None]:
    """Under Triton's interpreter, give CCE a working ``libdevice.log1p`` for the call.

    CCE's LSE forward kernel merges partial log-sum-exps with ``log1p`` from
    ``triton.language.extra.libdevice``. Triton 3.9's interpreter implements none of libdevice:
    the stubs return ``None`` and the kernel fails with an ``AttributeError``. For the duration of
    the call, ``cut_cross_entropy.tl_utils.tl_libdevice`` (CCE's alias of that module, the only
    name its kernels look it up by) is swapped for a namespace whose ``log1p`` is ``numpy.log1p``
    on the interpreter's arrays, i.e. the function libdevice computes. CCE's own code and math are
    untouched; nothing is patched outside the interpreter or outside the call.
    """
    if not _interpreting():
        yield
        return
    import numpy as np
    from cut_cross_entropy import tl_utils

    saved = tl_utils.tl_libdevice
    # tanh: used by CCE only with softcap (never here); supplied the same way for completeness.
    tl_utils.tl_libdevice = types.SimpleNamespace(log1p=lambda x: _interp_unary(x, np.log1p),
                                                  tanh=lambda x: _interp_unary(x, np.tanh))
    try:
        yield
    finally:
        tl_utils.tl_libdevice = saved


def _interp_unary(x: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` (a numpy ufunc) on an interpreter tensor's array, as the interpreter's own math ops do."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    return tl.core.tensor(TensorHandle(fn(x.handle.data), x.handle.dtype.scalar), x.type)


def linear_token_nll(
    peer: str,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
) -> Tensor:
    """Per-token NLL of ``logits = hidden @ weight.T (+ bias)`` by a peer's fused linear cross entropy.

    Args:
        peer: ``"liger"`` or ``"cce"``.
        hidden: ``[N, H]`` float32 / bfloat16 / float16 (CUDA, or CPU under the interpreter).
        weight: ``[V, H]``, the classifier (LM head), ``hidden``'s dtype.
        labels: ``[N]`` int64; ``ignore_index`` contributes 0. No shift is applied: ``labels[i]``
            is the target of ``hidden[i]``.
        bias: optional ``[V]`` (Liger only; CCE has no bias: ``ValueError``).
        ignore_index: the ignored label value (default -100).

    Returns:
        float32 ``[N]``, 0 at ignored tokens; differentiable w.r.t. ``hidden``, ``weight`` (and
        ``bias``). Inputs are never modified.

    Peer specifics:

    * ``liger``: ``LigerFusedLinearCrossEntropyFunction`` with ``reduction="none"`` and its default
      options (``accum_dtype=None``: ``grad_weight``/``grad_bias`` accumulate in the parameters'
      dtype). With ``reduction="none"`` Liger computes no gradient in the forward; its backward
      recomputes the chunked logits and folds the upstream per-token gradient in (chunks of rows
      sized so a logits chunk is about ``N x H`` elements). bf16/fp16 logits chunks are rounded to
      that dtype before its float32 cross entropy.
    * ``cce``: ``cut_cross_entropy.linear_cross_entropy(hidden, weight, labels, reduction="none",
      shift=False, filter_eps=None, impl="cce")``. ``shift=False`` is CCE's default, given
      explicitly. ``filter_eps=None`` turns OFF CCE's default gradient filtering
      (``filter_eps="high"``: blocks whose softmax is below ``finfo(dtype).eps / 32`` are skipped in
      the backward, an approximation) so the comparison is exact; timings are therefore of CCE
      without filtering, which is slower than its default. CCE's backward accepts only bfloat16 /
      float16 ``hidden``: a float32 ``hidden`` works forward-only (``ValueError`` here when a
      gradient would be needed, instead of CCE's ``AssertionError`` at backward time). Under
      Triton's interpreter the call runs with :func:`_cce_interpreter_log1p` (a missing
      interpreter function supplied, CCE's math unchanged).

    Raises:
        ValueError: unknown peer, bad shapes, ``bias`` with CCE, float32 CCE with a gradient needed.
    """
    _check_peer(peer)
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be [N, H], weight [V, H], labels [N]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}]; got {tuple(bias.shape)}")
    if peer == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        loss = liger_fused_linear_cross_entropy(hidden, weight, labels, bias, ignore_index=ignore_index,
                                                reduction="none")
        return loss.float()
    if bias is not None:
        raise ValueError("cce: Cut Cross-Entropy's linear_cross_entropy takes no bias")
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if needs_grad and hidden.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"cce: Cut Cross-Entropy's backward requires bfloat16/float16 hidden states, got {hidden.dtype} "
            "(use it under torch.no_grad() or with detached inputs for values only)"
        )
    from cut_cross_entropy import linear_cross_entropy

    with _cce_interpreter_log1p():
        loss = linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, reduction="none",
                                    shift=False, filter_eps=None, impl="cce")
    return loss.float()


# --------------------------------------------------------------------------------------------
# agreement check


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
        _check_peer(p)
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
            for dtype in _check_dtypes(dev):
                tol = TOLERANCES[dtype]
                if op == "token_nll":
                    inputs = [logits32.to(dtype)]
                    peer_fn: Callable[..., Tensor] = lambda x, _p=peer: token_nll(_p, x, labels)
                    ours_fn: Callable[..., Tensor] = lambda x: sk.token_nll(x, labels, ignore_index=ignore_index)
                    ref_fn: Callable[..., Tensor] = lambda x: _reference_nll(x, labels, ignore_index)
                else:
                    inputs = [hidden32.to(dtype), weight32.to(dtype)] + ([bias32.to(dtype)] if use_bias else [])
                    peer_fn = lambda hh, ww, *bb, _p=peer: linear_token_nll(_p, hh, ww, labels, *bb)
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
    """``python -m steerlm_kernels.peers [--device cpu|cuda] [--seed S] [--json FILE]``.

    Prints why each unavailable peer is unavailable and the agreement table; ``--json`` writes
    ``{"device", "versions", "available", "rows"}``. On CPU without ``TRITON_INTERPRET=1`` in the
    environment it re-runs itself in a subprocess with it set (the caller's process is never
    switched to the interpreter) and returns that exit status.

    Returns:
        1 when an available peer disagrees (or raised), else 0 (also when no peer is available).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m steerlm_kernels.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(args_list)

    if args.device == "cpu" and not _interpreting():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.run([sys.executable, "-m", "steerlm_kernels.peers", *args_list], env=env).returncode

    if _interpreting():  # numpy warnings from the interpreter's exp/log of masked-out lanes (as pyproject's)
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
