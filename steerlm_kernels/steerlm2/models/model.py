"""``GPTSteerLMModel``: SteerLM 2.0 training around any causal language model.

A thin wrapper that keeps the method names of NeMo-Aligner's ``GPTSteerLMModel`` but runs on a
plain ``nn.Module`` (no Megatron, no Apex) and delegates every ``[B, S, V]`` computation to the
fused ops of this package:

* **Phase 1 (baseline, no grad).** The batch is cut into micro-batches of
  ``cfg.steerlm2.forward_micro_batch_size`` items; each is run forward under ``torch.no_grad``
  and reduced to per-response NLLs by :func:`steerlm_kernels.sequence_nll` (the forward-only
  path: the logits are read once, nothing is kept for backward). Then
  :func:`steerlm_kernels.steerlm2_weights` gives ``weight = ws - baseline`` and the distance.
* **Phase 2 (training).** The batch is cut into ``M`` micro-batches of
  ``cfg.steerlm2.micro_batch_size`` items (the last may be smaller; a group may straddle two
  micro-batches). Each micro-batch loss is :func:`steerlm_kernels.weighted_sequence_loss` with
  NeMo's normalizer ``avg_num_valid_tokens_in_ub`` = (mean loss-masked tokens of the item's
  group) / (M / G), and ``loss / M`` is back-propagated, as Megatron's schedule does. The
  accumulated gradient is therefore that of ``(1/G) sum_g sum_{i in g} weight_i nll_i /
  mean_tokens_g`` whatever the micro-batch sizes, and the reported loss (the mean of the
  micro-batch losses) equals that objective.

The batch is the dictionary of NeMo's ``SteerLM2Dataset.collate_fn`` (see :data:`BATCH_KEYS`);
groups are consecutive and may have different sizes.

**Fused-linear path** (``lm_head_weight=``): the wrapped model returns hidden states ``[B, S, H]``
and the wrapper applies the LM head inside :func:`steerlm_kernels.linear_sequence_nll` (phase 1)
and :func:`steerlm_kernels.linear_weighted_sequence_loss` (phase 2): neither phase ever holds
``[B, S, V]`` logits. :meth:`GPTSteerLMModel.from_hf` does this for a Hugging Face causal LM as it is:
the fused losses run *inside* its forward in place of its head's matmul (with its config's logit
transform; :meth:`steerlm_kernels.hf.heads.CausalLMHead.intercept`), so DDP, ``no_sync`` and FSDP
(whose gathered head weight exists only during the forward) see an ordinary forward and backward.
Phase 1 (and ``forward_only=True``) runs the model in ``eval()`` mode (no dropout), then restores it.

**Tensor / context parallelism** (``process_group=``, ``cp_group=``, Megatron's layouts):

* ``process_group``: the vocabulary is split over the group. On the logits path the model returns
  this rank's logits shard ``[B, S, V/tp]``; on the fused path ``lm_head_weight`` is this rank's
  shard ``[V/tp, H]``. Labels are global. Losses, weights and distance equal the single-process
  ones on every rank. The gradient reaching the (replicated) hidden states is this rank's partial:
  the model must reduce it over the group (Megatron's ``copy_to_tensor_model_parallel_region`` in
  front of its column-parallel LM head does), or the caller sums replicated parameters' gradients.
* ``cp_group``: every rank holds a slice of every sequence (the batch's per-token tensors
  ``tokens``, ``labels``, ``loss_mask``, ... are ``[B, S/cp]``; ``ws``, ``log(Q(y|a,x))``,
  ``num_responses`` are per response and identical on every rank). The model is responsible for
  attention across the slices (ring attention etc.). Per-sequence NLL sums are all-reduced over
  the group in BOTH phases (NeMo's baseline phase forgets this and computes its baseline from
  partial sums), and the normalizer's valid-token counts are summed over the group too (one
  all-reduce of ``[B]`` floats per step), so the loss, distance and weights equal the
  single-process ones; each rank's parameters receive the gradient of its own tokens (sum them
  over the group, as Megatron's gradient all-reduce over data x context parallel ranks does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from steerlm_kernels.api import SteerLM2Weights, sequence_nll, steerlm2_weights, weighted_sequence_loss
from steerlm_kernels.api_linear import linear_sequence_nll, linear_weighted_sequence_loss
from steerlm_kernels.distributed import group_size_rank, sum_over_context
from steerlm_kernels.steerlm2.models.loss_path import chunk_rows, head_call, match_dtypes, resolve_loss_path
from steerlm_kernels.steerlm2.models.model_helpers import (
    BATCH_KEYS,
    LOG_Q_KEY,
    HeadSource,
    avg_num_valid_tokens_in_ub,
    cfg_get,
    cfg_positive_int,
    eval_mode,
    head_getter,
    hidden_of,
    logits_of,
    split_batch,
)

__all__ = ["BATCH_KEYS", "GPTSteerLMModel", "avg_num_valid_tokens_in_ub", "cfg_get"]


class GPTSteerLMModel(nn.Module):
    """SteerLM 2.0 wrapper of a causal LM, with NeMo-Aligner's method names.

    Args:
        model: an ``nn.Module`` called as ``model(input_ids=tokens, attention_mask=...,
            position_ids=...)`` returning logits ``[B, S, V]`` (any floating dtype), an object with
            ``.logits`` (Hugging Face), or a tuple whose first element is the logits.
        cfg: mapping or attribute object with ``steerlm2.forward_micro_batch_size`` (phase 1) and
            ``steerlm2.micro_batch_size`` (phase 2); read once, at construction.
        lm_head_weight: switches on the fused-linear path: ``model`` then returns the final hidden
            states (see :func:`~steerlm_kernels.steerlm2.models.model_helpers.hidden_of` for the accepted
            forms) and the LM head is applied inside the fused losses, so no ``[B, S, V]`` logits are
            ever held. Either the head's weight ``[V, H]`` itself (an ``nn.Parameter``, usually
            ``model.lm_head.weight`` of the full model, tied or not), a zero-argument callable returning
            the current weight (for weights that are re-materialised per step, e.g. by FSDP), or an
            ``nn.Module`` with ``.weight`` (and ``.bias``, used unless ``lm_head_bias`` is given), e.g.
            an ``nn.Linear``. The wrapper does not register it as a parameter of its own: it belongs to
            the model (or to the caller's optimizer). Its dtype must equal the hidden states'. With
            ``process_group`` it is this rank's vocabulary shard ``[V/tp, H]``.
        lm_head_bias: optional ``[V]`` (or ``[V/tp]``) bias of the fused path, or a callable
            returning it.
        process_group: tensor-parallel group over which the vocabulary is split (module notes).
        cp_group: context-parallel group over which the sequence is split (module notes).
        chunk_size: rows per logits chunk of the fused path (default: 32 MiB of float32 logits on CPU,
            the library's on CUDA: :func:`~steerlm_kernels.steerlm2.models.loss_path.chunk_rows`).
        backend: kernel backend for every op (``"auto"``, ``"triton"``, ``"cpp"``, ``"torch"``).
        inplace_backward: let the phase-2 backward write the logits' gradient into the logits'
            storage (saves one ``[N, V]`` buffer). Only safe when nothing in the model's autograd
            graph saved the logits tensor itself (true of a plain LM head; not of e.g. a final
            ``tanh`` soft-capping). No effect on the fused path (no logits).
        dp_group: data-parallel process group over which ``distance`` and the reported loss are
            averaged; ``None`` uses the default group when ``torch.distributed`` is initialised
            (harmless with tensor / context parallel ranks in it: their values are identical).
        softcap, logit_scale: the logit transform ``c * tanh(s * z / c)`` of the fused-linear path
            (``lm_head_weight=``), passed to the fused ops.
        hf_head: a :class:`steerlm_kernels.hf.heads.CausalLMHead` of ``model`` (what :meth:`from_hf`
            passes): the fused losses then run inside ``model``'s forward in place of its head, with
            the head's transform; ``model`` is called as a Hugging Face causal LM.

    The batch tensors are moved to the device of the model's first parameter.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: Any,
        *,
        lm_head_weight: HeadSource = None,
        lm_head_bias: HeadSource = None,
        process_group: Any = None,
        cp_group: Any = None,
        chunk_size: int | None = None,
        backend: str = "auto",
        inplace_backward: bool = False,
        dp_group: Any = None,
        softcap: float | None = None,
        logit_scale: float | None = None,
        hf_head: Any = None,
    ) -> None:
        super().__init__()
        if lm_head_weight is None and lm_head_bias is not None:
            raise ValueError("lm_head_bias needs lm_head_weight (the fused-linear path)")
        if hf_head is not None and lm_head_weight is not None:
            raise ValueError("give lm_head_weight or hf_head, not both")
        if (softcap is not None or logit_scale is not None) and lm_head_weight is None:
            raise ValueError("softcap / logit_scale apply to the fused-linear path (lm_head_weight=); "
                             "hf_head brings its own")
        self.hf_head = hf_head
        self._transform = dict(hf_head.transform.kwargs()) if hf_head is not None else {
            k: float(x) for k, x in (("softcap", softcap), ("logit_scale", logit_scale)) if x is not None}
        #: "fused" / "logits" and why (set by from_hf; else from the constructor's arguments).
        self.loss_path = "fused" if (lm_head_weight is not None or hf_head is not None) else "logits"
        self.loss_path_reason = "constructor arguments"
        self._lm_head: Callable[[], tuple[Tensor, Tensor | None]] | None = (
            None if lm_head_weight is None else head_getter(lm_head_weight, lm_head_bias)
        )
        if process_group is not None:
            group_size_rank(process_group, "process_group")
        if cp_group is not None:
            group_size_rank(cp_group, "cp_group")
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
        self.model = model
        self.cfg = cfg
        self.forward_micro_batch_size = cfg_positive_int(cfg, "steerlm2.forward_micro_batch_size")
        self.micro_batch_size = cfg_positive_int(cfg, "steerlm2.micro_batch_size")
        self.backend = backend
        self.inplace_backward = bool(inplace_backward)
        self.dp_group = dp_group
        self.process_group = process_group
        self.cp_group = cp_group
        self.chunk_size = chunk_size

    @classmethod
    def from_hf(cls, model: nn.Module, cfg: Any, loss_path: str = "auto", *, probe: bool = True,
                **kwargs: Any) -> GPTSteerLMModel:
        """The wrapper of a Hugging Face ``*ForCausalLM`` on the fused-linear path where it can serve
        the model (LM head tied or not, with or without bias, soft-capped or scaled logits), else on
        the logits path.

        ``loss_path``: ``"auto"`` (fused where :func:`steerlm_kernels.hf.heads.find_head` accepts the
        model and, with ``probe``, the fused NLL of a short synthetic sequence agrees with the
        model's own logits), ``"fused"`` (ValueError saying why when it cannot) or ``"logits"``.
        ``kwargs``: the constructor's (``backend``, ``dp_group``, ...); the path and why: :attr:`loss_path`,
        :attr:`loss_path_reason`.
        """
        path, why, head = resolve_loss_path(model, loss_path, probe=probe, backend=kwargs.get("backend", "auto"))
        wrapper = cls(model, cfg, hf_head=head if path == "fused" else None, **kwargs)
        wrapper.loss_path, wrapper.loss_path_reason = path, why
        return wrapper

    @property
    def fused_linear(self) -> bool:
        """True on the fused-linear path (constructed with ``lm_head_weight=``)."""
        return self._lm_head is not None

    def lm_head(self) -> tuple[Tensor, Tensor | None]:
        """The current ``(weight [V, H], bias [V] or None)`` of the fused path's LM head."""
        if self._lm_head is None:
            raise RuntimeError("no lm_head_weight was given: this wrapper runs on the logits path")
        return self._lm_head()

    def _output_of(self, output: Any) -> Tensor:
        return hidden_of(output) if self.fused_linear else logits_of(output)

    # ------------------------------------------------------------------------------------------
    # plumbing
    # ------------------------------------------------------------------------------------------

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        """Run the wrapped model; returns its logits ``[B, S, V]`` (``[B, S, V/tp]`` under vocabulary
        parallelism), or on the fused-linear path its hidden states ``[B, S, H]`` (with ``hf_head``:
        the model's own logits; the phases never call this then)."""
        return self._output_of(
            self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        )

    @property
    def device(self) -> torch.device:
        """Device of the wrapped model's first parameter (CPU if it has none)."""
        for p in self.model.parameters() if isinstance(self.model, nn.Module) else ():
            return p.device
        return torch.device("cpu")

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        device = self.device
        return {k: (x.to(device, non_blocking=True) if isinstance(x, Tensor) else x) for k, x in batch.items()}

    def _logits(self, mb: Mapping[str, Any]) -> Tensor:
        return self(mb["tokens"], mb.get("attention_mask"), mb.get("position_ids"))

    @staticmethod
    def _check_batch(batch: Any) -> None:
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a mapping with keys {BATCH_KEYS}, got {type(batch).__name__}")
        missing = [k for k in ("tokens", "labels", "loss_mask", "ws", LOG_Q_KEY, "num_responses") if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing}; a SteerLM 2.0 batch has keys {BATCH_KEYS}")
        tokens = batch["tokens"]
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError(f"batch['tokens'] must be a [B, S] tensor, got {getattr(tokens, 'shape', tokens)}")
        for key in ("labels", "loss_mask"):
            if not isinstance(batch[key], Tensor) or batch[key].shape != tokens.shape:
                raise ValueError(f"batch[{key!r}] must have the shape of tokens {tuple(tokens.shape)}")

    # ------------------------------------------------------------------------------------------
    # NeMo's loss functions
    # ------------------------------------------------------------------------------------------

    def loss_func(self, loss_mask: Tensor, output_tensor: Tensor, labels: Tensor | None = None) -> Tensor:
        """Per-response NLL ``[B]`` float32: ``sum_t loss_mask * nll`` (over the whole sequence,
        all-reduced over ``cp_group`` when given).

        ``output_tensor`` is either the model output with ``labels [B, S]``: the logits
        ``[B, S, V]`` (fused :func:`sequence_nll`) or, on the fused-linear path, the hidden
        states ``[B, S, H]`` (:func:`linear_sequence_nll` with the LM head); or, as in NeMo,
        per-token losses ``[B, S]`` without labels.
        """
        if labels is not None:
            if self.fused_linear:
                return self._linear_nll(output_tensor, *self.lm_head(), labels, loss_mask)
            return sequence_nll(output_tensor, labels, loss_mask, **self._groups)
        if output_tensor.shape != loss_mask.shape:
            raise ValueError("without labels, output_tensor must be per-token losses of loss_mask's shape")
        return sum_over_context((output_tensor.float() * loss_mask.float()).sum(dim=-1), self.cp_group)

    def weight_loss_func(
        self,
        loss_mask: Tensor,
        avg_num_valid_tokens_in_ub: Tensor | float,
        output_tensor: Tensor,
        weight: Tensor,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Micro-batch loss ``sum_b weight[b] * nll[b] / avg_num_valid_tokens_in_ub[b]`` (0-d float32).

        ``output_tensor``: logits ``[B, S, V]`` with ``labels`` (fused
        :func:`weighted_sequence_loss`, one-pass backward), hidden states ``[B, S, H]`` with
        ``labels`` on the fused-linear path (:func:`linear_weighted_sequence_loss`), or per-token
        losses ``[B, S]``. ``avg_num_valid_tokens_in_ub``: ``[B]`` tensor or float (NeMo's normalizer).
        """
        if labels is not None:
            if self.fused_linear:
                return self._linear_loss(output_tensor, *self.lm_head(), labels, loss_mask, weight,
                                         avg_num_valid_tokens_in_ub)
            return weighted_sequence_loss(
                output_tensor, labels, loss_mask, weight, avg_num_valid_tokens_in_ub,
                inplace_backward=self.inplace_backward, **self._groups,
            )
        seq = self.loss_func(loss_mask, output_tensor)
        norm = torch.as_tensor(avg_num_valid_tokens_in_ub, dtype=torch.float32, device=seq.device)
        w = weight.float()
        return (w * seq / torch.where(w == 0, torch.ones_like(norm), norm)).sum()

    @property
    def _groups(self) -> dict[str, Any]:
        return {"process_group": self.process_group, "cp_group": self.cp_group, "backend": self.backend}

    def _linear_nll(self, hidden: Tensor, w: Tensor, b: Tensor | None, labels: Tensor, loss_mask: Tensor) -> Tensor:
        with match_dtypes(hidden, w, b) as (hidden, w, b):
            return linear_sequence_nll(hidden, w, labels, loss_mask, bias=b, chunk_size=chunk_rows(w, self.chunk_size),
                                       **self._groups, **self._transform)

    def _linear_loss(self, hidden: Tensor, w: Tensor, b: Tensor | None, labels: Tensor, loss_mask: Tensor,
                     weight: Tensor, normalizer: Tensor | float) -> Tensor:
        with match_dtypes(hidden, w, b) as (hidden, w, b):
            return linear_weighted_sequence_loss(
                hidden, w, labels, loss_mask, weight, normalizer, bias=b, chunk_size=chunk_rows(w, self.chunk_size),
                **self._groups, **self._transform)

    def _hf_step(self, mb: Mapping[str, Any], model: Callable | None, weighted: bool) -> Tensor:
        """One forward of the Hugging Face model with the fused loss in place of its head (``hf_head``)."""
        if weighted:
            def fn(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
                return self._linear_loss(h, w, b, mb["labels"], mb["loss_mask"], mb["weight"],
                                         mb["avg_num_valid_tokens_in_ub"])
        else:
            def fn(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
                return self._linear_nll(h, w, b, mb["labels"], mb["loss_mask"])
        return head_call(self.hf_head, self.model if model is None else model, mb, fn)

    # ------------------------------------------------------------------------------------------
    # forward-step functions (Megatron schedule signature: (data_iterator, model) -> (output, loss_fn))
    # ------------------------------------------------------------------------------------------

    def get_forward_output_only_for_weight_func(self) -> Callable[..., tuple[Tensor, Callable]]:
        """Phase-1 step: ``fwd(data_iterator, model) -> (seq_nll [b], id_func)``.

        Runs one micro-batch forward under ``torch.no_grad`` and reduces it at once to the
        per-response NLL (the logits, or hidden states on the fused path, are freed before
        returning); ``id_func(out)`` returns ``(out, {"loss": out})`` as NeMo's does. ``model``
        defaults to this wrapper; another callable must return what this wrapper's model does.
        """

        def fwd_output_only_func(data_iterator: Iterator[Mapping[str, Any]], model: Callable | None = None):
            mb = next(data_iterator)
            run = self if model is None else model
            with torch.no_grad():
                if self.hf_head is not None:
                    nll = self._hf_step(mb, model, weighted=False)
                else:
                    out = self._output_of(run(input_ids=mb["tokens"], attention_mask=mb.get("attention_mask"),
                                              position_ids=mb.get("position_ids")))
                    nll = self.loss_func(mb["loss_mask"], out, mb["labels"])
                    del out

            def id_func(output_tensor: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
                return output_tensor, {"loss": output_tensor}

            return nll, id_func

        return fwd_output_only_func

    def get_forward_output_and_loss_func(self, validation_step: bool = False) -> Callable[..., tuple[Tensor, Callable]]:
        """Phase-2 step: ``fwd(data_iterator, model) -> (logits or hidden states, loss_func)``.

        The micro-batch must carry ``weight [b]`` and ``avg_num_valid_tokens_in_ub [b]`` (as
        NeMo's); ``loss_func(logits) -> (loss, {"avg": loss.detach()})`` is the micro-batch loss,
        which the schedule divides by the number of micro-batches before backward.
        ``validation_step`` is accepted for NeMo compatibility (no effect).
        """

        def fwd_output_and_loss_func(data_iterator: Iterator[Mapping[str, Any]], model: Callable | None = None):
            mb = next(data_iterator)
            if self.hf_head is not None:  # the loss is computed inside the forward: it is the output
                loss = self._hf_step(mb, model, weighted=True)
                return loss, lambda output_tensor: (output_tensor, {"avg": output_tensor.detach()})
            run = self if model is None else model
            logits = self._output_of(run(input_ids=mb["tokens"], attention_mask=mb.get("attention_mask"),
                                         position_ids=mb.get("position_ids")))

            def loss_func(output_tensor: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
                loss = self.weight_loss_func(
                    mb["loss_mask"], mb["avg_num_valid_tokens_in_ub"], output_tensor, mb["weight"], mb["labels"]
                )
                return loss, {"avg": loss.detach()}

            return logits, loss_func

        return fwd_output_and_loss_func

    # ------------------------------------------------------------------------------------------
    # the two phases
    # ------------------------------------------------------------------------------------------

    def compute_baseline_weights(self, batch: Mapping[str, Any]) -> SteerLM2Weights:
        """Phase 1 on the whole batch: per-response NLL in micro-batches of
        ``forward_micro_batch_size`` (no grad), then :func:`steerlm2_weights`. The richer form of
        NeMo's :meth:`compute_baselilne_weights`: ``batch`` is not modified. The model runs in
        ``eval()`` mode (no dropout); each module's mode is restored.

        Returns:
            ``SteerLM2Weights(weight [B], baseline [B], distance 0-d)``, float32, on the model's
            device; ``distance`` is local (not averaged over data-parallel ranks).
        """
        self._check_batch(batch)
        batch = self._to_device(batch)
        chunks = split_batch(batch, self.forward_micro_batch_size)
        step = self.get_forward_output_only_for_weight_func()
        it = iter(chunks)
        nlls = []
        with eval_mode(self.model):
            for _ in chunks:
                out, id_func = step(it)
                nlls.append(id_func(out)[1]["loss"])
        seq_nll = torch.cat(nlls)
        return steerlm2_weights(seq_nll, batch[LOG_Q_KEY].float(), batch["ws"].float(), batch["num_responses"],
                                backend=self.backend)

    def attach_weights(self, batch: MutableMapping[str, Any], weights: SteerLM2Weights) -> None:
        """Store phase 1's results into ``batch`` under NeMo's keys (all ``[B]`` float32, on the
        model's device): ``"base_weight"`` (the baseline), ``"weight"`` (``ws - baseline``) and
        ``"avg_num_valid_tokens_in_ub"`` for ``M = ceil(B / micro_batch_size)`` phase-2
        micro-batches (NeMo's ``gbs // micro_batch_size`` when it divides)."""
        num_microbatches = -(-batch["tokens"].shape[0] // self.micro_batch_size)
        batch["base_weight"] = weights.baseline
        batch["weight"] = weights.weight
        batch["avg_num_valid_tokens_in_ub"] = self.avg_num_valid_tokens_in_ub(
            batch["loss_mask"].to(weights.weight.device), batch["num_responses"].to(weights.weight.device),
            num_microbatches,
        )

    def compute_baselilne_weights(self, batch: MutableMapping[str, Any]) -> tuple[Tensor, int, int]:
        """NeMo-Aligner's phase 1, with its spelling, return values and side effect.

        Runs :meth:`compute_baseline_weights`, stores ``"base_weight"``, ``"weight"`` and
        ``"avg_num_valid_tokens_in_ub"`` into ``batch`` (:meth:`attach_weights`), as NeMo's does.

        Returns:
            ``(distance, seq_length, gbs)`` as NeMo's: ``distance`` a ``[1]`` float32 tensor
            averaged over the data-parallel group (NeMo's ``average_losses_across_data_parallel_group``),
            ``seq_length = S`` and ``gbs = B`` of ``batch["tokens"] [B, S]`` (ints).
        """
        if not isinstance(batch, MutableMapping):
            raise TypeError(f"batch must be a mutable mapping (the weights are stored in it), "
                            f"got {type(batch).__name__}")
        weights = self.compute_baseline_weights(batch)
        self.attach_weights(batch, weights)
        gbs, seq_length = batch["tokens"].shape
        return self._dp_average(weights.distance.float().reshape(1)), int(seq_length), int(gbs)

    def avg_num_valid_tokens_in_ub(self, loss_mask: Tensor, num_responses: Tensor | int,
                                   num_microbatches: int) -> Tensor:
        """NeMo's normalizer ``[B]`` float32: :func:`avg_num_valid_tokens_in_ub` with this
        wrapper's ``cp_group``."""
        return avg_num_valid_tokens_in_ub(loss_mask, num_responses, num_microbatches, cp_group=self.cp_group)

    def _dp_average(self, values: Tensor) -> Tensor:
        """Average ``values`` over the data-parallel group (one all-reduce), if distributed."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return values
        group = self.dp_group
        world = dist.get_world_size(group)
        if world == 1:
            return values
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
        return values / world

    def get_loss_and_metrics(
        self, batch: Mapping[str, Any], forward_only: bool = False
    ) -> tuple[float, dict[str, float]]:
        """One SteerLM 2.0 step on ``batch``: phase 1 (baseline weights), then phase 2.

        Unless ``forward_only``, the gradient of the objective is *accumulated* into the
        parameters' ``.grad`` (zero them and step the optimizer yourself). With
        ``forward_only=True`` phase 2 runs under ``torch.no_grad`` and no gradient is produced, and
        both phases run with the model in ``eval()`` mode (restored afterwards); phase 1 always does.

        Returns:
            ``(loss_value, {"loss": loss_value, "distance": distance})``: the mean of the
            micro-batch losses and the mean over groups of ``KL(ws || baseline)``, both averaged
            over the data-parallel group when ``torch.distributed`` is initialised.
        """
        self._check_batch(batch)
        batch = self._to_device(batch)
        weights = self.compute_baseline_weights(batch)

        train_batch = dict(batch)
        self.attach_weights(train_batch, weights)
        chunks = split_batch(train_batch, self.micro_batch_size)
        m = len(chunks)
        step = self.get_forward_output_and_loss_func()
        it = iter(chunks)
        losses = []
        with torch.set_grad_enabled(not forward_only), eval_mode(self.model) if forward_only else nullcontext():
            for _ in range(m):
                logits, loss_func = step(it)
                loss, reduced = loss_func(logits)
                del logits
                if not forward_only:
                    (loss / m).backward()
                losses.append(reduced["avg"])
        loss_mean = torch.stack(losses).mean()
        loss_value, distance = self._dp_average(torch.stack([loss_mean, weights.distance.float()])).tolist()
        return loss_value, {"loss": loss_value, "distance": distance}
