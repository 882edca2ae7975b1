"""The multi-level neck of the multi-scale transformers (Deformable DETR, multi-scale SMCA).

Like detrex's ``ChannelMapper``, but it also gives each level its padding mask and position
encoding: backbone features → per level (feature, padding mask, position encoding).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec, get_norm
from torch import Tensor, nn

EXTRA_MASK_SOURCES = ("image", "previous")


def _projection(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, norm: str, xavier: bool
) -> nn.Module:
    """A conv, then ``norm`` (a detectron2 norm name; "" for none: the conv alone, so that its
    keys are ``N.weight``/``N.bias``)."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2
    )
    if xavier:
        nn.init.xavier_uniform_(conv.weight, gain=1)
        nn.init.zeros_(conv.bias)  # type: ignore[arg-type]  # a Conv2d built with a bias
    return nn.Sequential(conv, get_norm(norm, out_channels)) if norm else conv


class MultiLevelNeck(nn.Module):
    """Projects backbone features to ``num_levels`` maps of ``hidden_dim`` channels.

    Each of ``in_features`` goes through a 1×1 conv (+ ``norm``); each further level is a 3×3
    stride-2 conv (+ ``norm``), the first on the raw last backbone feature (C5, as the official
    Deformable DETR and the released multi-scale SMCA), the next ones on the previous level.
    A level's padding mask is the backbone's for the ``in_features``; for an extra level it is the
    nearest resize of the image's (``extra_mask_source="image"``, Deformable DETR) or of the
    previous level's (``"previous"``, the released multi-scale SMCA). Its position encoding is
    ``position_embedding(mask)`` plus, with ``level_embed``, a learned per-level vector
    (``normal_`` init).

    Args:
        input_shapes: the backbone's ``output_shape()``.
        in_features: backbone outputs used as the first levels, finest first.
        hidden_dim: channels of every level.
        num_levels: levels in all (at least ``len(in_features)``).
        position_embedding: maps a (B, H, W) padding mask to (B, hidden_dim, H, W).
        norm: detectron2 norm after every conv ("GN": GroupNorm(32), as Deformable DETR; "": none).
        level_embed: add a learned embedding per level to its position encoding.
        extra_mask_source: ``"image"`` or ``"previous"`` (see above).
        xavier_init: xavier-uniform conv weights and zero biases (the official Deformable DETR);
            False: PyTorch's default conv init (DETR's ``input_proj``, the released SMCA).
    """

    def __init__(
        self,
        *,
        input_shapes: Dict[str, ShapeSpec],
        in_features: Sequence[str],
        hidden_dim: int,
        num_levels: int,
        position_embedding: nn.Module,
        norm: str = "",
        level_embed: bool = True,
        extra_mask_source: str = "image",
        xavier_init: bool = True,
    ):
        super().__init__()
        in_features = list(in_features)
        if num_levels < len(in_features):
            raise ValueError(
                f"num_levels ({num_levels}) must be at least len(in_features) ({len(in_features)})"
            )
        missing = [f for f in in_features if f not in input_shapes]
        if missing:
            raise ValueError(f"the backbone has no {missing}; it gives {sorted(input_shapes)}")
        if extra_mask_source not in EXTRA_MASK_SOURCES:
            raise ValueError(
                f"extra_mask_source must be one of {EXTRA_MASK_SOURCES}, got {extra_mask_source!r}"
            )
        self.in_features = in_features
        self.num_levels = num_levels
        self.extra_mask_source = extra_mask_source
        self.position_embedding = position_embedding
        last = input_shapes[in_features[-1]]
        projections = [
            _projection(input_shapes[f].channels, hidden_dim, 1, 1, norm, xavier_init)
            for f in in_features
        ]
        projections += [
            _projection(
                last.channels if i == 0 else hidden_dim, hidden_dim, 3, 2, norm, xavier_init
            )
            for i in range(num_levels - len(in_features))
        ]
        self.input_proj = nn.ModuleList(projections)
        self.strides = [input_shapes[f].stride for f in in_features]
        self.strides += [last.stride * 2 ** (i + 1) for i in range(num_levels - len(in_features))]
        self.level_embed: Optional[nn.Parameter] = None
        if level_embed:
            self.level_embed = nn.Parameter(torch.empty(num_levels, hidden_dim))
            nn.init.normal_(self.level_embed)

    def forward(
        self, features: Dict[str, Tensor], masks: Dict[str, Tensor], padding_mask: Tensor
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """
        Args:
            features, masks: backbone maps and their padding masks, by feature name.
            padding_mask: (B, H, W) the image's, True at padding.

        Returns:
            per level, finest first: the maps (B, hidden_dim, h, w), the padding masks (B, h, w)
            and the position encodings (B, hidden_dim, h, w).
        """
        srcs = [proj(features[f]) for proj, f in zip(self.input_proj, self.in_features)]
        level_masks = [masks[f] for f in self.in_features]
        for proj in self.input_proj[len(self.in_features) :]:
            first = len(srcs) == len(self.in_features)
            srcs.append(proj(features[self.in_features[-1]] if first else srcs[-1]))
            source = padding_mask if self.extra_mask_source == "image" else level_masks[-1]
            level_masks.append(
                F.interpolate(source[None].float(), size=srcs[-1].shape[-2:]).to(torch.bool)[0]
            )
        pos = [self.position_embedding(m).to(s.dtype) for m, s in zip(level_masks, srcs)]
        if self.level_embed is not None:
            pos = [p + e.view(1, -1, 1, 1) for p, e in zip(pos, self.level_embed)]
        return srcs, level_masks, pos
