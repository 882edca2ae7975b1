"""Scaled dot-product attention whose attention-weight dropout is :func:`~.dropout.dropout`.

``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` draw that dropout with PyTorch's
CPU sampler (see ``dropout.py``); for DETR's encoder at 800x1216 the weights are 8 x 950^2 per
image and layer. When training on the CPU these versions compute the attention explicitly and
use the native mask; everywhere else they are PyTorch's own functions.
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
    allowed, a float mask is added to the logits)."""
    if not native_dropout_applies(q, dropout_p, True):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
        )
    logits = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)
    if attn_mask is not None:
        logits = (
            logits.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else logits + attn_mask
        )
    return dropout(logits.softmax(-1), dropout_p, True) @ v


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (same parameters and state dict) that, when training on the CPU
    with dropout, computes the attention with :func:`scaled_dot_product_attention`. Only the
    configuration the DETR layers use takes that path: batch-first, packed input projection,
    no extra key/value biases, a boolean key padding mask if any, no attention weights returned;
    any other call is PyTorch's."""

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        if (
            need_weights
            or attn_mask is not None
            or is_causal
            or not self.batch_first
            or (key_padding_mask is not None and key_padding_mask.dtype != torch.bool)
            or not self._qkv_same_embed_dim
            or self.bias_k is not None
            or self.add_zero_attn
            or self.in_proj_bias is None
            or not native_dropout_applies(query, self.dropout, self.training)
        ):
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        (n, lq, e), h = query.shape, self.num_heads
        w, b = self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)
        q, k, v = (
            F.linear(x, w_i, b_i).view(n, x.shape[1], h, e // h).transpose(1, 2)
            for x, w_i, b_i in zip((query, key, value), w, b)
        )
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout)
        return self.out_proj(out.transpose(1, 2).reshape(n, lq, e)), None
