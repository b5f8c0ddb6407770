"""The SteerLM 2.0 application, built on the kernel library's public modules only.

Six rooms, each importing only the rooms above it in this list (``tests/test_layout.py`` checks it):

* :mod:`~steerlm_kernels.steerlm2.formats`: what the files and prompts are - the JSONL records and
  importance weights (``records``, the bundled sample in ``sample_data/``), prompt templates and the
  byte tokenizer, labels and the example attribute scorers, line-by-line JSONL reading, and the rules
  for outputs (refusals, locks) and their provenance.
* :mod:`~steerlm_kernels.steerlm2.models`: ``GPTSteerLMModel`` (NeMo-Aligner's wrapper of any causal LM,
  ``sk.GPTSteerLMModel``), the loss path (fused or logits), per-sequence log-probabilities, the built-in
  tiny Llama and model loading.
* :mod:`~steerlm_kernels.steerlm2.training`: the dataset and collate function (``sk.data``), the
  Hugging Face ``Trainer`` subclass, ``steerlm-kernels train`` and its run directory and guards,
  ``steerlm-kernels sft`` (the warm start).
* :mod:`~steerlm_kernels.steerlm2.datatools`: batched sampling, ``steerlm-kernels sample`` and
  ``steerlm-kernels score`` (files in, files out).
* :mod:`~steerlm_kernels.steerlm2.evaluation`: ``steerlm-kernels steer-eval`` and its statistics.
* :mod:`~steerlm_kernels.steerlm2.workflow`: ``steerlm-kernels pipeline`` and its rounds.

Nothing is imported here: ``import steerlm_kernels`` loads the library alone, and the application's
modules load on first use.
"""

#: The module of each ``steerlm-kernels`` command of the application (imported for its own command only).
COMMANDS: dict[str, str] = {
    "train": "steerlm_kernels.steerlm2.training.train",
    "sft": "steerlm_kernels.steerlm2.training.sft",
    "sample": "steerlm_kernels.steerlm2.datatools.sample",
    "score": "steerlm_kernels.steerlm2.datatools.score",
    "steer-eval": "steerlm_kernels.steerlm2.evaluation.steer_eval",
    "pipeline": "steerlm_kernels.steerlm2.workflow.pipeline",
}
