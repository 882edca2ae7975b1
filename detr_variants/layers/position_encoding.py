"""Position encodings: 2-D sine over a padding mask, learned row/column, and sine of coordinates."""

import math
from typing import Optional

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine encoding, computed from the unpadded extent given by the mask.

    Cumulative sums over the valid pixels are normalised to [0, 2π] (``normalize=True``).
    ``offset=-0.5`` reproduces Deformable DETR (pixel centres); DETR, Conditional DETR, SMCA
    and TSP use 0.

    Args:
        num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels (y then x).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: Optional[float] = None,
        offset: float = 0.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset
        self.eps = eps

    def forward(self, mask: Tensor) -> Tensor:
        """mask: (B, H, W) bool, True at padding. Returns (B, 2 * num_pos_feats, H, W)."""
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = _frequencies(self.num_pos_feats, self.temperature, mask.device)
        pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)
        pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """DETR's learned absolute encoding: row and column embeddings (up to 50 each), concatenated."""

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        b, h, w = mask.shape
        if h > self.row_embed.num_embeddings or w > self.col_embed.num_embeddings:
            raise ValueError(
                f"feature map {h}x{w} exceeds the learned embedding size "
                f"{self.row_embed.num_embeddings}"
            )
        x_emb = self.col_embed(torch.arange(w, device=mask.device))
        y_emb = self.row_embed(torch.arange(h, device=mask.device))
        pos = torch.cat([x_emb[None].expand(h, w, -1), y_emb[:, None].expand(h, w, -1)], dim=-1)
        return pos.permute(2, 0, 1)[None].expand(b, -1, -1, -1)


def sine_embed_coordinates(
    coords: Tensor,
    num_pos_feats: int = 128,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
) -> Tensor:
    """Sine encoding of normalised coordinates (Conditional DETR's ``gen_sineembed_for_position``).

    Each of the K last-dim coordinates is scaled by ``scale`` and encoded with ``num_pos_feats``
    interleaved sin/cos frequencies; the K encodings are concatenated in input order, giving
    ``K * num_pos_feats`` channels. (Conditional DETR orders a point as (y, x): pass
    ``coords[..., [1, 0]]``.)
    """
    dim_t = _frequencies(num_pos_feats, temperature, coords.device)
    return _interleave_sin_cos(coords[..., None] * scale / dim_t).flatten(-2)


def _frequencies(num_pos_feats: int, temperature: float, device) -> Tensor:
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)


def _interleave_sin_cos(x: Tensor) -> Tensor:
    """(..., F) -> (..., F) with sin on even and cos on odd frequencies, interleaved."""
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)
