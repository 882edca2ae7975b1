// Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, eq. 3): native operators.
//
//   value              (N, S, M, D)         float tensor, levels concatenated along S
//   spatial_shapes     (L, 2) int64         (H_l, W_l)
//   level_start_index  (L,) int64           first row of level l in S
//   sampling_locations (N, Lq, M, L, P, 2)  (x, y), normalised to [0, 1]
//   attention_weights  (N, Lq, M, L, P)
//   -> output          (N, Lq, M * D)
//
// Bilinear sampling is that of F.grid_sample(mode="bilinear", padding_mode="zeros",
// align_corners=False) (see ms_deform_attn_bilinear.h). value, sampling_locations and
// attention_weights must share one floating dtype; inputs need not be contiguous.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace detr_variants {

// Checks shapes, dtypes and devices; throws c10::Error with a readable message.
void ms_deform_attn_check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights);

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

// Returns (grad_value, grad_sampling_locations, grad_attention_weights).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

// Instruction set used by the CPU kernels: "avx512", "avx2" or "baseline". set_cpu_isa accepts
// one of these or "auto" (the default choice: AVX2 if supported) and throws for one the CPU lacks.
std::string ms_deform_attn_cpu_isa();
void ms_deform_attn_set_cpu_isa(const std::string& isa);

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output);
#endif

}  // namespace detr_variants
