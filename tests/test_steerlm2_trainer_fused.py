"""The fused-linear loss path of SteerLM 2.0 training: ``SteerLM2Trainer`` (loss_path auto / fused) equals
the logits path for tied, untied, soft-capped and logit-scaled Hugging Face models; the wrapper's
``from_hf``; dropout-free baseline phase of the plain wrapper; FSDP2 (``fully_shard``, 2 gloo processes
== 1 process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from steerlm_kernels.hf.heads import kernels_take_transforms  # noqa: E402
from steerlm_kernels.steerlm2.models.hf_models import build_tiny  # noqa: E402
from steerlm_kernels.steerlm2.models.model import GPTSteerLMModel  # noqa: E402
from steerlm_kernels.steerlm2.training.data import SteerLM2Dataset, sample_data_path  # noqa: E402
from steerlm_kernels.steerlm2.training.trainer import SteerLM2Collator, SteerLM2Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
         "intermediate_size": 64}
TRANSFORMS = kernels_take_transforms()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset():
    _, tok = build_tiny(0)
    return SteerLM2Dataset(sample_data_path(), tokenizer=tok, max_seq_length=4096)


def hf_model(kind: str, vocab: int = 262, seed: int = 0, **extra) -> torch.nn.Module:
    """Tiny models built from config (nothing downloads): llama, llama_tied, gemma2 (soft-capped at 0.5),
    cohere (logits x 4), granite (logits / 0.25)."""
    if kind in ("llama", "llama_tied"):
        return build_tiny(seed, vocab_size=vocab, tie_word_embeddings=kind == "llama_tied", **extra)[0]
    cfg_cls, kw = {
        "gemma2": (transformers.Gemma2Config, {"final_logit_softcapping": 0.5, "head_dim": 16}),
        "cohere": (transformers.CohereConfig, {"logit_scale": 4.0}),
        "granite": (transformers.GraniteConfig, {"logits_scaling": 0.25}),
    }[kind]
    cfg = cfg_cls(vocab_size=vocab, pad_token_id=256, bos_token_id=257, eos_token_id=258, **SMALL, **kw, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(cfg)


def needs_transforms(kind: str):
    if kind in ("gemma2", "cohere", "granite") and not TRANSFORMS:
        pytest.skip("the installed fused ops take no softcap= / logit_scale=")


def make_trainer(out: Path, ds, model, loss_path: str, steps: int = 2, **kw) -> SteerLM2Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, dataloader_drop_last=True, **kw)
    return SteerLM2Trainer(model=model.train(), args=args, train_dataset=ds, metrics_path=False,
                           steerlm2={"forward_micro_batch_size": 7, "micro_batch_size": 4, "backend": "torch",
                                     "loss_path": loss_path})


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "gemma2", "cohere", "granite"])
def test_trainer_fused_steps_equal_logits_steps(dataset, tmp_path, kind):
    """Two SGD steps on each path (Adam would blow float32 noise of ~0 gradients up to +-lr): same loss,
    distance, grad norm and weights after the steps; auto picks fused; the LM head never forms
    [B, S, V] logits on the fused path; tied: one weight."""
    needs_transforms(kind)
    fused_model, plain_model = hf_model(kind), hf_model(kind)
    fused = make_trainer(tmp_path / "f", dataset, fused_model, "auto")
    logits = make_trainer(tmp_path / "l", dataset, plain_model, "logits")
    assert fused.loss_path[0] == "fused", fused.loss_path
    assert logits.loss_path[0] == "logits"
    widths = []
    head = fused_model.get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, inp, out: widths.append(out.shape[-1]))
    fused.train()
    hook.remove()
    logits.train()
    assert widths and set(widths) == {0}, widths  # the head's matmul was replaced on every forward
    if kind in ("llama_tied", "gemma2", "cohere"):
        assert head.weight is fused_model.get_input_embeddings().weight
    a, b = fused.steerlm_history, logits.steerlm_history
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for key in ("loss", "distance", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=2e-5, abs=1e-6), (key, x, y)
    moved = 0.0
    for (name, p), q, r in zip(fused_model.named_parameters(), plain_model.parameters(), hf_model(kind).parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-6, msg=name)
        moved = max(moved, float((p.detach() - r.detach()).abs().max()))
    assert moved > 1e-4  # the steps changed the weights


def test_gradient_accumulation_equal_on_both_paths(dataset, tmp_path):
    """gradient_accumulation_steps=2: one optimizer step over 2 batches, fused == logits (loss, weights)."""
    runs = []
    for path in ("fused", "logits"):
        model = hf_model("llama")
        t = make_trainer(tmp_path / path, dataset, model, path, steps=1, gradient_accumulation_steps=2)
        t.train()
        runs.append((t.steerlm_history, model))
    assert len(runs[0][0]) == 1 and runs[0][0][0]["loss"] == pytest.approx(runs[1][0][0]["loss"], rel=1e-5)
    assert runs[0][0][0]["grad_norm"] == pytest.approx(runs[1][0][0]["grad_norm"], rel=1e-5)
    for (name, p), q in zip(runs[0][1].named_parameters(), runs[1][1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-6, msg=name)


def test_trainer_fused_step_gradients_include_the_head(dataset, tmp_path):
    """One training_step's gradient on the fused path equals the logits path's for every parameter,
    the untied LM head's included (it would be None or zero if the head were left out)."""
    trainer_f = make_trainer(tmp_path / "f", dataset, hf_model("llama"), "fused")
    trainer_l = make_trainer(tmp_path / "l", dataset, hf_model("llama"), "logits")
    batch = SteerLM2Collator.for_dataset(dataset)([dataset[i] for i in (3, 0, 7)])
    grads = []
    for t in (trainer_f, trainer_l):
        t.model.zero_grad()
        t.training_step(t.model, dict(batch))
        grads.append({n: p.grad.clone() for n, p in t.model.named_parameters()})
    assert float(grads[0]["lm_head.weight"].abs().max()) > 0
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7, msg=name)
    assert trainer_f._since_log[-1]["loss"] == pytest.approx(trainer_l._since_log[-1]["loss"], rel=1e-5)


def test_trainer_evaluate_equal_on_both_paths(dataset, tmp_path):
    ev = torch.utils.data.Subset(dataset, range(4))
    out = []
    for path in ("fused", "logits"):
        t = make_trainer(tmp_path / path, dataset, hf_model("llama"), path)
        out.append(t.evaluate(ev))
    assert out[0]["eval_loss"] == pytest.approx(out[1]["eval_loss"], rel=1e-5)
    assert out[0]["eval_distance"] == pytest.approx(out[1]["eval_distance"], rel=1e-5)


def test_fused_refused_with_the_reason(dataset, tmp_path):
    """An unknown post-head transform in the config: auto falls back to logits and says why; fused raises."""
    model = hf_model("llama")
    model.config.output_multiplier = 2.0
    t = make_trainer(tmp_path, dataset, model, "auto")
    assert t.loss_path[0] == "logits" and "output_multiplier" in t.loss_path[1]
    with pytest.raises(ValueError, match="output_multiplier"):
        make_trainer(tmp_path / "x", dataset, model, "fused")
    with pytest.raises(ValueError, match="output_multiplier"):
        GPTSteerLMModel.from_hf(model, {"steerlm2": {"forward_micro_batch_size": 2, "micro_batch_size": 2}},
                                "fused")


def test_auto_probe_catches_an_undeclared_transform(dataset, tmp_path):
    """A model that changes its logits after the head without saying so in its config: the probe refuses."""
    model = hf_model("llama")
    real = type(model).forward

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    model.forward = forward.__get__(model)
    t = make_trainer(tmp_path, dataset, model, "auto")
    assert t.loss_path[0] == "logits" and "probe" in t.loss_path[1], t.loss_path


# ---------------------------------------------------------------------------------------------------
# the plain wrapper: from_hf, dropout-free baseline phase

def group_batch(ds, idx=(1, 2)):
    return SteerLM2Collator.for_dataset(ds)([ds[i] for i in idx])


def test_from_hf_get_loss_and_metrics_equal_logits_path(dataset):
    batch = group_batch(dataset, (0, 4))
    cfg = {"steerlm2": {"forward_micro_batch_size": 3, "micro_batch_size": 2}}
    res = []
    for path in ("auto", "logits"):
        model = hf_model("llama_tied").train()
        w = GPTSteerLMModel.from_hf(model, cfg, path, backend="torch")
        loss, metrics = w.get_loss_and_metrics(batch)
        res.append((w.loss_path, loss, metrics["distance"], {n: p.grad for n, p in model.named_parameters()}))
    assert res[0][0] == "fused" and res[1][0] == "logits"
    assert res[0][1] == pytest.approx(res[1][1], rel=1e-5)
    assert res[0][2] == pytest.approx(res[1][2], rel=1e-5)
    assert set(res[0][3]) == set(res[1][3]) and "lm_head.weight" not in res[0][3]  # tied: one parameter
    for n in res[1][3]:
        torch.testing.assert_close(res[0][3][n], res[1][3][n], rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("path", ["fused", "logits"])
def test_wrapper_baseline_phase_unchanged_by_dropout(dataset, path):
    """compute_baseline_weights / compute_baselilne_weights / get_loss_and_metrics(forward_only=True) on a
    dropout model in train mode equal the eval-mode results and restore every module's mode. log(Q) is set
    to -NLL, so the group softmax is uniform and any change of a response's NLL moves the baseline."""
    model = build_tiny(0, attention_dropout=0.5)[0]
    batch = group_batch(dataset)
    cfg = {"steerlm2": {"forward_micro_batch_size": 3, "micro_batch_size": 2}}
    wrapper = GPTSteerLMModel.from_hf(model, cfg, path, backend="torch")
    model.eval()
    with torch.no_grad():
        step = wrapper.get_forward_output_only_for_weight_func()
        nll = step(iter([batch]))[0]
    batch["log(Q(y|a,x))"] = -nll
    ref = wrapper.compute_baseline_weights(batch)
    ref_loss, ref_metrics = wrapper.get_loss_and_metrics(batch, forward_only=True)
    model.train()
    model.model.layers[0].eval()  # a module the user keeps in eval: must stay so
    with torch.no_grad():  # dropout is really on: the train-mode NLLs differ
        train_nll = step(iter([batch]))[0]
    assert not torch.allclose(train_nll, nll, rtol=1e-4)
    for _ in range(2):
        got = wrapper.compute_baseline_weights(batch)
        torch.testing.assert_close(got.baseline, ref.baseline, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got.distance, ref.distance, rtol=1e-6, atol=1e-7)
        nemo = dict(batch)
        distance, _, _ = wrapper.compute_baselilne_weights(nemo)
        torch.testing.assert_close(nemo["base_weight"], ref.baseline, rtol=1e-6, atol=1e-7)
        assert float(distance) == pytest.approx(float(ref.distance), rel=1e-6)
        loss, metrics = wrapper.get_loss_and_metrics(batch, forward_only=True)
        assert loss == pytest.approx(ref_loss, rel=1e-6) and metrics["distance"] == pytest.approx(
            ref_metrics["distance"], rel=1e-6)
        assert model.training and model.model.norm.training and not model.model.layers[0].training
    assert float(ref.baseline.std()) > 0  # not a one-hot softmax


# ---------------------------------------------------------------------------------------------------
# FSDP2: fully_shard on gloo, 2 processes == 1 process

FSDP_WORKER = textwrap.dedent('''
    import json, os, sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from steerlm_kernels.steerlm2.models.hf_models import build_tiny
    from steerlm_kernels.steerlm2.models.model import GPTSteerLMModel
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tied = sys.argv[2] == "tied"
    model = build_tiny(0, vocab_size=300, tie_word_embeddings=tied)[0].train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    g, n, s = 4, 3, 12
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 300, (g * n, s), generator=gen)
    mask = (torch.rand(g * n, s, generator=gen) > 0.3).float()
    ws = torch.rand(g * n, generator=gen)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": mask,
             "attention_mask": torch.ones_like(tokens), "ws": ws / ws.view(g, n).sum(1).repeat_interleave(n),
             "log(Q(y|a,x))": -10 * torch.rand(g * n, generator=gen), "num_responses": torch.full((g * n,), n)}
    per = g * n // world
    local = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
    cfg = {"steerlm2": {"forward_micro_batch_size": 2, "micro_batch_size": 2}}
    wrapper = GPTSteerLMModel.from_hf(model, cfg, "fused", backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss, metrics = wrapper.get_loss_and_metrics(local)
        opt.step()
        losses.append([loss, metrics["distance"]])
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).tolist() for k, v in model.state_dict().items()}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"losses": losses, "params": full, "path": wrapper.loss_path}, f)
    dist.barrier()  # rank 1 must not tear gloo down while rank 0 writes (it aborted so under load)
    dist.destroy_process_group()
''')


def run_fsdp(tmp_path: Path, world: int, tied: str) -> dict:
    script = tmp_path / "fsdp_worker.py"
    script.write_text(FSDP_WORKER)
    out = tmp_path / f"fsdp_{world}_{tied}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(world), str(script), str(out), tied], capture_output=True, text=True, timeout=400,
                         env=env, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("tied", ["untied", "tied"])
def test_fsdp2_two_processes_equal_one(tmp_path, tied):
    """fully_shard (FSDP2) on gloo: the LM head is a sharded parameter, gathered by FSDP inside the model's
    forward where the fused loss reads it; 2 processes (half the groups each) give the losses, distances and
    weights after two SGD steps of 1 process with the whole batch."""
    one, two = run_fsdp(tmp_path, 1, tied), run_fsdp(tmp_path, 2, tied)
    assert one["path"] == two["path"] == "fused"
    for a, b in zip(one["losses"], two["losses"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert one["losses"][0] != pytest.approx(one["losses"][1], rel=1e-4)  # the first step changed the model
    for k in one["params"]:
        torch.testing.assert_close(torch.tensor(two["params"][k]), torch.tensor(one["params"][k]),
                                   rtol=1e-5, atol=1e-6, msg=k)


def test_fused_chunks_are_small_on_cpu(dataset, monkeypatch):
    """On CPU the wrapper's fused losses (both phases) run in chunks of min(H, 64 MiB / 4V) rows, at least 16
    (the library's default is sized for GPUs); an explicit chunk_size wins."""
    import steerlm_kernels.steerlm2.models.model as M
    from steerlm_kernels.steerlm2.models.loss_path import CPU_CHUNK_BYTES, chunk_rows

    seen = []
    for name in ("linear_weighted_sequence_loss", "linear_sequence_nll"):
        real = getattr(M, name)
        monkeypatch.setattr(M, name, lambda *a, _real=real, _n=name, **kw: (seen.append((_n, kw["chunk_size"])),
                                                                            _real(*a, **kw))[1])
    model = hf_model("llama", vocab=40000)
    cfg = {"steerlm2": {"forward_micro_batch_size": 4, "micro_batch_size": 4}}
    batch = SteerLM2Collator.for_dataset(dataset)([dataset[0]])
    GPTSteerLMModel.from_hf(model, cfg, "fused", backend="torch").get_loss_and_metrics(batch)
    h = model.config.hidden_size
    assert {n for n, _ in seen} == {"linear_weighted_sequence_loss", "linear_sequence_nll"}, seen
    assert all(c == min(h, CPU_CHUNK_BYTES // (4 * 40000)) for _, c in seen), seen
    assert chunk_rows(model.lm_head.weight, 7) == 7
    assert chunk_rows(torch.empty(128256, 256)) == 130 and chunk_rows(torch.empty(128256, 64)) == 64
    assert chunk_rows(torch.empty(1, 1).expand(10**7, 4096)) == 16
    assert chunk_rows(torch.empty(10, 4, device="meta")) is None


# ---------------------------------------------------------------------------------------------------
# train --loss-path: the start line and summary.json say which path and why; a refused fused is one line

def test_train_command_reports_the_loss_path(tmp_path, capsys):
    from steerlm_kernels.steerlm2.training import train

    fast = ["--groups-per-step", "2", "--backend", "torch", "--steps", "1", "--device", "cpu"]
    assert train.main([*fast, "--output", str(tmp_path / "auto")]) == 0
    out = capsys.readouterr().out
    assert "loss path: fused (LM head (untied) + final hidden states" in out
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())["summary"]
    assert summary["loss_path"] == "fused" and "probe" in summary["loss_path_reason"]
    assert train.main([*fast, "--loss-path", "logits", "--output", str(tmp_path / "logits")]) == 0
    assert json.loads((tmp_path / "logits" / "summary.json").read_text())["summary"]["loss_path"] == "logits"

    model, tok = build_tiny(0)
    model.config.output_multiplier = 2.0  # an unknown transform after the head
    model.save_pretrained(tmp_path / "odd")
    tok.save_pretrained(tmp_path / "odd")
    capsys.readouterr()
    code = train.main([*fast, "--model", str(tmp_path / "odd"), "--loss-path", "fused", "--output",
                       str(tmp_path / "refused")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "--loss-path fused" in err[0] and "output_multiplier" in err[0], err
    assert train.main([*fast, "--model", str(tmp_path / "odd"), "--output", str(tmp_path / "fallback")]) == 0
    assert "loss path: logits (the fused path cannot serve this model: config.output_multiplier" in \
        capsys.readouterr().out


def test_fused_path_in_bf16_on_the_test_device_matches_fp32(dataset, device):
    """The wrapper on the fused path, bf16 weights, the device's default backend (triton / cuda on a GPU:
    ``make gpu-check APP=1``; cpp here) against the fp32 logits path of the same weights (torch backend)."""
    batch = group_batch(dataset, (0, 4))
    cfg = {"steerlm2": {"forward_micro_batch_size": 3, "micro_batch_size": 2}}
    ref_model = hf_model("llama").train()
    ref = GPTSteerLMModel.from_hf(ref_model, cfg, "logits", backend="torch")
    ref_loss, ref_metrics = ref.get_loss_and_metrics(batch)
    model = hf_model("llama").to(device=device, dtype=torch.bfloat16).train()
    w = GPTSteerLMModel.from_hf(model, cfg, "fused")
    loss, metrics = w.get_loss_and_metrics({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    assert w.loss_path == "fused"
    assert abs(loss - ref_loss) <= 1e-2 * max(1.0, abs(ref_loss)), (loss, ref_loss)
    assert abs(metrics["distance"] - ref_metrics["distance"]) <= 1e-2 * max(1.0, abs(ref_metrics["distance"]))
    grads = dict(model.named_parameters())
    for n, p in ref_model.named_parameters():
        g = grads[n].grad
        assert g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all(), n
        err = (g.float().cpu() - p.grad).norm() / p.grad.norm().clamp_min(1e-12)
        assert err <= 3e-2, (n, float(err))
