// Dropout with a counter-based random mask (CPU): the keep decision of element i is a hash of
// (seed, i), so the mask is drawn in parallel, vectorised and independent of the thread count,
// where PyTorch's CPU dropout draws one mt19937 sample per element on one thread.
//
//   keep_i = hash_i >= threshold,  P(keep) = 1 - threshold / 2^32  (p quantised to 2^-32)
//   out_i  = keep_i ? x_i * scale : 0      (+ residual_i, optionally)
//
// With `relu` the ReLU is fused in: keep_i also needs x_i > 0, so one mask serves both.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace detr_variants {

// Returns (output, mask), mask a bool tensor of x's shape; x float32/float64 on the CPU. With
// `inplace` the output is x itself (x must be contiguous); with a `residual` (x's shape and dtype)
// the output is residual + dropout(x), one pass instead of two.
std::tuple<at::Tensor, at::Tensor> dropout_cpu_forward(const at::Tensor& x, double p, int64_t seed,
                                                       bool relu, bool inplace,
                                                       const c10::optional<at::Tensor>& residual);

// grad_output * mask * scale, in grad_output itself with `inplace`.
at::Tensor dropout_cpu_backward(const at::Tensor& grad_output, const at::Tensor& mask, double scale,
                                bool inplace);

}  // namespace detr_variants
