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


def test_grid_main_runs_the_main_shapes_only() -> None:
    """``--grid main`` (``make gpu-check QUICK=1``): one ce shape and one fused-linear shape, the
    defaults' main ones; the other grids add points."""
    cfg = config.resolve_config(_parse(["--device", "cpu", "--grid", "main"]))
    main = config.CPU
    assert cfg.ce_shapes == [(main["n"], main["v"])]
    assert cfg.linear_shapes == [(main["linear"]["n"], main["linear"]["v"], main["linear"]["h"])]
    cross = config.resolve_config(_parse(["--device", "cpu", "--grid", "cross"]))
    assert cross.ce_shapes[0] == cfg.ce_shapes[0] and len(cross.ce_shapes) > 1
    product = config.resolve_config(_parse(["--device", "cpu", "--grid", "product"]))
    assert len(product.linear_shapes) > 1
