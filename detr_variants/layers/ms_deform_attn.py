"""Multi-scale deformable attention (Deformable DETR, Zhu et al., ICLR 2021, eq. 3).

Two implementations of the same operator:

* :func:`ms_deform_attn_pytorch`: one ``F.grid_sample`` per level (the official
  ``ms_deform_attn_core_pytorch``); works everywhere, materialises an (N*M, D, Lq, L*P) tensor.
* the native kernels of ``detr_variants._C`` (``ops/csrc``): CPU (float32/float64) and CUDA
  (float32/float64/float16/bfloat16), forward and backward, with nothing materialised.

:func:`ms_deform_attn` picks the native kernels when they are built for the tensors' device and
dtype and falls back to the PyTorch path otherwise (warning once per reason).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import Function, once_differentiable

from detr_variants._native import _C, graph_capture
from detr_variants._native import IMPORT_ERROR as _C_IMPORT_ERROR

from .tap import Tap

logger = logging.getLogger(__name__)

__all__ = [
    "MultiScaleDeformableAttention",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "level_shapes",
    "native_available",
]

_NATIVE_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}
_WARNED: set = set()


def native_available(
    device_type: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None
) -> bool:
    """Whether the native kernels are built for ``device_type`` (and ``dtype``, if given)."""
    if isinstance(device_type, torch.device):
        device_type = device_type.type
    if _C is None or device_type not in _NATIVE_DTYPES:
        return False
    if device_type == "cuda" and not _C.with_cuda():
        return False
    return dtype is None or dtype in _NATIVE_DTYPES[device_type]


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"ms_deform_attn: using the PyTorch (grid_sample) path: {reason}",
            RuntimeWarning,
            stacklevel=3,
        )


def level_shapes(spatial_shapes: Union[torch.Tensor, Sequence[Sequence[int]]]) -> list:
    """[(H, W)] per level from an (L, 2) tensor, or from (H, W) pairs as given: sizes that may be
    symbolic (``torch.export``), which ``int()`` would fix to the capture-time value."""
    if isinstance(spatial_shapes, torch.Tensor):
        return [tuple(hw) for hw in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: Optional[torch.Tensor],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference multi-scale deformable attention built from ``F.grid_sample``.

    Same contract as the official ``ms_deform_attn_core_pytorch`` (levels are taken in order, so
    ``level_start_index`` is not used): bilinear sampling with ``align_corners=False`` and zero
    padding, weighted by the attention weights and summed over levels and points.

    Args:
        value: (N, S, M, D), the levels flattened and concatenated along S.
        spatial_shapes: (L, 2) int64, (H, W) per level.
        level_start_index: (L,) int64, unused.
        sampling_locations: (N, Lq, M, L, P, 2), (x, y) normalised to [0, 1].
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D).
    """
    del level_start_index
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = level_shapes(spatial_shapes)
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    # (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous()


class _MSDeformAttnFunction(Function):
    """Autograd wrapper of the native kernels (gradients for value, locations and weights)."""

    @staticmethod
    def forward(
        ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ):
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return _C.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
            ctx.saved_tensors
        )
        grad_value, grad_loc, grad_attn = _C.ms_deform_attn_backward(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            grad_output,
        )
        needs = ctx.needs_input_grad
        return (
            grad_value if needs[0] else None,
            None,
            None,
            grad_loc if needs[3] else None,
            grad_attn if needs[4] else None,
        )


def _fallback_reason(value: torch.Tensor) -> Optional[str]:
    capture = graph_capture()
    if capture is not None:
        return capture
    if _C is None:
        return f"detr_variants._C is not built ({_C_IMPORT_ERROR})"
    device = value.device.type
    if device not in _NATIVE_DTYPES:
        return f"no native kernel for device {device!r}"
    if device == "cuda" and not _C.with_cuda():
        return "detr_variants._C was built without CUDA kernels (rebuild with FORCE_CUDA=1)"
    if value.dtype not in _NATIVE_DTYPES[device]:
        return f"no native {device} kernel for {value.dtype}"
    return None


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention, native kernels when available.

    Arguments and result as in :func:`ms_deform_attn_pytorch` (``level_start_index`` is used by
    the native kernels). Floating inputs of different dtypes are promoted to a common one. Falls
    back to :func:`ms_deform_attn_pytorch` (one warning per reason) when ``detr_variants._C`` is
    missing or not built for the device/dtype, and while tracing, exporting to ONNX or compiling.
    """
    dtype = torch.promote_types(
        torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype
    )
    value, sampling_locations, attention_weights = (
        t if t.dtype == dtype else t.to(dtype)
        for t in (value, sampling_locations, attention_weights)
    )
    reason = _fallback_reason(value)
    if reason is not None:
        _warn_once(reason)
        return ms_deform_attn_pytorch(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    if not isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=value.device)
    return _MSDeformAttnFunction.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _is_power_of_2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention module of Deformable DETR (paper eq. 3, official ``MSDeformAttn``).

    Each query attends to ``num_points`` sampling points around its reference point on each of
    ``num_levels`` feature levels, per head; the offsets and the attention weights (softmax over
    levels x points jointly) are linear projections of the query.

    Args:
        embed_dim: channels C of queries and values.
        num_heads: attention heads M; ``embed_dim`` must be divisible by it.
        num_levels: feature levels L.
        num_points: sampling points P per head and level.
    """

    def __init__(
        self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4
    ):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        head_dim = embed_dim // num_heads
        if not _is_power_of_2(head_dim):
            logger.warning(
                "MultiScaleDeformableAttention: embed_dim / num_heads = %d is not a power of 2, "
                "which makes the kernels less efficient",
                head_dim,
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.tap = Tap()  # hook point for recording (see Tap)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Official init: offsets start on a ring of per-head directions, weights uniform.

        ``sampling_offsets``: weight 0, bias for head h the direction theta_h = 2*pi*h/M scaled so
        that its larger coordinate is 1, the same for every level, times (i + 1) for point i.
        ``attention_weights``: weight and bias 0. ``value_proj`` / ``output_proj``: xavier-uniform,
        bias 0.
        """
        M, L, P = self.num_heads, self.num_levels, self.num_points
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(M, dtype=torch.float64) * (2.0 * math.pi / M)
        dirs = torch.stack([thetas.cos(), thetas.sin()], dim=-1)
        dirs = dirs / dirs.abs().max(dim=-1, keepdim=True).values
        grid = dirs.view(M, 1, 1, 2).repeat(1, L, P, 1)
        grid = grid * torch.arange(1, P + 1, dtype=torch.float64).view(1, 1, P, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attend from ``query`` to the flattened multi-level ``input_flatten``.

        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) normalised (x, y) in [0, 1], or (N, Lq, L, 4) boxes
                (cx, cy, w, h); with boxes the offsets are scaled by half the box size / P.
            input_flatten: (N, S, C), levels concatenated.
            input_spatial_shapes: (L, 2) int64 (H, W), or (H, W) pairs (see :func:`level_shapes`).
            input_level_start_index: (L,) int64.
            input_padding_mask: (N, S) bool, True at padding (those values are zeroed).

        Returns:
            (N, Lq, C).
        """
        N, Lq, _ = query.shape
        _, S, _ = input_flatten.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points

        # projected as a 2-d batch, so that the result is no view and the padding can be zeroed in
        # place, also under autograd
        value = self.value_proj(input_flatten.reshape(N * S, -1))
        if input_padding_mask is not None:
            if input_padding_mask.shape != (N, S) or input_padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"input_padding_mask must be a ({N}, {S}) bool tensor (batch, flattened "
                    f"positions of input_flatten), got {tuple(input_padding_mask.shape)} "
                    f"{input_padding_mask.dtype}"
                )
            value.masked_fill_(input_padding_mask.reshape(N * S, 1), 0.0)
        value = value.view(N, S, M, self.embed_dim // M)
        weights = (
            self.attention_weights(query).view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
        )
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level, normalised by 1 / (W_l, H_l): scaling the
            # projection's rows instead of its output saves a pass over the offsets (and one in
            # the backward)
            sizes = input_spatial_shapes
            if not isinstance(sizes, torch.Tensor):  # torch.tensor keeps symbolic sizes symbolic
                sizes = torch.tensor(sizes, device=query.device)
            inv_size = 1.0 / sizes.flip(-1).to(query.dtype)  # (L, 2)
            row_scale = inv_size[None, :, None, :].expand(M, L, P, 2).reshape(-1)
            proj = self.sampling_offsets
            offsets = F.linear(query, proj.weight * row_scale[:, None], proj.bias * row_scale)
            # the reference repeated over points first, so that the broadcast (over heads) runs
            # along rows of L*P*2 contiguous numbers
            origin = (
                reference_points[:, :, None, :, None, :]
                .expand(N, Lq, 1, L, P, 2)
                .reshape(N, Lq, 1, L * P * 2)
            )
            locations = (offsets.view(N, Lq, M, L * P * 2) + origin).view(N, Lq, M, L, P, 2)
        elif reference_points.shape[-1] == 4:
            # offsets are in units of half the box size / P: one fused pass (addcmul)
            offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
            origin = reference_points[:, :, None, :, None, :2]
            locations = torch.addcmul(
                origin, offsets, reference_points[:, :, None, :, None, 2:], value=0.5 / P
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), got shape {tuple(reference_points.shape)}"
            )
        self.tap(
            reference_points=reference_points,
            spatial_shapes=input_spatial_shapes,
            locations=locations,
            weights=weights,
        )
        out = ms_deform_attn(
            value, input_spatial_shapes, input_level_start_index, locations, weights
        )
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_levels={self.num_levels}, num_points={self.num_points}"
        )
