"""Models: ``GPTSteerLMModel`` (``model``, building blocks in ``model_helpers``), the loss path of a
Hugging Face model (``loss_path``: fused or logits), per-sequence log-probabilities (``logprobs``), the
built-in tiny Llama (``hf_models``), a plain-PyTorch tiny LM (``tiny_lm``) and model loading (``loading``).

Imports the ``formats`` room only."""
