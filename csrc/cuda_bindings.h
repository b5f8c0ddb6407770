// Torch-level CUDA entry points (defined in cuda_bindings.cpp, built only with SK_WITH_CUDA).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace steerlm {

// softcap (0: none) and scale (1: none): the logit transform, as ce_forward_cpu / ce_backward_cpu.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_forward_cuda_op(const at::Tensor& logits, const at::Tensor& labels,
                                                                  int64_t vocab_start, int64_t ignore_index,
                                                                  double softcap = 0.0, double scale = 1.0);
void ce_backward_cuda_op(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& m,
                         const at::Tensor& lse, const at::Tensor& coef, int64_t vocab_start, int64_t ignore_index,
                         at::Tensor out, double softcap = 0.0, double scale = 1.0);
at::Tensor segment_sum_cuda_op(const at::Tensor& x, const at::Tensor& cu_seqlens);

}  // namespace steerlm
