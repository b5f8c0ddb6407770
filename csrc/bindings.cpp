// Python and dispatcher bindings of the extension steerlm_kernels._C.
//
// * pybind11 functions (`_C.ce_forward`, ...): what steerlm_kernels/kernels/cpp.py calls (lowest
//   overhead, no dispatcher round trip).
// * TORCH_LIBRARY(steerlm_kernels_C): the same kernels as dispatcher ops
//   (torch.ops.steerlm_kernels_C.*), CPU implementations here; CUDA implementations are added by
//   cuda_bindings.cpp when the extension is built with CUDA.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu_kernels.h"
#ifdef SK_WITH_CUDA
#include "cuda_bindings.h"
#endif

namespace {

// The pybind entry points pick the CPU or (when built) CUDA kernels by the logits' device.
// softcap (0: none) and scale (1: none) are the logit transform of the registry's contract.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_forward(const at::Tensor& logits, const at::Tensor& labels,
                                                          int64_t vocab_start, int64_t ignore_index, double softcap,
                                                          double scale) {
#ifdef SK_WITH_CUDA
  if (logits.is_cuda()) return steerlm::ce_forward_cuda_op(logits, labels, vocab_start, ignore_index, softcap, scale);
#endif
  return steerlm::ce_forward_cpu(logits, labels, vocab_start, ignore_index, softcap, scale);
}

void ce_backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& m, const at::Tensor& lse,
                 const at::Tensor& coef, int64_t vocab_start, int64_t ignore_index, const at::Tensor& out,
                 double softcap, double scale) {
#ifdef SK_WITH_CUDA
  if (logits.is_cuda()) {
    return steerlm::ce_backward_cuda_op(logits, labels, m, lse, coef, vocab_start, ignore_index, out, softcap,
                                        scale);
  }
#endif
  steerlm::ce_backward_cpu(logits, labels, m, lse, coef, vocab_start, ignore_index, out, softcap, scale);
}

at::Tensor segment_sum(const at::Tensor& x, const at::Tensor& cu_seqlens) {
#ifdef SK_WITH_CUDA
  if (x.is_cuda()) return steerlm::segment_sum_cuda_op(x, cu_seqlens);
#endif
  return steerlm::segment_sum_cpu(x, cu_seqlens);
}

// Dispatcher form of ce_backward: returns nothing, mutates `out`.
void ce_backward_op(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& m, const at::Tensor& lse,
                    const at::Tensor& coef, int64_t vocab_start, int64_t ignore_index, at::Tensor out, double softcap,
                    double scale) {
  steerlm::ce_backward_cpu(logits, labels, m, lse, coef, vocab_start, ignore_index, out, softcap, scale);
}

}  // namespace

TORCH_LIBRARY(steerlm_kernels_C, m) {
  m.def(
      "ce_forward(Tensor logits, Tensor labels, int vocab_start, int ignore_index, float softcap=0.0, "
      "float scale=1.0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ce_backward(Tensor logits, Tensor labels, Tensor m, Tensor lse, Tensor coef, int vocab_start, "
      "int ignore_index, Tensor(a!) out, float softcap=0.0, float scale=1.0) -> ()");
  m.def("segment_sum(Tensor x, Tensor cu_seqlens) -> Tensor");
  m.def("group_softmax(Tensor x, Tensor cu_groups) -> Tensor");
  m.def("steerlm2_weights(Tensor seq_nll, Tensor log_q, Tensor ws, Tensor cu_groups) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(steerlm_kernels_C, CPU, m) {
  m.impl("ce_forward", &steerlm::ce_forward_cpu);
  m.impl("ce_backward", &ce_backward_op);
  m.impl("segment_sum", &steerlm::segment_sum_cpu);
  m.impl("group_softmax", &steerlm::group_softmax_cpu);
  m.impl("steerlm2_weights", &steerlm::steerlm2_weights_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "steerlm_kernels compiled kernels (cpp backend); contract in steerlm_kernels/registry.py";
  m.def("ce_forward", &ce_forward, "(m[N], lse[N], target[N]) float32 of logits [N, V]: row max, "
        "log-sum-exp relative to it, target logit",
        py::arg("logits"), py::arg("labels"), py::arg("vocab_start"), py::arg("ignore_index"),
        py::arg("softcap") = 0.0, py::arg("scale") = 1.0, py::call_guard<py::gil_scoped_release>());
  m.def("ce_backward", &ce_backward,
        "out = (exp((logits - m) - lse) - onehot) * coef row by row; out may be logits", py::arg("logits"),
        py::arg("labels"), py::arg("m"), py::arg("lse"), py::arg("coef"), py::arg("vocab_start"), py::arg("ignore_index"),
        py::arg("out"), py::arg("softcap") = 0.0, py::arg("scale") = 1.0, py::call_guard<py::gil_scoped_release>());
  m.def("segment_sum", &segment_sum, "y[b] = sum(x[cu[b]:cu[b+1]]), bounds clamped",
        py::arg("x"), py::arg("cu_seqlens"), py::call_guard<py::gil_scoped_release>());
  // The group ops are CPU-only (CUDA tensors go to the Triton kernels of ops/group.py).
  m.def("group_softmax", &steerlm::group_softmax_cpu, "softmax within consecutive groups x[cu[g]:cu[g+1]]",
        py::arg("x"), py::arg("cu_groups"), py::call_guard<py::gil_scoped_release>());
  m.def("steerlm2_weights", &steerlm::steerlm2_weights_cpu,
        "(weight, baseline, kl[G]) of SteerLM 2.0's baseline phase, groups x[cu[g]:cu[g+1]]", py::arg("seq_nll"),
        py::arg("log_q"), py::arg("ws"), py::arg("cu_groups"), py::call_guard<py::gil_scoped_release>());
  m.attr("simd") = steerlm::simd_capability();
#ifdef SK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
