"""Multi-head attention as the DETR papers write it: input projections, scaled dot-product
attention per head, output projection.

:func:`scaled_dot_product_attention` is PyTorch's fused kernel, except when training on the CPU
with dropout: PyTorch draws that attention-weight dropout with its slow CPU sampler (see
``dropout.py``; for DETR's encoder at 800x1216 the weights are 8 x 950^2 per image and layer), so
there the attention is computed explicitly with the native dropout mask.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dropout import dropout, native_dropout_applies

__all__ = ["MultiheadAttention", "scaled_dot_product_attention"]


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> Tensor:
    """``F.scaled_dot_product_attention`` (same arguments; a bool mask is True where attention is
    allowed, a float mask is added to the logits). Pass ``dropout_p=0`` at inference."""
    if not native_dropout_applies(q, dropout_p, True):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
        )
    return dropout(attention_weights(q, k, attn_mask, scale), dropout_p, True) @ v


def attention_weights(
    q: Tensor, k: Tensor, attn_mask: Optional[Tensor] = None, scale: Optional[float] = None
) -> Tensor:
    """``softmax(q kᵀ · scale + mask)`` with ``scaled_dot_product_attention``'s mask convention."""
    logits = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)
    if attn_mask is None:
        return logits.softmax(-1)
    if attn_mask.dtype == torch.bool:
        return logits.masked_fill(~attn_mask, float("-inf")).softmax(-1)
    return (logits + attn_mask).softmax(-1)


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention with ``nn.MultiheadAttention``'s parameters, init and
    state-dict keys (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), so released DETR-family
    weights load as they are, and its call: ``(query, key, value, key_padding_mask,
    need_weights)`` → ``(output, head-averaged weights or None)``."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """query (B, Q, E), key/value (B, S, E), key_padding_mask (B, S) True at padding."""
        (n, lq, e), h = query.shape, self.num_heads
        w, b = self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)
        q, k, v = (
            F.linear(x, w_i, b_i).view(n, x.shape[1], h, e // h).transpose(1, 2)
            for x, w_i, b_i in zip((query, key, value), w, b)
        )
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        p = self.dropout if self.training else 0.0
        if need_weights:
            weights = attention_weights(q, k, mask)
            out, weights = dropout(weights, p, self.training) @ v, weights.mean(1)
        else:
            out, weights = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p), None
        return self.out_proj(out.transpose(1, 2).reshape(n, lq, e)), weights
