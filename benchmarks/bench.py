"""Print the benchmark tables: a thin script over :mod:`steerlm_kernels.bench.suite`.

    .venv/bin/python benchmarks/bench.py [--n N --v V --s S --dtype bf16 --device cpu|cuda
                                          --phases baseline,train,inplace --impls ... --output DIR]

Same as ``steerlm-kernels bench`` / ``python -m steerlm_kernels bench``.
"""

from __future__ import annotations

import argparse
import sys

from steerlm_kernels.bench import suite


def main(argv: list[str] | None = None) -> int:
    """Parse the options of ``steerlm-kernels bench`` and run it."""
    parser = argparse.ArgumentParser(prog="benchmarks/bench.py", description=suite.__doc__.split("\n")[0])
    suite.add_arguments(parser)
    return suite.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
