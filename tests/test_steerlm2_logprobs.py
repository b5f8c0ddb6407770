"""steerlm2.logprobs: span log-probabilities (fused / logits paths), batching by length."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import steerlm_kernels as sk  # noqa: E402
from steerlm_kernels.steerlm2.models import logprobs as L  # noqa: E402
from steerlm_kernels.steerlm2.models.hf_models import build_tiny  # noqa: E402

V = 1000


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny(3, vocab_size=V)
    return model


def _seqs(n: int, gen: torch.Generator) -> list[tuple[list[int], int]]:
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 40, (1,), generator=gen))
        start = int(torch.randint(1, length, (1,), generator=gen))
        out.append((torch.randint(0, V, (length,), generator=gen).tolist(), start))
    return out


def _ref(model, ids: list[int], start: int) -> float:
    m64 = model.double() if next(model.parameters()).dtype != torch.float64 else model
    with torch.no_grad():
        lp = torch.log_softmax(m64(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(lp[t - 1, ids[t]] for t in range(start, len(ids))))


@pytest.mark.parametrize("path", ["fused", "logits"])
def test_score_sequences_matches_float64_in_any_batching(tiny, path) -> None:
    import copy

    gen = torch.Generator().manual_seed(0)
    seqs = _seqs(9, gen)
    m64 = copy.deepcopy(tiny).double()
    want = [_ref(m64, ids, s) for ids, s in seqs]
    scorer = L.SpanScorer(tiny, pad_id=5, path=path, chunk_rows=7)  # chunks smaller than a sequence
    for budget in (1, 60, 10_000):  # one sequence per batch, a few, all in one padded batch
        got = L.score_sequences(scorer, seqs, budget)
        assert got == pytest.approx(want, rel=2e-5, abs=2e-4)


def test_fused_path_sends_only_scored_rows_in_small_chunks(tiny, monkeypatch) -> None:
    seen = {}
    real = sk.linear_sequence_nll

    def spy(hidden, weight, labels, *args, **kwargs):
        seen.update(rows=hidden.shape[0], chunk=kwargs["chunk_size"], v=weight.shape[0])
        return real(hidden, weight, labels, *args, **kwargs)

    monkeypatch.setattr(sk, "linear_sequence_nll", spy)
    seqs = [(list(range(1, 31)), 20), (list(range(2, 12)), 3)]
    L.score_batch(L.SpanScorer(tiny, 0, "fused"), seqs)
    assert seen["rows"] == (30 - 20) + (10 - 3)  # prompt and padding rows never meet the LM head
    assert seen["chunk"] * seen["v"] * 4 <= L.CPU_CHUNK_BYTES


def test_plan_batches_respects_the_budget() -> None:
    lengths = [5, 30, 7, 30, 12, 1, 100, 8]
    batches = L.plan_batches(lengths, 40)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 40
    assert batches[0] == [6]  # longest first; longer than the budget: alone
    with pytest.raises(ValueError, match="max_tokens"):
        L.plan_batches(lengths, 0)


def test_auto_path_falls_back_to_logits_when_fused_cannot_reproduce_them(tiny) -> None:
    probe = (list(range(1, 12)), 4)
    assert L.choose_path(tiny, "auto", probe)[0] == "fused"

    class Scaled(torch.nn.Module):  # logits post-processed where no config field says so
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.base_model = inner.model
            self.config = inner.config

        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, **kw):
            return self.inner(**kw).logits * 2.0

    path, why = L.choose_path(Scaled(tiny), "auto", probe)
    assert path == "logits" and "disagreed" in why
    plain = torch.nn.Linear(4, 4)
    assert L.choose_path(plain, "auto")[0] == "logits"
    with pytest.raises(ValueError):
        L.choose_path(plain, "fused")
    with pytest.raises(ValueError, match="path must be"):
        L.choose_path(tiny, "fast")


def test_bad_spans_are_refused(tiny) -> None:
    with pytest.raises(ValueError, match="scored span must start"):
        L.score_batch(L.SpanScorer(tiny), [([1, 2, 3], 3)])
    with pytest.raises(ValueError, match="scored span must start"):
        L.score_batch(L.SpanScorer(tiny), [([1, 2, 3], 0)])


def test_logits_path_reads_any_model_output(tiny) -> None:
    """The logits path reads outputs as the wrapper does (tensor, ``.logits``, tuple); refuses non-[B, S, V]."""
    seqs = [(list(range(1, 12)), 4), (list(range(5, 14)), 2)]
    expected = L.score_batch(L.SpanScorer(tiny, path="logits"), seqs)

    class Returns(torch.nn.Module):
        def __init__(self, wrap):
            super().__init__()
            self.inner, self.wrap = tiny, wrap

        def forward(self, **kw):
            return self.wrap(self.inner(**kw).logits)

    for wrap in (lambda x: x, lambda x: (x, None)):
        assert L.score_batch(L.SpanScorer(Returns(wrap), path="logits"), seqs) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(TypeError, match=r"logits \[B, S, V\], got shape"):
        L.score_batch(L.SpanScorer(Returns(lambda x: x[0]), path="logits"), seqs)
