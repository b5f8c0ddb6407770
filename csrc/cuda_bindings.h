// Torch-level CUDA entry points (defined in cuda_bindings.cpp, built only with SK_WITH_CUDA).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace steerlm {

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_forward_cuda_op(const at::Tensor& logits, const at::Tensor& labels,
                                                                  int64_t vocab_start, int64_t ignore_index);
void ce_backward_cuda_op(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& m,
                         const at::Tensor& lse, const at::Tensor& coef, int64_t vocab_start, int64_t ignore_index,
                         at::Tensor out);
at::Tensor segment_sum_cuda_op(const at::Tensor& x, const at::Tensor& cu_seqlens);

}  // namespace steerlm
