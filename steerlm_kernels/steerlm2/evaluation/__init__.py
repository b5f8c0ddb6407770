"""Evaluation: ``steerlm-kernels steer-eval`` (``steer_eval``) and its paired statistics (``steer_stats``).

Imports the ``formats``, ``models``, ``training`` (the output and NLL helpers) and ``datatools`` rooms."""
