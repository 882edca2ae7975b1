"""Conditional DETR's decoder (Meng et al. 2021, Sec. 3.3), batch-first.

Each decoder layer's cross-attention concatenates, per head, a content part and a spatial part
of the query and of the key, so a head's attention logit is the sum of a content dot product and
a spatial dot product, ``c_qᵀc_k + p_qᵀp_k``. The spatial query ``p_q = λ_q ⊙ p_s`` is the sine
embedding ``p_s`` of a reference point ``s``, scaled elementwise by ``λ_q = FFN(f)`` of the previous
decoder embedding f (conditional spatial query prediction). Names and
behaviour follow the official code (``models/transformer.py``, ``models/attention.py``).
"""

from typing import Optional, Tuple, cast

import torch
from torch import Tensor, nn

from .attention import scaled_dot_product_attention
from .dropout import dropout_add
from .mlp import MLP
from .position_encoding import sine_embed_coordinates
from .tap import Tap
from .transformer import FeedForward, clone_layers


def concat_per_head(content: Tensor, spatial: Tensor, num_heads: int) -> Tensor:
    """``(..., D)``, ``(..., D)`` → ``(..., 2D)`` laid out as ``[content_h | spatial_h]`` per head h.

    Split into heads, the result gives each head a ``2D/H``-wide query (key) whose dot product is
    ``c_qᵀc_k + p_qᵀp_k`` (paper Sec. 3.3); concatenating across heads instead would mix them.
    """
    shape = content.shape[:-1]
    return torch.cat(
        [content.reshape(*shape, num_heads, -1), spatial.reshape(*shape, num_heads, -1)], dim=-1
    ).flatten(-2)


class PreprojectedAttention(nn.Module):
    """Multi-head attention over queries, keys and values that are already projected.

    The official ``MultiheadAttention`` (``models/attention.py``) without input projection: only
    ``out_proj`` is learned (bias initialised to 0). Queries/keys are ``embed_dim`` wide (``2d``
    in the conditional cross-attention), values ``value_dim`` (``d``); logits are scaled by
    ``(embed_dim / num_heads) ** -0.5`` and the attention weights see dropout.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, value_dim: Optional[int] = None, dropout: float = 0.0
    ):
        super().__init__()
        value_dim = embed_dim if value_dim is None else value_dim
        if embed_dim % num_heads or value_dim % num_heads:
            raise ValueError(
                f"embed_dim {embed_dim} and value_dim {value_dim} must be divisible by "
                f"num_heads {num_heads}"
            )
        self.embed_dim = embed_dim
        self.value_dim = value_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = dropout
        self.out_proj = nn.Linear(value_dim, value_dim)
        nn.init.zeros_(self.out_proj.bias)
        self.tap = Tap()  # hook point for recording (see Tap)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        """query: (B, Q, embed_dim); key: (B, S, embed_dim); value: (B, S, value_dim);
        key_padding_mask: (B, S) True at padding. Returns (B, Q, value_dim)."""
        b, nq, _ = query.shape
        q, k, v = (
            x.reshape(b, x.shape[1], self.num_heads, -1).transpose(1, 2)
            for x in (query, key, value)
        )
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        self.tap(q=q, k=k, v=v, attn_mask=mask)
        out = scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            scale=self.scaling,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, self.value_dim))


class ConditionalDecoderLayer(nn.Module):
    """Self-attention, conditional cross-attention and FFN, each post-norm (official layer).

    Self-attention projects content (``tgt``) and position (``query_pos``) separately and adds
    them: ``q = sa_qcontent_proj(tgt) + sa_qpos_proj(query_pos)``, likewise ``k``; ``v =
    sa_v_proj(tgt)``. Cross-attention: ``q = [ca_qcontent_proj(tgt) | ca_qpos_sine_proj(p_q)]``,
    ``k = [ca_kcontent_proj(memory) | ca_kpos_proj(pos)]`` per head, ``v = ca_v_proj(memory)``.
    While ``ca_qpos_proj`` exists (the first layer; :class:`ConditionalDecoder` removes it from
    the others, as the official code does) the content query also gets ``ca_qpos_proj(query_pos)``
    and the content key the projected key position, as in DETR.
    """

    # the projections, made in a loop below
    sa_qcontent_proj: nn.Linear
    sa_qpos_proj: nn.Linear
    sa_kcontent_proj: nn.Linear
    sa_kpos_proj: nn.Linear
    sa_v_proj: nn.Linear
    ca_qcontent_proj: nn.Linear
    ca_qpos_proj: Optional[nn.Linear]  # None after the first decoder layer
    ca_kcontent_proj: nn.Linear
    ca_kpos_proj: nn.Linear
    ca_v_proj: nn.Linear
    ca_qpos_sine_proj: nn.Linear

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        for name in (
            "sa_qcontent_proj",
            "sa_qpos_proj",
            "sa_kcontent_proj",
            "sa_kpos_proj",
            "sa_v_proj",
            "ca_qcontent_proj",
            "ca_qpos_proj",
            "ca_kcontent_proj",
            "ca_kpos_proj",
            "ca_v_proj",
            "ca_qpos_sine_proj",
        ):
            setattr(self, name, nn.Linear(d_model, d_model))
        self.self_attn = PreprojectedAttention(d_model, nhead, dropout=dropout)
        self.cross_attn = PreprojectedAttention(
            2 * d_model, nhead, value_dim=d_model, dropout=dropout
        )
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = dropout
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        query_pos: Tensor,
        query_sine_embed: Tensor,
        pos: Tensor,
        memory_key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """tgt, query_pos, query_sine_embed (the conditional spatial query before projection):
        (B, Q, d); memory, pos: (B, S, d); memory_key_padding_mask: (B, S) True at padding."""
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        attn = self.self_attn(q, k, self.sa_v_proj(tgt))
        tgt = self.norm1(dropout_add(attn, tgt, self.dropout, self.training))

        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:  # first layer: DETR's positional query/key as well
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        q = concat_per_head(q, self.ca_qpos_sine_proj(query_sine_embed), self.nhead)
        k = concat_per_head(k, k_pos, self.nhead)
        out = self.cross_attn(
            q, k, self.ca_v_proj(memory), key_padding_mask=memory_key_padding_mask
        )
        tgt = self.norm2(dropout_add(out, tgt, self.dropout, self.training))
        return self.ffn(tgt)


class ConditionalDecoder(nn.Module):
    """Conditional DETR's decoder: a fixed reference point per query and conditional spatial queries.

    ``s = sigmoid(ref_point_head(query_pos))`` (normalised (x, y), computed once and never
    refined); for layer l the conditional spatial query is ``λ_q ⊙ PE(s)`` with ``PE`` the
    sine embedding of (y, x) (``d/2`` frequencies per coordinate, T = 10000) and ``λ_q = 1``
    for l = 0, else ``query_scale`` applied to the previous layer's raw (un-normalised) output.

    Args:
        layer: a :class:`ConditionalDecoderLayer`, deep-copied ``num_layers`` times; every copy
            but the first loses its ``ca_qpos_proj``.
        norm: the shared decoder norm applied to every layer's output (a ``LayerNorm``).
    """

    def __init__(
        self, layer: ConditionalDecoderLayer, num_layers: int, norm: Optional[nn.Module] = None
    ):
        super().__init__()
        self.layers = clone_layers(layer, num_layers)
        for later in list(self.layers)[1:]:
            cast(ConditionalDecoderLayer, later).ca_qpos_proj = None
        self.norm = nn.Identity() if norm is None else norm
        d = layer.d_model
        self.query_scale = MLP(d, d, d, 2)
        self.ref_point_head = MLP(d, d, 2, 2)

    def reference_points(self, query_pos: Tensor) -> Tensor:
        """(B, Q, d) → normalised reference points (B, Q, 2) as (x, y)."""
        return self.ref_point_head(query_pos).sigmoid()

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        query_pos: Tensor,
        pos: Tensor,
        memory_key_padding_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Returns every layer's normed output (num_layers, B, Q, d) and the reference points (B, Q, 2)."""
        reference = self.reference_points(query_pos)
        sine = sine_embed_coordinates(reference[..., [1, 0]], num_pos_feats=tgt.shape[-1] // 2).to(
            tgt.dtype
        )
        outputs = []
        for i, layer in enumerate(self.layers):
            query_sine_embed = sine if i == 0 else sine * self.query_scale(tgt)
            tgt = layer(
                tgt,
                memory,
                query_pos=query_pos,
                query_sine_embed=query_sine_embed,
                pos=pos,
                memory_key_padding_mask=memory_key_padding_mask,
            )
            outputs.append(self.norm(tgt))
        return torch.stack(outputs), reference
