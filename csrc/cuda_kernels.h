// Torch-free CUDA kernels of steerlm_kernels._C (raw pointers + cudaStream_t).
//
// Same contract as the CPU kernels (steerlm_kernels/registry.py): logits [N, V] with unit
// column stride and a row stride in elements; labels int32 or int64; lse/target/coef float32.
// Each entry point launches one kernel on `stream` and returns the launch status. Results are
// deterministic: one thread block per row / segment, reductions in a fixed tree order.
// The Triton kernels remain the primary GPU path; these serve C++/TorchScript users and builds
// without Triton.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace steerlm {

enum class Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// The logit transform applied to every logit before the softmax (registry contract):
// kind 0: none (the plain kernels); 1: z' = pre * x (logit_scale only, pre = scale);
// 2: z' = cap * tanh(pre * x) (a softcap, pre = scale / cap), dz'/dx = scale * sech^2(pre * x).
struct Transform {
  int kind = 0;
  float pre = 1.f;
  float cap = 0.f;
  float scale = 1.f;
};

// m[i], lse[i], target[i] of each row: the row max (0 for a row of -inf only), the log-sum-exp
// relative to it (log(sum(exp(x - m)))) and the target logit; nll = lse - (target - m). Ignored
// rows are not read and get 0/0/0. With a transform, of z' = transform(logits) (target included).
cudaError_t ce_forward_cuda(const void* logits, Dtype dtype, int64_t n_rows, int64_t n_cols, int64_t row_stride,
                            const void* labels, bool labels_int64, int64_t vocab_start, int64_t ignore_index,
                            float* row_max, float* lse, float* target, cudaStream_t stream,
                            Transform transform = Transform());

// out = (exp((logits - m) - lse) - onehot) * coef per row (coef forced to 0 for ignored labels; rows
// with coef == 0 are zeroed without reading logits). out may equal logits (in place). With a
// transform: z' = transform(logits) in place of the logits, each element times dz'/dx.
cudaError_t ce_backward_cuda(const void* logits, int64_t row_stride, void* out, int64_t out_row_stride, Dtype dtype,
                             int64_t n_rows, int64_t n_cols, const void* labels, bool labels_int64,
                             const float* row_max, const float* lse, const float* coef, int64_t vocab_start,
                             int64_t ignore_index, cudaStream_t stream, Transform transform = Transform());

// y[b] = sum(x[cu[b]:cu[b+1]]) with bounds clamped to [0, n_tokens].
cudaError_t segment_sum_cuda(const float* x, int64_t n_tokens, const void* cu_seqlens, bool cu_int64,
                             int64_t n_segments, float* y, cudaStream_t stream);

}  // namespace steerlm
