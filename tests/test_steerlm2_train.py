"""``train``: the embedded default halves the distance; options, outputs and errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from steerlm_kernels.steerlm2 import train
from steerlm_kernels.steerlm2.data import sample_data_path


def parse(*argv: str) -> argparse.Namespace:
    return train.add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def check_outputs(out: Path, steps: int) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["steps"]) == steps
    assert set(metrics["steps"][0]) >= {"step", "loss", "distance", "tokens", "seconds", "tokens_per_s"}
    assert metrics["summary"]["steps"] == steps
    if has_matplotlib():
        assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not (out / "metrics.png").exists()
    return metrics


SHORT_STEPS = 60


@pytest.mark.slow
def test_default_run_halves_the_distance(tmp_path, capsys):
    """Acceptance: the embedded default (bundled sample + tiny model, CPU) brings the mean
    distance of the last steps below half of the first step's. Shortened to its first half: the
    learning rate is constant, so this is exactly a prefix of the default run."""
    assert train.DEFAULTS["steps"] >= SHORT_STEPS
    out = tmp_path / "run"
    assert train.run(parse("--output", str(out), "--steps", str(SHORT_STEPS))) == 0
    metrics = check_outputs(out, SHORT_STEPS)
    s = metrics["summary"]
    assert s["last_distance_mean"] < 0.5 * s["first_distance"], s
    assert metrics["config"]["model"] == "tiny" and metrics["config"]["device"] == "cpu"
    text = capsys.readouterr().out
    assert f"{SHORT_STEPS}/{SHORT_STEPS}" in text and "distance" in text
    assert "tok/s" in text and "wrote" in text


def test_short_run_with_options(tmp_path, capsys):
    out = tmp_path / "short"
    argv = ["--steps", "3", "--groups-per-step", "3", "--micro-batch-size", "5", "--forward-micro-batch-size", "7",
            "--backend", "torch", "--lr", "1e-3", "--seed", "3", "--output", str(out)]
    assert train.main(argv) == 0
    metrics = check_outputs(out, 3)
    cfg = metrics["config"]
    assert cfg["micro_batch_size"] == 5 and cfg["forward_micro_batch_size"] == 7 and cfg["backend"] == "torch"
    assert cfg["data"] == str(sample_data_path())
    for step in metrics["steps"]:
        assert step["responses"] >= 3 * 4  # 3 groups of 4-8 responses
        assert step["distance"] >= 0
    assert "3/3" in capsys.readouterr().out


def test_custom_data(tmp_path):
    records = [
        {"system": "", "prompt_turns": [{"from": "User", "value": f"Question {i}?"}], "label": "helpfulness:4",
         "responses": [{"value": "yes." * (j + 1), "log(P(a|x,y))": -1.0 * j, "log(P(y|x))": -3.0 - j,
                        "log(Q(y|a,x))": -2.5 - j} for j in range(2 + i % 3)]}
        for i in range(6)
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "o"
    assert train.main(["--data", str(data), "--steps", "4", "--groups-per-step", "2", "--output", str(out)]) == 0
    metrics = check_outputs(out, 4)
    assert metrics["config"]["data"] == str(data)


def test_bad_options(tmp_path, capsys):
    assert train.main(["--steps", "0", "--output", str(tmp_path / "a")]) == 2
    assert "--steps" in capsys.readouterr().err
    assert train.main(["--model", str(tmp_path / "nope"), "--output", str(tmp_path / "b")]) == 2
    assert "neither a built-in model" in capsys.readouterr().err
    assert train.main(["--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "a").exists()


def test_hugging_face_model_directory(tmp_path):
    """``--model DIR``: a tiny Llama and a word-level tokenizer saved locally (no download)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = set()
    for line in sample_data_path().read_text().splitlines():
        rec = json.loads(line)
        texts = [rec["system"], *(t["value"] for t in rec["prompt_turns"]), *(r["value"] for r in rec["responses"])]
        for text in texts + ["User: Assistant [helpfulness:0,verbosity:0]: System:"]:
            words.update(text.replace(".", " . ").replace("?", " ? ").replace(":", " : ").replace(",", " , ")
                         .replace("[", " [ ").replace("]", " ] ").split())
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "[BOS]", "[EOS]", *sorted(words)])}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                               bos_token="[BOS]", eos_token="[EOS]")
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    model_dir = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "o"
    assert train.main(["--model", str(model_dir), "--steps", "2", "--groups-per-step", "2", "--device", "cpu",
                       "--output", str(out)]) == 0
    metrics = check_outputs(out, 2)
    assert metrics["config"]["model"] == str(model_dir)
