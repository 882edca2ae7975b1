"""Conditional DETR (Meng et al. 2021): conditional spatial queries for fast training convergence."""
import math

import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ...layers.box_ops import inverse_sigmoid
from ...layers.mlp import MLP
from ...layers.transformer import xavier_init_
from .base import SetPredictionDetector, set_prediction_outputs


@META_ARCH_REGISTRY.register()
class ConditionalDETR(SetPredictionDetector):
    """DETR's single-scale encoder with the conditional decoder and a sigmoid (focal-loss) head.

    Boxes are predicted relative to each query's fixed reference point s (paper eq. 1,
    official ``ConditionalDETR.forward``): ``sigmoid(bbox_embed(f) + [logit(s), 0, 0])``. The
    class head has one sigmoid output per class (bias ``-log(99)``, prior 0.01), both heads are
    shared by all decoder layers, and the last box layer starts at zero. Inference keeps the
    top ``test_topk`` (100) of queries × classes.

    Args:
        encoder: DETR's :class:`TransformerEncoder` (post-norm).
        decoder: a :class:`~detr_variants.layers.conditional_attention.ConditionalDecoder`.
        position_embedding: maps the padding mask to (B, hidden_dim, H, W) (DETR's sine).
        num_queries: object queries (300 in the paper).
        in_feature: the backbone output the transformer reads (``"res5"``).
        **kwargs: :class:`SetPredictionDetector` arguments.
    """

    def __init__(self, *, encoder: nn.Module, decoder: nn.Module, position_embedding: nn.Module,
                 num_queries: int = 300, hidden_dim: int = 256, in_feature: str = "res5",
                 aux_loss: bool = True, **kwargs):
        super().__init__(class_score="sigmoid", **kwargs)
        self.in_feature = in_feature
        self.aux_loss = aux_loss
        self.input_proj = nn.Conv2d(self.backbone.output_shape()[in_feature].channels, hidden_dim, 1)
        self.position_embedding = position_embedding
        self.encoder = encoder
        self.decoder = decoder
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, self.num_classes)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        xavier_init_(self.encoder)
        xavier_init_(self.decoder)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def compute_outputs(self, images, padding_mask):
        features, masks = self.backbone_features(images, padding_mask)
        src = self.input_proj(features[self.in_feature])
        mask = masks[self.in_feature]
        pos = self.position_embedding(mask).to(src.dtype).flatten(2).transpose(1, 2)
        src, mask = src.flatten(2).transpose(1, 2), mask.flatten(1)
        memory = self.encoder(src, pos=pos, key_padding_mask=mask)
        query_pos = self.query_embed.weight.unsqueeze(0).expand(src.shape[0], -1, -1)
        hs, reference = self.decoder(query_pos.new_zeros(query_pos.shape), memory, query_pos=query_pos,
                                     pos=pos, memory_key_padding_mask=mask)
        delta = self.bbox_embed(hs)
        boxes = torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], dim=-1).sigmoid()
        return set_prediction_outputs(self.class_embed(hs), boxes, self.aux_loss)
