"""What the data commands (``sample``, ``score``) load: models on a device in a dtype, and the
attribute scorer of ``score --attribute-scorer`` with the checks of its values.

Every failure is a :class:`~steerlm_kernels.steerlm2.formats.jsonl_stream.CommandError` naming the option.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from steerlm_kernels.steerlm2.formats.jsonl_stream import CommandError
from steerlm_kernels.steerlm2.formats.records import LOG_P_A, log_prob_problem

__all__ = ["SEED_MAX", "AttributeScorer", "call_attribute_scorer", "check_backend", "check_log_prob", "check_seed",
           "load_attribute_scorer", "load_models", "pad_id", "resolve_device", "resolve_dtype", "scorer_identity"]

#: The largest ``--seed`` (NumPy's seeds, which the Trainer's ``set_seed`` uses, are 32-bit).
SEED_MAX = 2**32 - 1

#: ``function(records) -> per record, one log P(a|x,y) per response`` (see ``example_scorers``).
AttributeScorer = Callable[[list[dict[str, Any]]], Sequence[Sequence[float]]]


def load_attribute_scorer(spec: str) -> AttributeScorer:
    """The callable named by ``module:function`` (``module`` dotted, or a path to a ``.py`` file)."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise CommandError(f"--attribute-scorer {spec!r}: expected MODULE:FUNCTION")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise CommandError(f"--attribute-scorer {spec!r}: no file {module_name}")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            if loader_spec is None or loader_spec.loader is None:
                raise CommandError(f"--attribute-scorer {spec!r}: cannot load {module_name}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except CommandError:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a user module can fail in any way; report one line
        raise CommandError(f"--attribute-scorer {spec!r}: import failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise CommandError(f"--attribute-scorer {spec!r}: {module_name} has no callable {func_name!r}")
    return fn

def check_log_prob(x: Any) -> str | None:
    """Why ``x`` is not a log-probability (a finite number <= 0), or None: the records' check
    (:func:`~steerlm_kernels.steerlm2.formats.records.log_prob_problem`: a number, finite as a float, an
    integer too large for one named) without its rounding tolerance above 0."""
    problem = log_prob_problem(x)
    if (problem is not None and isinstance(x, float)) or (problem is None and x > 0):  # nan, inf, > 0
        return f"must be a finite log-probability <= 0, got {x}"
    return problem

def call_attribute_scorer(fn: AttributeScorer, objs: list[dict[str, Any]], linenos: list[int], source: str) -> None:
    """Fill the missing ``log(P(a|x,y))`` of ``objs`` (records of input lines ``linenos``) with ``fn``'s
    values, checked (one list per record, one finite value <= 0 per response); CommandError otherwise."""
    lines = ", ".join(str(n) for n in linenos[:5]) + ("..." if len(linenos) > 5 else "")
    try:
        result = fn(copy.deepcopy(objs))
    except KeyboardInterrupt:  # Ctrl-C, or user code raising it: an interruption (exit 130), said where
        raise KeyboardInterrupt(f"in --attribute-scorer, records of {source}, lines {lines}") from None
    except SystemExit as exc:  # user code calling sys.exit(): never the command's exit status
        raise CommandError(f"{source}, lines {lines}: --attribute-scorer called sys.exit({exc.code!r}) (SystemExit); "
                           "an attribute scorer must return its values") from None
    except Exception as exc:  # noqa: BLE001 - user code; one line naming the records
        raise CommandError(f"{source}, lines {lines}: --attribute-scorer raised {type(exc).__name__}: {exc}") from None
    try:
        result = [list(r) for r in result]
    except TypeError:
        raise CommandError(f"--attribute-scorer returned {type(result).__name__}, expected a list of lists") from None
    if len(result) != len(objs):
        raise CommandError(f"{source}, lines {lines}: --attribute-scorer returned {len(result)} lists for "
                           f"{len(objs)} records")
    for obj, lineno, values in zip(objs, linenos, result):
        if len(values) != len(obj["responses"]):
            raise CommandError(f"{source}, line {lineno}: --attribute-scorer returned {len(values)} values for "
                               f"{len(obj['responses'])} responses")
        for i, (resp, x) in enumerate(zip(obj["responses"], values)):
            problem = check_log_prob(x)
            if problem:
                raise CommandError(f"{source}, line {lineno}: --attribute-scorer, responses[{i}]: {problem}")
            resp.setdefault(LOG_P_A, float(x))

def check_seed(seed: int, option: str = "--seed") -> int:
    """``seed`` when it is in ``[0, SEED_MAX]``; CommandError naming ``option`` otherwise."""
    if not 0 <= seed <= SEED_MAX:
        raise CommandError(f"{option} must be an integer in [0, {SEED_MAX}], got {seed}")
    return seed


def check_backend(backend: str, device: torch.device) -> None:
    """CommandError naming ``--backend`` when the kernel backend cannot run on ``device`` here
    (e.g. ``triton`` without a GPU and without ``TRITON_INTERPRET=1``)."""
    if backend == "auto":
        return
    import steerlm_kernels as sk

    try:
        sk.registry.resolve(backend, device)
    except ValueError as exc:
        raise CommandError(f"--backend {backend}: cannot run on {device} here: {str(exc).splitlines()[0]}") from None


def scorer_identity(spec: str) -> str:
    """What identifies ``--attribute-scorer`` for provenance: the spec, plus the SHA-256 of the file
    for a ``path.py:function`` spec (an edited scorer file is another scorer)."""
    import hashlib

    module_name, _, _ = spec.rpartition(":")
    if module_name.endswith(".py") and Path(module_name).is_file():
        return f"{spec} sha256:{hashlib.sha256(Path(module_name).read_bytes()).hexdigest()[:32]}"
    return spec


def resolve_device(device: str, specs: Sequence[str]) -> torch.device:
    """``auto``: cpu when every model is a built-in one, else cuda when available, else cpu."""
    from steerlm_kernels.steerlm2.models.hf_models import TINY_MODELS

    if device == "auto":
        if all(s in TINY_MODELS for s in specs) or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda")
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise CommandError(f"--device {device}: {str(exc).splitlines()[0]}") from None
    return dev


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``--precision`` as a dtype (``auto``: float32 on CPU, bfloat16 on CUDA where supported)."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision in table:
        return table[precision]
    if precision != "auto":
        raise CommandError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_models(specs: dict[str, str], device: torch.device, dtype: torch.dtype, seed: int
                     ) -> dict[str, tuple[Any, Any]]:
    """``{option name: (model, tokenizer)}``; the same spec is loaded once."""
    from steerlm_kernels.steerlm2.models.hf_models import load_model_and_tokenizer

    loaded: dict[str, tuple[Any, Any]] = {}
    out = {}
    for option, spec in specs.items():
        if spec not in loaded:
            try:
                loaded[spec] = load_model_and_tokenizer(spec, device=device, dtype=dtype, seed=seed)
            except (ValueError, ImportError, OSError) as exc:
                raise CommandError(f"--{option}: {exc}") from None
        out[option] = loaded[spec]
    return out


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id (else its EOS id, else 0): what padding positions hold."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and value >= 0:
            return value
    return 0
