// Cross entropy straight from the logits on CUDA (torch-free; see cuda_kernels.h).
//
// One 256-thread block per row. Forward: each thread keeps an online (max, sum of exp) pair over
// its columns, visited in tiles of kUnroll coalesced loads (one rescale per tile, not per
// element); the block then merges the 256 pairs in a fixed tree order, so the result is
// deterministic. Backward: each thread rewrites exactly the elements it reads, which makes the
// in-place form (out == logits) safe. All arithmetic in float32; offsets in int64.
//
// The forward's results stay relative to the row max m (stored, with lse = log(sum(exp(x - m)))
// and the target logit itself): m + lse is never formed, so a large common offset of the logits
// costs no precision (at m = 1e8 a float32 ulp is 8); the backward forms exp((x - m) - lse).
// A row of -inf only has m = 0 and lse = -inf (a vocabulary shard that holds nothing).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "cuda_kernels.h"

namespace steerlm {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// z' of one logit x under the transform K (see cuda_kernels.h; K = 0 is the identity and compiles
// the plain kernels), and with `slope` dz'/dx. tanhf is CUDA's accurate tanh; sech^2 comes from
// e = exp(-2|y|) as 4e / (1 + e)^2, which does not cancel as tanh saturates.
template <int K>
__device__ __forceinline__ float transform1(float x, const Transform& f, float* slope = nullptr) {
  if constexpr (K == 0) {
    return x;
  } else if constexpr (K == 1) {
    if (slope) *slope = f.pre;
    return x * f.pre;
  } else {
    const float y = x * f.pre;
    if (slope) {
      const float e = expf(-2.f * fabsf(y));
      *slope = f.scale * ((4.f * e) / ((1.f + e) * (1.f + e)));
    }
    return f.cap * tanhf(y);
  }
}

// Merge two (max, sum exp(x - max)) pairs. Both max -inf: nothing seen, sum stays 0.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;
  s = s * expf(m - mn) + s2 * expf(m2 - mn);
  m = mn;
}

template <int K, typename T, typename L>
__global__ void ce_forward_kernel(const T* __restrict__ logits, int64_t n_cols, int64_t row_stride,
                                  const L* __restrict__ labels, int64_t vocab_start, int64_t ignore_index,
                                  float* __restrict__ max_out, float* __restrict__ lse_out,
                                  float* __restrict__ target_out, Transform f) {
  __shared__ float sm[kThreads], ss[kThreads];
  const int64_t row = blockIdx.x;
  const int64_t label = static_cast<int64_t>(labels[row]);
  if (label == ignore_index) {  // never read
    if (threadIdx.x == 0) max_out[row] = lse_out[row] = target_out[row] = 0.f;
    return;
  }
  const T* x = logits + row * row_stride;
  float m = -INFINITY, s = 0.f;
  bool nan_seen = false;  // fmaxf drops NaN; remember it so that it propagates
  for (int64_t base = 0; base < n_cols; base += int64_t(kThreads) * kUnroll) {
    float v[kUnroll];
    float tile_max = -INFINITY;
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t col = base + int64_t(k) * kThreads + threadIdx.x;
      v[k] = col < n_cols ? transform1<K>(to_f32(x[col]), f) : -INFINITY;  // padding stays -inf
      nan_seen |= isnan(v[k]);
      tile_max = fmaxf(tile_max, v[k]);
    }
    const float mn = fmaxf(m, tile_max);
    if (mn == -INFINITY) continue;
    float tile_sum = 0.f;
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) tile_sum += expf(v[k] - mn);
    s = s * expf(m - mn) + tile_sum;
    m = mn;
  }
  sm[threadIdx.x] = nan_seen ? NAN : m;
  ss[threadIdx.x] = s;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      float mm = sm[threadIdx.x], sss = ss[threadIdx.x];
      const float m2 = sm[threadIdx.x + width], s2 = ss[threadIdx.x + width];
      if (isnan(mm) || isnan(m2)) {
        mm = NAN;
      } else {
        merge(mm, sss, m2, s2);
      }
      sm[threadIdx.x] = mm;
      ss[threadIdx.x] = sss;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float mm = sm[0];
    max_out[row] = mm == -INFINITY ? 0.f : mm;
    // NaN seen: NaN. +inf: its exp(inf - inf) made the sum NaN. -inf only: log(0) = -inf.
    lse_out[row] = isnan(mm) ? mm : logf(ss[0]);
    const int64_t local = label - vocab_start;
    target_out[row] = (local >= 0 && local < n_cols) ? transform1<K>(to_f32(x[local]), f) : 0.f;
  }
}

template <int K, typename T, typename L>
__global__ void ce_backward_kernel(const T* logits, int64_t row_stride, T* out, int64_t out_row_stride,
                                   int64_t n_cols, const L* __restrict__ labels, const float* __restrict__ row_max,
                                   const float* __restrict__ lse, const float* __restrict__ coef,
                                   int64_t vocab_start, int64_t ignore_index, Transform f) {
  const int64_t row = blockIdx.x;
  const int64_t label = static_cast<int64_t>(labels[row]);
  const float c = label == ignore_index ? 0.f : coef[row];
  T* o = out + row * out_row_stride;
  if (c == 0.f) {  // dead row: zeros, logits not read
    for (int64_t col = threadIdx.x; col < n_cols; col += kThreads) o[col] = from_f32<T>(0.f);
    return;
  }
  const T* x = logits + row * row_stride;  // may equal o (in place): read then write, same thread
  const float mx = row_max[row], l = lse[row];
  const int64_t local = label - vocab_start;
  for (int64_t col = threadIdx.x; col < n_cols; col += kThreads) {
    float slope = 1.f;
    const float z = transform1<K>(to_f32(x[col]), f, &slope);
    const float p = expf((z - mx) - l);
    // float32 throughout, rounded once (the slope multiplies before the rounding)
    o[col] = from_f32<T>(K == 0 ? (p - (col == local ? 1.f : 0.f)) * c : (p - (col == local ? 1.f : 0.f)) * c * slope);
  }
}

template <int K, typename T, typename L>
void launch_forward_k(const void* logits, int64_t n_rows, int64_t n_cols, int64_t row_stride, const void* labels,
                      int64_t vocab_start, int64_t ignore_index, float* row_max, float* lse, float* target,
                      cudaStream_t stream, const Transform& f) {
  ce_forward_kernel<K, T, L><<<n_rows, kThreads, 0, stream>>>(static_cast<const T*>(logits), n_cols, row_stride,
                                                             static_cast<const L*>(labels), vocab_start,
                                                             ignore_index, row_max, lse, target, f);
}

template <typename T, typename L>
void launch_forward(const void* logits, int64_t n_rows, int64_t n_cols, int64_t row_stride, const void* labels,
                    int64_t vocab_start, int64_t ignore_index, float* row_max, float* lse, float* target,
                    cudaStream_t stream, const Transform& f) {
  if (f.kind == 0) {
    launch_forward_k<0, T, L>(logits, n_rows, n_cols, row_stride, labels, vocab_start, ignore_index, row_max, lse,
                              target, stream, f);
  } else if (f.kind == 1) {
    launch_forward_k<1, T, L>(logits, n_rows, n_cols, row_stride, labels, vocab_start, ignore_index, row_max, lse,
                              target, stream, f);
  } else {
    launch_forward_k<2, T, L>(logits, n_rows, n_cols, row_stride, labels, vocab_start, ignore_index, row_max, lse,
                              target, stream, f);
  }
}

template <int K, typename T, typename L>
void launch_backward_k(const void* logits, int64_t row_stride, void* out, int64_t out_row_stride, int64_t n_rows,
                       int64_t n_cols, const void* labels, const float* row_max, const float* lse, const float* coef,
                       int64_t vocab_start, int64_t ignore_index, cudaStream_t stream, const Transform& f) {
  ce_backward_kernel<K, T, L><<<n_rows, kThreads, 0, stream>>>(static_cast<const T*>(logits), row_stride,
                                                              static_cast<T*>(out), out_row_stride, n_cols,
                                                              static_cast<const L*>(labels), row_max, lse, coef,
                                                              vocab_start, ignore_index, f);
}

template <typename T, typename L>
void launch_backward(const void* logits, int64_t row_stride, void* out, int64_t out_row_stride, int64_t n_rows,
                     int64_t n_cols, const void* labels, const float* row_max, const float* lse, const float* coef,
                     int64_t vocab_start, int64_t ignore_index, cudaStream_t stream, const Transform& f) {
  if (f.kind == 0) {
    launch_backward_k<0, T, L>(logits, row_stride, out, out_row_stride, n_rows, n_cols, labels, row_max, lse, coef,
                               vocab_start, ignore_index, stream, f);
  } else if (f.kind == 1) {
    launch_backward_k<1, T, L>(logits, row_stride, out, out_row_stride, n_rows, n_cols, labels, row_max, lse, coef,
                               vocab_start, ignore_index, stream, f);
  } else {
    launch_backward_k<2, T, L>(logits, row_stride, out, out_row_stride, n_rows, n_cols, labels, row_max, lse, coef,
                               vocab_start, ignore_index, stream, f);
  }
}

// Calls F<T, L>(args...) for the runtime dtype / label width.
#define SK_DISPATCH(FN, DTYPE, LABELS_INT64, ...)                                         \
  switch (DTYPE) {                                                                        \
    case Dtype::kF32:                                                                     \
      LABELS_INT64 ? FN<float, int64_t>(__VA_ARGS__) : FN<float, int32_t>(__VA_ARGS__);   \
      break;                                                                              \
    case Dtype::kBF16:                                                                    \
      LABELS_INT64 ? FN<__nv_bfloat16, int64_t>(__VA_ARGS__)                              \
                   : FN<__nv_bfloat16, int32_t>(__VA_ARGS__);                             \
      break;                                                                              \
    case Dtype::kF16:                                                                     \
      LABELS_INT64 ? FN<__half, int64_t>(__VA_ARGS__) : FN<__half, int32_t>(__VA_ARGS__); \
      break;                                                                              \
  }

}  // namespace

cudaError_t ce_forward_cuda(const void* logits, Dtype dtype, int64_t n_rows, int64_t n_cols, int64_t row_stride,
                            const void* labels, bool labels_int64, int64_t vocab_start, int64_t ignore_index,
                            float* row_max, float* lse, float* target, cudaStream_t stream, Transform transform) {
  if (n_rows <= 0) return cudaSuccess;
  SK_DISPATCH(launch_forward, dtype, labels_int64, logits, n_rows, n_cols, row_stride, labels, vocab_start,
              ignore_index, row_max, lse, target, stream, transform);
  return cudaGetLastError();
}

cudaError_t ce_backward_cuda(const void* logits, int64_t row_stride, void* out, int64_t out_row_stride, Dtype dtype,
                             int64_t n_rows, int64_t n_cols, const void* labels, bool labels_int64,
                             const float* row_max, const float* lse, const float* coef, int64_t vocab_start,
                             int64_t ignore_index, cudaStream_t stream, Transform transform) {
  if (n_rows <= 0) return cudaSuccess;
  SK_DISPATCH(launch_backward, dtype, labels_int64, logits, row_stride, out, out_row_stride, n_rows, n_cols,
              labels, row_max, lse, coef, vocab_start, ignore_index, stream, transform);
  return cudaGetLastError();
}

}  // namespace steerlm
