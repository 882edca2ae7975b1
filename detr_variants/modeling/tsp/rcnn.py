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
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.proposal_generator.proposal_utils import (
    add_ground_truth_to_proposals_single_image,
)
from detectron2.modeling.roi_heads import ROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage
from fvcore.nn import giou_loss
from torch import Tensor, nn
from torchvision.ops import nms

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
    x1, y1, x2, y2 = boxes.float().unbind(-1)
    # h, w: ints or 0-d tensors, never a tensor made of ints (that would fix them in an export)
    xyxy = torch.stack([x1 / w, y1 / h, x2 / w, y2 / h], dim=-1)
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


def fixed_size_rpn_proposals(
    rpn: RPN, images: ImageList, features: Dict[str, Tensor]
) -> Tuple[Tensor, Tensor]:
    """detectron2's RPN inference (``RPN.forward`` → ``find_top_rpn_proposals``) at a fixed
    proposal count, so that it exports with symbolic image sizes: per level the
    ``pre_nms_topk`` best objectness logits; boxes with a non-finite value or score, or a side
    not above ``min_box_size`` after clipping to the image, are invalid; NMS per level
    (``torchvision.ops.nms``, as ``batched_nms`` over levels does); the kept boxes of all levels
    by descending objectness, padded (zero boxes, ``valid`` False) or truncated to
    ``post_nms_topk``. Its valid rows are detectron2's proposals in their order, except that
    detectron2 runs the level-wise NMS as one offset NMS when at most 1000 boxes enter it (CPU),
    which rounds the IoUs differently, and that tied scores may rank differently.

    Returns:
        ``boxes`` (B, post_nms_topk, 4) absolute xyxy and ``valid`` (B, post_nms_topk).
    """
    features_list = [features[f] for f in rpn.in_features]
    anchors = rpn.anchor_generator(features_list)
    logits, deltas = rpn.rpn_head(features_list)
    logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]  # (B, Hi·Wi·A), as RPN.forward
    box_dim = rpn.anchor_generator.box_dim
    deltas = [
        x.view(x.shape[0], -1, box_dim, *x.shape[-2:]).permute(0, 3, 4, 1, 2).flatten(1, -2)
        for x in deltas
    ]
    proposals = rpn._decode_proposals(anchors, deltas)
    pre_nms_topk, post_nms_topk = rpn.pre_nms_topk[rpn.training], rpn.post_nms_topk[rpn.training]
    out_boxes, out_valid = [], []
    for i, (h, w) in enumerate(images.image_sizes):
        scores, boxes, kept = [], [], []
        for level_boxes, level_logits in zip(proposals, logits):
            n = level_logits.shape[1]
            k = (
                torch.sym_min(pre_nms_topk, n)
                if isinstance(n, torch.SymInt)
                else min(pre_nms_topk, n)
            )
            s, idx = level_logits[i].topk(k)
            b = level_boxes[i, idx]
            ok = torch.isfinite(b).all(1) & torch.isfinite(s)
            b = torch.where(ok[:, None], b, 0.0)
            x1, y1, x2, y2 = b.unbind(1)
            # h, w: ints, or 0-d tensors in an export (clamp(min=int, max=tensor) does not exist)
            x1, x2 = x1.clamp(min=0).clamp(max=w), x2.clamp(min=0).clamp(max=w)
            y1, y2 = y1.clamp(min=0).clamp(max=h), y2.clamp(min=0).clamp(max=h)
            b = torch.stack([x1, y1, x2, y2], dim=1)
            ok &= (b[:, 2] - b[:, 0] > rpn.min_box_size) & (b[:, 3] - b[:, 1] > rpn.min_box_size)
            # an invalid box becomes (0, 0, 0, 0): IoU 0 with every box, so it suppresses none
            b = torch.where(ok[:, None], b, 0.0)
            s = torch.where(ok, s, float("-inf"))
            keep = torch.zeros_like(ok)
            keep[nms(b, s, rpn.nms_thresh)] = True
            scores.append(s)
            boxes.append(b)
            kept.append(keep & ok)
        # pad so that there are at least post_nms_topk rows to rank
        scores.append(logits[0].new_full((post_nms_topk,), float("-inf")))
        boxes.append(logits[0].new_zeros((post_nms_topk, 4)))
        kept.append(torch.zeros((post_nms_topk,), dtype=torch.bool, device=logits[0].device))
        kept_ = torch.cat(kept)
        ranked = torch.where(kept_, torch.cat(scores), float("-inf"))
        order = ranked.topk(post_nms_topk).indices  # ONNX TopK (a stable sort has no ONNX op)
        valid = kept_[order]
        out_boxes.append(torch.where(valid[:, None], torch.cat(boxes)[order], 0.0))
        out_valid.append(valid)
    return torch.stack(out_boxes), torch.stack(out_valid)


def fixed_size_roi_pool(pooler: ROIPooler, features: List[Tensor], boxes: Tensor) -> Tensor:
    """detectron2's ``ROIPooler.forward`` for ``boxes`` (B, N, 4) without its data-dependent
    split by level: every box is pooled on every level and keeps the one of its level
    (``assign_boxes_to_levels``, FPN eq. 1). The same values, for L times the RoIAlign work.

    Returns:
        (B·N, C, S, S), the boxes of image 0 first.
    """
    b, n = boxes.shape[:2]
    image_index = torch.arange(b, dtype=boxes.dtype, device=boxes.device)
    rois = torch.cat([image_index[:, None, None].expand(b, n, 1), boxes], dim=2).flatten(0, 1)
    levels = assign_boxes_to_levels(
        [Boxes(x) for x in boxes],
        pooler.min_level,
        pooler.max_level,
        pooler.canonical_box_size,
        pooler.canonical_level,
    )[:, None, None, None]
    roi_aligns = pooler.level_poolers
    out = roi_aligns[0](features[0], rois)
    for level in range(1, len(features)):
        out = torch.where(levels == level, roi_aligns[level](features[level], rois), out)
    return out


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
        counts = [len(p) for p in proposals]
        if sum(counts) == 0:  # nothing to encode
            return self.input_norm(self.input_proj(pooled.flatten(1)))
        pooled, mask = pad_per_image(pooled, counts)
        boxes = pad_per_image(cat([p.proposal_boxes.tensor for p in proposals]), counts)[0]
        x = self.forward_padded(pooled, boxes, [p.image_size for p in proposals], mask)
        return x[~mask]

    def forward_padded(
        self,
        pooled: Tensor,
        boxes: Tensor,
        image_sizes: Sequence[Tuple[int, int]],
        padding_mask: Tensor,
    ) -> Tensor:
        """The box head on RoIs padded per image: ``pooled`` (B, N, C, S, S), ``boxes`` (B, N, 4)
        absolute xyxy, ``padding_mask`` (B, N) True at padding, which no RoI attends to.
        Returns (B, N, d)."""
        x = self.input_proj(pooled.flatten(2))
        pos = None
        if self.pos_proj is not None:
            pos = torch.stack(
                [
                    roi_position_encoding(b, size, self.hidden_dim // 8)
                    for b, size in zip(boxes, image_sizes)
                ]
            ).to(x.dtype)
            x = x + self.pos_proj(pos)
        x = self.input_norm(x)
        return self.encoder(x, pos=pos, key_padding_mask=unmask_empty_rows(padding_mask))


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
        box_head: TSPBoxHead,
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

    def padded_outputs(
        self,
        features: Dict[str, Tensor],
        boxes: Tensor,
        valid: Tensor,
        image_sizes: Sequence[Tuple[int, int]],
    ) -> Dict[str, Tensor]:
        """Inference raw outputs for a fixed number N of proposals per image (``boxes``
        (B, N, 4), ``valid`` (B, N), as :func:`fixed_size_rpn_proposals` gives them):
        ``pred_logits`` (B, N, K+1), ``pred_boxes`` (B, N, K·4 or 4) absolute xyxy, unclipped,
        and ``valid``. Invalid rows attend to nothing valid and are not attended to."""
        pooled = fixed_size_roi_pool(
            self.box_pooler, [features[f] for f in self.box_in_features], boxes
        )
        x = self.box_head.forward_padded(
            pooled.unflatten(0, valid.shape), boxes, image_sizes, ~valid
        )
        predictions = self.box_predictor(x.flatten(0, 1))
        proposals = [
            Instances(size, proposal_boxes=Boxes(b)) for b, size in zip(boxes, image_sizes)
        ]
        pred_boxes = torch.stack(self.box_predictor.predict_boxes(predictions, proposals))
        return {
            "pred_logits": predictions[0].unflatten(0, valid.shape),
            "pred_boxes": pred_boxes,
            "valid": valid,
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

    @property
    def size_divisibility(self) -> int:
        """The input padding multiple (the FPN's: 32)."""
        return self.backbone.size_divisibility

    def compute_outputs(
        self, images: ImageList, padding_mask: Optional[Tensor] = None
    ) -> Dict[str, Tensor]:
        """Inference raw outputs for normalised, padded ``images``, of a fixed size (the export
        path): :func:`fixed_size_rpn_proposals`, then
        :meth:`TransformerROIHeads.padded_outputs`. ``padding_mask`` is unused (the image sizes
        say it). :func:`detr_variants.engine.export.postprocess_exported` turns them into the
        model's own detections."""
        features = self.backbone(images.tensor)
        boxes, valid = fixed_size_rpn_proposals(self.proposal_generator, images, features)
        return self.roi_heads.padded_outputs(features, boxes, valid, images.image_sizes)
