"""Conditional DETR (Meng et al. 2021): conditional spatial queries for fast training convergence."""

from typing import Sequence

import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ...layers.box_ops import inverse_sigmoid
from .base import set_prediction_outputs
from .detr import DETR


@META_ARCH_REGISTRY.register()
class ConditionalDETR(DETR):
    """DETR's single-scale encoder with the conditional decoder and a sigmoid (focal-loss) head.

    Boxes are predicted relative to each query's fixed reference point s (paper eq. 1,
    official ``ConditionalDETR.forward``): ``sigmoid(bbox_embed(f) + [logit(s), 0, 0])``. The
    class head has one sigmoid output per class (prior 0.01), both heads are shared by all
    decoder layers, and the last box layer starts at zero. Inference keeps the top
    ``test_topk`` (100) of queries × classes.

    Args:
        decoder: a :class:`~detr_variants.layers.conditional_attention.ConditionalDecoder`.
        num_queries: object queries (300 in the paper).
        **kwargs: :class:`DETR` arguments.
    """

    classifications: Sequence[str] = ("sigmoid",)

    def __init__(self, *, num_queries: int = 300, **kwargs):
        super().__init__(num_queries=num_queries, **kwargs)
        nn.init.zeros_(self.bbox_embed.output_layer.weight)
        nn.init.zeros_(self.bbox_embed.output_layer.bias)

    def compute_outputs(self, images, padding_mask):
        memory, pos, mask = self.encode(images, padding_mask)
        query_pos = self.query_positions(memory.shape[0])
        hs, reference = self.decoder(
            query_pos.new_zeros(query_pos.shape),
            memory,
            query_pos=query_pos,
            pos=pos,
            memory_key_padding_mask=mask,
        )
        delta = self.bbox_embed(hs)
        boxes = torch.cat(
            [delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], dim=-1
        ).sigmoid()
        return set_prediction_outputs(self.class_embed(hs), boxes, self.aux_loss)
