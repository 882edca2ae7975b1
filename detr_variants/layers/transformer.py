"""DETR's transformer layers (Carion et al. 2020), batch-first.

Post-norm by default as in DETR; ``normalize_before=True`` gives the pre-norm layers TSP uses.
Positional encodings are added to queries and keys (never to values) in every layer.
"""

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiheadAttention
from .dropout import dropout_add, ffn_hidden


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


def _activation(name: str):
    try:
        return {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; use relu, gelu or glu") from None


class FeedForward(nn.Module):
    """``x + dropout(linear2(dropout(activation(linear1(x)))))`` with post- or pre-LayerNorm."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = dropout
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(x) if self.normalize_before else x
        h = ffn_hidden(y, self.linear1, self.activation, self.dropout, self.training)
        x = dropout_add(self.linear2(h), x, self.dropout, self.training)
        return x if self.normalize_before else self.norm(x)


class TransformerEncoderLayer(nn.Module):
    """Self-attention over flattened feature tokens, then FFN (DETR, eq. in Sec. 3.2)."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = dropout
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation, normalize_before)
        self.normalize_before = normalize_before

    def forward(
        self, src: Tensor, pos: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        """src, pos: (B, S, C); key_padding_mask: (B, S) True at padding."""
        x = self.norm(src) if self.normalize_before else src
        q = k = _with_pos(x, pos)
        attn = self.self_attn(q, k, x, key_padding_mask=key_padding_mask)[0]
        src = dropout_add(attn, src, self.dropout, self.training)
        if not self.normalize_before:
            src = self.norm(src)
        return self.ffn(src)


class TransformerDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the encoder memory, then FFN (DETR)."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.cross_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = dropout
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation, normalize_before)
        self.normalize_before = normalize_before

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        query_pos: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """tgt, query_pos: (B, Q, C); memory, pos: (B, S, C)."""
        x = self.norm1(tgt) if self.normalize_before else tgt
        q = k = _with_pos(x, query_pos)
        attn = self.self_attn(q, k, x)[0]
        tgt = dropout_add(attn, tgt, self.dropout, self.training)
        if not self.normalize_before:
            tgt = self.norm1(tgt)
        x = self.norm2(tgt) if self.normalize_before else tgt
        attn = self.cross_attn(
            _with_pos(x, query_pos),
            _with_pos(memory, pos),
            memory,
            key_padding_mask=memory_key_padding_mask,
        )[0]
        tgt = dropout_add(attn, tgt, self.dropout, self.training)
        if not self.normalize_before:
            tgt = self.norm2(tgt)
        return self.ffn(tgt)


def clone_layers(layer: nn.Module, num_layers: int) -> nn.ModuleList:
    """``num_layers`` independent deep copies of ``layer``."""
    return nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))


class TransformerEncoder(nn.Module):
    """A stack of encoder layers (deep copies of ``layer``) with an optional final norm."""

    def __init__(self, layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = clone_layers(layer, num_layers)
        self.norm = norm

    def forward(
        self, src: Tensor, pos: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos=pos, key_padding_mask=key_padding_mask)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """A stack of decoder layers; returns every layer's output after the shared final norm.

    Returns:
        (num_layers, B, Q, C): the intermediate outputs used for the auxiliary losses.
    """

    def __init__(self, layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = clone_layers(layer, num_layers)
        self.norm = nn.Identity() if norm is None else norm

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        query_pos: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        outputs = []
        for layer in self.layers:
            tgt = layer(
                tgt,
                memory,
                query_pos=query_pos,
                pos=pos,
                memory_key_padding_mask=memory_key_padding_mask,
            )
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


def xavier_init_(module: nn.Module) -> None:
    """Xavier-uniform on every parameter with more than one dimension (DETR's transformer init)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
