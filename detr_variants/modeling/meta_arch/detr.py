"""DETR (Carion et al. 2020): the baseline every fast-converging variant is measured against."""

import math
from typing import Optional, Sequence, Tuple

from detectron2.modeling import META_ARCH_REGISTRY
from torch import Tensor, nn

from ...layers.mlp import MLP
from ...layers.transformer import xavier_init_
from .base import SetPredictionDetector, set_prediction_outputs


@META_ARCH_REGISTRY.register()
class DETR(SetPredictionDetector):
    """Single-scale encoder-decoder transformer with ``num_queries`` learned object queries.

    Softmax classification over the classes plus "no object"; a 3-layer MLP predicts sigmoid
    cxcywh boxes; every decoder layer's output is supervised (auxiliary losses). Single-scale
    variants (Conditional DETR, SMCA) subclass it and change the decoder and the heads.

    Args:
        encoder, decoder: :class:`TransformerEncoder` / :class:`TransformerDecoder`.
        position_embedding: maps the padding mask to (B, hidden_dim, H, W).
        in_feature: the backbone output the transformer reads (``"res5"``); None for a
            multi-level subclass that projects the backbone levels with its own neck.
        **kwargs: :class:`SetPredictionDetector` arguments; ``classification`` is
            ``"softmax"`` (classes + no-object, the default) or ``"sigmoid"`` (one focal-loss
            logit per class, initialised to the prior 0.01, as the fast-converging variants).
    """

    classifications: Sequence[str] = ("softmax", "sigmoid")

    def __init__(
        self,
        *,
        encoder: nn.Module,
        decoder: nn.Module,
        position_embedding: nn.Module,
        num_queries: int = 100,
        hidden_dim: int = 256,
        in_feature: Optional[str] = "res5",
        aux_loss: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.in_feature = in_feature
        self.aux_loss = aux_loss
        if in_feature is not None:
            self.input_proj = nn.Conv2d(
                self.backbone.output_shape()[in_feature].channels, hidden_dim, 1
            )
        self.position_embedding = position_embedding
        self.encoder = encoder
        self.decoder = decoder
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        no_object = int(self.classification == "softmax")
        self.class_embed = nn.Linear(hidden_dim, self.num_classes + no_object)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        xavier_init_(self.encoder)
        xavier_init_(self.decoder)
        if self.classification == "sigmoid":
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))

    def encode(self, images, padding_mask) -> Tuple[Tensor, Tensor, Tensor]:
        """Encoder memory (B, HW, C), its position encoding and its padding mask (B, HW)."""
        if self.in_feature is None:
            raise NotImplementedError("a multi-level subclass encodes its neck's levels itself")
        features, masks = self.backbone_features(images, padding_mask)
        src = self.input_proj(features[self.in_feature])
        mask = masks[self.in_feature]
        pos = self.position_embedding(mask).to(src.dtype).flatten(2).transpose(1, 2)
        src, mask = src.flatten(2).transpose(1, 2), mask.flatten(1)
        return self.encoder(src, pos=pos, key_padding_mask=mask), pos, mask

    def query_positions(self, batch_size: int) -> Tensor:
        """The learned object queries, (B, Q, C)."""
        return self.query_embed.weight.unsqueeze(0).expand(batch_size, -1, -1)

    def compute_outputs(self, images, padding_mask):
        memory, pos, mask = self.encode(images, padding_mask)
        query_pos = self.query_positions(memory.shape[0])
        hs = self.decoder(
            query_pos.new_zeros(query_pos.shape),
            memory,
            query_pos=query_pos,
            pos=pos,
            memory_key_padding_mask=mask,
        )
        return set_prediction_outputs(
            self.class_embed(hs), self.bbox_embed(hs).sigmoid(), self.aux_loss
        )
