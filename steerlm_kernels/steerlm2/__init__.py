"""The SteerLM 2.0 application, built on the kernel library's public modules only.

* :mod:`~steerlm_kernels.steerlm2.model`: ``GPTSteerLMModel``, NeMo-Aligner's wrapper of any causal
  LM (building blocks in :mod:`~steerlm_kernels.steerlm2.model_helpers`); ``sk.GPTSteerLMModel``.
* :mod:`~steerlm_kernels.steerlm2.data`: dataset, collate function, group sampler (``sk.data``), over
  :mod:`~steerlm_kernels.steerlm2.records` (JSONL format, validation, importance weights, the bundled
  sample in ``sample_data/``) and :mod:`~steerlm_kernels.steerlm2.tokenization` (prompt template,
  byte tokenizer).
* :mod:`~steerlm_kernels.steerlm2.train`: ``steerlm-kernels train``;
  :mod:`~steerlm_kernels.steerlm2.hf_models`: the built-in tiny Llama of the commands;
  :mod:`~steerlm_kernels.steerlm2.tiny_lm`: a plain-PyTorch tiny causal LM (``python/example_plain_loop.py``, tests).

Nothing is imported here: ``import steerlm_kernels`` loads the library alone, and the application's
modules load on first use.
"""
