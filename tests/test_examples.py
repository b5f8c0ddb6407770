"""The runnable examples in ``python/``: a plain PyTorch loop and a Hugging Face ``Trainer`` subclass.

Each script is imported by path (``python/`` is not a package) and run with small settings; its
loss is checked against an independent float64 computation of the SteerLM 2.0 objective.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

import steerlm_kernels as sk
from steerlm_kernels.steerlm2.training.data import SteerLM2Dataset, sample_data_path

EXAMPLES = Path(__file__).resolve().parents[1] / "python"


def load_example(name: str) -> ModuleType:
    """Import ``python/<name>.py`` as a module."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def group_sizes(num_responses: torch.Tensor) -> list[int]:
    """Sizes of the consecutive groups of a batch; asserts every item holds its own group's size."""
    per_item = num_responses.tolist()
    sizes, i = [], 0
    while i < len(per_item):
        n = per_item[i]
        assert per_item[i:i + n] == [n] * n, f"a group was split or mixed: {per_item}"
        sizes.append(n)
        i += n
    return sizes


def reference_float64(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """SteerLM 2.0 ``(loss, distance)`` of one batch, eagerly in float64, from the closed form:
    ``loss = (1/G) sum_g sum_{i in g} (ws_i - baseline_i) nll_i / mean_tokens_g`` with
    ``baseline = softmax_g(-nll - log_q)``; ``distance = mean_g KL(ws_g + 1e-8 || baseline_g + 1e-8)``."""
    logits = logits.detach().double()
    b, s, v = logits.shape
    tok = F.cross_entropy(logits.reshape(-1, v), batch["labels"].reshape(-1), reduction="none").view(b, s)
    mask = batch["loss_mask"].double()
    nll = (tok * mask).sum(-1)
    ws, log_q = batch["ws"].double(), batch["log(Q(y|a,x))"].double()
    loss = distance = 0.0
    start = 0
    sizes = group_sizes(batch["num_responses"])
    for n in sizes:
        g = slice(start, start + n)
        baseline = torch.softmax(-nll[g] - log_q[g], dim=0)
        mean_tokens = mask[g].sum(-1).mean()
        loss += float(((ws[g] - baseline) * nll[g]).sum() / mean_tokens)
        distance += float(((ws[g] + 1e-8) * ((ws[g] + 1e-8) / (baseline + 1e-8)).log()).sum())
        start += n
    return loss / len(sizes), distance / len(sizes)


@pytest.fixture
def one_thread():
    """Train on one intra-op thread. On a 2-core machine shared with other jobs, torch's default of
    one thread per core was measured 7x slower (threads waiting on descheduled peers); one thread
    keeps these tests at a few seconds whatever the load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sample_batch(groups: list[int]) -> dict[str, torch.Tensor]:
    ds = SteerLM2Dataset(sample_data_path(), max_seq_length=256)
    return ds.collate_fn([ds[i] for i in groups])


# ------------------------------------------------------------------------------------------------
# plain PyTorch loop


def test_plain_loop_lowers_the_distance(capsys, one_thread):
    """40 steps of 8 groups: the mean distance of the last 5 steps is below 0.75x the first step's
    (0.41x-0.64x over seeds 0-7; 0.48x for seed 0)."""
    ex = load_example("example_plain_loop")
    result = ex.main(["--steps", "40", "--seed", "0"])
    assert result["steps"] == 40 and len(result["losses"]) == len(result["distances"]) == 40
    assert all(math.isfinite(x) for x in result["losses"] + result["distances"])
    assert all(d >= 0 for d in result["distances"])
    assert result["last_distance_mean"] < 0.75 * result["first_distance"], result
    out = capsys.readouterr().out
    assert "step  40/40" in out and "distance" in out


def test_plain_loop_step_matches_float64_reference():
    ex = load_example("example_plain_loop")
    from steerlm_kernels.steerlm2.models.tiny_lm import TinyCausalLM

    batch = sample_batch([3, 0, 7])  # groups of different sizes
    model = TinyCausalLM(259, max_seq_len=256, seed=1)
    with torch.no_grad():
        logits = model(input_ids=batch["tokens"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"])
    ref_loss, ref_distance = reference_float64(logits, batch)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = ex.steerlm2_step(model, batch, optimizer)
    assert out["loss"] == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)
    assert out["distance"] == pytest.approx(ref_distance, rel=1e-5, abs=1e-5)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_group_normalizer_is_nemos_closed_form():
    """The examples' normalizer is the package's; check it against NeMo's formula computed by hand,
    with a group whose mean is below one token and an all-masked group (which gets 1)."""
    from steerlm_kernels.steerlm2.models.model import avg_num_valid_tokens_in_ub

    loss_mask = torch.zeros(6, 4)
    loss_mask[0, :3] = 1  # group 0 = items 0..2: 3, 0, 2 tokens -> mean 5/3
    loss_mask[2, :2] = 1
    loss_mask[4, :1] = 1  # group 1 = items 3, 4: 0, 1 tokens -> mean 0.5
    # group 2 = item 5: no tokens -> 1
    per_item = torch.tensor([3, 3, 3, 2, 2, 1])
    expected = torch.tensor([5 / 3] * 3 + [0.5] * 2 + [1.0]) * (3 / 2)  # 3 groups, 2 micro-batches
    torch.testing.assert_close(avg_num_valid_tokens_in_ub(loss_mask, per_item, 2), expected)
    got = load_example("example_plain_loop").group_normalizer(loss_mask, per_item, 2)
    torch.testing.assert_close(got, expected)
    wrapper = sk.GPTSteerLMModel(torch.nn.Linear(1, 1), {"steerlm2": {"forward_micro_batch_size": 1,
                                                                       "micro_batch_size": 1}})
    torch.testing.assert_close(wrapper.avg_num_valid_tokens_in_ub(loss_mask, per_item, 2), expected)


# ------------------------------------------------------------------------------------------------
# Hugging Face Trainer


@pytest.fixture(scope="module")
def hf_example() -> ModuleType:
    for name in ("transformers", "accelerate"):
        try:
            __import__(name)
        except ImportError as exc:
            pytest.skip(f"the Trainer example needs {name} (pip install 'steerlm-kernels[test]'): {exc}")
    return load_example("example_hf_trainer")


def test_trainer_compute_loss_matches_float64_reference(hf_example, tmp_path):
    args = hf_example.parse_args(["--steps", "1", "--groups-per-step", "3"])
    trainer = hf_example.build_trainer(args, str(tmp_path))
    batch = next(iter(trainer.get_train_dataloader()))  # the Trainer's own loader keeps groups whole
    sizes = group_sizes(batch["num_responses"])
    assert len(sizes) == 3 and batch["tokens"].shape[0] == sum(sizes)
    loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["tokens"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
    ref_loss, ref_distance = reference_float64(logits, batch)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(ref_loss, rel=1e-4, abs=1e-5)
    assert float(outputs["distance"]) == pytest.approx(ref_distance, rel=1e-5, abs=1e-5)


def test_trainer_trains_with_gradient_accumulation(hf_example, one_thread):
    result = hf_example.main(["--steps", "2", "--groups-per-step", "2", "--grad-accum", "2", "--seed", "1"])
    trainer = result["trainer"]
    assert result["steps"] == trainer.state.global_step == 2
    losses = result["losses"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses + result["distances"])
    # Each step's loss is the mean of its two batches' objectives: the Trainer divides our per-batch
    # mean by the accumulation steps (without that division its training loss would be twice ours).
    assert result["training_loss"] == pytest.approx(sum(losses) / 2, rel=1e-4)
    # the parameters moved away from their initialisation
    from steerlm_kernels.steerlm2.models.hf_models import build_tiny

    init = build_tiny(1)[0].state_dict()
    trained = trainer.model.state_dict()
    assert any(not torch.equal(init[k], trained[k].cpu()) for k in init)
