// CPU entry points of multi-scale deformable attention: input handling, threading
// (at::parallel_for) and the run-time choice of the instruction-set variant of the kernels in
// ms_deform_attn_cpu_kernel.h.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/ms_deform_attn_cpu_isa.h"
#include "ms_deform_attn.h"

namespace detr_variants {
namespace {

using msda_cpu::BwdArgs;
using msda_cpu::FwdArgs;
using msda_cpu::ScalarKind;

enum Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

bool isa_supported(int isa) {
  if (isa == kBaseline) return true;
#ifdef MSDA_HAVE_X86_VARIANTS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kAvx2) return avx2;
  if (isa == kAvx512) {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  }
#endif
  return false;
}

int best_isa() {
  // AVX2 by default: AVX-512 measured no faster on the development machine (AMD EPYC; the gather
  // is bound by cache-miss latency, not by vector width) and can lower the clock on some Intel
  // parts. Both are several times faster than the SSE2 baseline. AVX-512 stays selectable.
  if (isa_supported(kAvx2)) return kAvx2;
  return kBaseline;
}

int parse_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  if (name == "baseline") return kBaseline;
  if (name == "avx2") return kAvx2;
  if (name == "avx512") return kAvx512;
  TORCH_CHECK(false, "ms_deform_attn: unknown CPU instruction set '", name,
              "' (use auto, baseline, avx2 or avx512)");
  return kBaseline;
}

int initial_isa() {
  // DETR_VARIANTS_CPU_ISA=baseline|avx2|avx512 forces a variant (falls back to the best supported
  // one if the CPU lacks it).
  const char* env = std::getenv("DETR_VARIANTS_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    const std::string name(env);
    if (name == "baseline" || name == "avx2" || name == "avx512") {
      const int isa = parse_isa(name);
      if (isa_supported(isa)) return isa;
    }
  }
  return best_isa();
}

std::atomic<int>& current_isa() {
  static std::atomic<int> isa{initial_isa()};
  return isa;
}

using ForwardFn = void (*)(const FwdArgs&, ScalarKind, int64_t, int64_t);
using BackwardFn = void (*)(const BwdArgs&, ScalarKind, int64_t, int64_t, void*);

ForwardFn forward_fn() {
#ifdef MSDA_HAVE_X86_VARIANTS
  switch (current_isa().load()) {
    case kAvx512:
      return &msda_cpu::avx512::forward;
    case kAvx2:
      return &msda_cpu::avx2::forward;
    default:
      break;
  }
#endif
  return &msda_cpu::baseline::forward;
}

BackwardFn backward_fn() {
#ifdef MSDA_HAVE_X86_VARIANTS
  switch (current_isa().load()) {
    case kAvx512:
      return &msda_cpu::avx512::backward;
    case kAvx2:
      return &msda_cpu::avx2::backward;
    default:
      break;
  }
#endif
  return &msda_cpu::baseline::backward;
}

ScalarKind scalar_kind(const at::Tensor& value) {
  switch (value.scalar_type()) {
    case at::kFloat:
      return ScalarKind::kFloat;
    case at::kDouble:
      return ScalarKind::kDouble;
    default:
      TORCH_CHECK(false, "ms_deform_attn: the CPU kernel supports float32 and float64, got ",
                  value.scalar_type(),
                  " (use the PyTorch path, ms_deform_attn_pytorch, for others)");
  }
  return ScalarKind::kFloat;
}

void check_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
               const at::Tensor& level_start_index) {
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn_cpu: value is not a CPU tensor");
  TORCH_CHECK(spatial_shapes.device().is_cpu() && level_start_index.device().is_cpu(),
              "ms_deform_attn_cpu: spatial_shapes and level_start_index must be CPU tensors");
}

int64_t prefetch_distance() {
  static const int64_t distance = [] {
    const char* env = std::getenv("DETR_VARIANTS_MSDA_PREFETCH");
    return env != nullptr && *env != '\0' ? std::max<int64_t>(0, std::atoll(env)) : int64_t(4);
  }();
  return distance;
}

// The inputs of both passes, validated and made contiguous; `args` points into these tensors.
struct PreparedInputs {
  at::Tensor value, shapes, starts, loc, attn, zeros;
  ScalarKind kind;
  msda_cpu::InputArgs args;
};

PreparedInputs prepare_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index,
                              const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights) {
  ms_deform_attn_check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights);
  check_cpu(value, spatial_shapes, level_start_index);
  PreparedInputs p;
  p.kind = scalar_kind(value);
  p.value = value.contiguous();
  p.shapes = spatial_shapes.contiguous();
  p.starts = level_start_index.contiguous();
  p.loc = sampling_locations.contiguous();
  p.attn = attention_weights.contiguous();
  p.zeros = at::zeros({p.value.size(3)}, p.value.options());
  msda_cpu::InputArgs& a = p.args;
  a.value = p.value.data_ptr();
  a.spatial = p.shapes.data_ptr<int64_t>();
  a.level_start = p.starts.data_ptr<int64_t>();
  a.loc = p.loc.data_ptr();
  a.attn = p.attn.data_ptr();
  a.zeros = p.zeros.data_ptr();
  a.N = p.value.size(0);
  a.S = p.value.size(1);
  a.M = p.value.size(2);
  a.D = p.value.size(3);
  a.Lq = p.loc.size(1);
  a.L = p.loc.size(3);
  a.P = p.loc.size(4);
  a.prefetch = prefetch_distance();
  return p;
}

}  // namespace

std::string ms_deform_attn_cpu_isa() {
  switch (current_isa().load()) {
    case kAvx512:
      return "avx512";
    case kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

void ms_deform_attn_set_cpu_isa(const std::string& name) {
  const int isa = parse_isa(name);
  TORCH_CHECK(isa_supported(isa), "ms_deform_attn: this CPU (or build) does not support ", name);
  current_isa().store(isa);
}

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const PreparedInputs in = prepare_inputs(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights);
  const int64_t N = in.args.N, M = in.args.M, D = in.args.D, Lq = in.args.Lq, L = in.args.L,
                P = in.args.P;
  at::Tensor out = at::empty({N, Lq, M * D}, in.value.options());
  if (out.numel() == 0) return out;

  FwdArgs a{in.args};
  a.out = out.data_ptr();

  // Roughly 32k multiply-adds per task before it is worth waking a second thread.
  const int64_t per_query = std::max<int64_t>(1, M * L * P * D);
  const int64_t grain = std::max<int64_t>(1, 32768 / per_query);
  const ForwardFn fn = forward_fn();
  // Each output row is produced by exactly one task in a fixed order, so the result is bitwise
  // independent of the thread count.
  at::parallel_for(0, N * Lq, grain,
                   [&](int64_t begin, int64_t end) { fn(a, in.kind, begin, end); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const PreparedInputs in = prepare_inputs(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights);
  const at::Tensor& v = in.value;
  const int64_t N = in.args.N, S = in.args.S, M = in.args.M, D = in.args.D, Lq = in.args.Lq,
                L = in.args.L, P = in.args.P;
  TORCH_CHECK(grad_output.device().is_cpu() && grad_output.scalar_type() == v.scalar_type(),
              "ms_deform_attn_cpu_backward: grad_output must be a CPU tensor of dtype ",
              v.scalar_type());
  TORCH_CHECK(grad_output.numel() == N * Lq * M * D,
              "ms_deform_attn_cpu_backward: grad_output has ", grad_output.numel(),
              " elements, expected ", N * Lq * M * D, " for (N, Lq, M*D)");
  const at::Tensor grad_out = grad_output.contiguous();

  at::Tensor grad_value = at::zeros_like(v);
  at::Tensor grad_loc = at::empty_like(in.loc);
  at::Tensor grad_attn = at::empty_like(in.attn);
  if (N * Lq * M == 0 || D == 0 || L * P == 0) {
    grad_loc.zero_();
    grad_attn.zero_();
    return std::make_tuple(grad_value, grad_loc, grad_attn);
  }

  // Work items are (n, m, query chunk); an item owns grad_value[n, :, m, :] of its chunk's buffer.
  // One chunk whenever N * M already keeps every thread busy: no extra buffer, and the result is
  // then independent of the thread count. Otherwise a few chunks, each with its own zeroed copy of
  // grad_value, as long as zeroing and summing those copies stays cheap next to the sampling work.
  const int64_t threads = at::get_num_threads();
  const int64_t NM = N * M;
  int64_t chunks = 1;
  if (NM < threads) {
    chunks = (threads + NM - 1) / NM;
    const int64_t affordable = 1 + (Lq * L * P) / std::max<int64_t>(1, 2 * S);
    chunks = std::max<int64_t>(1, std::min({chunks, affordable, Lq}));
  }
  at::Tensor extra;
  if (chunks > 1) extra = at::zeros({chunks - 1, N, S, M, D}, v.options());

  BwdArgs a{in.args};
  a.grad_out = grad_out.data_ptr();
  a.grad_value = grad_value.data_ptr();
  a.grad_value_extra = chunks > 1 ? extra.data_ptr() : nullptr;
  a.grad_loc = grad_loc.data_ptr();
  a.grad_attn = grad_attn.data_ptr();
  a.chunks = chunks;

  const BackwardFn fn = backward_fn();
  at::parallel_for(0, NM * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sink(static_cast<size_t>(D));  // scratch row, large enough for any dtype
    fn(a, in.kind, begin, end, sink.data());
  });
  for (int64_t k = 0; k + 1 < chunks; ++k) grad_value.add_(extra[k]);
  return std::make_tuple(grad_value, grad_loc, grad_attn);
}

}  // namespace detr_variants
