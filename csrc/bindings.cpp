// Python and dispatcher bindings of the extension steerlm_kernels._C.
//
// * pybind11 functions (`_C.ce_forward`, ...): what steerlm_kernels/ops/cpp.py calls (lowest
//   overhead, no dispatcher round trip).
// * TORCH_LIBRARY(steerlm_kernels_C): the same kernels as dispatcher ops
//   (torch.ops.steerlm_kernels_C.*), CPU implementations here; CUDA implementations are added by
//   cuda_bindings.cpp when the extension is built with CUDA.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu_kernels.h"

namespace {

// Dispatcher form of ce_backward: returns nothing, mutates `out`.
void ce_backward_op(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                    const at::Tensor& coef, int64_t vocab_start, int64_t ignore_index, at::Tensor out) {
  steerlm::ce_backward_cpu(logits, labels, lse, coef, vocab_start, ignore_index, out);
}

}  // namespace

TORCH_LIBRARY(steerlm_kernels_C, m) {
  m.def("ce_forward(Tensor logits, Tensor labels, int vocab_start, int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "ce_backward(Tensor logits, Tensor labels, Tensor lse, Tensor coef, int vocab_start, "
      "int ignore_index, Tensor(a!) out) -> ()");
  m.def("segment_sum(Tensor x, Tensor cu_seqlens) -> Tensor");
}

TORCH_LIBRARY_IMPL(steerlm_kernels_C, CPU, m) {
  m.impl("ce_forward", &steerlm::ce_forward_cpu);
  m.impl("ce_backward", &ce_backward_op);
  m.impl("segment_sum", &steerlm::segment_sum_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "steerlm_kernels compiled kernels (cpp backend); contract in steerlm_kernels/_dispatch.py";
  m.def("ce_forward", &steerlm::ce_forward_cpu, "(lse[N], target[N]) float32 of logits [N, V]",
        py::arg("logits"), py::arg("labels"), py::arg("vocab_start"), py::arg("ignore_index"),
        py::call_guard<py::gil_scoped_release>());
  m.def("ce_backward", &steerlm::ce_backward_cpu,
        "out = (softmax(logits) - onehot) * coef row by row; out may be logits", py::arg("logits"),
        py::arg("labels"), py::arg("lse"), py::arg("coef"), py::arg("vocab_start"), py::arg("ignore_index"),
        py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("segment_sum", &steerlm::segment_sum_cpu, "y[b] = sum(x[cu[b]:cu[b+1]]), bounds clamped",
        py::arg("x"), py::arg("cu_seqlens"), py::call_guard<py::gil_scoped_release>());
  m.attr("simd") = steerlm::simd_capability();
#ifdef SK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
