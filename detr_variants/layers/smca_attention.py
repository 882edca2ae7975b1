"""SMCA's spatially modulated co-attention (Gao et al., ICCV 2021), batch-first.

Each object query predicts a Gaussian-like spatial weight map ``G`` around an estimated object
centre, and the decoder's co-attention becomes ``softmax(q·kᵀ/√d + log G)·v`` (paper eq. 5/6).
As in the released code (``models/transformer.py``), ``log G = −(s_x·(x−c_x)² + s_y·(y−c_y)²)/β``
on the integer cell grid of the (padded) feature map, with the centre ``c`` in feature cells of
the *unpadded* image and ``s`` a predicted squared scale (the paper writes ``1/s²``; the two are
the same parameterisation up to a reciprocal).

Multi-scale SMCA (paper Sec. 3.3, eq. 7-9): the encoder mixes intra-scale blocks (one layer run on
every scale separately, weights shared across scales) and multi-scale blocks (one layer over the
tokens of all scales), and the decoder attends to every scale with that scale's own Gaussian, a
softmax per scale, and sums the per-scale results weighted by a per-query softmax over scales
(scale-selection attention).
"""

import re
from typing import List, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiheadAttention, scaled_dot_product_attention
from .dropout import dropout_add
from .mlp import MLP
from .tap import Tap
from .transformer import FeedForward, clone_layers

SCALE_TYPES = {"fixed": 0, "single": 1, "independent": 2}


def gaussian_log_prior(
    centers: Tensor, scales: Tensor, height: int, width: int, beta: float
) -> Tensor:
    """``log G`` of paper eq. 4 in the released form, on a ``height`` × ``width`` cell grid.

    Args:
        centers: (B, Q, H, 2) per-head centres (x, y) in feature cells (cell (i, j) sits at x = j,
            y = i, as the released ``grid``).
        scales: (B, Q, H, 2) non-negative (s_x, s_y).
        beta: the bandwidth β (``--smooth``, 8 in the paper).

    Returns:
        (B, H, Q, height·width): ``−(s_x·(x−c_x)² + s_y·(y−c_y)²)/β``, cells in row-major order
        (the order of ``feature.flatten(2)``).
    """
    centers, scales = centers.float(), scales.float()
    xs = torch.arange(width, dtype=torch.float32, device=centers.device)
    ys = torch.arange(height, dtype=torch.float32, device=centers.device)
    dx2 = scales[..., :1] * (xs - centers[..., :1]) ** 2  # (B, Q, H, width)
    dy2 = scales[..., 1:] * (ys - centers[..., 1:]) ** 2  # (B, Q, H, height)
    distance = dy2[..., :, None] + dx2[..., None, :]
    return (-distance.flatten(-2) / beta).transpose(1, 2)


class SpatialModulation(nn.Module):
    """Per-query Gaussian priors of one decoder layer (paper eq. 3, 4 and 6; Table 2 ablations).

    Every head starts from the query's shared normalised centre (predicted once, by
    :class:`SMCADecoder`), scaled to each level's cells. With ``multi_head=True`` each head adds
    its own offset (``offsets``, released ``point2``, in feature cells) and predicts its own
    scales; with ``multi_head=False`` all heads share the centre and the scales (the paper's
    "head-shared" modulation). ``scale_type`` is Table 2's "Fixed" (s = 1), "Single" (one scale
    for both axes) or "Indep." (independent width and height scales, the default);
    ``scales`` (released ``point3``) is squared, and starts at weight 0 / bias 1 (s = 1).

    With several levels (multi-scale SMCA) offsets and scales are predicted per level, and each
    level's Gaussian lives in that level's cells. ``level_distance_factors`` multiplies each
    level's squared distance (the released multi-scale code uses 0.5, 0.5, 1, 2 for strides 8-64;
    the paper does not, and the default is 1 everywhere).

    Args:
        d_model, num_heads: width of the query features and co-attention heads.
        num_levels: feature levels the co-attention reads.
        scale_type: ``"fixed"``, ``"single"`` or ``"independent"``.
        multi_head: per-head centre offsets and scales (the paper's default).
        beta: bandwidth β of eq. 4.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_levels: int = 1,
        scale_type: str = "independent",
        multi_head: bool = True,
        beta: float = 8.0,
        level_distance_factors: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        if scale_type not in SCALE_TYPES:
            raise ValueError(f"scale_type must be one of {sorted(SCALE_TYPES)}, got {scale_type!r}")
        if level_distance_factors is not None and len(level_distance_factors) != num_levels:
            raise ValueError(
                f"level_distance_factors needs {num_levels} values, got {list(level_distance_factors)}"
            )
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.scale_type = scale_type
        self.multi_head = multi_head
        self.beta = beta
        self.level_distance_factors = (
            None if level_distance_factors is None else [float(f) for f in level_distance_factors]
        )
        self.groups = num_heads if multi_head else 1
        self.offsets = nn.Linear(d_model, num_levels * num_heads * 2) if multi_head else None
        per_group = SCALE_TYPES[scale_type]
        self.scales = (
            nn.Linear(d_model, num_levels * self.groups * per_group) if per_group else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Scales start at 1 (weight 0, bias 1), as the released code re-initialises them after
        the transformer's xavier init; call again after any such init."""
        if self.scales is not None:
            nn.init.zeros_(self.scales.weight)
            nn.init.ones_(self.scales.bias)

    def centers_and_scales(
        self, x: Tensor, centers: Tensor, level_sizes: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """Per-level, per-head centres (x, y) in cells and scales (s_x, s_y), both (B, Q, L, H, 2).

        Args:
            x: (B, Q, d) the layer's ``prior_norm(tgt + query_pos)``.
            centers: (B, Q, 2) normalised centres (x, y) in [0, 1] of the unpadded image.
            level_sizes: (B, L, 2) the unpadded image size (w, h) in each level's cells
                (``image size / stride``, not rounded, as released).
        """
        b, q, _ = x.shape
        shape = (b, q, self.num_levels, self.num_heads, 2)
        c = centers.float()[:, :, None, None, :] * level_sizes.float()[:, None, :, None, :]
        if self.offsets is not None:
            c = c + self.offsets(x).float().view(shape)
        c = c.expand(shape)
        if self.scales is None:
            s = c.new_ones(()).expand(shape)
        else:
            s = (
                self.scales(x)
                .float()
                .view(b, q, self.num_levels, self.groups, -1)
                .square()
                .expand(shape)
            )
        return c, s

    def forward(
        self,
        x: Tensor,
        centers: Tensor,
        level_sizes: Tensor,
        spatial_shapes: Sequence[Tuple[int, int]],
    ) -> List[Tensor]:
        """Returns each level's additive attention prior (B, H, Q, h_l·w_l), float32."""
        c, s = self.centers_and_scales(x, centers, level_sizes)
        priors = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            prior = gaussian_log_prior(c[:, :, lvl], s[:, :, lvl], h, w, self.beta)
            if self.level_distance_factors is not None:
                prior = prior * self.level_distance_factors[lvl]
            priors.append(prior)
        return priors


class GaussianModulatedAttention(nn.Module):
    """Multi-head co-attention with an additive log-prior per level (paper eq. 5, 6, 8, 9).

    Parameters are those of ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``, same init), so the released ``GaussianMultiheadAttention`` weights load as they
    are. Without priors and level weights it computes exactly what ``nn.MultiheadAttention`` does.

    With ``level_weights`` (scale-selection attention) the keys are split into levels of
    ``level_lengths`` tokens, each level gets its own softmax, ``E_l = softmax(q·k_lᵀ/√d +
    log G_l)·v_l``, and the output is ``Σ_l α_l·E_l`` before ``out_proj``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)
        self.tap = Tap()  # hook point for recording (see Tap)

    def _heads(self, x: Tensor, index: int) -> Tensor:
        e = self.embed_dim
        x = F.linear(
            x,
            self.in_proj_weight[index * e : (index + 1) * e],
            self.in_proj_bias[index * e : (index + 1) * e],
        )
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        priors: Optional[Sequence[Tensor]] = None,
        level_lengths: Optional[Sequence[int]] = None,
        level_weights: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: (B, Q, E); key, value: (B, S, E).
            key_padding_mask: (B, S), True at padding (−inf before the softmax).
            priors: per level (B, H, Q, S_l) additive logits (``log G``), or None.
            level_lengths: S_l per level (sum S); None: one level.
            level_weights: (B, Q, L) scale-selection weights; None: one softmax over all tokens.

        Returns:
            (B, Q, E).
        """
        b, nq, _ = query.shape
        q, k, v = self._heads(query, 0), self._heads(key, 1), self._heads(value, 2)
        lengths = [key.shape[1]] if level_lengths is None else list(level_lengths)
        if sum(lengths) != key.shape[1]:
            raise ValueError(f"level_lengths {lengths} do not add up to {key.shape[1]} keys")
        if priors is not None and len(priors) != len(lengths):
            raise ValueError(f"{len(priors)} priors for {len(lengths)} levels")
        if level_weights is not None and level_weights.shape[-1] != len(lengths):
            raise ValueError(
                f"level_weights has {level_weights.shape[-1]} levels, keys have {len(lengths)}"
            )
        masks: List[Optional[Tensor]] = [None] * len(lengths)
        if key_padding_mask is not None:
            mask = key_padding_mask[:, None, None, :]
            # no one-chunk split: the ONNX exporter fixes its (symbolic) size to the example's
            masks = [mask] if len(lengths) == 1 else list(mask.split(lengths, dim=-1))
        biases: List[Optional[Tensor]] = []
        for lvl, level_mask in enumerate(masks):
            bias = level_mask
            if priors is not None:
                bias = priors[lvl].to(q.dtype).clamp(min=torch.finfo(q.dtype).min / 2)
                if level_mask is not None:
                    bias = bias.masked_fill(level_mask, float("-inf"))
            elif bias is not None:
                bias = ~bias  # boolean attn_mask: True = attend
            biases.append(bias)
        self.tap(q=q, k=k, v=v, biases=biases, lengths=lengths, level_weights=level_weights)
        dropout = self.dropout if self.training else 0.0
        if level_weights is None:
            if len(lengths) > 1:
                full = [_full_bias(x, q, k_len) for x, k_len in zip(biases, lengths)]
                bias = torch.cat(full, dim=-1)
            else:
                bias = biases[0]
            out = scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        else:
            weights = level_weights.to(q.dtype).transpose(1, 2)[
                :, None, :, :, None
            ]  # (B, 1, L, Q, 1)
            levels = zip(k.split(lengths, dim=2), v.split(lengths, dim=2), biases)
            for lvl, (k_l, v_l, bias_l) in enumerate(levels):
                e_l = scaled_dot_product_attention(q, k_l, v_l, attn_mask=bias_l, dropout_p=dropout)
                term = weights[:, :, lvl] * e_l
                out = term if lvl == 0 else out + term
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, self.embed_dim))


def _full_bias(bias: Optional[Tensor], q: Tensor, length: int) -> Tensor:
    """A level's attention mask as an additive float tensor broadcastable to (B, H, Q, length)."""
    if bias is None:
        return q.new_zeros((1, 1, 1, length))
    if bias.dtype == torch.bool:
        return torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~bias, float("-inf")
        )
    return bias


class SMCADecoderLayer(nn.Module):
    """DETR's post-norm decoder layer with the spatially modulated co-attention.

    ``prior_norm(tgt + query_pos)`` (released ``norm4``, computed from the layer input) drives
    the layer's :class:`SpatialModulation` (``point2``/``point3``) and, with several levels, the
    scale-selection weights ``α = softmax(scale_selection(·))`` (paper eq. 7). Self-attention,
    co-attention (queries ``tgt + query_pos``, keys ``memory + pos``) and the FFN are DETR's.

    Args:
        num_levels: feature levels in the memory (1: single-scale SMCA).
        scale_type, multi_head_modulation, beta, level_distance_factors: see
            :class:`SpatialModulation`.
        scale_selection: with several levels, weight a softmax per level by α (eq. 8-9);
            False: one softmax over the tokens of all levels ("w/o SSA" of Table 3).
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        num_levels: int = 1,
        scale_type: str = "independent",
        multi_head_modulation: bool = True,
        beta: float = 8.0,
        scale_selection: bool = True,
        level_distance_factors: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.num_levels = num_levels
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.cross_attn = GaussianModulatedAttention(d_model, nhead, dropout=dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = dropout
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation)
        self.prior_norm = nn.LayerNorm(d_model)
        self.modulation = SpatialModulation(
            d_model,
            nhead,
            num_levels,
            scale_type,
            multi_head_modulation,
            beta,
            level_distance_factors,
        )
        self.scale_selection = (
            nn.Linear(d_model, num_levels) if num_levels > 1 and scale_selection else None
        )

    def scale_weights(self, x: Tensor) -> Optional[Tensor]:
        """(B, Q, L) scale-selection weights from ``x = prior_norm(tgt + query_pos)``, or None."""
        return None if self.scale_selection is None else self.scale_selection(x).softmax(-1)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        query_pos: Tensor,
        pos: Tensor,
        centers: Tensor,
        level_sizes: Tensor,
        spatial_shapes: Sequence[Tuple[int, int]],
        memory_key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """tgt, query_pos: (B, Q, d); memory, pos: (B, S, d) (levels concatenated, row-major);
        centers: (B, Q, 2) normalised; level_sizes: (B, L, 2) unpadded (w, h) in cells;
        spatial_shapes: per level (h, w) of the padded maps."""
        if len(spatial_shapes) != self.num_levels:
            raise ValueError(f"layer built for {self.num_levels} levels, got {len(spatial_shapes)}")
        x = self.prior_norm(tgt + query_pos)
        priors = self.modulation(x, centers, level_sizes, spatial_shapes)
        weights = self.scale_weights(x)
        q = k = tgt + query_pos
        tgt = self.norm1(
            dropout_add(self.self_attn(q, k, tgt)[0], tgt, self.dropout, self.training)
        )
        out = self.cross_attn(
            tgt + query_pos,
            memory + pos,
            memory,
            key_padding_mask=memory_key_padding_mask,
            priors=priors,
            level_lengths=[h * w for h, w in spatial_shapes],
            level_weights=weights,
        )
        tgt = self.norm2(dropout_add(out, tgt, self.dropout, self.training))
        return self.ffn(tgt)


class SMCADecoder(nn.Module):
    """SMCA's decoder: a shared centre prior per query and spatially modulated layers.

    The normalised centre ``sigmoid(center_head(layers[0].prior_norm(query_pos)))`` (paper eq. 3;
    released ``layers.0.point1``, a 3-layer MLP; tgt is 0 in the first layer) is computed once
    and reused by every layer, never refined. Its logit is returned for the box head (eq. 12).

    Args:
        layer: a :class:`SMCADecoderLayer`, deep-copied ``num_layers`` times.
        norm: the shared norm applied to every layer's output.
    """

    def __init__(self, layer: SMCADecoderLayer, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = clone_layers(layer, num_layers)
        self.norm = nn.Identity() if norm is None else norm
        self.center_head = MLP(layer.d_model, layer.d_model, 2, 3)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        query_pos: Tensor,
        pos: Tensor,
        level_sizes: Tensor,
        spatial_shapes: Sequence[Tuple[int, int]],
        memory_key_padding_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Returns every layer's normed output (num_layers, B, Q, d) and the centre logits (B, Q, 2)."""
        first = cast(SMCADecoderLayer, self.layers[0])
        center_logits = self.center_head(first.prior_norm(tgt + query_pos))
        centers = center_logits.sigmoid()
        outputs = []
        for layer in self.layers:
            tgt = layer(
                tgt,
                memory,
                query_pos,
                pos,
                centers,
                level_sizes,
                spatial_shapes,
                memory_key_padding_mask,
            )
            outputs.append(self.norm(tgt))
        return torch.stack(outputs), center_logits


# ---------------------------------------------------------------------------- multi-scale encoder
ENCODER_BLOCKS = ("intra", "multi")


def parse_encoder_layout(layout: Union[str, Sequence[str]]) -> List[str]:
    """Table 3's encoder layouts → a list of blocks.

    Accepts a list (``["intra", "intra", "multi", "intra", "intra"]``) or the paper's shorthand
    joined by ``-``: ``"2intra-multi-2intra"``, ``"5intra"``, ``"3multi"``.
    """
    parts = (
        re.split(r"[-_,\s]+", layout.strip().lower()) if isinstance(layout, str) else list(layout)
    )
    blocks: List[str] = []
    for part in parts:
        m = re.fullmatch(r"(\d*)\s*(intra|multi)", str(part).strip().lower())
        if not m:
            raise ValueError(
                f"bad encoder block {part!r} in {layout!r}; use 'intra' or 'multi', "
                "e.g. '2intra-multi-2intra'"
            )
        blocks += [m.group(2)] * int(m.group(1) or 1)
    if not blocks:
        raise ValueError("the encoder layout is empty")
    return blocks


class MultiScaleEncoder(nn.Module):
    """SMCA's multi-scale encoder: intra-scale and multi-scale self-attention blocks (Sec. 3.3).

    An ``"intra"`` block runs its layer (self-attention + FFN) on each scale separately, with the
    same weights for every scale; a ``"multi"`` block runs its layer over the tokens of all scales
    together. Each block has its own weights. The paper's final design is
    ``"2intra-multi-2intra"`` with FFN 1024.

    Args:
        layer: e.g. a :class:`~detr_variants.layers.transformer.TransformerEncoderLayer`; deep-copied
            once per block.
        layout: see :func:`parse_encoder_layout`.
    """

    def __init__(
        self,
        layer: nn.Module,
        layout: Union[str, Sequence[str]] = "2intra-multi-2intra",
        norm: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.layout = parse_encoder_layout(layout)
        self.layers = clone_layers(layer, len(self.layout))
        self.norm = norm

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        key_padding_mask: Optional[Tensor],
        level_lengths: Sequence[int],
    ) -> Tensor:
        """src, pos: (B, S, d), levels concatenated; key_padding_mask: (B, S); level_lengths sum to S."""
        lengths = list(level_lengths)
        pos_levels = pos.split(lengths, dim=1)
        mask_levels = (
            [None] * len(lengths)
            if key_padding_mask is None
            else key_padding_mask.split(lengths, dim=1)
        )
        for kind, layer in zip(self.layout, self.layers):
            if kind == "multi":
                src = layer(src, pos=pos, key_padding_mask=key_padding_mask)
            else:
                src = torch.cat(
                    [
                        layer(s, pos=p, key_padding_mask=m)
                        for s, p, m in zip(src.split(lengths, dim=1), pos_levels, mask_levels)
                    ],
                    dim=1,
                )
        return src if self.norm is None else self.norm(src)


__all__ = [
    "gaussian_log_prior",
    "SpatialModulation",
    "GaussianModulatedAttention",
    "SMCADecoderLayer",
    "SMCADecoder",
    "parse_encoder_layout",
    "MultiScaleEncoder",
    "SCALE_TYPES",
    "ENCODER_BLOCKS",
]
