"""The encoder of the released multi-scale SMCA (``Multi_scale_SMCA.zip``, the "New multi scale"
44.4 AP model): depthwise convolutions with an exchange between adjacent scales, no attention.

It is not the paper's encoder (Sec. 3.3, intra-scale and multi-scale self-attention,
:class:`~detr_variants.layers.smca_attention.MultiScaleEncoder`).
"""

from typing import List, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .dropout import dropout_add
from .transformer import FeedForward, clone_layers


def _depthwise(channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        channels, channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=channels
    )


class CrossScaleConvEncoderLayer(nn.Module):
    """One released encoder layer (``TransformerEncoderLayer.forward_post`` of the zip).

    On every level ``l`` (finest first): ``d_l = level_convs[l](input_conv(src_l + pos_l))``, a
    shared 1×1 conv then the level's depthwise conv; the level's update sums ``d_l``, the next
    (coarser) level's ``up_convs[l](d_{l+1})`` resized bilinearly (``align_corners=True``, the
    released ``F.upsample_bilinear``) and the previous (finer) level's stride-2
    ``down_convs[l-1](d_{l-1})``; then ``src_l + dropout(output_conv(sum))`` → LayerNorm → FFN
    (post-norm), the norm and FFN shared by all levels. Padding is not masked (as released).

    Args:
        d_model: channels of every level.
        num_levels: levels (4 in the release: strides 8, 16, 32, 64).
        dim_feedforward, dropout, activation: the FFN's (1024, 0.1, ReLU in the release).
        kernel_size: of every depthwise conv (5 in ``models/transformer.py``).
        shared_cross_scale: one down and one up conv for all adjacent pairs
            (``models/transformer_44_dot_4.py``) instead of one per pair (``models/transformer.py``).
    """

    def __init__(
        self,
        d_model: int = 256,
        num_levels: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        kernel_size: int = 5,
        shared_cross_scale: bool = False,
    ):
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"the cross-scale exchange needs at least 2 levels, got {num_levels}")
        self.num_levels = num_levels
        self.shared_cross_scale = shared_cross_scale
        pairs = 1 if shared_cross_scale else num_levels - 1
        self.input_conv = nn.Conv2d(d_model, d_model, 1)
        self.level_convs = nn.ModuleList(
            _depthwise(d_model, kernel_size) for _ in range(num_levels)
        )
        self.down_convs = nn.ModuleList(_depthwise(d_model, kernel_size, 2) for _ in range(pairs))
        self.up_convs = nn.ModuleList(_depthwise(d_model, kernel_size) for _ in range(pairs))
        self.output_conv = nn.Conv2d(d_model, d_model, 1)
        self.dropout = dropout
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation)

    def _pair(self, convs: nn.ModuleList, index: int) -> nn.Module:
        return convs[0 if self.shared_cross_scale else index]

    def forward(self, srcs: Sequence[Tensor], pos: Sequence[Tensor]) -> List[Tensor]:
        """srcs, pos: per level (B, C, h_l, w_l), finest first; returns the updated maps."""
        if len(srcs) != self.num_levels or len(pos) != self.num_levels:
            raise ValueError(f"layer built for {self.num_levels} levels, got {len(srcs)}")
        mixed = [conv(self.input_conv(s + p)) for conv, s, p in zip(self.level_convs, srcs, pos)]
        out = []
        for lvl, (src, update) in enumerate(zip(srcs, mixed)):
            if lvl + 1 < self.num_levels:
                coarser = self._pair(self.up_convs, lvl)(mixed[lvl + 1])
                update = update + F.interpolate(
                    coarser, size=update.shape[-2:], mode="bilinear", align_corners=True
                )
            if lvl > 0:
                finer = self._pair(self.down_convs, lvl - 1)(mixed[lvl - 1])
                if finer.shape[-2:] != update.shape[-2:]:
                    raise ValueError(
                        f"level {lvl} is {tuple(update.shape[-2:])}, but the stride-2 conv of "
                        f"level {lvl - 1} gives {tuple(finer.shape[-2:])}"
                    )
                update = update + finer
            x = dropout_add(self.output_conv(update), src, self.dropout, self.training)
            b, c, h, w = x.shape
            x = self.ffn(self.norm(x.flatten(2).transpose(1, 2)))
            out.append(x.transpose(1, 2).reshape(b, c, h, w))
        return out


class CrossScaleConvEncoder(nn.Module):
    """``num_layers`` copies of a :class:`CrossScaleConvEncoderLayer` (5 in the release)."""

    def __init__(self, layer: CrossScaleConvEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = clone_layers(layer, num_layers)

    def forward(self, srcs: Sequence[Tensor], pos: Sequence[Tensor]) -> List[Tensor]:
        for layer in self.layers:
            srcs = layer(srcs, pos)
        return list(srcs)


__all__ = ["CrossScaleConvEncoderLayer", "CrossScaleConvEncoder"]
