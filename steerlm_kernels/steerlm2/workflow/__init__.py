"""Workflow: ``steerlm-kernels pipeline`` (``pipeline``) - sample -> score -> train, and its rounds with a
warm start, several attribute levels and ``steer-eval`` per round (``rounds``).

Top room: may import every other room."""
