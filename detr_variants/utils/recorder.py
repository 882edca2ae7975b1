"""Record what the decoders' cross-attention looks at, for the papers' visualisations.

:func:`record_attention` registers forward hooks on the :class:`~detr_variants.layers.tap.Tap`
that each decoder layer's cross-attention calls, and removes them on exit. Unused, the taps
cost one empty module call; the attention maps below are computed only while recording, from
the very tensors the layer uses.

What one decoder layer's record holds (B images, Q queries, H heads, S memory tokens):

* Deformable DETR (``MultiScaleDeformableAttention``, paper eq. 3): ``spatial_shapes`` (L, 2),
  ``reference_points`` (B, Q, L, 2 or 4), ``locations`` (B, Q, H, L, P, 2) normalised (x, y) on
  the padded level maps, ``weights`` (B, Q, H, L, P), the softmax over levels x points (A_mlqk).
* Conditional DETR (``PreprojectedAttention``, paper Sec. 3.3 and Figure 1): ``content`` and
  ``spatial`` logits (B, H, Q, S), ``c_qᵀc_k`` and ``p_qᵀp_k`` scaled as the layer scales them,
  ``weights`` (B, H, Q, S) = softmax(content + spatial) over the unpadded tokens, and ``padding``
  (B, S), True at padding (or None).
* SMCA (``SpatialModulation`` and ``GaussianModulatedAttention``, paper eq. 4-9): ``priors``, per
  level (B, H, Q, h_l·w_l), ``log G``; ``weights``, per level, the modulated attention
  ``softmax(q·kᵀ/√d + log G)`` (a softmax per level with scale selection, one over all levels
  without); ``level_weights`` (B, Q, L) the scale-selection weights, or None; ``spatial_shapes``.

The dense variants' records also hold the heads' ``value`` (B, H, S, ·), so that
``weights @ value`` reproduces the layer (the tests check it).
"""

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from ..layers.attention import attention_weights
from ..layers.conditional_attention import ConditionalDecoderLayer
from ..layers.deformable_transformer import DeformableDecoderLayer
from ..layers.smca_attention import SMCADecoderLayer, _full_bias

__all__ = ["AttentionRecord", "record_attention"]

_KINDS = {
    DeformableDecoderLayer: "deformable",
    ConditionalDecoderLayer: "conditional",
    SMCADecoderLayer: "smca",
}


class AttentionRecord:
    """What :func:`record_attention` collected.

    Attributes:
        kind: ``"deformable"``, ``"conditional"`` or ``"smca"``.
        layers: decoder layer index → that layer's record (a dict, see the module docstring),
            for the recorded layers of the latest forward pass.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self.layers: Dict[int, Dict] = {}


def _decoder_layers(model: nn.Module) -> List[nn.Module]:
    layers = [m for m in model.modules() if type(m) in _KINDS]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no Deformable, Conditional or SMCA decoder layer to record"
        )
    return layers


def _deformable_hook(store: Dict):
    def hook(module, args, kwargs, output):
        store.update({k: v.detach() for k, v in kwargs.items()})

    return hook


def _conditional_hook(store: Dict, attention: nn.Module):
    """Splits each head's ``[content | spatial]`` query and key (``concat_per_head``) in two."""

    def hook(module, args, kwargs, output):
        q, k, v, mask = (kwargs[n].detach() for n in ("q", "k", "v", "attn_mask"))
        half = q.shape[-1] // 2
        scale = attention.scaling
        content = (q[..., :half] * scale) @ k[..., :half].transpose(-2, -1)
        spatial = (q[..., half:] * scale) @ k[..., half:].transpose(-2, -1)
        store.update(
            content=content,
            spatial=spatial,
            weights=attention_weights(q, k, mask, scale),
            value=v,
            padding=None if mask is None else ~mask[:, 0, 0],
        )

    return hook


def _smca_prior_hook(store: Dict):
    def hook(module, args, output):
        store.update(priors=[p.detach() for p in output], spatial_shapes=list(args[3]))

    return hook


def _smca_attention_hook(store: Dict):
    """The modulated attention as ``GaussianModulatedAttention`` applies it (same biases)."""

    def hook(module, args, kwargs, output):
        q, k, v = (kwargs[n].detach() for n in ("q", "k", "v"))
        biases, lengths, level_weights = (kwargs[n] for n in ("biases", "lengths", "level_weights"))
        if level_weights is None:  # one softmax over the tokens of all levels
            bias = torch.cat([_full_bias(b, q, n) for b, n in zip(biases, lengths)], dim=-1)
            weights = list(attention_weights(q, k, bias.detach()).split(lengths, dim=-1))
        else:  # a softmax per level (scale-selection attention)
            weights = [
                attention_weights(q, k_l, None if b is None else b.detach())
                for k_l, b in zip(k.split(lengths, dim=2), biases)
            ]
        store.update(
            weights=weights,
            value=v,
            level_weights=None if level_weights is None else level_weights.detach(),
        )

    return hook


@contextlib.contextmanager
def record_attention(
    model: nn.Module, layers: Optional[Sequence[int]] = None
) -> Iterator[AttentionRecord]:
    """Records the decoder cross-attention of ``model`` while the context is open.

    Args:
        model: a Deformable DETR, Conditional DETR or SMCA (single- or multi-scale) detector, or
            any module holding their decoder layers.
        layers: decoder layer indices to record (negative ones count from the end); None: all.
            Conditional DETR and SMCA keep (B, H, Q, S) maps per layer, so record few on large
            images.

    Yields:
        An :class:`AttentionRecord` filled by every forward pass inside the context.

    Example::

        with record_attention(model, layers=[-1]) as record:
            outputs = model([{"image": image}])
        record.layers[len(model.decoder.layers) - 1]["locations"]
    """
    decoder_layers = _decoder_layers(model)
    record = AttentionRecord(_KINDS[type(decoder_layers[0])])
    n = len(decoder_layers)
    if layers is not None and any(not -n <= i < n for i in layers):
        raise ValueError(f"decoder layers {list(layers)} asked for; the model has {n}")
    wanted = range(n) if layers is None else sorted({i % n for i in layers})
    handles = []
    try:
        for i in wanted:
            layer, store = decoder_layers[i], record.layers.setdefault(i, {})
            attention = layer.cross_attn
            if record.kind == "deformable":
                hook = _deformable_hook(store)
            elif record.kind == "conditional":
                hook = _conditional_hook(store, attention)
            else:
                hook = _smca_attention_hook(store)
                handles.append(layer.modulation.register_forward_hook(_smca_prior_hook(store)))
            handles.append(attention.tap.register_forward_hook(hook, with_kwargs=True))
        yield record
    finally:
        for handle in handles:
            handle.remove()
