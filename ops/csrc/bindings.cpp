// Python bindings of detr_variants._C: device dispatch of the native operators.
#include <torch/extension.h>

#include "dropout.h"
#include "ms_deform_attn.h"

namespace detr_variants {
namespace {

#ifndef WITH_CUDA
[[noreturn]] void no_cuda() {
  TORCH_CHECK(false,
              "detr_variants._C was built without CUDA kernels; rebuild with FORCE_CUDA=1 and "
              "CUDA_HOME set (see ops/README.md), or use ms_deform_attn_pytorch");
}
#endif

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index,
                                  const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_cuda_forward(value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights);
#else
    no_cuda();
#endif
  }
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn_forward: unsupported device ",
              value.device());
  return ms_deform_attn_cpu_forward(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_cuda_backward(value, spatial_shapes, level_start_index,
                                        sampling_locations, attention_weights, grad_output);
#else
    no_cuda();
#endif
  }
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn_backward: unsupported device ",
              value.device());
  return ms_deform_attn_cpu_backward(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights, grad_output);
}

bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace detr_variants

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace detr_variants;
  m.doc() = "Native operators of detr_variants (multi-scale deformable attention, CPU dropout).";
  m.def("ms_deform_attn_forward", &ms_deform_attn_forward,
        "Multi-scale deformable attention forward -> (N, Lq, M*D).", py::arg("value"),
        py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"));
  m.def("ms_deform_attn_backward", &ms_deform_attn_backward,
        "Multi-scale deformable attention backward -> (grad_value, grad_sampling_locations, "
        "grad_attention_weights).",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_locations"), py::arg("attention_weights"), py::arg("grad_output"));
  m.def("dropout_cpu_forward", &dropout_cpu_forward,
        "Dropout (optionally fused with a ReLU before it, or a residual added after it) with a "
        "counter-based mask -> (output, bool mask).",
        py::arg("x"), py::arg("p"), py::arg("seed"), py::arg("relu") = false,
        py::arg("inplace") = false, py::arg("residual") = py::none());
  m.def("dropout_cpu_backward", &dropout_cpu_backward, "grad_output * mask * scale.",
        py::arg("grad_output"), py::arg("mask"), py::arg("scale"), py::arg("inplace") = false);
  m.def("with_cuda", &with_cuda, "Whether the CUDA kernels were compiled in.");
  m.def("cpu_isa", &ms_deform_attn_cpu_isa,
        "Instruction set used by the CPU kernels: avx512, avx2 or baseline.");
  m.def("set_cpu_isa", &ms_deform_attn_set_cpu_isa,
        "Select the CPU kernels' instruction set: auto, baseline, avx2 or avx512.", py::arg("isa"));
}
