// Bilinear tap set-up shared by the CPU and CUDA kernels of multi-scale deformable attention.
//
// Convention (Deformable DETR, identical to F.grid_sample(mode="bilinear",
// padding_mode="zeros", align_corners=False)):
//   h_im = y * H - 0.5,  w_im = x * W - 0.5
//   the sample is taken only if  -1 < h_im < H  and  -1 < w_im < W,
//   corners outside the map contribute 0.
// Non-finite input propagates as it does there: a sample whose location or attention weight is
// not finite is kept even outside the map (see bilinear_tap), so the output is NaN and the
// gradients are NaN/0 where F.grid_sample's are.
//
// This header is plain C++ (no ATen, no CUDA runtime) so that the CPU kernels can be compiled
// for several instruction sets and nvcc can use the very same arithmetic on the device.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace detr_variants {
namespace msda {

// floor() for the range the taps use (-1 < v < 2^31). On the host, truncation plus a correction
// avoids a libm call where the build's baseline instruction set has no rounding instruction.
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
MSDA_HOST_DEVICE float msda_floor(float v) { return floorf(v); }
MSDA_HOST_DEVICE double msda_floor(double v) { return floor(v); }
#else
template <typename T>
inline T msda_floor(T v) {
  const T t = static_cast<T>(static_cast<int64_t>(v));
  return t > v ? t - static_cast<T>(1) : t;
}
#endif

template <typename T>
MSDA_HOST_DEVICE bool msda_isfinite(T v) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

// One bilinear sample: the four corners (h_low,w_low), (h_low,w_high), (h_high,w_low),
// (h_high,w_high) in that order.
//   offset[k]  element offset of corner k from the level's first position, already multiplied
//              by the position stride (M * D); only meaningful when valid[k]
//   w[k]       bilinear weight of corner k (without the attention weight)
//   lh, lw     fractional parts; hh = 1 - lh, hw = 1 - lw
template <typename acc_t, typename index_t>
struct BilinearTap {
  index_t offset[4];
  bool valid[4];
  acc_t w[4];
  acc_t lh, lw, hh, hw;
};

// Returns false when the sample contributes nothing (it lies entirely outside the map, all
// gradients zero). Otherwise fills `tap`. A sample outside the map whose location (x, y) or
// attention weight w is not finite still gets a tap, with every corner invalid (reading zeros) and
// fractional parts v - v along each coordinate (NaN where v is not finite, else 0): the kernels'
// arithmetic then gives what F.grid_sample and the weighted sum give, i.e. a NaN output, a NaN
// weight gradient for a non-finite location, location gradients NaN along the other coordinate
// (or both for a non-finite weight), and no value gradient. The finiteness test runs only on the
// outside-the-map path; NaN / inf weights of samples inside the map propagate through the sums.
template <typename acc_t, typename index_t>
MSDA_HOST_DEVICE bool bilinear_tap(acc_t x, acc_t y, acc_t w, int64_t H, int64_t W, index_t pos_stride,
                                   BilinearTap<acc_t, index_t>& tap) {
  const acc_t h_im = y * static_cast<acc_t>(H) - static_cast<acc_t>(0.5);
  const acc_t w_im = x * static_cast<acc_t>(W) - static_cast<acc_t>(0.5);
  // Written so that NaN locations are rejected too.
  if (!(h_im > static_cast<acc_t>(-1) && w_im > static_cast<acc_t>(-1) &&
        h_im < static_cast<acc_t>(H) && w_im < static_cast<acc_t>(W))) {
    if (msda_isfinite(h_im) && msda_isfinite(w_im) && msda_isfinite(w)) return false;
    tap.lh = h_im - h_im;
    tap.lw = w_im - w_im;
    tap.hh = static_cast<acc_t>(1) - tap.lh;
    tap.hw = static_cast<acc_t>(1) - tap.lw;
    tap.w[0] = tap.hh * tap.hw;
    tap.w[1] = tap.hh * tap.lw;
    tap.w[2] = tap.lh * tap.hw;
    tap.w[3] = tap.lh * tap.lw;
    for (int k = 0; k < 4; ++k) {
      tap.valid[k] = false;
      tap.offset[k] = 0;
    }
    return true;
  }
  const acc_t h_floor = msda_floor(h_im);
  const acc_t w_floor = msda_floor(w_im);
  const index_t h_low = static_cast<index_t>(h_floor);
  const index_t w_low = static_cast<index_t>(w_floor);
  const index_t h_high = h_low + 1;
  const index_t w_high = w_low + 1;
  const acc_t lh = h_im - h_floor;
  const acc_t lw = w_im - w_floor;
  const acc_t hh = static_cast<acc_t>(1) - lh;
  const acc_t hw = static_cast<acc_t>(1) - lw;
  tap.lh = lh;
  tap.lw = lw;
  tap.hh = hh;
  tap.hw = hw;
  tap.w[0] = hh * hw;
  tap.w[1] = hh * lw;
  tap.w[2] = lh * hw;
  tap.w[3] = lh * lw;
  const bool top = h_low >= 0;
  const bool bottom = h_high <= static_cast<index_t>(H) - 1;
  const bool left = w_low >= 0;
  const bool right = w_high <= static_cast<index_t>(W) - 1;
  tap.valid[0] = top && left;
  tap.valid[1] = top && right;
  tap.valid[2] = bottom && left;
  tap.valid[3] = bottom && right;
  const index_t W_ = static_cast<index_t>(W);
  tap.offset[0] = (h_low * W_ + w_low) * pos_stride;
  tap.offset[1] = (h_low * W_ + w_high) * pos_stride;
  tap.offset[2] = (h_high * W_ + w_low) * pos_stride;
  tap.offset[3] = (h_high * W_ + w_high) * pos_stride;
  return true;
}

}  // namespace msda
}  // namespace detr_variants
