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
from .dropout import Dropout, relu_dropout_


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


def _activation(name: str):
    try:
        return {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; use relu, gelu or glu") from None


class FeedForward(nn.Module):
    """``x + Dropout(Linear(Dropout(act(Linear(x)))))`` with post- or pre-LayerNorm."""

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
        self.dropout = Dropout(dropout)
        self.dropout_out = Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def _hidden(self, y: Tensor) -> Tensor:
        # 2-d, so that the widest activation (the largest tensor of an encoder layer) is no view
        # and the ReLU + dropout can overwrite it instead of allocating another
        h = self.linear1(y.reshape(-1, y.shape[-1]))
        if self.activation is F.relu:
            return relu_dropout_(h, self.dropout.p, self.training)
        return self.dropout(self.activation(h))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(x) if self.normalize_before else x
        x = self.dropout_out(self.linear2(self._hidden(y)).view(x.shape), residual=x)
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
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation, normalize_before)
        self.normalize_before = normalize_before

    def forward(
        self, src: Tensor, pos: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        """src, pos: (B, S, C); key_padding_mask: (B, S) True at padding."""
        x = self.norm(src) if self.normalize_before else src
        q = k = _with_pos(x, pos)
        attn = self.self_attn(q, k, x, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.dropout(attn, residual=src)
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
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
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
        tgt = self.dropout1(self.self_attn(q, k, x, need_weights=False)[0], residual=tgt)
        if not self.normalize_before:
            tgt = self.norm1(tgt)
        x = self.norm2(tgt) if self.normalize_before else tgt
        attn = self.cross_attn(
            _with_pos(x, query_pos),
            _with_pos(memory, pos),
            memory,
            key_padding_mask=memory_key_padding_mask,
            need_weights=False,
        )[0]
        tgt = self.dropout2(attn, residual=tgt)
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
