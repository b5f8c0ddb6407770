"""``steerlm-kernels bench``'s options: a bad one is refused, naming the option."""

from __future__ import annotations

import argparse

import pytest

from steerlm_kernels.bench import config


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("argv, message", [
    (["--sections", "ce,nope"], "--sections"),
    (["--impls", "eager,nope"], "--impls"),
    (["--n", "64", "--s", "7"], "--s"),
    (["--vs", "10,x"], "--vs"),
])
def test_bad_options_name_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        config.resolve_config(_parse(["--device", "cpu", *argv]))
