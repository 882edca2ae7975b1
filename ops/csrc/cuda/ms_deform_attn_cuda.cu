// CUDA kernels of multi-scale deformable attention (Deformable DETR), float32 / float64 / float16 /
// bfloat16, accumulating in float32 (float64 for float64).
//
// Structure mirrors the CPU kernels (ms_deform_attn_cpu_kernel.h) and shares their bilinear
// arithmetic (ms_deform_attn_bilinear.h):
//   * forward: one thread per (n, q, m, channel group of VEC channels). The thread walks the L*P
//     samples of its (n, q, m) row, reads each valid corner with one VEC-wide vector load and
//     accumulates in registers; nothing is materialised.
//   * backward: a group of GW threads (a power of two <= 32, lanes of one warp) per (n, q, m) row;
//     thread g handles channel groups g, g + GW, ... For every sample the partial channel sums
//     for the attention weight and the two location gradients are reduced across the group with
//     warp shuffles (no shared memory, no atomics); grad_value is the only scatter and the only
//     atomicAdd (float4/float2 vector atomics on sm_90+). For float16/bfloat16 grad_value is
//     accumulated in a float32 buffer and converted at the end.
// Value layout (N, S, M, D) keeps each tap's D channels contiguous, so a group's loads of one
// corner are coalesced.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "ms_deform_attn.h"
#include "ms_deform_attn_bilinear.h"

// Launch plumbing. ms_deform_attn_cuda_emulation.cpp compiles this file as plain C++ with
// MSDA_CUDA_EMULATION defined and runs the kernels on CPU threads (a host emulation of blocks,
// warps, shuffles and atomics), so the kernels and launchers can be checked without a GPU.
#ifdef MSDA_CUDA_EMULATION
#define MSDA_LAUNCH(blocks, threads, smem, stream, ...) msda_emulated_launch(blocks, threads, smem, __VA_ARGS__)
#define MSDA_DEVICE_GUARD(tensor)
#define MSDA_CURRENT_STREAM() nullptr
#define MSDA_LAUNCH_CHECK()
#define MSDA_CHECK_CUDA_TENSOR(tensor)
#else
#define MSDA_LAUNCH(blocks, threads, smem, stream, ...) __VA_ARGS__<<<blocks, threads, smem, stream>>>
#define MSDA_DEVICE_GUARD(tensor) const c10::cuda::CUDAGuard device_guard((tensor).device())
#define MSDA_CURRENT_STREAM() c10::cuda::getCurrentCUDAStream()
#define MSDA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define MSDA_CHECK_CUDA_TENSOR(tensor) \
  TORCH_CHECK((tensor).is_cuda(), "ms_deform_attn_cuda: value is not a CUDA tensor")
#endif

namespace detr_variants {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void load_pack(const scalar_t* __restrict__ p, acc_t (&out)[VEC]) {
  const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<acc_t>(pk.v[i]);
}

template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void store_pack(scalar_t* __restrict__ p, const acc_t (&in)[VEC]) {
  Pack<scalar_t, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = static_cast<scalar_t>(in[i]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = pk;
}

template <int VEC>
__device__ __forceinline__ void atomic_add_pack(float* p, const float (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC / 4; ++j) {
      atomicAdd(reinterpret_cast<float4*>(p) + j, make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]));
    }
    return;
  } else if constexpr (VEC % 2 == 0) {
#pragma unroll
    for (int j = 0; j < VEC / 2; ++j) {
      atomicAdd(reinterpret_cast<float2*>(p) + j, make_float2(v[2 * j], v[2 * j + 1]));
    }
    return;
  }
#endif
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(p + i, v[i]);
}

template <int VEC>
__device__ __forceinline__ void atomic_add_pack(double* p, const double (&v)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(p + i, v[i]);
}

// (H, W, start) of every level, staged in shared memory once per block.
__device__ __forceinline__ void load_levels(const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                            int64_t L, int64_t* s_levels) {
  for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
    s_levels[3 * i] = shapes[2 * i];
    s_levels[3 * i + 1] = shapes[2 * i + 1];
    s_levels[3 * i + 2] = starts[i];
  }
  __syncthreads();
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    msda_forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                        const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                        const scalar_t* __restrict__ attn, scalar_t* __restrict__ out, int64_t S, int64_t M,
                        int64_t D, int64_t Lq, int64_t L, int64_t P, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ int64_t s_levels[];
  load_levels(shapes, starts, L, s_levels);

  const int64_t G = D / VEC;  // channel groups per row
  const int64_t pos_stride = M * D;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = t % G;
    const int64_t row = t / G;  // (n * Lq + q) * M + m
    const int64_t m = row % M;
    const int64_t n = row / M / Lq;
    const scalar_t* value_nm = value + n * S * pos_stride + m * D + g * VEC;
    const scalar_t* loc_p = loc + row * L * P * 2;
    const scalar_t* attn_p = attn + row * L * P;
    acc_t acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = s_levels[3 * l], W = s_levels[3 * l + 1];
      const scalar_t* vbase = value_nm + s_levels[3 * l + 2] * pos_stride;
      for (int64_t p = 0; p < P; ++p, loc_p += 2, ++attn_p) {
        const acc_t w = static_cast<acc_t>(*attn_p);
        msda::BilinearTap<acc_t, int64_t> tap;
        if (!msda::bilinear_tap<acc_t, int64_t>(static_cast<acc_t>(loc_p[0]), static_cast<acc_t>(loc_p[1]), w, H,
                                                W, pos_stride, tap)) {
          continue;
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const acc_t wk = w * tap.w[k];
          if (tap.valid[k]) {
            acc_t v[VEC];
            load_pack<scalar_t, acc_t, VEC>(vbase + tap.offset[k], v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[i] += wk * v[i];
          } else {
            // a corner outside the map reads zero, as on the CPU: NaN stays NaN (wk * 0)
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[i] += wk * acc_t(0);
          }
        }
      }
    }
    store_pack<scalar_t, acc_t, VEC>(out + row * D + g * VEC, acc);
  }
}

// grad_value is accumulated in gv_t: float for float16 / bfloat16 / float32, double for float64.
template <typename scalar_t, typename gv_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    msda_backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                         const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                         const scalar_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                         gv_t* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
                         scalar_t* __restrict__ grad_attn, int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L,
                         int64_t P, int64_t rows, int gw_log2) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(std::is_same<acc_t, gv_t>::value, "grad_value accumulates in the math type");
  extern __shared__ int64_t s_levels[];
  load_levels(shapes, starts, L, s_levels);

  const int GW = 1 << gw_log2;  // threads per row; divides 32, so a row never straddles warps
  const int64_t G = D / VEC;
  const bool single = G <= GW;  // one channel group per thread: grad_out stays in registers
  const int64_t pos_stride = M * D;
  const int64_t total = rows * GW;
  // Whole blocks advance together, so every lane of a warp reaches each shuffle.
  for (int64_t base = blockIdx.x * static_cast<int64_t>(blockDim.x); base < total;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = base + threadIdx.x;
    const bool active = t < total;
    const int64_t g = active ? t % GW : 0;
    const int64_t row = active ? t / GW : 0;
    const int64_t m = row % M;
    const int64_t n = row / M / Lq;
    const int64_t value_off = n * S * pos_stride + m * D;
    const scalar_t* value_nm = value + value_off;
    gv_t* grad_value_nm = grad_value + value_off;
    const scalar_t* grad_out_row = grad_out + row * D;
    const scalar_t* loc_p = loc + row * L * P * 2;
    const scalar_t* attn_p = attn + row * L * P;

    acc_t go_cached[VEC];
    if (active && single && g < G) {
      load_pack<scalar_t, acc_t, VEC>(grad_out_row + g * VEC, go_cached);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) go_cached[i] = acc_t(0);
    }

    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = s_levels[3 * l], W = s_levels[3 * l + 1];
      const int64_t start = s_levels[3 * l + 2] * pos_stride;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t lp = l * P + p;
        acc_t s_attn = 0, s_w = 0, s_h = 0;
        acc_t w = 0;
        bool inside = false;
        msda::BilinearTap<acc_t, int64_t> tap;
        if (active) {
          w = static_cast<acc_t>(attn_p[lp]);
          inside = msda::bilinear_tap<acc_t, int64_t>(static_cast<acc_t>(loc_p[2 * lp]),
                                                      static_cast<acc_t>(loc_p[2 * lp + 1]), w, H, W, pos_stride,
                                                      tap);
        }
        if (inside) {
          for (int64_t cg = g; cg < G; cg += GW) {
            const int64_t ch = cg * VEC;
            acc_t go[VEC];
            if (single) {
#pragma unroll
              for (int i = 0; i < VEC; ++i) go[i] = go_cached[i];
            } else {
              load_pack<scalar_t, acc_t, VEC>(grad_out_row + ch, go);
            }
            acc_t x[4][VEC];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              if (tap.valid[k]) {
                load_pack<scalar_t, acc_t, VEC>(value_nm + start + tap.offset[k] + ch, x[k]);
              } else {
#pragma unroll
                for (int i = 0; i < VEC; ++i) x[k][i] = acc_t(0);
              }
            }
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              s_attn += go[i] * (tap.w[0] * x[0][i] + tap.w[1] * x[1][i] + tap.w[2] * x[2][i] + tap.w[3] * x[3][i]);
              s_w += go[i] * (tap.hh * (x[1][i] - x[0][i]) + tap.lh * (x[3][i] - x[2][i]));
              s_h += go[i] * (tap.hw * (x[2][i] - x[0][i]) + tap.lw * (x[3][i] - x[1][i]));
            }
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              if (tap.valid[k]) {
                const acc_t wk = w * tap.w[k];
                acc_t upd[VEC];
#pragma unroll
                for (int i = 0; i < VEC; ++i) upd[i] = wk * go[i];
                atomic_add_pack<VEC>(grad_value_nm + start + tap.offset[k] + ch, upd);
              }
            }
          }
        }
        // Reduce the channel sums over the row's GW lanes (uniform control flow here).
        for (int o = GW / 2; o > 0; o >>= 1) {
          s_attn += __shfl_xor_sync(kFullMask, s_attn, o);
          s_w += __shfl_xor_sync(kFullMask, s_w, o);
          s_h += __shfl_xor_sync(kFullMask, s_h, o);
        }
        if (active && g == 0) {
          grad_attn[row * L * P + lp] = static_cast<scalar_t>(s_attn);
          grad_loc[(row * L * P + lp) * 2] = static_cast<scalar_t>(w * static_cast<acc_t>(W) * s_w);
          grad_loc[(row * L * P + lp) * 2 + 1] = static_cast<scalar_t>(w * static_cast<acc_t>(H) * s_h);
        }
      }
    }
  }
}

// Widest vector (in elements) per dtype; the kernels are also built for 2 and 1 where that
// differs, and the launcher picks the widest one that divides D and keeps every row aligned.
template <typename scalar_t>
struct MaxVec {
  static constexpr int value = 16 / sizeof(scalar_t) > 8 ? 8 : 16 / sizeof(scalar_t);
};

int pick_vec(int max_vec, int64_t D, std::initializer_list<std::pair<const void*, int64_t>> ptrs) {
  for (int vec : {max_vec, 2, 1}) {
    if (vec > max_vec || D % vec != 0) continue;
    bool aligned = true;
    for (const auto& pe : ptrs) {
      aligned = aligned && reinterpret_cast<uintptr_t>(pe.first) % static_cast<uintptr_t>(vec * pe.second) == 0;
    }
    if (aligned) return vec;
  }
  return 1;
}

template <typename scalar_t, typename F>
void dispatch_vec(int vec, F&& f) {
  constexpr int kMax = MaxVec<scalar_t>::value;
  if (vec == kMax) {
    f(std::integral_constant<int, kMax>{});
  } else if constexpr (kMax > 2) {
    if (vec == 2) {
      f(std::integral_constant<int, 2>{});
    } else {
      f(std::integral_constant<int, 1>{});
    }
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

int64_t blocks_for(int64_t threads_total) {
  const int64_t blocks = (threads_total + kThreads - 1) / kThreads;
  return blocks < 1 ? 1 : (blocks > INT32_MAX ? INT32_MAX : blocks);
}

struct Prepared {
  at::Tensor value, shapes, starts, loc, attn;
  int64_t N, S, M, D, Lq, L, P;
};

Prepared prepare(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                 const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  ms_deform_attn_check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  MSDA_CHECK_CUDA_TENSOR(value);
  Prepared p;
  p.value = value.contiguous();
  p.shapes = spatial_shapes.to(value.device()).contiguous();
  p.starts = level_start_index.to(value.device()).contiguous();
  p.loc = sampling_locations.contiguous();
  p.attn = attention_weights.contiguous();
  p.N = value.size(0);
  p.S = value.size(1);
  p.M = value.size(2);
  p.D = value.size(3);
  p.Lq = sampling_locations.size(1);
  p.L = sampling_locations.size(3);
  p.P = sampling_locations.size(4);
  return p;
}

}  // namespace

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  MSDA_DEVICE_GUARD(value);
  Prepared a = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  at::Tensor out = at::empty({a.N, a.Lq, a.M * a.D}, a.value.options());
  if (out.numel() == 0) return out;
  const size_t smem = static_cast<size_t>(3 * a.L) * sizeof(int64_t);
  cudaStream_t stream = MSDA_CURRENT_STREAM();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.value.scalar_type(), "ms_deform_attn_cuda_forward", [&] {
    const int64_t es = sizeof(scalar_t);
    const int vec = pick_vec(MaxVec<scalar_t>::value, a.D, {{a.value.data_ptr(), es}, {out.data_ptr(), es}});
    dispatch_vec<scalar_t>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      const int64_t total = a.N * a.Lq * a.M * (a.D / VEC);
      MSDA_LAUNCH(blocks_for(total), kThreads, smem, stream, msda_forward_kernel<scalar_t, VEC>)(
          a.value.data_ptr<scalar_t>(), a.shapes.data_ptr<int64_t>(), a.starts.data_ptr<int64_t>(),
          a.loc.data_ptr<scalar_t>(), a.attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), a.S, a.M, a.D, a.Lq,
          a.L, a.P, total);
      MSDA_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  MSDA_DEVICE_GUARD(value);
  Prepared a = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.device() == value.device() && grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn_cuda_backward: grad_output must be on ", value.device(), " with dtype ",
              value.scalar_type());
  TORCH_CHECK(grad_output.numel() == a.N * a.Lq * a.M * a.D, "ms_deform_attn_cuda_backward: grad_output has ",
              grad_output.numel(), " elements, expected ", a.N * a.Lq * a.M * a.D, " for (N, Lq, M*D)");
  const at::Tensor grad_out = grad_output.contiguous();

  const bool reduced = a.value.scalar_type() == at::kHalf || a.value.scalar_type() == at::kBFloat16;
  at::Tensor grad_value_acc = reduced ? at::zeros(a.value.sizes(), a.value.options().dtype(at::kFloat))
                                      : at::zeros_like(a.value);
  at::Tensor grad_loc = at::empty_like(a.loc);
  at::Tensor grad_attn = at::empty_like(a.attn);
  const int64_t rows = a.N * a.Lq * a.M;
  if (rows == 0 || a.D == 0 || a.L * a.P == 0) {
    grad_loc.zero_();
    grad_attn.zero_();
  } else {
    const size_t smem = static_cast<size_t>(3 * a.L) * sizeof(int64_t);
    cudaStream_t stream = MSDA_CURRENT_STREAM();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, a.value.scalar_type(), "ms_deform_attn_cuda_backward", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const int64_t es = sizeof(scalar_t);
          const int vec = pick_vec(MaxVec<scalar_t>::value, a.D,
                                   {{a.value.data_ptr(), es},
                                    {grad_out.data_ptr(), es},
                                    {grad_value_acc.data_ptr(), static_cast<int64_t>(sizeof(acc_t))}});
          dispatch_vec<scalar_t>(vec, [&](auto vec_c) {
            constexpr int VEC = decltype(vec_c)::value;
            const int64_t G = a.D / VEC;
            int gw_log2 = 0;
            while ((int64_t(1) << gw_log2) < G && gw_log2 < 5) ++gw_log2;
            const int64_t total = rows << gw_log2;
            MSDA_LAUNCH(blocks_for(total), kThreads, smem, stream, msda_backward_kernel<scalar_t, acc_t, VEC>)(
                a.value.data_ptr<scalar_t>(), a.shapes.data_ptr<int64_t>(), a.starts.data_ptr<int64_t>(),
                a.loc.data_ptr<scalar_t>(), a.attn.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), a.S,
                a.M, a.D, a.Lq, a.L, a.P, rows, gw_log2);
            MSDA_LAUNCH_CHECK();
          });
        });
  }
  at::Tensor grad_value = reduced ? grad_value_acc.to(a.value.scalar_type()) : grad_value_acc;
  return std::make_tuple(grad_value, grad_loc, grad_attn);
}

}  // namespace detr_variants
