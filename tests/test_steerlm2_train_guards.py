"""steerlm2.train_guards: held-out fluency next to the distance, the rising-distance warning, the preset line."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from steerlm_kernels import cli  # noqa: E402
from steerlm_kernels.steerlm2.formats.records import sample_data_path  # noqa: E402
from steerlm_kernels.steerlm2.models.hf_models import build_tiny  # noqa: E402
from steerlm_kernels.steerlm2.training import train_guards as TG  # noqa: E402
from steerlm_kernels.steerlm2.training.sft import read_pairs  # noqa: E402
from steerlm_kernels.steerlm2.training.train import BUILTIN_PRESET, NEMO_PRESET  # noqa: E402


def test_distance_warning_only_when_the_distance_rose() -> None:
    assert TG.distance_warning(0.3, 0.2, 5) is None
    assert TG.distance_warning(0.3, 0.3, 5) is None
    assert TG.distance_warning(None, 0.2, 5) is None
    w = TG.distance_warning(0.27, 0.41, 5)
    assert w.startswith("warning: the distance rose: first step 0.2700 -> mean of the last 5 steps 0.4100")
    assert "steer-eval" in w


def test_preset_note_names_the_preset_that_applies() -> None:
    note = TG.preset_note("/models/llama", False, NEMO_PRESET)
    assert "gpt_sft.yaml" in note and "lr 3e-05" in note and "does not" in note
    assert "CPU demonstration preset" in TG.preset_note("tiny", True, BUILTIN_PRESET)


def test_fluency_guard_measures_and_warns_on_a_rise(capsys) -> None:
    model, tok = build_tiny(0)
    pairs = read_pairs(sample_data_path())[:12]
    logged = []

    class FakeTrainer:
        class metrics:  # noqa: N801 - stands in for MetricsLog
            @staticmethod
            def write(row):
                logged.append(row)

    guard = TG.FluencyCallback(pairs, tok, "nemo", 10, [FakeTrainer()])
    first = guard.measure(model, 0)
    assert 5.0 < first < 6.0  # a random byte model: about log(262) nats per token
    assert guard.warning() is None  # one measurement: nothing to compare
    guard.history.append((10, first * 1.04))
    assert guard.warning() is None  # +4 %: within NLL_RISE
    guard.history.append((20, first * 1.2))
    assert "held-out NLL rose 20.0 %" in guard.warning()
    assert logged == [{"step": 0, "val_nll": first}]
    assert "held-out NLL at step 0" in capsys.readouterr().out


def test_train_reports_val_nll_in_metrics(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["train", "--steps", "2", "--groups-per-step", "2", "--eval-every", "2", "--output", str(out),
            "--heldout", str(sample_data_path())]
    assert cli.main(argv) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "preset: built-in model 'tiny'" in text and "held-out NLL at step 0" in text
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    nll = [r for r in rows if "val_nll" in r]
    assert [r["step"] for r in nll] == [0, 2] and all(0 < r["val_nll"] < 10 for r in nll)
    bad = ["train", "--steps", "1", "--output", str(tmp_path / "r2"), "--heldout", str(tmp_path / "none.jsonl")]
    assert cli.main(bad) == 2
    assert "--heldout" in capsys.readouterr().err
