"""Guards of ``steerlm-kernels train``: signs that a run damaged the model or did not learn.

A falling SteerLM 2.0 ``distance`` is not evidence of steering (a run can memorise its groups),
and training can break the language model while the distance falls. ``train`` therefore

- reports the **held-out fluency** with ``--heldout FILE`` (SteerLM 2.0 JSONL; its responses are
  reference text): the NLL in nats per token of those responses under their own labels, before the
  first step and every ``--eval-every`` steps, as ``{"step", "val_nll"}`` lines of
  ``metrics.jsonl`` next to ``val_loss`` / ``val_distance``, with a warning when it rose by more
  than :data:`NLL_RISE` (:class:`FluencyCallback`);
- warns when the mean distance of the last steps is **above** the first step's
  (:func:`distance_warning`);
- says which **preset** of defaults applies: NeMo-Aligner's ``gpt_sft.yaml`` for a model directory,
  the CPU preset for the built-in models only (:func:`preset_note`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["NLL_RISE", "FluencyCallback", "add_guard_arguments", "distance_warning", "fluency_callbacks",
           "preset_note", "print_warnings"]

#: Relative rise of the held-out NLL above which ``train`` warns.
NLL_RISE = 0.05


def add_guard_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--heldout`` to ``train``'s parser; returns it."""
    parser.add_argument("--heldout", default=None,
                        help="SteerLM 2.0 JSONL of reference text: its held-out NLL (fluency) is reported before "
                             "training and every --eval-every steps (val_nll in metrics.jsonl)")
    return parser


def preset_note(model: str, builtin: bool, preset: dict[str, Any]) -> str:
    """One line: which defaults apply to ``model`` (explicit options override them)."""
    keys = f"lr {preset['lr']} {preset['lr_schedule']}, warm-up {preset['warmup_steps']}, weight decay " \
           f"{preset['weight_decay']}, steps {preset['steps'] or '1 epoch'}"
    if builtin:
        return f"preset: built-in model {model!r}: the CPU demonstration preset ({keys})"
    return (f"preset: {model} is a model directory: NeMo-Aligner's gpt_sft.yaml defaults apply ({keys}); the CPU "
            "preset of the built-in models (lr 3e-3 constant) does not")


def distance_warning(first: float | None, last_mean: float | None, last_steps: int) -> str | None:
    """The warning when the mean distance of the last ``last_steps`` steps is above the first step's."""
    if first is None or last_mean is None or not last_mean > first:
        return None
    return (f"warning: the distance rose: first step {first:.4f} -> mean of the last {last_steps} steps "
            f"{last_mean:.4f}; the model moved away from the targets (lower --lr, more data); a falling distance "
            "would still not show steering: measure it with steerlm-kernels steer-eval")


class FluencyCallback:
    """Held-out NLL before training and every ``every`` steps (module docstring); ``history``: ``[(step, nll)]``.

    Built by :func:`fluency_callbacks` (a ``transformers.TrainerCallback`` subclass); ``trainer_ref``
    is a list holding the trainer once built (its ``metrics`` log receives the lines).
    """

    def __init__(self, pairs: list[dict[str, Any]], tokenizer: Any, template: str, every: int,
                 trainer_ref: list[Any], log: Any = None) -> None:
        self.pairs, self.tokenizer, self.template, self.every = pairs, tokenizer, template, every
        self.trainer_ref, self.log = trainer_ref, log
        self.history: list[tuple[int, float]] = []

    def measure(self, model: Any, step: int) -> float:
        from steerlm_kernels.steerlm2.models.loading import pad_id
        from steerlm_kernels.steerlm2.training.sft import heldout_nll

        nll = heldout_nll(model, self.tokenizer, self.pairs, self.template, pad_id(self.tokenizer))
        self.history.append((step, nll))
        trainer = self.trainer_ref[0] if self.trainer_ref else None
        metrics = getattr(trainer, "metrics", None)
        if metrics is not None:
            metrics.write({"step": step, "val_nll": nll})
        first = self.history[0][1]
        rise = (nll - first) / first if first else 0.0
        note = f" ({100 * rise:+.1f} % since step {self.history[0][0]})" if len(self.history) > 1 else ""
        print(f"  held-out NLL at step {step}: {nll:.4f} nats/token{note}", file=self.log or sys.stdout, flush=True)
        return nll

    def warning(self) -> str | None:
        """The warning when the last held-out NLL is more than :data:`NLL_RISE` above the first."""
        if len(self.history) < 2:
            return None
        (s0, first), (s1, last) = self.history[0], self.history[-1]
        if first > 0 and (last - first) / first > NLL_RISE:
            return (f"warning: held-out NLL rose {100 * (last - first) / first:.1f} % (step {s0}: {first:.4f} -> "
                    f"step {s1}: {last:.4f} nats/token): training damaged the language model (lower --lr)")
        return None


def fluency_callbacks(ns: argparse.Namespace, tokenizer: Any, template: str, every: int,
                      trainer_ref: list[Any], error: type[Exception] = ValueError) -> list[Any]:
    """``[callback]`` measuring the held-out NLL when ``ns.heldout`` is set, else ``[]``, each added to the
    trainer of ``trainer_ref`` when it holds one; an unreadable ``--heldout`` raises ``error`` (one line
    naming it)."""
    if getattr(ns, "heldout", None) is None:
        return []
    import transformers

    from steerlm_kernels.steerlm2.formats.jsonl_stream import CommandError
    from steerlm_kernels.steerlm2.training.sft import read_pairs

    try:
        pairs = read_pairs(ns.heldout, "--heldout")
    except CommandError as exc:
        raise error(str(exc)) from None
    guard = FluencyCallback(pairs, tokenizer, template, every, trainer_ref)

    class Fluency(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
            if state.is_world_process_zero and model is not None and not guard.history:
                guard.measure(model, state.global_step)

        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
            k = state.global_step
            if state.is_world_process_zero and model is not None and (k % every == 0 or k == state.max_steps):
                guard.measure(model, k)

    cb = Fluency()
    cb.guard = guard
    for trainer in trainer_ref[:1]:
        trainer.add_callback(cb)
    return [cb]


def print_warnings(first: float | None, last_mean: float | None, last_steps: int, guards: list[Any],
                   log: Any = None) -> list[str]:
    """Print (and return) the warnings of a finished run: :func:`distance_warning` and the fluency guards'."""
    found = [w for w in [distance_warning(first, last_mean, last_steps), *(cb.guard.warning() for cb in guards)] if w]
    for w in found:
        print(w, file=log or sys.stdout)
    return found
