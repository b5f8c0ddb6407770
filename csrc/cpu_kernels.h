// CPU kernels of the `cpp` backend (see steerlm_kernels/_dispatch.py for the contract).
//
// All three functions take CPU tensors, validate them with TORCH_CHECK (shapes, dtypes, strides)
// and run OpenMP-parallel, SIMD-vectorised loops. Results never depend on the thread count:
// every output element is computed by exactly one thread in a fixed order.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace steerlm {

// (lse[N], target[N]) float32 of logits [N, V] (bf16/fp16/fp32, unit column stride, any row
// stride). Rows whose label is ignore_index are not read and get 0/0; target is the logit at
// column label - vocab_start when it lies in [0, V), else 0.
std::tuple<at::Tensor, at::Tensor> ce_forward_cpu(
    const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start, int64_t ignore_index);

// out = (exp(logits - lse) - onehot(label - vocab_start)) * coef, row by row, in float32,
// rounded once to out's dtype. coef is forced to 0 for ignored labels; rows with coef == 0 are
// written as zeros without reading the logits. `out` may be `logits` itself (in place).
void ce_backward_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& coef,
    int64_t vocab_start, int64_t ignore_index, const at::Tensor& out);

// y[b] = sum(x[cu[b]:cu[b+1]]) with the bounds clamped to [0, T]; float32 out, fixed order.
at::Tensor segment_sum_cpu(const at::Tensor& x, const at::Tensor& cu_seqlens);

// The SIMD flavour this file was compiled for ("avx512", "avx2" or "default").
const char* simd_capability();

}  // namespace steerlm
