"""Command line: ``steerlm-kernels {info,bench,demo,train,sample,score,pipeline}`` (``python -m steerlm_kernels``)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys

import torch

#: What ``steerlm-kernels --help`` says first (plain text: no reST markup in a terminal).
DESCRIPTION = ("Fused kernels for SteerLM 2.0 training, and the SteerLM 2.0 application (train, sample, score, "
               "pipeline). Also: python -m steerlm_kernels.")


def info() -> int:
    """Print versions, devices and the status of every backend."""
    import steerlm_kernels as sk

    print(f"steerlm_kernels {sk.__version__}")
    print(f"python {platform.python_version()} on {platform.machine()} ({platform.system()})")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
    else:
        print(f"device: CPU only ({torch.get_num_threads()} threads)")
    print("backends:")
    for status in sk.backends().values():
        print(f"  {backend_line(status)}")
    try:
        strategy = sk.registry.linear_strategy("triton")
    except ValueError as exc:
        strategy = f"invalid ({exc})"
    print(f"fused linear on triton: {strategy} (${sk.registry.LINEAR_ENV_VAR}; other backends: chunks)")
    return 0


def backend_line(status: object) -> str:
    """A backend's line of ``info``: its status, except that on a machine without a CUDA device the
    ``cuda`` backend says so (``no CUDA device``) whatever the extension was built with: that is the
    reason it cannot run here."""
    if getattr(status, "name", None) == "cuda" and not torch.cuda.is_available():
        return "cuda: unavailable (no CUDA device)"
    return str(status)


#: What the application's commands (train, sample, score, pipeline) import: the `app` extra.
APP_DEPENDENCIES = ("transformers", "tokenizers", "accelerate")


def missing_app_dependencies() -> list[str]:
    """The packages of the ``app`` extra that cannot be imported here (found without importing them)."""
    missing = []
    for name in APP_DEPENDENCIES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: sys.modules[name] is None
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    app_commands = ("train", "sample", "score", "pipeline", "steer-eval", "sft")
    if argv[:1] and argv[0] in app_commands and missing_app_dependencies():
        print(f"steerlm-kernels {argv[0]}: error: the SteerLM 2.0 application needs "
              f"{', '.join(missing_app_dependencies())}: pip install 'steerlm-kernels[app]'", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="steerlm-kernels", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and backends")
    bench_parser = sub.add_parser(
        "bench", help="benchmark tables (logits in, fused linear, group ops, peers) against eager PyTorch, "
        "torch.compile and the peers; JSON, markdown and plots in --output")
    if argv[:1] == ["bench"]:  # the benchmark wing is imported for its own command only
        from steerlm_kernels.bench import suite

        suite.add_arguments(bench_parser)
    sub.add_parser("demo", help="info, then the fused loss beside eager PyTorch on a random batch")
    train_parser = sub.add_parser(
        "train", help="SteerLM 2.0 training (no arguments: bundled sample + tiny model on CPU)"
    )
    if argv[:1] == ["train"]:  # the SteerLM 2.0 application is imported for its own command only
        from steerlm_kernels.steerlm2.training import train

        train.add_arguments(train_parser)
    data_commands = {  # SteerLM 2.0 commands (modules: steerlm_kernels.steerlm2.COMMANDS), imported for their own only
        "sample": "draw n responses per prompt, batched, a random stream per response (SteerLM 2.0 records)",
        "score": "fill log(P(y|x)) and log(Q(y|a,x)) with the fused kernels (streaming, resumable)",
        "pipeline": "sample -> score -> train on the embedded default (bundled prompts, tiny model, CPU)",
        "steer-eval": "does the model follow the attribute it is asked for? (curve, slope, CIs, fluency)",
        "sft": "warm start: fine-tune on responses under labels drawn independently of them (no steering)",
    }
    from steerlm_kernels.steerlm2 import COMMANDS

    for name, text in data_commands.items():
        data_parser = sub.add_parser(name, help=text)
        if argv[:1] == [name]:
            importlib.import_module(COMMANDS[name]).add_arguments(data_parser)
    ns = parser.parse_args(argv)
    if ns.command in data_commands:
        return importlib.import_module(COMMANDS[ns.command]).run(ns)
    if ns.command == "info":
        return info()
    if ns.command == "bench":
        from steerlm_kernels.bench import suite

        return suite.run(ns)
    if ns.command == "train":
        from steerlm_kernels.steerlm2.training import train

        return train.run(ns)
    from steerlm_kernels.demo import demo

    info()
    print()
    return demo()


if __name__ == "__main__":
    sys.exit(main())
