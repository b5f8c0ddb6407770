"""Print the benchmark table: a thin script over :mod:`steerlm_kernels.bench`.

    .venv/bin/python benchmarks/bench.py [--n N --v V --s S --dtype bf16 --device cpu|cuda
                                          --phases baseline,train,inplace --impls ... --output DIR]

Same as ``steerlm-kernels bench`` / ``python -m steerlm_kernels bench``.
"""

from __future__ import annotations

import argparse
import sys

from steerlm_kernels import bench_suite


def main(argv: list[str] | None = None) -> int:
    """Parse the options of ``steerlm-kernels bench`` and run it."""
    parser = argparse.ArgumentParser(prog="benchmarks/bench.py", description=bench_suite.__doc__.split("\n")[0])
    bench_suite.add_arguments(parser)
    return bench_suite.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
