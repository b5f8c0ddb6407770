"""steerlm2.loading: devices, dtypes, models and the attribute scorer of the data commands."""

from __future__ import annotations

import pytest
import torch

from steerlm_kernels.steerlm2.formats.jsonl_stream import CommandError
from steerlm_kernels.steerlm2.models import loading as L


def test_device_and_precision() -> None:
    assert L.resolve_device("auto", ["tiny", "small"]) == torch.device("cpu")
    assert L.resolve_device("cpu", ["/some/dir"]) == torch.device("cpu")
    with pytest.raises(CommandError, match="--device nonsense"):
        L.resolve_device("nonsense", ["tiny"])
    assert L.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert L.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(CommandError, match="--precision"):
        L.resolve_dtype("fp8", torch.device("cpu"))


def test_models_load_once_per_spec_and_fail_naming_the_option(tmp_path) -> None:
    pytest.importorskip("transformers")
    out = L.load_models({"sft-model": "tiny", "steerlm-model": "tiny"}, torch.device("cpu"), torch.float32, 0)
    assert out["sft-model"][0] is out["steerlm-model"][0]
    assert L.pad_id(out["sft-model"][1]) == out["sft-model"][1].pad_token_id
    with pytest.raises(CommandError, match="^--steerlm-model: "):
        L.load_models({"steerlm-model": str(tmp_path / "none")}, torch.device("cpu"), torch.float32, 0)


def test_attribute_scorer_values_are_checked() -> None:
    objs = [{"responses": [{"value": "a"}, {"value": "b", "log(P(a|x,y))": -3.0}]}]
    L.call_attribute_scorer(lambda recs: [[-1.0, -2.0]], objs, [5], "in.jsonl")
    assert [r["log(P(a|x,y))"] for r in objs[0]["responses"]] == [-1.0, -3.0]  # present values kept
    for bad, msg in (([[-1.0]], "1 values for 2 responses"), ([], "0 lists for 1 records"),
                     ([[float("nan"), -1.0]], "responses\\[0\\]: must be a finite"), ([["x", -1.0]], "a number")):
        with pytest.raises(CommandError, match=f"in.jsonl, line.? 5: --attribute-scorer.*{msg}"):
            L.call_attribute_scorer(lambda recs, bad=bad: bad, [{"responses": [{}, {}]}], [5], "in.jsonl")

    def raises(recs):
        raise RuntimeError("model offline")

    with pytest.raises(CommandError, match="lines 5: --attribute-scorer raised RuntimeError: model offline"):
        L.call_attribute_scorer(raises, objs, [5], "in.jsonl")
    assert L.check_log_prob(0) is None and L.check_log_prob(True) and L.check_log_prob(0.1)
    assert L.check_log_prob(-7) is None and L.check_log_prob(0.005) and L.check_log_prob(None)  # strict: no tolerance
    assert "integer of about 10^400" in L.check_log_prob(-10**400)  # too large for a float: named, no OverflowError
