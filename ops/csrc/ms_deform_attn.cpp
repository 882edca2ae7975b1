// Input checks shared by the CPU and CUDA entry points.
#include "ms_deform_attn.h"

namespace detr_variants {

void ms_deform_attn_check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1, "ms_deform_attn: level_start_index must be (L,), got ",
              level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5,
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P), got ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64, got ",
              spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type());
  TORCH_CHECK(at::isFloatingType(value.scalar_type()),
              "ms_deform_attn: value must be a floating tensor, got ", value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share one dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ",
              attention_weights.scalar_type());
  TORCH_CHECK(sampling_locations.device() == value.device() &&
                  attention_weights.device() == value.device(),
              "ms_deform_attn: value, sampling_locations and attention_weights must be on one device");

  const int64_t N = value.size(0), M = value.size(2), L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.size(0) == L, "ms_deform_attn: level_start_index has ",
              level_start_index.size(0), " entries for ", L, " levels");
  TORCH_CHECK(sampling_locations.size(0) == N && attention_weights.size(0) == N,
              "ms_deform_attn: batch sizes differ: value ", N, ", sampling_locations ",
              sampling_locations.size(0), ", attention_weights ", attention_weights.size(0));
  TORCH_CHECK(sampling_locations.size(1) == attention_weights.size(1),
              "ms_deform_attn: query counts differ: sampling_locations ", sampling_locations.size(1),
              ", attention_weights ", attention_weights.size(1));
  TORCH_CHECK(sampling_locations.size(2) == M && attention_weights.size(2) == M,
              "ms_deform_attn: head counts differ: value ", M, ", sampling_locations ",
              sampling_locations.size(2), ", attention_weights ", attention_weights.size(2));
  TORCH_CHECK(sampling_locations.size(3) == L && attention_weights.size(3) == L,
              "ms_deform_attn: level counts differ: spatial_shapes ", L, ", sampling_locations ",
              sampling_locations.size(3), ", attention_weights ", attention_weights.size(3));
  TORCH_CHECK(sampling_locations.size(4) == attention_weights.size(4),
              "ms_deform_attn: point counts differ: sampling_locations ", sampling_locations.size(4),
              ", attention_weights ", attention_weights.size(4));

  // The level table is checked against S whenever that needs no device synchronisation: the
  // levels must tile value's S positions in order (what the PyTorch path's split assumes).
  if (spatial_shapes.device().is_cpu() && level_start_index.device().is_cpu()) {
    const int64_t S = value.size(1);
    auto shapes = spatial_shapes.contiguous();
    auto starts = level_start_index.contiguous();
    const int64_t* hw = shapes.data_ptr<int64_t>();
    const int64_t* st = starts.data_ptr<int64_t>();
    int64_t next = 0;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = hw[2 * l], W = hw[2 * l + 1];
      TORCH_CHECK(H >= 0 && W >= 0, "ms_deform_attn: level ", l, " has a negative size (H=", H,
                  ", W=", W, ")");
      TORCH_CHECK(st[l] == next, "ms_deform_attn: level_start_index[", l, "] = ", st[l],
                  ", but spatial_shapes put level ", l, " at ", next,
                  " (level_start_index must be the running sum of H*W)");
      next += H * W;
    }
    TORCH_CHECK(next == S, "ms_deform_attn: spatial_shapes cover ", next,
                " positions, but value has S=", S);
  }
}

}  // namespace detr_variants
