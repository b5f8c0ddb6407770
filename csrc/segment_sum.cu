// segment_sum on CUDA: one 256-thread block per segment; each thread sums a strided slice of the
// segment, then the block reduces the 256 partials in a fixed tree order (deterministic, no
// atomics). Bounds are clamped to [0, n_tokens] so bad offsets never read out of bounds.
#include "cuda_kernels.h"

namespace steerlm {
namespace {

constexpr int kThreads = 256;

template <typename Index>
__global__ void segment_sum_kernel(const float* __restrict__ x, int64_t n_tokens, const Index* __restrict__ cu,
                                   float* __restrict__ y) {
  __shared__ float partial[kThreads];
  const int64_t seg = blockIdx.x;
  int64_t start = static_cast<int64_t>(cu[seg]);
  int64_t end = static_cast<int64_t>(cu[seg + 1]);
  start = start < 0 ? 0 : (start > n_tokens ? n_tokens : start);
  end = end < start ? start : (end > n_tokens ? n_tokens : end);
  float acc = 0.f;
  for (int64_t t = start + threadIdx.x; t < end; t += kThreads) acc += x[t];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) y[seg] = partial[0];
}

}  // namespace

cudaError_t segment_sum_cuda(const float* x, int64_t n_tokens, const void* cu_seqlens, bool cu_int64,
                             int64_t n_segments, float* y, cudaStream_t stream) {
  if (n_segments <= 0) return cudaSuccess;
  if (cu_int64) {
    segment_sum_kernel<<<n_segments, kThreads, 0, stream>>>(x, n_tokens, static_cast<const int64_t*>(cu_seqlens), y);
  } else {
    segment_sum_kernel<<<n_segments, kThreads, 0, stream>>>(x, n_tokens, static_cast<const int32_t*>(cu_seqlens), y);
  }
  return cudaGetLastError();
}

}  // namespace steerlm
