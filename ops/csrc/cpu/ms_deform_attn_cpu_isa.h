// Argument blocks and per-instruction-set entry points of the CPU kernels
// (ms_deform_attn_cpu_kernel.h). Plain C++ on purpose: see that header.
//
// Every standard header the kernels use is included here, so that a translation unit that
// includes this file before switching the target instruction set compiles no library code for
// that target (an inline library function compiled with AVX-512 could otherwise be picked by the
// linker for the baseline code too).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace detr_variants {
namespace msda_cpu {

enum class ScalarKind { kFloat, kDouble };

// What the forward and the backward kernels both read.
struct InputArgs {
  const void* value;           // (N, S, M, D)
  const int64_t* spatial;      // (L, 2) (H, W)
  const int64_t* level_start;  // (L,)
  const void* loc;             // (N, Lq, M, L, P, 2)
  const void* attn;            // (N, Lq, M, L, P)
  const void* zeros;           // D zeros, read for corners outside the map
  int64_t N, S, M, D, Lq, L, P;
  int64_t prefetch;  // prefetch distance in taps (0: none)
};

struct FwdArgs : InputArgs {
  void* out;  // (N, Lq, M, D)
};

struct BwdArgs : InputArgs {
  const void* grad_out;    // (N, Lq, M, D)
  void* grad_value;        // (N, S, M, D), chunk 0 accumulates here (must start at zero)
  void* grad_value_extra;  // (chunks - 1, N, S, M, D) zeroed buffers for chunks 1.., or null
  void* grad_loc;          // (N, Lq, M, L, P, 2), fully written
  void* grad_attn;         // (N, Lq, M, L, P), fully written
  int64_t chunks;          // query chunks per (n, m); work items = N * M * chunks
};

// One namespace per instruction set; each provides
//   forward:  computes out rows [begin, end) of the flattened (N * Lq) query index
//   backward: processes work items [begin, end) of the flattened (N, M, chunk) index;
//             sink_row points to D private scratch elements of the scalar type
#define MSDA_DECLARE_ISA(isa)                                                                   \
  namespace isa {                                                                               \
  void forward(const FwdArgs& a, ScalarKind kind, int64_t begin, int64_t end);                  \
  void backward(const BwdArgs& a, ScalarKind kind, int64_t begin, int64_t end, void* sink_row); \
  }

MSDA_DECLARE_ISA(baseline)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MSDA_HAVE_X86_VARIANTS 1
MSDA_DECLARE_ISA(avx2)
MSDA_DECLARE_ISA(avx512)
#endif

#undef MSDA_DECLARE_ISA

}  // namespace msda_cpu
}  // namespace detr_variants
