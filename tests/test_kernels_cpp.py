"""The compiled extension ``steerlm_kernels._C`` (the ``cpp`` backend), tested directly.

* every ``csrc/*.cu`` compiles with nvcc for sm_90 and sm_80 (skipped without nvcc);
* the extension is built and importable (a failure, not a skip, under ``$CI`` when a C++
  compiler exists, so that CI proves the build);
* ``_C.ce_forward`` / ``_C.ce_backward`` / ``_C.segment_sum`` against float64 math: every dtype,
  odd vocabulary sizes, ignored and zero-coefficient rows, in place, row-strided input, offsets
  past 2**31 elements, NaN-poisoned outputs (every element is written), thread-count independence;
* ``_C.group_softmax`` / ``_C.steerlm2_weights`` (the group ops; their values on every backend
  are tested in test_ops_group.py) against the torch implementations: many groups over several
  threads, thread-count independence, empty groups, non-contiguous and non-float32 inputs,
  contract violations.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from steerlm_kernels.kernels import reference

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc").glob("*.cu"))
IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VOCABS = [1, 7, 1000, 32003]


def _compiler_exists() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++"))


def _load_ext():
    try:
        from steerlm_kernels import _C
    except ImportError as exc:
        return None, exc
    return _C, None


_C, _IMPORT_ERROR = _load_ext()
needs_ext = pytest.mark.skipif(_C is None, reason=f"steerlm_kernels._C not built ({_IMPORT_ERROR})")


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cuda_sources_compile(cu: Path, arch: str, tmp_path: Path) -> None:
    """The torch-free CUDA kernels compile for Hopper and Ampere (no GPU needed)."""
    cmd = ["nvcc", "-c", f"-arch={arch}", "-O3", "-std=c++17", str(cu), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


def test_cuda_sources_exist() -> None:
    assert CU_FILES, "csrc/ holds no .cu sources"


def test_extension_built() -> None:
    """Under CI with a compiler the extension must have been built by the install."""
    if _C is None:
        if os.environ.get("CI") and _compiler_exists():
            pytest.fail(f"steerlm_kernels._C failed to import under CI with a compiler: {_IMPORT_ERROR}")
        pytest.skip(f"extension not built: {_IMPORT_ERROR}")
    import steerlm_kernels as sk

    assert sk.backends()["cpp"].available
    assert _C.simd in ("avx512", "avx2", "default")


# --------------------------------------------------------------------------------------------
# helpers: inputs and float64 truth
# --------------------------------------------------------------------------------------------


def make_case(n: int, v: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with a wide range (scale 4, one large outlier per row) and int64 labels, some
    ignored, one out of range of this shard (only meaningful with vocab_start)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 4
    x[torch.arange(n), torch.randint(0, v, (n,), generator=g)] += 20
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = IGNORE
    return x.to(dtype), labels


def f64_forward(x: torch.Tensor, labels: torch.Tensor, vocab_start: int) -> tuple[torch.Tensor, ...]:
    """``(m, lse, target)`` of the contract (row max, log-sum-exp relative to it, target logit), float64."""
    x64 = x.double()
    v = x.shape[1]
    active = labels != IGNORE
    local = labels - vocab_start
    in_shard = active & (local >= 0) & (local < v)
    m = x64.amax(1)
    m = torch.where(m == float("-inf"), 0.0, m)
    lse = torch.where(active, torch.logsumexp(x64 - m[:, None], 1), 0.0)
    tgt = torch.where(in_shard, x64.gather(1, local.clamp(0, v - 1).unsqueeze(1)).squeeze(1), 0.0)
    return torch.where(active, m, 0.0), lse, tgt


def assert_forward_f64(got: tuple[torch.Tensor, ...], x: torch.Tensor, labels: torch.Tensor, vocab_start: int) -> None:
    m64, lse64, tgt64 = f64_forward(x, labels, vocab_start)
    m, lse, tgt = got
    assert m.dtype == lse.dtype == tgt.dtype == torch.float32
    torch.testing.assert_close(m.double(), m64, rtol=0, atol=0)  # the max of float32 values: exact
    torch.testing.assert_close(lse.double(), lse64, rtol=2e-6, atol=1e-5)  # float32 sums of up to 32k terms
    torch.testing.assert_close(tgt.double(), tgt64, rtol=0, atol=0)  # an exact widening


def f64_backward(x: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor, vocab_start: int) -> torch.Tensor:
    x64 = x.double()
    v = x.shape[1]
    local = labels - vocab_start
    in_shard = (labels != IGNORE) & (local >= 0) & (local < v)
    g = torch.softmax(x64, 1)
    g[in_shard, local[in_shard]] -= 1.0
    c = torch.where(labels == IGNORE, 0.0, coef.double())
    g = g * c.unsqueeze(1)
    g[c == 0] = 0.0  # never NaN from a row that is not read
    return g


def grad_tol(dtype: torch.dtype) -> dict[str, float]:
    """One rounding to ``dtype`` as a relative tolerance, plus float32 noise as an absolute one:
    at the target column ``p - 1`` cancels when p is close to 1, leaving the rounding of the
    float32 ``lse`` (half an ulp of |lse| < 64, i.e. < 2e-6) times ``|coef|`` (< 4)."""
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    return {"rtol": rtol, "atol": 1e-5}


# --------------------------------------------------------------------------------------------
# ce_forward
# --------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("v", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=str)
def test_forward_matches_reference_and_f64(v: int, dtype: torch.dtype, label_dtype: torch.dtype) -> None:
    x, labels = make_case(37, v, dtype)
    labels = labels.to(label_dtype)
    x[labels == IGNORE] = float("nan")  # ignored rows must not be read
    got = _C.ce_forward(x, labels, 0, IGNORE)
    assert all(t.shape == (37,) for t in got)
    assert_forward_f64(got, torch.nan_to_num(x, nan=0.0), labels.long(), 0)


@needs_ext
@pytest.mark.parametrize("vocab_start", [0, 500, 1000, -3])
def test_forward_vocab_shard(vocab_start: int) -> None:
    """Under vocabulary parallelism only the shard holding the label reads its target."""
    x, labels = make_case(64, 1000, torch.float32, seed=1)
    labels = torch.where(labels == IGNORE, labels, labels * 2)  # labels in [0, 2000)
    assert_forward_f64(_C.ce_forward(x, labels, vocab_start, IGNORE), x, labels, vocab_start)


@needs_ext
def test_forward_special_values() -> None:
    """NaN propagates; a row of -inf has m 0 and lse -inf; a large finite range does not overflow;
    +inf gives NaN."""
    x = torch.zeros(5, 100)
    x[0, 7] = float("nan")
    x[1] = float("-inf")
    x[2, 3] = 1e30
    x[3, 5] = -1e30
    x[4, 9] = float("inf")
    m, lse, _ = _C.ce_forward(x, torch.zeros(5, dtype=torch.long), 0, IGNORE)
    assert torch.isnan(lse[0]) and torch.isnan(lse[4])
    assert m[1] == 0 and lse[1] == float("-inf")
    assert m[2] == 1e30 and lse[2] == 0
    torch.testing.assert_close(m[3] + lse[3], torch.logsumexp(x[3], 0))


@needs_ext
def test_forward_empty_and_row_strided() -> None:
    assert all(t.shape == (0,) for t in _C.ce_forward(torch.empty(0, 10), torch.empty(0, dtype=torch.long), 0, IGNORE))
    wide, labels = make_case(33, 1013, torch.bfloat16, seed=2)
    x = wide[:, 5:1005]  # row stride 1013, unit column stride, unaligned start
    labels = labels.clamp(max=999).masked_fill(labels == IGNORE, IGNORE)
    got = _C.ce_forward(x, labels, 0, IGNORE)
    dense = _C.ce_forward(x.contiguous(), labels, 0, IGNORE)
    assert all(torch.equal(a, b) for a, b in zip(got, dense, strict=True))


@needs_ext
def test_offsets_beyond_2_31() -> None:
    """Rows whose element offset passes 2**31: a two-row view into a lazily allocated 4 GiB
    buffer (untouched pages cost no memory); only the rows in use are ever written."""
    v = 4096
    stride = 2**31 + 64  # the second row starts past 2**31 elements (4 GiB of bf16)
    storage = torch.empty(stride + v, dtype=torch.bfloat16)
    x = storage.as_strided((2, v), (stride, 1))
    g = torch.Generator().manual_seed(3)
    x.copy_(torch.randn(2, v, generator=g).bfloat16())
    labels = torch.tensor([5, v - 1])
    m, lse, tgt = _C.ce_forward(x, labels, 0, IGNORE)
    assert_forward_f64((m, lse, tgt), x.contiguous(), labels, 0)
    expected = f64_backward(x.contiguous(), labels, torch.ones(2), 0)
    _C.ce_backward(x, labels, m, lse, torch.ones(2), 0, IGNORE, x)  # in place, through the view
    torch.testing.assert_close(x.double(), expected, **grad_tol(torch.bfloat16))


# --------------------------------------------------------------------------------------------
# ce_backward
# --------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("v", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_reference_and_f64(v: int, dtype: torch.dtype) -> None:
    n = 41
    x, labels = make_case(n, v, dtype, seed=4)
    coef = torch.randn(n)
    coef[1::5] = 0.0  # zero-weight / masked rows
    dead = (labels == IGNORE) | (coef == 0)
    clean = x.clone()
    x[dead] = float("nan")  # rows that must not be read
    m, lse, _ = (t.float() for t in f64_forward(clean, labels, 0))
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    _C.ce_backward(x, labels, m, lse, coef, 0, IGNORE, out)
    assert not torch.isnan(out).any()
    assert (out[dead] == 0).all()
    torch.testing.assert_close(out.double(), f64_backward(clean, labels, coef, 0), **grad_tol(dtype))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab_start", [0, 300, 2000])
def test_backward_in_place_equals_out_of_place(dtype: torch.dtype, vocab_start: int) -> None:
    x, labels = make_case(29, 1000, dtype, seed=5)
    labels = torch.where(labels == IGNORE, labels, labels + 500)
    m, lse, _ = _C.ce_forward(x, labels, vocab_start, IGNORE)
    coef = torch.rand(29) + 0.5
    out = torch.full_like(x, float("nan"))
    _C.ce_backward(x, labels, m, lse, coef, vocab_start, IGNORE, out)
    y = x.clone()
    _C.ce_backward(y, labels, m, lse, coef, vocab_start, IGNORE, y)
    assert torch.equal(y, out)
    torch.testing.assert_close(out.double(), f64_backward(x, labels, coef, vocab_start), **grad_tol(dtype))


@needs_ext
def test_backward_row_strided_in_and_out() -> None:
    wide, labels = make_case(17, 530, torch.float16, seed=6)
    x = wide[:, 3:515]
    labels = torch.where(labels >= 512, 0, labels)
    coef = torch.randn(17)
    m, lse, _ = _C.ce_forward(x, labels, 0, IGNORE)
    out_wide = torch.full((17, 600), float("nan"), dtype=torch.float16)
    out = out_wide[:, 7:519]
    _C.ce_backward(x, labels, m, lse, coef, 0, IGNORE, out)
    expected = torch.empty(17, 512, dtype=torch.float16)
    _C.ce_backward(x.contiguous(), labels, m, lse, coef, 0, IGNORE, expected)
    assert torch.equal(out, expected)
    assert torch.isnan(out_wide[:, :7]).all() and torch.isnan(out_wide[:, 519:]).all()  # untouched


def assert_same_for_thread_counts(run) -> None:
    """``run()`` (a tuple of tensors) is bit-identical with 1, 2 and 3 OpenMP threads."""
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run())
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@needs_ext
def test_results_do_not_depend_on_thread_count() -> None:
    x, labels = make_case(64, 3001, torch.bfloat16, seed=7)
    coef = torch.randn(64)

    def run():
        m, lse, tgt = _C.ce_forward(x, labels, 0, IGNORE)
        out = torch.empty_like(x)
        _C.ce_backward(x, labels, m, lse, coef, 0, IGNORE, out)
        return m, lse, tgt, out, _C.segment_sum(lse, torch.tensor([0, 10, 10, 64]))

    assert_same_for_thread_counts(run)


@needs_ext
def test_bad_input_raises() -> None:
    x = torch.randn(4, 8)
    lab = torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="logits"):
        _C.ce_forward(x.double(), lab, 0, IGNORE)
    with pytest.raises(RuntimeError, match="column stride"):
        _C.ce_forward(x.t(), lab, 0, IGNORE)
    with pytest.raises(RuntimeError, match="labels"):
        _C.ce_forward(x, lab.float(), 0, IGNORE)
    with pytest.raises(RuntimeError, match="labels"):
        _C.ce_forward(x, lab[:3], 0, IGNORE)
    with pytest.raises(RuntimeError, match="out"):
        _C.ce_backward(x, lab, torch.zeros(4), torch.zeros(4), torch.ones(4), 0, IGNORE,
                       torch.empty(4, 8, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="m must have shape"):
        _C.ce_backward(x, lab, torch.zeros(3), torch.zeros(4), torch.ones(4), 0, IGNORE, torch.empty_like(x))


# --------------------------------------------------------------------------------------------
# segment_sum, dispatcher ops, the public API on the cpp backend
# --------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=str)
def test_segment_sum(cu_dtype: torch.dtype) -> None:
    x = torch.randn(1000)
    cu = torch.tensor([0, 0, 3, 3, 500, 999, 1000], dtype=cu_dtype)  # empty segments included
    y = _C.segment_sum(x, cu)
    expected = torch.stack([x[a:b].double().sum() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)])
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, reference.segment_sum(x, cu))
    assert _C.segment_sum(x, torch.tensor([0], dtype=cu_dtype)).shape == (0,)


@needs_ext
def test_segment_sum_clamps_bounds() -> None:
    """Offsets outside [0, T] or decreasing never read out of bounds: they are clamped."""
    x = torch.arange(10, dtype=torch.float32)
    y = _C.segment_sum(x, torch.tensor([-5, 4, 2, 50, 10**12]))
    assert y.tolist() == [sum(range(4)), 0.0, sum(range(2, 10)), 0.0]


@needs_ext
def test_dispatcher_ops_registered() -> None:
    x, labels = make_case(8, 100, torch.float32, seed=8)
    m, lse, tgt = torch.ops.steerlm_kernels_C.ce_forward(x, labels, 0, IGNORE)
    assert all(torch.equal(a, b) for a, b in zip((m, lse, tgt), _C.ce_forward(x, labels, 0, IGNORE), strict=True))
    out = torch.empty_like(x)
    torch.ops.steerlm_kernels_C.ce_backward(x, labels, m, lse, torch.ones(8), 0, IGNORE, out)
    out2 = torch.empty_like(x)
    _C.ce_backward(x, labels, m, lse, torch.ones(8), 0, IGNORE, out2)
    assert torch.equal(out, out2)
    cu = torch.tensor([0, 3, 8])
    assert torch.equal(torch.ops.steerlm_kernels_C.segment_sum(lse, cu), _C.segment_sum(lse, cu))
    assert torch.equal(torch.ops.steerlm_kernels_C.group_softmax(lse, cu), _C.group_softmax(lse, cu))
    ws = torch.rand(8)
    for a, b in zip(torch.ops.steerlm_kernels_C.steerlm2_weights(lse, tgt, ws, cu),
                    _C.steerlm2_weights(lse, tgt, ws, cu), strict=True):
        assert torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize("inplace", [False, True])
def test_public_api_cpp_and_torch_match_float64(inplace: bool) -> None:
    """Both CPU backends through the public API, each against float64 math (not one against the
    other: a bug shared by both must not pass)."""
    import steerlm_kernels as sk
    from tests import reference as ref

    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(3, 20, 517, generator=g) * 3).bfloat16()
    labels = torch.randint(0, 517, (3, 20), generator=g)
    mask = torch.rand(3, 20, generator=g) > 0.3
    weight, norm = torch.randn(3), torch.tensor([10.0, 12.0, 9.0])
    x64 = logits.double().requires_grad_()
    want = ref.weighted_sequence_loss(x64, labels, mask, weight, norm)
    want.backward()
    for backend in ("cpp", "torch"):
        x = logits.clone().requires_grad_(True)
        loss = sk.weighted_sequence_loss(x * 1, labels, mask, weight, norm, backend=backend, inplace_backward=inplace)
        loss.backward()
        torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad.double(), x64.grad, **grad_tol(torch.bfloat16))
        with torch.no_grad():
            seq = sk.sequence_nll(logits, labels, mask, backend=backend)
        torch.testing.assert_close(seq.double(), ref.sequence_nll(logits, labels, mask), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# group ops (SteerLM 2.0 baseline phase)
# --------------------------------------------------------------------------------------------


def make_groups(n_groups: int, max_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(seq_nll, log_q, ws, cu_groups int64) for random group sizes in [1, max_size]."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_size + 1, (n_groups,), generator=g)
    cu = torch.zeros(n_groups + 1, dtype=torch.long)
    cu[1:] = sizes.cumsum(0)
    b = int(cu[-1])
    nll = torch.rand(b, generator=g) * 200
    log_q = -torch.rand(b, generator=g) * 200
    ws = torch.rand(b, generator=g)
    return nll, log_q, ws, cu


@needs_ext
@pytest.mark.parametrize("max_size", [1, 8, 40])
def test_group_ops_match_torch_many_groups(max_size: int) -> None:
    """Enough items for every thread and many blocks per thread (groups of 1, of up to a vector,
    of several vectors); kernel vs the torch implementations, to float32 rounding."""
    nll, log_q, ws, cu = make_groups(60000 // (max_size // 2 + 1), max_size, seed=10)
    weight, baseline, kl = _C.steerlm2_weights(nll, log_q, ws, cu)
    ref = reference.steerlm2_weights(nll, log_q, ws, cu, max_size)
    assert weight.dtype == baseline.dtype == kl.dtype == torch.float32
    assert kl.shape == (cu.numel() - 1,) and weight.shape == baseline.shape == nll.shape
    torch.testing.assert_close(weight, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(baseline, ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl, ref[2], rtol=1e-5, atol=1e-5)
    x = torch.randn(nll.numel()) * 50
    torch.testing.assert_close(_C.group_softmax(x, cu), reference.group_softmax(x, cu, max_size),
                               rtol=1e-5, atol=1e-7)


@needs_ext
def test_group_ops_do_not_depend_on_thread_count() -> None:
    nll, log_q, ws, cu = make_groups(9000, 12, seed=12)
    assert_same_for_thread_counts(lambda: (*_C.steerlm2_weights(nll, log_q, ws, cu), _C.group_softmax(nll, cu)))


@needs_ext
def test_group_ops_empty_groups_and_inputs() -> None:
    """The kernels allow what the API never passes: empty groups (nothing written, KL 0), no
    groups at all, B = 0."""
    nll, log_q, ws = torch.randn(5), torch.randn(5), torch.rand(5)
    cu = torch.tensor([0, 0, 2, 2, 5, 5])
    weight, baseline, kl = _C.steerlm2_weights(nll, log_q, ws, cu)
    dense = _C.steerlm2_weights(nll, log_q, ws, torch.tensor([0, 2, 5]))
    assert torch.equal(weight, dense[0]) and torch.equal(baseline, dense[1])
    assert kl.tolist()[0] == 0 and kl.tolist()[2] == 0 and kl.tolist()[4] == 0
    assert torch.equal(kl[[1, 3]], dense[2])
    assert torch.equal(_C.group_softmax(nll, cu), _C.group_softmax(nll, torch.tensor([0, 2, 5])))
    empty = torch.empty(0)
    for cu0 in (torch.tensor([0]), torch.tensor([0, 0])):
        w, b, k = _C.steerlm2_weights(empty, empty, empty, cu0)
        assert w.shape == b.shape == (0,) and k.shape == (cu0.numel() - 1,) and (k == 0).all()
        assert _C.group_softmax(empty, cu0).shape == (0,)


@needs_ext
def test_group_ops_strided_and_dtypes() -> None:
    """Non-contiguous inputs and int32 offsets give the same result; float64 / bf16 / fp16 are
    rounded to float32 first, as the torch reference does."""
    nll, log_q, ws, cu = make_groups(50, 9, seed=13)
    base = _C.steerlm2_weights(nll, log_q, ws, cu)
    wide = torch.stack([nll, log_q, ws], 1)  # each column has stride 3
    for a, c in zip(_C.steerlm2_weights(wide[:, 0], wide[:, 1], wide[:, 2], cu.int()), base, strict=True):
        assert torch.equal(a, c)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        got = _C.steerlm2_weights(nll.to(dtype), log_q.to(dtype), ws.to(dtype), cu)
        want = _C.steerlm2_weights(nll.to(dtype).float(), log_q.to(dtype).float(), ws.to(dtype).float(), cu)
        assert all(torch.equal(a, c) for a, c in zip(got, want, strict=True))
        assert torch.equal(_C.group_softmax(nll.to(dtype), cu), _C.group_softmax(nll.to(dtype).float(), cu))


@needs_ext
def test_group_ops_write_every_output() -> None:
    """Outputs are fresh torch.empty tensors: after freeing NaN-filled buffers of the same size
    (which the allocator is likely to hand back), every output element must still be finite."""
    nll, log_q, ws, cu = make_groups(700, 9, seed=14)
    for _ in range(3):
        poison = [torch.full_like(nll, float("nan")) for _ in range(3)] + [torch.full((cu.numel() - 1,), float("nan"))]
        del poison
        for out in (*_C.steerlm2_weights(nll, log_q, ws, cu), _C.group_softmax(nll, cu)):
            assert torch.isfinite(out).all()


@needs_ext
def test_group_ops_bad_input_raises() -> None:
    x, ws = torch.randn(6), torch.rand(6)
    cu = torch.tensor([0, 2, 6])
    with pytest.raises(RuntimeError, match="cu_groups must run from 0 to 6"):
        _C.group_softmax(x, torch.tensor([0, 2, 5]))
    with pytest.raises(RuntimeError, match="cu_groups must run from 0 to 6"):
        _C.steerlm2_weights(x, x, ws, torch.tensor([1, 2, 6]))
    with pytest.raises(RuntimeError, match="non-decreasing"):
        _C.group_softmax(x, torch.tensor([0, 4, 2, 6]))
    with pytest.raises(RuntimeError, match="cu_groups must be int32 or int64"):
        _C.group_softmax(x, cu.float())
    with pytest.raises(RuntimeError, match="cu_groups must be 1-D"):
        _C.group_softmax(x, torch.empty(0, dtype=torch.long))
    with pytest.raises(RuntimeError, match="log_q must have 6 elements"):
        _C.steerlm2_weights(x, x[:5], ws, cu)
    with pytest.raises(RuntimeError, match="ws must be a floating-point"):
        _C.steerlm2_weights(x, x, ws.long(), cu)
    with pytest.raises(RuntimeError, match="seq_nll must be 1-D"):
        _C.steerlm2_weights(x.view(2, 3), x, ws, cu)
