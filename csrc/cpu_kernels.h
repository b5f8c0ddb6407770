// CPU kernels of the `cpp` backend (see steerlm_kernels/registry.py for the contract).
//
// All functions take CPU tensors, validate them with TORCH_CHECK (shapes, dtypes, strides)
// and run OpenMP-parallel, SIMD-vectorised loops. Results never depend on the thread count:
// every output element is computed by exactly one thread in a fixed order.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace steerlm {

// (m[N], lse[N], target[N]) float32 of logits [N, V] (bf16/fp16/fp32, unit column stride, any
// row stride): m is the row max (0 for a row of -inf only), lse = log(sum(exp(x - m))) relative
// to it, target the logit at column label - vocab_start when it lies in [0, V), else 0; so
// nll = lse - (target - m), with nothing ever added to m (no precision lost to a large common
// offset). Rows whose label is ignore_index are not read and get 0/0/0.
// The logit transform: softcap > 0 and/or scale != 1 replace every logit x by
// z' = softcap * tanh(scale * x / softcap) (or scale * x without a softcap) before all of the
// above (target included); softcap = 0 and scale = 1 (the defaults) compile to the plain kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_forward_cpu(
    const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start, int64_t ignore_index,
    double softcap = 0.0, double scale = 1.0);

// out = (exp((logits - m) - lse) - onehot(label - vocab_start)) * coef, row by row, in float32,
// rounded once to out's dtype. coef is forced to 0 for ignored labels; rows with coef == 0 are
// written as zeros without reading the logits. `out` may be `logits` itself (in place). With a
// transform (softcap, scale as ce_forward_cpu), logits -> z' and each element times dz'/dx.
void ce_backward_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& m, const at::Tensor& lse,
    const at::Tensor& coef, int64_t vocab_start, int64_t ignore_index, const at::Tensor& out,
    double softcap = 0.0, double scale = 1.0);

// y[b] = sum(x[cu[b]:cu[b+1]]) with the bounds clamped to [0, T]; float32 out, fixed order.
at::Tensor segment_sum_cpu(const at::Tensor& x, const at::Tensor& cu_seqlens);

// Group (per-prompt) ops of SteerLM 2.0 over consecutive groups x[cu[g]:cu[g+1]] (cu int32/int64
// [G+1], 0 = cu[0] <= cu[1] <= ... <= cu[G] = B; an empty group writes nothing and has kl 0).
// Inputs are 1-D [B] floating tensors of any stride, rounded to float32 first (as the torch
// reference does); everything is computed in float32, one group start to finish by one thread,
// group sums in a fixed order (bit-identical for every thread count).
//
// y = softmax within each group (max-subtracted). NaN anywhere in a group makes the whole group
// NaN; so does +inf (inf - inf) or a group of -inf only, as in PyTorch.
at::Tensor group_softmax_cpu(const at::Tensor& x, const at::Tensor& cu_groups);

// baseline = group_softmax(-seq_nll - log_q), weight = ws - baseline,
// kl[g] = sum_{i in g} (ws_i + 1e-8) * log((ws_i + 1e-8) / (baseline_i + 1e-8)).
// Returns (weight [B], baseline [B], kl [G]) float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> steerlm2_weights_cpu(
    const at::Tensor& seq_nll, const at::Tensor& log_q, const at::Tensor& ws, const at::Tensor& cu_groups);

// The SIMD flavour this file was compiled for ("avx512", "avx2" or "default").
const char* simd_capability();

}  // namespace steerlm
