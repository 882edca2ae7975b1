"""Deformable DETR's encoder and decoder (Zhu et al. 2021, Sec. 4.1 and App. A.2-A.4).

Tokens of all feature levels are flattened into one sequence; ``spatial_shapes`` (L, 2) holds
each level's (H, W) and ``level_start_index`` (L,) where it starts. Reference points are
normalised to the *valid* (unpadded) part of each level, as in the official code.
"""

from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .._native import graph_capture
from .attention import MultiheadAttention
from .box_ops import inverse_sigmoid
from .dropout import dropout_add
from .ms_deform_attn import MultiScaleDeformableAttention, level_shapes
from .transformer import FeedForward, clone_layers

# (L, 2) int64 (H, W) per level, or the (H, W) pairs while a graph is captured (see level_layout)
SpatialShapes = Union[Tensor, List[Tuple[int, int]]]


def flatten_levels(maps: List[Tensor]) -> Tensor:
    """[(B, C, H_l, W_l)] → (B, Σ H_l·W_l, C), or [(B, H_l, W_l)] masks → (B, Σ H_l·W_l)."""
    return torch.cat(
        [m.flatten(2).transpose(1, 2) if m.dim() == 4 else m.flatten(1) for m in maps], 1
    )


def level_layout(maps: List[Tensor]) -> Tuple[SpatialShapes, Tensor]:
    """``spatial_shapes`` (L, 2) as (H, W) and ``level_start_index`` (L,), both int64.

    While a graph is captured, ``spatial_shapes`` is the list of the maps' (H, W) instead: sizes
    that stay symbolic, so the graph follows the input size (a tensor's values would be fixed or
    data-dependent); everything that reads it takes either (:func:`level_shapes`).
    """
    sizes = [(m.shape[-2], m.shape[-1]) for m in maps]
    shapes = torch.tensor(sizes, dtype=torch.long, device=maps[0].device)  # as_tensor specialises
    starts = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    return (sizes if graph_capture() is not None else shapes), starts


def padding_or_none(mask: Tensor) -> Optional[Tensor]:
    """``mask``, or None when it masks nothing, so that the attention skips zeroing the padded
    values (and its backward) for a batch without padding (one image, or images of one size).

    While a graph is captured (tracing, ``torch.export``, ONNX) the mask is always kept: the test
    ``mask.any()`` is data-dependent, and zeroing with an all-False mask changes nothing.
    """
    if graph_capture() is not None:
        return mask
    return mask if mask.any() else None


def valid_ratios(masks: List[Tensor]) -> Tensor:
    """(B, L, 2): the fraction (w, h) of each level that is image, not padding."""
    ratios = []
    for m in masks:
        valid_h = (~m[:, :, 0]).sum(1).float() / m.shape[1]
        valid_w = (~m[:, 0, :]).sum(1).float() / m.shape[2]
        ratios.append(torch.stack([valid_w, valid_h], -1))
    return torch.stack(ratios, 1)


def encoder_reference_points(spatial_shapes: Tensor, ratios: Tensor) -> Tensor:
    """Pixel centres of every level normalised by its valid extent, then scaled by each level's
    valid ratio: (B, S, L, 2), as the official ``DeformableTransformerEncoder.get_reference_points``."""
    points = []
    for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
        # arange + 0.5: the official linspace(0.5, h - 0.5, h), exactly, for symbolic h as well
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=ratios.device) + 0.5,
            torch.arange(w, dtype=torch.float32, device=ratios.device) + 0.5,
            indexing="ij",
        )
        ys = ys.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)
        xs = xs.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w)
        points.append(torch.stack((xs, ys), -1))
    return torch.cat(points, 1)[:, :, None] * ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """Multi-scale deformable self-attention over all tokens, then FFN (post-norm)."""

    def __init__(
        self,
        d_model: int = 256,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        num_levels: int = 4,
        num_heads: int = 8,
        num_points: int = 4,
    ):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(d_model, num_heads, num_levels, num_points)
        self.dropout = dropout
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation)

    def forward(
        self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None
    ):
        attn = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        return self.ffn(self.norm(dropout_add(attn, src, self.dropout, self.training)))


class DeformableEncoder(nn.Module):
    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = clone_layers(layer, num_layers)

    def forward(self, src, pos, spatial_shapes, level_start_index, ratios, padding_mask=None):
        reference_points = encoder_reference_points(spatial_shapes, ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableDecoderLayer(nn.Module):
    """Query self-attention → multi-scale deformable cross-attention → FFN, each post-norm."""

    def __init__(
        self,
        d_model: int = 256,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        num_levels: int = 4,
        num_heads: int = 8,
        num_points: int = 4,
    ):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, num_heads, dropout=dropout)
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MultiScaleDeformableAttention(d_model, num_heads, num_levels, num_points)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation)

    def forward(
        self,
        tgt,
        query_pos,
        reference_points,
        memory,
        spatial_shapes,
        level_start_index,
        memory_padding_mask=None,
    ):
        q = k = tgt + query_pos
        tgt = self.norm1(
            dropout_add(self.self_attn(q, k, tgt)[0], tgt, self.dropout, self.training)
        )
        attn = self.cross_attn(
            tgt + query_pos,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            memory_padding_mask,
        )
        return self.ffn(self.norm2(dropout_add(attn, tgt, self.dropout, self.training)))


class DeformableDecoder(nn.Module):
    """Decoder layers around (2-d point or 4-d box) reference points.

    With ``bbox_embed`` (one box head per layer: iterative box refinement, Sec. 4.2 / App. A.4)
    each layer refines the reference of the previous one, and the refined reference is detached
    before it feeds the next layer.

    Returns:
        (L, B, Q, C) layer outputs, and per layer the (B, Q, 2|4) reference it started from (the
        one its box head refines); a 2-d point reference becomes a box after the first refinement.
    """

    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = clone_layers(layer, num_layers)
        self.bbox_embed: Optional[nn.ModuleList] = None  # set by the detector for box refinement

    def forward(
        self,
        tgt,
        query_pos,
        reference_points,
        memory,
        spatial_shapes,
        level_start_index,
        ratios,
        memory_padding_mask=None,
    ):
        outputs, references = [], []
        for lid, layer in enumerate(self.layers):
            scale = ratios if reference_points.shape[-1] == 2 else torch.cat([ratios, ratios], -1)
            tgt = layer(
                tgt,
                query_pos,
                reference_points[:, :, None] * scale[:, None],
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
            )
            outputs.append(tgt)
            references.append(reference_points)
            if self.bbox_embed is not None:
                reference_points = refine_reference(
                    self.bbox_embed[lid](tgt), reference_points
                ).detach()
        return torch.stack(outputs), references


def refine_reference(delta: Tensor, reference: Tensor) -> Tensor:
    """``sigmoid(delta + logit(reference))`` for 4-d references; for 2-d (point) references the
    box's wh is the raw delta and only its centre is offset (official Deformable DETR)."""
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
