// CUDA implementations of the steerlm_kernels_C dispatcher ops: thin torch wrappers around the
// torch-free kernels of cuda_kernels.h (pointers, sizes, strides and the current stream).
// Compiled only when setup.py finds a CUDA toolkit and a CUDA build of torch (defines
// SK_WITH_CUDA); bindings.cpp routes CUDA tensors of the pybind functions here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "cuda_bindings.h"
#include "cuda_kernels.h"

namespace steerlm {
namespace {

Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kF32;
    case at::kBFloat16: return Dtype::kBF16;
    case at::kHalf: return Dtype::kF16;
    default: TORCH_CHECK(false, "logits must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2, name, " must be a 2-D CUDA tensor");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have unit column stride");
}

at::Tensor rows(const at::Tensor& t, int64_t n, const char* name, bool is_label) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 1 && t.size(0) == n, name,
              " must be a CUDA tensor of shape [", n, "]");
  if (is_label) {
    TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name, " must be int32 or int64");
    return t.contiguous();
  }
  return t.to(at::kFloat).contiguous();
}

// The kernels' transform from the contract's (softcap, scale) (0 / 1: none), as the CPU kernels.
Transform make_transform(double softcap, double scale) {
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), "softcap must be finite and >= 0 (0: none), got ", softcap);
  TORCH_CHECK(scale > 0.0 && std::isfinite(scale), "scale must be finite and > 0, got ", scale);
  Transform f;
  if (softcap > 0.0) {
    f.kind = 2;
    f.pre = static_cast<float>(scale / softcap);
    f.cap = static_cast<float>(softcap);
    f.scale = static_cast<float>(scale);
  } else if (scale != 1.0) {
    f.kind = 1;
    f.pre = static_cast<float>(scale);
  }
  return f;
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_forward_cuda_op(const at::Tensor& logits, const at::Tensor& labels_in,
                                                                  int64_t vocab_start, int64_t ignore_index,
                                                                  double softcap, double scale) {
  check_2d(logits, "logits");
  const Transform f = make_transform(softcap, scale);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0);
  const at::Tensor labels = rows(labels_in, n, "labels", true);
  at::Tensor row_max = at::empty({n}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({n}, logits.options().dtype(at::kFloat));
  at::Tensor target = at::empty({n}, logits.options().dtype(at::kFloat));
  check_launch(ce_forward_cuda(logits.data_ptr(), dtype_of(logits), n, logits.size(1), logits.stride(0),
                               labels.data_ptr(), labels.scalar_type() == at::kLong, vocab_start, ignore_index,
                               row_max.data_ptr<float>(), lse.data_ptr<float>(), target.data_ptr<float>(),
                               c10::cuda::getCurrentCUDAStream().stream(), f));
  return {row_max, lse, target};
}

void ce_backward_cuda_op(const at::Tensor& logits, const at::Tensor& labels_in, const at::Tensor& max_in,
                         const at::Tensor& lse_in, const at::Tensor& coef_in, int64_t vocab_start,
                         int64_t ignore_index, at::Tensor out, double softcap, double scale) {
  check_2d(logits, "logits");
  const Transform f = make_transform(softcap, scale);
  check_2d(out, "out");
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type(),
              "out must have the shape and dtype of logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0);
  const at::Tensor labels = rows(labels_in, n, "labels", true);
  const at::Tensor row_max = rows(max_in, n, "m", false);
  const at::Tensor lse = rows(lse_in, n, "lse", false);
  const at::Tensor coef = rows(coef_in, n, "coef", false);
  check_launch(ce_backward_cuda(logits.data_ptr(), logits.stride(0), out.data_ptr(), out.stride(0),
                                dtype_of(logits), n, logits.size(1), labels.data_ptr(),
                                labels.scalar_type() == at::kLong, row_max.data_ptr<float>(), lse.data_ptr<float>(),
                                coef.data_ptr<float>(), vocab_start, ignore_index,
                                c10::cuda::getCurrentCUDAStream().stream(), f));
}

at::Tensor segment_sum_cuda_op(const at::Tensor& x_in, const at::Tensor& cu_in) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() == 1, "x must be a 1-D CUDA tensor");
  TORCH_CHECK(cu_in.is_cuda() && cu_in.dim() == 1 && cu_in.size(0) >= 1, "cu_seqlens must be 1-D, non-empty");
  TORCH_CHECK(cu_in.scalar_type() == at::kLong || cu_in.scalar_type() == at::kInt, "cu_seqlens must be int32/int64");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor cu = cu_in.contiguous();
  at::Tensor y = at::empty({cu.size(0) - 1}, x.options());
  check_launch(segment_sum_cuda(x.data_ptr<float>(), x.size(0), cu.data_ptr(), cu.scalar_type() == at::kLong,
                                y.size(0), y.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

}  // namespace steerlm

TORCH_LIBRARY_IMPL(steerlm_kernels_C, CUDA, m) {
  m.impl("ce_forward", &steerlm::ce_forward_cuda_op);
  m.impl("ce_backward", &steerlm::ce_backward_cuda_op);
  m.impl("segment_sum", &steerlm::segment_sum_cuda_op);
}
