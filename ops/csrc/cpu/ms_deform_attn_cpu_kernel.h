// CPU kernels of multi-scale deformable attention, written once and compiled once per
// instruction set (see ms_deform_attn_cpu_isa.h). Plain C++: no ATen here, so that a translation
// unit can compile this header under `#pragma GCC target(...)` without also compiling ATen's
// inline functions for that target.
//
// Before including this file, define MSDA_ISA to the namespace name of the variant.
//
// Layout (all contiguous):
//   value        (N, S, M, D)        levels concatenated along S, level l starts at level_start[l]
//   spatial      (L, 2) int64        (H_l, W_l)
//   loc          (N, Lq, M, L, P, 2) (x, y) in [0, 1]
//   attn         (N, Lq, M, L, P)
//   out          (N, Lq, M, D)
//
// Forward: one work item per (n, q). The taps of all heads are set up first (corner row pointers
// and weights, samples outside the map dropped); then for each head the D output channels are
// accumulated in one fused gather + bilinear + weighted-sum pass (nothing is materialised), the
// inner loop running over the D contiguous channels of a corner row. The corner rows of the taps
// a.prefetch steps ahead (across query boundaries) are prefetched: with scattered sampling
// locations the gather is bound by cache-miss latency, not arithmetic.
//
// Backward: one work item per (n, m, query chunk). The item owns the slice grad_value[n, :, m, :]
// of its chunk's buffer, so grad_value is accumulated without atomics and without races; with one
// chunk (the usual case, N*M >= threads) the result does not depend on the thread count. The
// location / attention-weight gradients are reductions over channels kept in (SIMD) registers.

#ifndef MSDA_ISA
#error "define MSDA_ISA before including ms_deform_attn_cpu_kernel.h"
#endif

#include "cpu/ms_deform_attn_cpu_isa.h"
#include "ms_deform_attn_bilinear.h"

namespace detr_variants {
namespace msda_cpu {
namespace MSDA_ISA {

// Prefetches the cache lines of one corner row (rw = 1: about to be written).
template <typename scalar_t>
static inline void prefetch_row(const scalar_t* p, int64_t bytes, int rw) {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) {
    if (rw) {
      __builtin_prefetch(c + o, 1, 3);
    } else {
      __builtin_prefetch(c + o, 0, 3);
    }
  }
#else
  (void)p;
  (void)bytes;
  (void)rw;
#endif
}

// A forward tap: four corner rows (pointing to `zeros` for corners outside the map) and their
// bilinear weights already multiplied by the attention weight.
template <typename scalar_t>
struct FwdTap {
  const scalar_t* v[4];
  scalar_t w[4];
};

// Computes the taps of query row `idx` (all heads), skipping samples that contribute nothing.
// head_end[m] = one past the last tap of head m. Returns the number of taps.
template <typename scalar_t>
static inline int64_t forward_taps(const FwdArgs& a, int64_t idx, int64_t pos_stride, int64_t D,
                                   const scalar_t* value, const scalar_t* loc, const scalar_t* attn,
                                   const scalar_t* zeros, FwdTap<scalar_t>* taps, int64_t* head_end) {
  const int64_t M = a.M, L = a.L, P = a.P;
  const int64_t n = idx / a.Lq;
  const scalar_t* value_n = value + n * a.S * pos_stride;
  int64_t count = 0;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t row = idx * M + m;
    const scalar_t* loc_p = loc + row * L * P * 2;
    const scalar_t* attn_p = attn + row * L * P;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = a.spatial[2 * l], W = a.spatial[2 * l + 1];
      const scalar_t* vbase = value_n + a.level_start[l] * pos_stride + m * D;
      for (int64_t p = 0; p < P; ++p, loc_p += 2, ++attn_p) {
        const scalar_t w = *attn_p;
        msda::BilinearTap<scalar_t, int64_t> t;
        if (!msda::bilinear_tap<scalar_t, int64_t>(loc_p[0], loc_p[1], w, H, W, pos_stride, t)) continue;
        FwdTap<scalar_t>& tap = taps[count++];
        for (int k = 0; k < 4; ++k) {
          tap.v[k] = t.valid[k] ? vbase + t.offset[k] : zeros;
          tap.w[k] = w * t.w[k];
        }
      }
    }
    head_end[m] = count;
  }
  return count;
}

template <typename scalar_t, int DC>
static void forward_range(const FwdArgs& a, int64_t begin, int64_t end) {
  const int64_t D = DC > 0 ? DC : a.D;
  const int64_t M = a.M, L = a.L, P = a.P;
  const int64_t pos_stride = M * D;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  const scalar_t* value = static_cast<const scalar_t*>(a.value);
  const scalar_t* loc = static_cast<const scalar_t*>(a.loc);
  const scalar_t* attn = static_cast<const scalar_t*>(a.attn);
  scalar_t* out = static_cast<scalar_t*>(a.out);
  const scalar_t* zeros = static_cast<const scalar_t*>(a.zeros);

  // Taps of the current and of the next query row: prefetching runs a.prefetch taps ahead,
  // across the row boundary. Each tap reads four D-channel rows at unrelated addresses, so
  // starting the loads of later taps early overlaps their cache misses.
  const int64_t max_taps = M * L * P;
  std::vector<FwdTap<scalar_t>> tap_storage(2 * static_cast<size_t>(max_taps));
  std::vector<int64_t> end_storage(2 * static_cast<size_t>(M));
  FwdTap<scalar_t>* cur = tap_storage.data();
  FwdTap<scalar_t>* nxt = cur + max_taps;
  int64_t* cur_end = end_storage.data();
  int64_t* nxt_end = cur_end + M;

  // Fixed D: the accumulator lives in registers. Dynamic D: accumulate in the output row.
  scalar_t acc_local[DC > 0 ? DC : 1];

  int64_t n_cur = begin < end ? forward_taps(a, begin, pos_stride, D, value, loc, attn, zeros, cur, cur_end) : 0;
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t n_nxt =
        idx + 1 < end ? forward_taps(a, idx + 1, pos_stride, D, value, loc, attn, zeros, nxt, nxt_end) : 0;
    for (int64_t i = 0; i < a.prefetch && i < n_cur; ++i) {
      for (int k = 0; k < 4; ++k) prefetch_row(cur[i].v[k], row_bytes, 0);
    }
    int64_t i = 0;
    for (int64_t m = 0; m < M; ++m) {
      scalar_t* out_p = out + (idx * M + m) * D;
      scalar_t* __restrict acc = DC > 0 ? acc_local : out_p;
      for (int64_t c = 0; c < D; ++c) acc[c] = scalar_t(0);
      for (; i < cur_end[m]; ++i) {
        const int64_t j = i + a.prefetch;
        const FwdTap<scalar_t>* ahead = j < n_cur ? cur + j : (j - n_cur < n_nxt ? nxt + (j - n_cur) : nullptr);
        if (a.prefetch > 0 && ahead != nullptr) {
          for (int k = 0; k < 4; ++k) prefetch_row(ahead->v[k], row_bytes, 0);
        }
        const FwdTap<scalar_t>& t = cur[i];
        const scalar_t* __restrict v0 = t.v[0];
        const scalar_t* __restrict v1 = t.v[1];
        const scalar_t* __restrict v2 = t.v[2];
        const scalar_t* __restrict v3 = t.v[3];
        const scalar_t w0 = t.w[0], w1 = t.w[1], w2 = t.w[2], w3 = t.w[3];
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) {
          acc[c] += w0 * v0[c] + w1 * v1[c] + w2 * v2[c] + w3 * v3[c];
        }
      }
      if (DC > 0) {
        for (int64_t c = 0; c < D; ++c) out_p[c] = acc[c];
      }
    }
    std::swap(cur, nxt);
    std::swap(cur_end, nxt_end);
    n_cur = n_nxt;
  }
}

// A backward tap: corner rows of value (or `zeros`) and of grad_value (or the private `sink`),
// the bilinear factors, and where its location / weight gradients go.
template <typename scalar_t>
struct BwdTap {
  const scalar_t* v[4];
  scalar_t* gv[4];
  scalar_t b[4];
  scalar_t lh, lw, hh, hw;
  scalar_t w, scale_x, scale_y;  // attention weight, w * W, w * H
  scalar_t* gloc;
  scalar_t* gattn;
};

// Taps of query row q of head m (batch n); samples that contribute nothing get zero gradients
// here and no tap. Returns the number of taps.
template <typename scalar_t>
static inline int64_t backward_taps(const BwdArgs& a, int64_t n, int64_t m, int64_t q, int64_t pos_stride,
                                    const scalar_t* value_nm, scalar_t* gv_nm, const scalar_t* loc,
                                    const scalar_t* attn, scalar_t* grad_loc, scalar_t* grad_attn,
                                    const scalar_t* zeros, scalar_t* sink, BwdTap<scalar_t>* taps) {
  const int64_t L = a.L, P = a.P;
  const int64_t row = (n * a.Lq + q) * a.M + m;
  const scalar_t* loc_p = loc + row * L * P * 2;
  const scalar_t* attn_p = attn + row * L * P;
  scalar_t* gloc_p = grad_loc + row * L * P * 2;
  scalar_t* gattn_p = grad_attn + row * L * P;
  int64_t count = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = a.spatial[2 * l], W = a.spatial[2 * l + 1];
    const int64_t start = a.level_start[l] * pos_stride;
    for (int64_t p = 0; p < P; ++p, loc_p += 2, ++attn_p, gloc_p += 2, ++gattn_p) {
      msda::BilinearTap<scalar_t, int64_t> t;
      if (!msda::bilinear_tap<scalar_t, int64_t>(loc_p[0], loc_p[1], *attn_p, H, W, pos_stride, t)) {
        gloc_p[0] = scalar_t(0);
        gloc_p[1] = scalar_t(0);
        *gattn_p = scalar_t(0);
        continue;
      }
      BwdTap<scalar_t>& tap = taps[count++];
      for (int k = 0; k < 4; ++k) {
        tap.v[k] = t.valid[k] ? value_nm + start + t.offset[k] : zeros;
        tap.gv[k] = t.valid[k] ? gv_nm + start + t.offset[k] : sink;
        tap.b[k] = t.w[k];
      }
      tap.lh = t.lh;
      tap.lw = t.lw;
      tap.hh = t.hh;
      tap.hw = t.hw;
      tap.w = *attn_p;
      tap.scale_x = tap.w * static_cast<scalar_t>(W);
      tap.scale_y = tap.w * static_cast<scalar_t>(H);
      tap.gloc = gloc_p;
      tap.gattn = gattn_p;
    }
  }
  return count;
}

template <typename scalar_t, int DC>
static void backward_range(const BwdArgs& a, int64_t begin, int64_t end, void* sink_row) {
  const int64_t D = DC > 0 ? DC : a.D;
  const int64_t M = a.M, L = a.L, P = a.P, S = a.S, Lq = a.Lq, N = a.N;
  const int64_t chunks = a.chunks;
  const int64_t q_per_chunk = (Lq + chunks - 1) / chunks;
  const int64_t pos_stride = M * D;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  const scalar_t* value = static_cast<const scalar_t*>(a.value);
  const scalar_t* loc = static_cast<const scalar_t*>(a.loc);
  const scalar_t* attn = static_cast<const scalar_t*>(a.attn);
  const scalar_t* grad_out = static_cast<const scalar_t*>(a.grad_out);
  const scalar_t* zeros = static_cast<const scalar_t*>(a.zeros);
  scalar_t* grad_loc = static_cast<scalar_t*>(a.grad_loc);
  scalar_t* grad_attn = static_cast<scalar_t*>(a.grad_attn);
  // Invalid corners write into `sink` (the caller's private scratch row of D elements) so the
  // channel loop stays branch-free.
  scalar_t* sink = static_cast<scalar_t*>(sink_row);

  // Taps of the current and the next query row (see forward_range).
  const int64_t max_taps = L * P;
  std::vector<BwdTap<scalar_t>> tap_storage(2 * static_cast<size_t>(max_taps));
  BwdTap<scalar_t>* cur = tap_storage.data();
  BwdTap<scalar_t>* nxt = cur + max_taps;

  for (int64_t task = begin; task < end; ++task) {
    const int64_t chunk = task % chunks;
    const int64_t nm = task / chunks;
    const int64_t n = nm / M, m = nm % M;
    scalar_t* gv_buffer = chunk == 0 ? static_cast<scalar_t*>(a.grad_value)
                                     : static_cast<scalar_t*>(a.grad_value_extra) + (chunk - 1) * N * S * pos_stride;
    scalar_t* gv_nm = gv_buffer + n * S * pos_stride + m * D;
    const scalar_t* value_nm = value + n * S * pos_stride + m * D;
    const int64_t q0 = chunk * q_per_chunk;
    const int64_t q1 = q0 + q_per_chunk < Lq ? q0 + q_per_chunk : Lq;
    int64_t n_cur = q0 < q1 ? backward_taps(a, n, m, q0, pos_stride, value_nm, gv_nm, loc, attn, grad_loc,
                                            grad_attn, zeros, sink, cur)
                            : 0;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n_nxt = q + 1 < q1 ? backward_taps(a, n, m, q + 1, pos_stride, value_nm, gv_nm, loc, attn,
                                                       grad_loc, grad_attn, zeros, sink, nxt)
                                       : 0;
      const scalar_t* __restrict g = grad_out + ((n * Lq + q) * M + m) * D;
      for (int64_t i = 0; i < a.prefetch && i < n_cur; ++i) {
        for (int k = 0; k < 4; ++k) {
          prefetch_row(cur[i].v[k], row_bytes, 0);
          prefetch_row(cur[i].gv[k], row_bytes, 1);
        }
      }
      for (int64_t i = 0; i < n_cur; ++i) {
        const int64_t j = i + a.prefetch;
        const BwdTap<scalar_t>* ahead = j < n_cur ? cur + j : (j - n_cur < n_nxt ? nxt + (j - n_cur) : nullptr);
        if (a.prefetch > 0 && ahead != nullptr) {
          for (int k = 0; k < 4; ++k) {
            prefetch_row(ahead->v[k], row_bytes, 0);
            prefetch_row(ahead->gv[k], row_bytes, 1);
          }
        }
        const BwdTap<scalar_t>& t = cur[i];
        const scalar_t* __restrict v0 = t.v[0];
        const scalar_t* __restrict v1 = t.v[1];
        const scalar_t* __restrict v2 = t.v[2];
        const scalar_t* __restrict v3 = t.v[3];
        scalar_t* __restrict gv0 = t.gv[0];
        scalar_t* __restrict gv1 = t.gv[1];
        scalar_t* __restrict gv2 = t.gv[2];
        scalar_t* __restrict gv3 = t.gv[3];
        const scalar_t b0 = t.b[0], b1 = t.b[1], b2 = t.b[2], b3 = t.b[3];
        const scalar_t aw0 = t.w * b0, aw1 = t.w * b1, aw2 = t.w * b2, aw3 = t.w * b3;
        const scalar_t lh = t.lh, lw = t.lw, hh = t.hh, hw = t.hw;
        scalar_t s_attn = 0, s_w = 0, s_h = 0;
#pragma omp simd reduction(+ : s_attn, s_w, s_h)
        for (int64_t c = 0; c < D; ++c) {
          const scalar_t gc = g[c];
          const scalar_t x0 = v0[c], x1 = v1[c], x2 = v2[c], x3 = v3[c];
          s_attn += gc * (b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3);
          s_w += gc * (hh * (x1 - x0) + lh * (x3 - x2));
          s_h += gc * (hw * (x2 - x0) + lw * (x3 - x1));
          gv0[c] += aw0 * gc;
          gv1[c] += aw1 * gc;
          gv2[c] += aw2 * gc;
          gv3[c] += aw3 * gc;
        }
        *t.gattn = s_attn;
        t.gloc[0] = t.scale_x * s_w;
        t.gloc[1] = t.scale_y * s_h;
      }
      std::swap(cur, nxt);
      n_cur = n_nxt;
    }
  }
}

// The entry points of this instruction set (declared in ms_deform_attn_cpu_isa.h).
void forward(const FwdArgs& a, ScalarKind kind, int64_t begin, int64_t end) {
  if (kind == ScalarKind::kFloat) {
    switch (a.D) {
      case 16: return forward_range<float, 16>(a, begin, end);
      case 32: return forward_range<float, 32>(a, begin, end);
      case 64: return forward_range<float, 64>(a, begin, end);
      default: return forward_range<float, 0>(a, begin, end);
    }
  } else {
    switch (a.D) {
      case 16: return forward_range<double, 16>(a, begin, end);
      case 32: return forward_range<double, 32>(a, begin, end);
      default: return forward_range<double, 0>(a, begin, end);
    }
  }
}

void backward(const BwdArgs& a, ScalarKind kind, int64_t begin, int64_t end, void* sink_row) {
  if (kind == ScalarKind::kFloat) {
    switch (a.D) {
      case 16: return backward_range<float, 16>(a, begin, end, sink_row);
      case 32: return backward_range<float, 32>(a, begin, end, sink_row);
      case 64: return backward_range<float, 64>(a, begin, end, sink_row);
      default: return backward_range<float, 0>(a, begin, end, sink_row);
    }
  } else {
    switch (a.D) {
      case 16: return backward_range<double, 16>(a, begin, end, sink_row);
      case 32: return backward_range<double, 32>(a, begin, end, sink_row);
      default: return backward_range<double, 0>(a, begin, end, sink_row);
    }
  }
}

}  // namespace MSDA_ISA
}  // namespace msda_cpu
}  // namespace detr_variants
