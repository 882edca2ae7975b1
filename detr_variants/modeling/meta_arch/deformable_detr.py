"""Deformable DETR (Zhu et al., ICLR 2021): multi-scale deformable attention, optional iterative
box refinement and two-stage proposals, faithful to the official implementation."""

import copy
import math
from typing import Dict, List, Sequence

import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch import Tensor, nn

from ...layers.deformable_transformer import (
    DeformableDecoder,
    DeformableEncoder,
    SpatialShapes,
    flatten_levels,
    level_layout,
    padding_or_none,
    refine_reference,
    valid_ratios,
)
from ...layers.mlp import MLP
from ...layers.ms_deform_attn import MultiScaleDeformableAttention, level_shapes
from ...layers.position_encoding import sine_embed_coordinates
from ..neck import MultiLevelNeck
from .base import SetPredictionDetector, set_prediction_outputs


def _class_head(hidden_dim: int, num_classes: int) -> nn.Linear:
    """A sigmoid class head with the official prior-probability (0.01) bias."""
    head = nn.Linear(hidden_dim, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
    return head


@META_ARCH_REGISTRY.register()
class DeformableDETR(SetPredictionDetector):
    """Deformable DETR.

    Args:
        in_features: backbone outputs used as levels (C3-C5, or C5 alone for single-scale).
        num_feature_levels: levels fed to the transformer; levels beyond ``in_features`` are
            made by 3x3 stride-2 convs, the first on the raw last backbone feature (C5).
        encoder, decoder: :class:`DeformableEncoder` / :class:`DeformableDecoder`.
        position_embedding: sine encoding with the -0.5 offset.
        with_box_refine: per-layer heads; each decoder layer refines the previous box (Sec. 4.2).
        two_stage: queries from the top-scoring encoder proposals (Sec. 4.2, App. A.4). Each
            encoder token is a proposal, scored by ``proposal_class_embed``, a one-logit
            (foreground) head: the paper's binary classification, and in effect the official
            head ``class_embed[L]``, of which only column 0 ranks proposals and gets positives
            (every encoder-output label is 0). Its box head is ``bbox_embed[L]``, as official.
    """

    classifications: Sequence[str] = ("sigmoid",)

    def __init__(
        self,
        *,
        in_features: Sequence[str],
        num_feature_levels: int,
        encoder: DeformableEncoder,
        decoder: DeformableDecoder,
        position_embedding: nn.Module,
        num_queries: int = 300,
        hidden_dim: int = 256,
        with_box_refine: bool = False,
        two_stage: bool = False,
        aux_loss: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_feature_levels < len(in_features):
            raise ValueError("num_feature_levels must be at least len(in_features)")
        self.in_features = list(in_features)
        self.num_feature_levels = num_feature_levels
        self.num_queries = num_queries
        self.hidden_dim = hidden_dim
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.aux_loss = aux_loss
        self.encoder = encoder
        self.decoder = decoder
        self.neck = MultiLevelNeck(
            input_shapes=self.backbone.output_shape(),
            in_features=self.in_features,
            hidden_dim=hidden_dim,
            num_levels=num_feature_levels,
            position_embedding=position_embedding,
            norm="GN",
        )
        if two_stage:
            self.enc_output = nn.Linear(hidden_dim, hidden_dim)
            self.enc_output_norm = nn.LayerNorm(hidden_dim)
            self.pos_trans = nn.Linear(hidden_dim * 2, hidden_dim * 2)
            self.pos_trans_norm = nn.LayerNorm(hidden_dim * 2)
        else:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
            self.reference_points = nn.Linear(hidden_dim, 2)
        self._reset_transformer_parameters()

        class_embed = _class_head(hidden_dim, self.num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.zeros_(bbox_embed.output_layer.weight)
        nn.init.zeros_(bbox_embed.output_layer.bias)
        num_layers = len(self.decoder.layers)
        num_boxes = num_layers + int(two_stage)  # + the encoder-proposal box head
        if with_box_refine:
            class_heads = [copy.deepcopy(class_embed) for _ in range(num_layers)]
            box_heads = [copy.deepcopy(bbox_embed) for _ in range(num_boxes)]
            nn.init.constant_(box_heads[0].output_layer.bias[2:], -2.0)
        else:
            nn.init.constant_(bbox_embed.output_layer.bias[2:], -2.0)
            class_heads, box_heads = [class_embed] * num_layers, [bbox_embed] * num_boxes  # shared
        if two_stage:
            for head in box_heads:
                nn.init.zeros_(head.output_layer.bias[2:])
        self.class_embed = nn.ModuleList(class_heads)
        self.bbox_embed = nn.ModuleList(box_heads)
        if with_box_refine:
            self.decoder.bbox_embed = self.bbox_embed
        if two_stage:
            self.proposal_class_embed = _class_head(hidden_dim, 1)

    def _reset_transformer_parameters(self) -> None:
        """The official ``DeformableTransformer._reset_parameters``."""
        for module in (self.encoder, self.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            for m in module.modules():
                if isinstance(m, MultiScaleDeformableAttention):
                    m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        if self.neck.level_embed is not None:  # always built with one (above)
            nn.init.normal_(self.neck.level_embed)

    def multi_level_features(self, images, padding_mask):
        """Projected feature maps of every level with their masks and position encodings."""
        return self.neck(*self.backbone_features(images, padding_mask), padding_mask)

    def compute_outputs(self, images, padding_mask) -> Dict:
        srcs, masks, pos = self.multi_level_features(images, padding_mask)
        spatial_shapes, level_start_index = level_layout(srcs)
        ratios = valid_ratios(masks)
        memory_mask = flatten_levels(masks)
        value_mask = padding_or_none(memory_mask)  # the attention zeroes the values at padding
        memory = self.encoder(
            flatten_levels(srcs),
            flatten_levels(pos),
            spatial_shapes,
            level_start_index,
            ratios,
            value_mask,
        )

        out_extra = {}
        if self.two_stage:
            query_pos, tgt, reference_points, enc_outputs = self.encoder_proposals(
                memory, memory_mask, spatial_shapes
            )
            out_extra["enc_outputs"] = enc_outputs
        else:
            query_pos, tgt = (
                self.query_embed.weight.unsqueeze(0)
                .expand(memory.shape[0], -1, -1)
                .chunk(2, dim=-1)
            )
            reference_points = self.reference_points(query_pos).sigmoid()
        hs, references = self.decoder(
            tgt,
            query_pos,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            ratios,
            value_mask,
        )
        logits = torch.stack([self.class_embed[i](h) for i, h in enumerate(hs)])
        boxes = torch.stack(
            [
                refine_reference(self.bbox_embed[i](h), r)
                for i, (h, r) in enumerate(zip(hs, references))
            ]
        )
        return {**set_prediction_outputs(logits, boxes, self.aux_loss), **out_extra}

    def encoder_proposals(self, memory: Tensor, memory_mask: Tensor, spatial_shapes: SpatialShapes):
        """Two-stage: score every encoder token as a proposal (one foreground logit), keep the top
        ``num_queries`` (detached) as the decoder's reference boxes and derive its queries from
        them. ``enc_outputs`` holds the (B, S, 1) logits the class-agnostic loss trains."""
        output_memory, proposals = self.proposals_from_memory(memory, memory_mask, spatial_shapes)
        enc_class = self.proposal_class_embed(output_memory)
        enc_coord_logits = self.bbox_embed[-1](output_memory) + proposals
        topk = torch.topk(enc_class[..., 0], self.num_queries, dim=1)[1]
        topk_coords = enc_coord_logits.gather(1, topk.unsqueeze(-1).expand(-1, -1, 4)).detach()
        reference_points = topk_coords.sigmoid()
        query = self.pos_trans_norm(
            self.pos_trans(sine_embed_coordinates(reference_points, self.hidden_dim // 2))
        )
        query_pos, tgt = query.chunk(2, dim=-1)
        enc_outputs = {"pred_logits": enc_class, "pred_boxes": enc_coord_logits.sigmoid()}
        return query_pos, tgt, reference_points, enc_outputs

    def proposals_from_memory(
        self, memory: Tensor, memory_mask: Tensor, spatial_shapes: SpatialShapes
    ):
        """One proposal per token: its cell centre in the valid image and a size of 0.05·2^level,
        in logit space; padding and proposals outside (0.01, 0.99) get +inf and zero memory
        (the official ``gen_encoder_output_proposals``)."""
        per_level: List[Tensor] = []
        start = 0
        for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
            mask = memory_mask[:, start : start + h * w].view(-1, h, w)
            valid_h, valid_w = (~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)
            ys, xs = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=memory.device),
                torch.arange(w, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            scale = torch.stack([valid_w, valid_h], -1).float().view(-1, 1, 1, 2)
            centres = (torch.stack([xs, ys], -1)[None] + 0.5) / scale
            sizes = torch.full_like(centres, 0.05 * 2.0**lvl)
            per_level.append(torch.cat([centres, sizes], -1).view(mask.shape[0], -1, 4))
            start += h * w
        proposals = torch.cat(per_level, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        invalid = memory_mask.unsqueeze(-1) | ~valid
        proposals = proposals.masked_fill(invalid, float("inf"))
        output_memory = self.enc_output_norm(self.enc_output(memory.masked_fill(invalid, 0.0)))
        return output_memory, proposals
