"""Data tools (files in, files out): batched sampling (``generation``), ``steerlm-kernels sample``
(``sample``), ``steerlm-kernels score`` (``score``) and their outputs' provenance (``command_output``).

Imports the ``formats`` and ``models`` rooms."""
