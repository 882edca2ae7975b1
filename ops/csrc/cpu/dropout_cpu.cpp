// CPU dropout with a counter-based mask (see dropout.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "dropout.h"

namespace detr_variants {
namespace {

// SplitMix64 (Steele et al. 2014): output k of the stream `seed`. Two elements share one output,
// one 32-bit half each.
inline uint64_t splitmix64(uint64_t seed, uint64_t k) {
  uint64_t z = seed + (k + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

constexpr int64_t kBlock = 1024;  // elements whose random bits are drawn in one batch

// The random bits of elements [2 * first_pair, 2 * first_pair + kBlock). The 64-bit multiplies
// only vectorise with AVX2 / AVX-512, so this one function is compiled for those too and the
// loader picks the variant the CPU supports.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#endif
void draw_bits(uint64_t seed, uint64_t first_pair, uint32_t* bits) {
  for (int64_t k = 0; k < kBlock / 2; ++k) {
    const uint64_t z = splitmix64(seed, first_pair + k);
    bits[2 * k] = static_cast<uint32_t>(z);
    bits[2 * k + 1] = static_cast<uint32_t>(z >> 32);
  }
}

template <typename scalar_t, bool kRelu, bool kResidual>
void forward_kernel(const scalar_t* x, const scalar_t* residual, scalar_t* out, uint8_t* mask,
                    int64_t n, uint64_t seed, uint32_t threshold, scalar_t scale) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 32, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t bits[kBlock];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * kBlock;
      const int64_t count = std::min(kBlock, n - start);
      draw_bits(seed, static_cast<uint64_t>(start / 2), bits);
      const scalar_t* xs = x + start;
      const scalar_t* rs = kResidual ? residual + start : nullptr;
      scalar_t* os = out + start;
      uint8_t* ms = mask + start;
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) {
        const scalar_t v = xs[j];
        const int keep = (bits[j] >= threshold) & (!kRelu | (v > scalar_t(0)));
        ms[j] = keep;
        const scalar_t dropped =
            v * (static_cast<scalar_t>(keep) * scale);  // x * 0 keeps NaNs, as torch
        os[j] = kResidual ? rs[j] + dropped : dropped;
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad, const uint8_t* mask, scalar_t* out, int64_t n,
                     scalar_t scale) {
  at::parallel_for(0, n, 32 * kBlock, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i)
      out[i] = grad[i] * (static_cast<scalar_t>(mask[i]) * scale);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dropout_cpu_forward(const at::Tensor& x, double p, int64_t seed,
                                                       bool relu, bool inplace,
                                                       const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.device().is_cpu(), "dropout_cpu_forward: expected a CPU tensor, got ", x.device());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_cpu_forward: p must be in [0, 1), got ", p);
  TORCH_CHECK(!inplace || x.is_contiguous(),
              "dropout_cpu_forward: in place needs a contiguous tensor");
  const at::Tensor input = x.contiguous();
  at::Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->device().is_cpu(),
                "dropout_cpu_forward: the residual must be a CPU tensor of x's shape and dtype");
    res = residual->contiguous();
  }
  at::Tensor out =
      inplace ? input : at::empty_like(input);  // the kernel reads x[i] before writing out[i]
  at::Tensor mask = at::empty(input.sizes(), input.options().dtype(at::kBool));
  const double levels = std::ldexp(1.0, 32);
  const uint32_t threshold =
      static_cast<uint32_t>(std::min(std::nearbyint(p * levels), levels - 1));
  const double scale = 1.0 / (1.0 - p);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dropout_cpu_forward", [&] {
    auto run = relu ? (res.defined() ? forward_kernel<scalar_t, true, true>
                                     : forward_kernel<scalar_t, true, false>)
                    : (res.defined() ? forward_kernel<scalar_t, false, true>
                                     : forward_kernel<scalar_t, false, false>);
    run(input.const_data_ptr<scalar_t>(), res.defined() ? res.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), reinterpret_cast<uint8_t*>(mask.mutable_data_ptr<bool>()),
        input.numel(), static_cast<uint64_t>(seed), threshold, static_cast<scalar_t>(scale));
  });
  return {out, mask};
}

at::Tensor dropout_cpu_backward(const at::Tensor& grad_output, const at::Tensor& mask, double scale,
                                bool inplace) {
  TORCH_CHECK(grad_output.device().is_cpu() && mask.device().is_cpu(),
              "dropout_cpu_backward: expected CPU tensors");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.sizes() == grad_output.sizes(),
              "dropout_cpu_backward: mask must be a bool tensor of the gradient's shape");
  TORCH_CHECK(!inplace || grad_output.is_contiguous(),
              "dropout_cpu_backward: in place needs a contiguous tensor");
  const at::Tensor grad = grad_output.contiguous();
  const at::Tensor keep = mask.contiguous();
  at::Tensor out = inplace ? grad : at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "dropout_cpu_backward", [&] {
    backward_kernel(grad.const_data_ptr<scalar_t>(),
                    reinterpret_cast<const uint8_t*>(keep.const_data_ptr<bool>()),
                    out.mutable_data_ptr<scalar_t>(), grad.numel(), static_cast<scalar_t>(scale));
  });
  return out;
}

}  // namespace detr_variants
