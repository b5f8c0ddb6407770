"""Training: the dataset and collate function (``data``, ``collate``; ``sk.data``), the Hugging Face
``Trainer`` subclass (``trainer``), ``steerlm-kernels train`` (``train``, its run directory ``run_dir``,
metrics log ``metrics`` and guards ``train_guards``) and the warm start ``steerlm-kernels sft`` (``sft``).

Imports the ``formats`` and ``models`` rooms."""
