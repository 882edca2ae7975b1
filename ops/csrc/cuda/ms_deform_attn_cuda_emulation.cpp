// Host emulation of the CUDA kernels in ms_deform_attn_cuda.cu, for machines without a GPU.
//
// Not part of the extension (setup.py compiles only *.cu in this folder). It compiles the .cu as
// plain C++ with MSDA_CUDA_EMULATION defined and runs every kernel launch on CPU threads: one
// std::thread per CUDA thread of a block, blocks one after another, __syncthreads as a block
// barrier, __shfl_xor_sync through per-warp slots and barriers, atomicAdd as std::atomic_ref.
// The launchers (vector width choice, grid sizes, float32 grad buffers) run unchanged on CPU
// tensors. Slow, only for small inputs. Built and compared with the PyTorch reference by
// tests/test_ms_deform_attn.py::test_cuda_kernels_in_host_emulation (see ops/README.md).
#include <atomic>
#include <barrier>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

// Everything the .cu includes comes first, so that the macros below touch only the kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <type_traits>

#include "ms_deform_attn.h"
#include "ms_deform_attn_bilinear.h"

struct EmuDim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace msda_emu {
inline thread_local EmuDim3 thread_idx, block_idx;
inline EmuDim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;

struct Warp {
  std::unique_ptr<std::barrier<>> barrier;
  alignas(8) unsigned char slots[32][8];
};
inline std::vector<Warp>* warps = nullptr;
}  // namespace msda_emu

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __restrict__
#define threadIdx (msda_emu::thread_idx)
#define blockIdx (msda_emu::block_idx)
#define blockDim (msda_emu::block_dim)
#define gridDim (msda_emu::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__
#define __restrict__ __restrict

inline void __syncthreads() { msda_emu::block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "emulated shuffle of at most 8 bytes");
  const unsigned tid = msda_emu::thread_idx.x;
  msda_emu::Warp& warp = (*msda_emu::warps)[tid / 32];
  const unsigned lane = tid % 32;
  std::memcpy(warp.slots[lane], &value, sizeof(T));
  warp.barrier->arrive_and_wait();
  T result;
  std::memcpy(&result, warp.slots[lane ^ static_cast<unsigned>(lane_mask)], sizeof(T));
  warp.barrier->arrive_and_wait();
  return result;
}

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }

template <typename... KArgs>
struct EmulatedLaunch {
  void (*kernel)(KArgs...);
  int64_t blocks;
  int threads;

  template <typename... Args>
  void operator()(Args... args) const {
    TORCH_CHECK(threads % 32 == 0, "emulation: block size must be a multiple of 32");
    msda_emu::block_dim.x = static_cast<unsigned>(threads);
    msda_emu::grid_dim.x = static_cast<unsigned>(blocks);
    for (int64_t b = 0; b < blocks; ++b) {
      std::barrier<> block_barrier(threads);
      std::vector<msda_emu::Warp> warps(threads / 32);
      for (auto& w : warps) w.barrier = std::make_unique<std::barrier<>>(32);
      msda_emu::block_barrier = &block_barrier;
      msda_emu::warps = &warps;
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([this, b, t, args...] {
          msda_emu::thread_idx.x = static_cast<unsigned>(t);
          msda_emu::block_idx.x = static_cast<unsigned>(b);
          kernel(args...);
        });
      }
      for (auto& th : pool) th.join();
    }
  }
};

template <typename... KArgs>
EmulatedLaunch<KArgs...> msda_emulated_launch(int64_t blocks, int threads, size_t /*smem*/,
                                              void (*kernel)(KArgs...)) {
  return EmulatedLaunch<KArgs...>{kernel, blocks, threads};
}

// Storage behind the kernels' `extern __shared__ int64_t s_levels[]` (blocks run one at a time).
namespace detr_variants {
namespace {
int64_t s_levels[4096];
}
}  // namespace detr_variants

#define MSDA_CUDA_EMULATION 1
#include "cuda/ms_deform_attn_cuda.cu"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ms_deform_attn_forward", &detr_variants::ms_deform_attn_cuda_forward);
  m.def("ms_deform_attn_backward", &detr_variants::ms_deform_attn_cuda_backward);
}
