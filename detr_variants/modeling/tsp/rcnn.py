"""TSP-RCNN (Sun et al. 2021, "Rethinking Transformer-based Set Prediction for Object Detection").

Faster R-CNN whose box head is an encoder-only transformer over the RoIs of an image, trained
with the restricted matching (each GT takes its best RoI among those with IoU >= 0.5). Built as
detectron2 pieces: :class:`TSPRCNN` is a ``GeneralizedRCNN`` and :class:`TransformerROIHeads`
a registered ``ROIHeads``, so detectron2's ``FPN``, ``RPN``, ``ROIPooler`` (ROIAlignV2),
``Box2BoxTransform``, ``Matcher``, sampling and ``fast_rcnn_inference`` are used unchanged.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec, cat, get_norm
from detectron2.modeling import META_ARCH_REGISTRY, ROI_HEADS_REGISTRY
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.proposal_generator.proposal_utils import (
    add_ground_truth_to_proposals_single_image,
)
from detectron2.modeling.roi_heads import ROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage
from fvcore.nn import giou_loss
from torch import Tensor, nn

from ...layers.box_ops import box_xyxy_to_cxcywh
from ...layers.mlp import MLP
from ...layers.position_encoding import sine_embed_coordinates
from ...layers.transformer import xavier_init_
from .common import event_storage, random_keep_count, unmask_empty_rows


class TSPRPNHead(nn.Module):
    """The released RPN head (``MyStandardRPNHead``): separate objectness and box-delta towers of
    ``num_convs`` Conv3x3 + per-level norm + ReLU, then 1x1 objectness and delta convs (normal
    std 0.01). A drop-in for detectron2's ``StandardRPNHead`` inside ``RPN``."""

    def __init__(
        self,
        *,
        in_channels: int = 256,
        num_anchors: int = 9,
        box_dim: int = 4,
        num_convs: int = 2,
        num_levels: int = 5,
        norm: str = "SyncBN",
    ):
        super().__init__()

        def convs():
            return nn.ModuleList(
                nn.Conv2d(in_channels, in_channels, 3, padding=1) for _ in range(num_convs)
            )

        def norms():  # one set per pyramid level
            return nn.ModuleList(
                nn.ModuleList(
                    get_norm(norm, in_channels) or nn.Identity() for _ in range(num_convs)
                )
                for _ in range(num_levels)
            )

        self.obj_convs, self.anchor_convs = convs(), convs()
        self.obj_norms, self.anchor_norms = norms(), norms()
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * box_dim, 1)
        for layer in (self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)  # type: ignore[arg-type]  # a Conv2d built with a bias

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        if len(features) != len(self.obj_norms):
            raise ValueError(
                f"TSPRPNHead has norms for {len(self.obj_norms)} levels, got {len(features)}"
            )
        logits, deltas = [], []
        for x, obj_norms, anchor_norms in zip(features, self.obj_norms, self.anchor_norms):
            t_obj, t_anchor = x, x
            for conv, norm in zip(self.obj_convs, obj_norms):
                t_obj = F.relu(norm(conv(t_obj)))
            for conv, norm in zip(self.anchor_convs, anchor_norms):
                t_anchor = F.relu(norm(conv(t_anchor)))
            logits.append(self.objectness_logits(t_obj))
            deltas.append(self.anchor_deltas(t_anchor))
        return logits, deltas


def roi_position_encoding(
    boxes: Tensor, image_size: Tuple[int, int], num_pos_feats: int = 64
) -> Tensor:
    """TSP-RCNN's RoI positional encoding: the box normalised by the image size as the 8 values
    [cx, cy, w, h, x1, y1, x2, y2], each × 2π with ``num_pos_feats`` interleaved sin/cos
    frequencies (T = 10000), concatenated in that order → (N, 8 · num_pos_feats)."""
    h, w = image_size
    xyxy = boxes.float() / boxes.new_tensor([w, h, w, h], dtype=torch.float32)
    return sine_embed_coordinates(
        torch.cat([box_xyxy_to_cxcywh(xyxy), xyxy], dim=-1), num_pos_feats
    )


def pad_per_image(x: Tensor, counts: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """(sum(counts), ...) → (B, max(counts), ...) zero-padded, and the (B, max) padding mask."""
    n = max(counts, default=0)
    out = x.new_zeros((len(counts), n) + x.shape[1:])
    mask = torch.ones((len(counts), n), dtype=torch.bool, device=x.device)
    for i, part in enumerate(x.split(list(counts))):
        out[i, : len(part)] = part
        mask[i, : len(part)] = False
    return out, mask


class TSPBoxHead(nn.Module):
    """RoIAlign features → ``Linear`` to ``hidden_dim`` (+ ``Linear`` of the RoI position
    encoding) → LayerNorm → encoder-only transformer over the RoIs of each image, the RoI
    encoding as ``pos`` in every layer and padded RoIs masked (``MyFastRCNNTransformerHead``
    with ``NUM_FC 1``, ``USE_POSITION_ENCODING``). Xavier init of every matrix, as released.

    Args:
        in_channels, pooler_resolution: the pooled feature shape (256, 7).
        encoder: :class:`TransformerEncoder` of width ``hidden_dim``.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        in_channels: int = 256,
        pooler_resolution: int = 7,
        hidden_dim: int = 512,
        use_position_encoding: bool = True,
    ):
        super().__init__()
        if hidden_dim % 8:
            raise ValueError(f"hidden_dim must be a multiple of 8 (8 box values), got {hidden_dim}")
        self.hidden_dim = hidden_dim
        self.input_proj = nn.Linear(in_channels * pooler_resolution**2, hidden_dim)
        self.pos_proj = nn.Linear(hidden_dim, hidden_dim) if use_position_encoding else None
        self.input_norm = nn.LayerNorm(hidden_dim)
        self.encoder = encoder
        xavier_init_(self)

    @property
    def output_shape(self) -> ShapeSpec:
        return ShapeSpec(channels=self.hidden_dim)

    def forward(self, pooled: Tensor, proposals: List[Instances]) -> Tensor:
        """pooled: (R, C, S, S) for the proposals of all images in order. Returns (R, d)."""
        x = self.input_proj(pooled.flatten(1))
        pos = None
        if self.pos_proj is not None:
            pos = cat(
                [
                    roi_position_encoding(
                        p.proposal_boxes.tensor, p.image_size, self.hidden_dim // 8
                    )
                    for p in proposals
                ]
            ).to(x.dtype)
            x = x + self.pos_proj(pos)
        x = self.input_norm(x)
        counts = [len(p) for p in proposals]
        if sum(counts) == 0:
            return x
        x, mask = pad_per_image(x, counts)
        pos = None if pos is None else pad_per_image(pos, counts)[0]
        x = self.encoder(x, pos=pos, key_padding_mask=unmask_empty_rows(mask))
        return x[~mask]


class TSPFastRCNNOutputLayers(FastRCNNOutputLayers):
    """detectron2's ``FastRCNNOutputLayers`` (softmax over K + background, inference with
    ``fast_rcnn_inference``) with TSP's box MLP and losses (``rcnn/my_fast_rcnn_output.py``,
    ``USE_OBJ_LOSS``):

    - ``loss_cls``: the RoIs with IoU >= 0.5 to a GT are its candidates; the restricted matching
      (``-softmax_gt + 2·GIoU loss``) gives each GT one RoI, which keeps the GT class, every
      other RoI is background. Cross-entropy × focal weight (background: γ(1-p_t)^γ,
      foreground 1) × (1 matched / ``eos_coef`` other), / Σ weights. As released, the loss is
      0 when nothing in the batch is matched.
    - ``loss_box_reg``: over all candidates, ``l1_weight``·L1(deltas) + ``giou_weight``·GIoU
      loss of the decoded box, / number of sampled RoIs.

    Args:
        hidden_dim: the box head's output width.
        matcher: :class:`~detr_variants.modeling.matcher.RestrictedMatcher`.
        **kwargs: ``FastRCNNOutputLayers`` arguments (``box2box_transform``, ``num_classes``,
            ``cls_agnostic_bbox_reg``, ``test_*``, ``loss_weight``).
    """

    def __init__(
        self,
        *,
        hidden_dim: int = 512,
        matcher: nn.Module,
        eos_coef: float = 0.1,
        focal_gamma: float = 2.0,
        l1_weight: float = 1.0,
        giou_weight: float = 2.0,
        **kwargs,
    ):
        super().__init__(ShapeSpec(channels=hidden_dim), **kwargs)
        out = self.bbox_pred.out_features  # type: ignore[has-type]  # detectron2's Linear
        self.bbox_pred = MLP(hidden_dim, hidden_dim, out, 3)
        nn.init.normal_(self.bbox_pred.output_layer.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.output_layer.bias)
        self.matcher = matcher
        self.eos_coef = eos_coef
        self.focal_gamma = focal_gamma
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight

    def losses(
        self, predictions: Tuple[Tensor, Tensor], proposals: List[Instances]
    ) -> Dict[str, Tensor]:
        scores, deltas = predictions
        k = self.num_classes
        proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals])
        gt_boxes = cat([p.gt_boxes.tensor for p in proposals])
        gt_classes = cat([p.gt_classes for p in proposals])
        stride = max((int(p.gt_idxs.max()) + 1 for p in proposals if len(p)), default=1)
        gt_index = cat(
            [p.gt_idxs + i * stride for i, p in enumerate(proposals)]
        )  # unique over the batch
        fg = (gt_classes >= 0) & (gt_classes < k)
        if deltas.shape[1] == 4:  # class-agnostic
            pred_deltas = deltas
        else:  # the deltas of the GT class (of class K-1 for background RoIs, unused)
            pred_deltas = deltas.view(len(deltas), k, 4)[
                torch.arange(len(deltas), device=deltas.device), gt_classes.clamp(0, k - 1)
            ]
        pred_boxes = self.box2box_transform.apply_deltas(pred_deltas, proposal_boxes)

        with torch.no_grad():
            prob = scores.softmax(-1)
            class_cost = -prob[torch.arange(len(prob), device=prob.device), gt_classes.clamp(0, k)][
                fg
            ]
            giou_cost = giou_loss(pred_boxes[fg], gt_boxes[fg], reduction="none")
            fg_pos = torch.nonzero(fg).squeeze(1)
            matched = fg_pos[self.matcher(class_cost, giou_cost, gt_index[fg])[0]]
        target = torch.full_like(gt_classes, k)
        target[matched] = gt_classes[matched]
        if matched.numel() == 0:
            loss_cls = scores.sum() * 0.0
        else:
            ce = F.cross_entropy(scores, target, reduction="none")
            with torch.no_grad():
                p_t = prob.gather(1, target[:, None]).squeeze(1)
                focal = self.focal_gamma * (1 - p_t) ** self.focal_gamma
                focal[target < k] = 1.0
                weight = torch.full_like(ce, self.eos_coef)
                weight[matched] = 1.0
            loss_cls = (ce * focal * weight).sum() / (weight.sum() + 1e-6)

        if fg.any():
            target_deltas = self.box2box_transform.get_deltas(proposal_boxes[fg], gt_boxes[fg])
            l1 = (pred_deltas[fg] - target_deltas).abs().sum()
            loss_box = self.l1_weight * l1 + self.giou_weight * giou_loss(
                pred_boxes[fg], gt_boxes[fg], reduction="sum"
            )
            loss_box = loss_box / max(len(gt_classes), 1)
        else:
            loss_box = deltas.sum() * 0.0
        if len(gt_classes):
            storage = get_event_storage()
            storage.put_scalar("fast_rcnn/num_candidates", fg.sum().item() / len(proposals))
            storage.put_scalar("fast_rcnn/num_matched", matched.numel() / len(proposals))
        losses = {"loss_cls": loss_cls, "loss_box_reg": loss_box}
        return {name: value * self.loss_weight.get(name, 1.0) for name, value in losses.items()}


def jitter_boxes(boxes: Tensor) -> Tensor:
    """The released ``add_noise_to_boxes``: centre moved by U(-0.1, 0.1)·(w, h), size scaled by
    0.8^U(-1, 1)."""
    cxcywh = box_xyxy_to_cxcywh(boxes)
    u = torch.rand_like(cxcywh)
    center = cxcywh[:, :2] + cxcywh[:, 2:] * (u[:, :2] - 0.5) * 0.2
    size = cxcywh[:, 2:] * 0.8 ** (u[:, 2:] * 2 - 1)
    return torch.cat([center - size / 2, center + size / 2], dim=1)


@ROI_HEADS_REGISTRY.register()
class TransformerROIHeads(ROIHeads):
    """TSP-RCNN's ROI heads (``rcnn/rcnn_heads.py TransformerROIHeads``).

    Training sampling as released: detectron2's IoU matcher and fg/bg sampling; jittered GT
    boxes are appended only for images where no proposal matches a GT; then a random drop
    keeps ``int(n·u)`` sampled RoIs per image, ``u ~ U(random_drop, 1]`` (drawn per image).

    Args:
        box_in_features: pooled levels (P2-P5).
        box_pooler: detectron2 ``ROIPooler`` (ROIAlignV2 7x7).
        box_head: :class:`TSPBoxHead`. box_predictor: :class:`TSPFastRCNNOutputLayers`.
        random_drop: lower bound of the kept fraction (1.0: no drop).
        **kwargs: ``ROIHeads`` arguments (``num_classes``, ``batch_size_per_image``,
            ``positive_fraction``, ``proposal_matcher``, ``proposal_append_gt``).
    """

    def __init__(
        self,
        *,
        box_in_features: Sequence[str],
        box_pooler: nn.Module,
        box_head: nn.Module,
        box_predictor: TSPFastRCNNOutputLayers,
        random_drop: float = 0.7,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.box_in_features = list(box_in_features)
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.random_drop = random_drop

    def forward(
        self,
        images: ImageList,
        features: Dict[str, Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
    ):
        """detectron2's ``ROIHeads`` interface: pool → transformer box head → predictor."""
        del images
        if self.training:
            if targets is None:
                raise ValueError("training needs the ground truth (targets)")
            proposals = self.label_and_sample_proposals(proposals, targets)
            return proposals, self.box_predictor.losses(
                self.predictions(features, proposals), proposals
            )
        predictions = self.predictions(features, proposals)
        results, kept = self.box_predictor.inference(predictions, proposals)
        for inst, proposal_index in zip(
            results, self.proposal_indices(predictions, proposals, kept)
        ):
            inst.query_indices = proposal_index  # the proposal (RoI) behind each detection
        return results, {}

    def proposal_indices(
        self, predictions: Tuple[Tensor, Tensor], proposals: List[Instances], kept: List[Tensor]
    ) -> List[Tensor]:
        """``fast_rcnn_inference``'s kept indices as indices into each image's proposals: it
        numbers the rows left after dropping those with a non-finite box or score."""
        if all(torch.isfinite(p).all() for p in predictions):
            return kept
        boxes = self.box_predictor.predict_boxes(predictions, proposals)
        scores = self.box_predictor.predict_probs(predictions, proposals)
        return [
            torch.nonzero(torch.isfinite(b).all(1) & torch.isfinite(s).all(1)).squeeze(1)[k]
            for b, s, k in zip(boxes, scores, kept)
        ]

    def predictions(
        self, features: Dict[str, Tensor], proposals: List[Instances]
    ) -> Tuple[Tensor, Tensor]:
        """Class logits (R, K+1) and box deltas (R, K·4 or 4) of all images' proposals."""
        pooled = self.box_pooler(
            [features[f] for f in self.box_in_features], [p.proposal_boxes for p in proposals]
        )
        return self.box_predictor(self.box_head(pooled, proposals))

    def box_outputs(
        self, features: Dict[str, Tensor], proposals: List[Instances]
    ) -> Dict[str, Tensor]:
        """Raw outputs padded per image: ``pred_logits`` (B, N, K+1), ``pred_boxes``
        (B, N, K·4 or 4) absolute xyxy, ``valid`` (B, N)."""
        predictions = self.predictions(features, proposals)
        counts = [len(p) for p in proposals]
        logits, padding = pad_per_image(predictions[0], counts)
        boxes = (
            cat(self.box_predictor.predict_boxes(predictions, proposals))
            if sum(counts)
            else predictions[1]
        )
        return {
            "pred_logits": logits,
            "pred_boxes": pad_per_image(boxes, counts)[0],
            "valid": ~padding,
        }

    @torch.no_grad()
    def label_and_sample_proposals(
        self, proposals: List[Instances], targets: List[Instances]
    ) -> List[Instances]:
        """Adds ``gt_classes``, ``gt_boxes`` and ``gt_idxs`` (index of the matched GT) to the
        sampled proposals."""
        sampled_proposals, num_fg, num_bg = [], [], []
        for props, tgt in zip(proposals, targets):
            matched_idxs, matched_labels = self.proposal_matcher(
                pairwise_iou(tgt.gt_boxes, props.proposal_boxes)
            )
            if self.proposal_append_gt and len(tgt) and not (matched_labels == 1).any():
                props = add_ground_truth_to_proposals_single_image(
                    Boxes(jitter_boxes(tgt.gt_boxes.tensor)), props
                )
                matched_idxs, matched_labels = self.proposal_matcher(
                    pairwise_iou(tgt.gt_boxes, props.proposal_boxes)
                )
            sampled, gt_classes = self._sample_proposals(
                matched_idxs, matched_labels, tgt.gt_classes
            )
            if self.random_drop < 1.0:
                keep = torch.randperm(len(sampled), device=sampled.device)[
                    : random_keep_count(len(sampled), self.random_drop)
                ]
                sampled, gt_classes = sampled[keep], gt_classes[keep]
            props = props[sampled]
            props.gt_classes = gt_classes
            if len(tgt):
                props.gt_boxes = tgt.gt_boxes[matched_idxs[sampled]]
                props.gt_idxs = matched_idxs[sampled]
            else:
                props.gt_boxes = Boxes(tgt.gt_boxes.tensor.new_zeros((len(sampled), 4)))
                props.gt_idxs = torch.zeros_like(sampled)
            num_bg.append((gt_classes == self.num_classes).sum().item())
            num_fg.append(len(gt_classes) - num_bg[-1])
            sampled_proposals.append(props)
        storage = get_event_storage()
        storage.put_scalar("roi_head/num_fg_samples", sum(num_fg) / len(num_fg))
        storage.put_scalar("roi_head/num_bg_samples", sum(num_bg) / len(num_bg))
        return sampled_proposals


@META_ARCH_REGISTRY.register()
class TSPRCNN(GeneralizedRCNN):
    """TSP-RCNN: detectron2's ``GeneralizedRCNN`` (FPN, RPN on P3-P7 with
    :class:`TSPRPNHead`, :class:`TransformerROIHeads`). It also trains outside a detectron2
    trainer (it opens an ``EventStorage`` when none is active) and has :meth:`compute_outputs`
    for the FLOP counter."""

    @property
    def num_classes(self) -> int:
        return self.roi_heads.num_classes

    def forward(self, batched_inputs: List[Dict]):
        with event_storage():
            return super().forward(batched_inputs)

    def compute_outputs(
        self, images: ImageList, padding_mask: Optional[Tensor] = None
    ) -> Dict[str, Tensor]:
        """Inference-mode raw outputs for normalised, padded ``images`` (see
        :meth:`TransformerROIHeads.box_outputs`); ``padding_mask`` is unused (the image sizes
        say it)."""
        features = self.backbone(images.tensor)
        proposals, _ = self.proposal_generator(images, features, None)
        return self.roi_heads.box_outputs(features, proposals)
