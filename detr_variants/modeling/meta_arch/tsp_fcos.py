"""TSP-FCOS (Sun et al. 2021, "Rethinking Transformer-based Set Prediction for Object Detection").

FCOS's towers on an FPN (P3-P7) act as a feature-of-interest (FoI) classifier; the top 700
FoIs go through an encoder-only transformer whose outputs are matched one-to-one to the ground
truth with the restricted matching (each GT takes its best FCOS-positive FoI). Only what TSP
adds lives here: detectron2 provides the FPN, the FCOS towers (``FCOSHead``), FCOS's target
assignment (``FCOS._match_anchors``), the ltrb box transform and class-wise NMS. The pieces
TSP-RCNN shares with it (FPN top block, random drop, event storage outside a trainer) are also
defined here.
"""

import contextlib
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, batched_nms, get_norm
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransformLinear
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.events import EventStorage, has_event_storage
from torch import Tensor, nn

from ...layers.position_encoding import PositionEmbeddingSine
from ..backbone import feature_masks
from ..criterion import sigmoid_focal_loss
from .base import SetPredictionDetector


# ------------------------------------------------------------------ pieces shared with TSP-RCNN
class TSPTopBlock(nn.Module):
    """The released "v2" FPN top block (``LastLevelMaxPoolV2``, despite its name no pooling):
    P6 = Conv3x3/s2 + norm on P5, P7 = Conv3x3/s2 + norm on ReLU(P6). Plugs into detectron2's
    ``FPN(top_block=...)``."""

    def __init__(self, channels: int = 256, norm: str = "SyncBN", in_feature: str = "p5"):
        super().__init__()
        self.num_levels = 2
        self.in_feature = in_feature
        self.p6 = Conv2d(channels, channels, 3, stride=2, padding=1, norm=get_norm(norm, channels))
        self.p7 = Conv2d(channels, channels, 3, stride=2, padding=1, norm=get_norm(norm, channels))

    def forward(self, x: Tensor) -> List[Tensor]:
        p6 = self.p6(x)
        return [p6, self.p7(F.relu(p6))]


def random_keep_count(n: int, lower: float, upper: float = 1.0) -> int:
    """TSP's random proposal drop: keep ``int(n·u)`` of ``n`` inputs, ``u ~ U(lower, upper]``
    (at least one when ``n > 0``)."""
    if not 0 < lower <= upper <= 1:
        raise ValueError(f"need 0 < lower <= upper <= 1, got {lower}, {upper}")
    u = upper - torch.rand(()).item() * (upper - lower)
    return min(n, max(int(n * u), 1)) if n > 0 else 0


def event_storage():
    """The running trainer's ``EventStorage``, or a throwaway one so that detectron2 components
    that log (RPN, ROI heads) also train outside a trainer (tests, benchmarks)."""
    return contextlib.nullcontext() if has_event_storage() else EventStorage()


def mean_over_ranks(value: Tensor, minimum: float) -> float:
    """``value`` summed over the distributed ranks, divided by their number, at least ``minimum``
    (the released normalisers: positives per GPU)."""
    value = value.detach().float().clone()
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(value)
    return max(value.item() / comm.get_world_size(), minimum)


def unmask_empty_rows(key_padding_mask: Tensor) -> Tensor:
    """Lets a sequence that is all padding attend to its first (zero) token instead of producing
    NaN; its outputs are discarded."""
    empty = key_padding_mask.all(dim=1)
    if key_padding_mask.shape[1] and empty.any():
        key_padding_mask = key_padding_mask.clone()
        key_padding_mask[empty, 0] = False
    return key_padding_mask


# ------------------------------------------------------------------ TSP-FCOS
def _flatten_levels(maps: List[Tensor]) -> Tensor:
    """Per-level (B, C, H, W) maps → (B, ΣHW, C), level after level, row-major."""
    return torch.cat([x.flatten(2).transpose(1, 2) for x in maps], dim=1)


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B, R, C), index (B, k) → (B, k, C)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class FoIClassifier(FCOSHead):
    """detectron2's ``FCOSHead`` towers (4x Conv3x3 + GN + ReLU each, normal(0.01) init) and its
    class logits (prior-probability bias) without the dense box and centerness outputs: TSP's
    FoI classifier. The towers' features are the transformer's input."""

    def __init__(
        self,
        *,
        in_channels: int = 256,
        num_levels: int = 5,
        num_classes: int = 80,
        num_convs: int = 4,
        norm: str = "GN",
        prior_prob: float = 0.01,
    ):
        super().__init__(
            input_shape=[ShapeSpec(channels=in_channels)] * num_levels,
            conv_dims=[in_channels] * num_convs,
            num_classes=num_classes,
            norm=norm,
            prior_prob=prior_prob,
        )
        del self.bbox_pred, self.ctrness  # predicted by the transformer instead

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Per level: class logits (B, K, H, W), class-tower and box-tower features (B, C, H, W)."""
        logits, cls_feats, box_feats = [], [], []
        for x in features:
            cls_feats.append(self.cls_subnet(x))
            box_feats.append(self.bbox_subnet(x))
            logits.append(self.cls_score(cls_feats[-1]))
        return logits, cls_feats, box_feats


def ltrb_giou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """1 - GIoU of boxes given as (left, top, right, bottom) distances from a common point, with
    the released ``IOULoss`` smoothing ``IoU = (I + 1) / (U + 1)``. Elementwise over (..., 4)."""
    pl, pt, pr, pb = pred.unbind(-1)
    tl, tt, tr, tb = target.unbind(-1)
    pred_area = (pl + pr) * (pt + pb)
    target_area = (tl + tr) * (tt + tb)
    inter = (torch.min(pl, tl) + torch.min(pr, tr)) * (torch.min(pt, tt) + torch.min(pb, tb))
    enclosing = (torch.max(pl, tl) + torch.max(pr, tr)) * (torch.max(pt, tt) + torch.max(pb, tb))
    union = pred_area + target_area - inter
    iou = (inter + 1.0) / (union + 1.0)
    return 1 - (iou - (enclosing - union) / enclosing)


def centerness(ltrb: Tensor) -> Tensor:
    """FCOS centerness sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b)) of (..., 4) distances."""
    lr, tb = ltrb[..., [0, 2]], ltrb[..., [1, 3]]
    return torch.sqrt(
        (lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values)
    )


class TSPFCOSCriterion(nn.Module):
    """The released TSP-FCOS losses (``fcos/my_fcos_outputs.py`` with ``USE_OBJ_LOSS``,
    ``ONLY_REWEIGHT_FG``, ``CLASS_DENORM_TYPE mixed_2x``), weighted by ``weight_dict``:

    - ``loss_fcos_local_cls``: FCOS sigmoid focal loss of the FoI classifier over all
      locations, / number of FCOS positives;
    - ``loss_fcos_cls``: sigmoid focal loss over the selected FoIs, target 1 only for the FoIs
      the restricted matching gives a GT; unmatched FCOS-positive FoIs weigh ``eos_coef`` on
      their GT-class logit; / 2·(matched + eos_coef·candidates);
    - ``loss_fcos_loc``: GIoU loss of every FCOS-positive FoI, weighted by its centerness
      target, / Σ centerness;
    - ``loss_fcos_ctr``: centerness BCE of every FCOS-positive FoI, / number of them.

    Normalisers are averaged over distributed ranks, as released.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Optional[Dict[str, float]] = None,
        eos_coef: float = 0.1,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        names = ("loss_fcos_local_cls", "loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr")
        self.weight_dict = {k: 1.0 for k in names} | dict(weight_dict or {})
        unknown = set(self.weight_dict) - set(names)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = eos_coef
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def forward(self, outputs: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``outputs`` of :meth:`TSPFCOS.compute_outputs` in training."""
        k = self.num_classes
        labels, gt_index, reg_targets = (
            outputs["fcos_labels"],
            outputs["fcos_gt_index"],
            outputs["fcos_reg_targets"],
        )
        # FoI classifier: FCOS focal loss over every location
        local_logits = outputs["local_logits"]
        positive = labels != k
        onehot = F.one_hot(labels, k + 1)[..., :k].to(local_logits.dtype)
        local_cls = sigmoid_focal_loss(
            local_logits, onehot, self.focal_alpha, self.focal_gamma
        ).sum()
        local_cls = local_cls / mean_over_ranks(positive.sum(), 1.0)

        # transformer outputs on the selected FoIs
        selected, valid = outputs["selected"], outputs["valid"]
        sel_labels = labels.gather(1, selected)
        sel_gt = gt_index.gather(1, selected)
        sel_reg = reg_targets.gather(1, selected[..., None].expand(-1, -1, 4))
        logits, ltrb, ctr_logits = (
            outputs["pred_logits"],
            outputs["pred_ltrb"],
            outputs["pred_ctrness"],
        )
        cand = (sel_labels != k) & valid  # FCOS positives among the selected FoIs
        num_cand = mean_over_ranks(cand.sum(), 1.0)
        cand_labels, cand_reg, cand_ltrb = sel_labels[cand], sel_reg[cand], ltrb[cand]
        ctr_targets = centerness(cand_reg)
        giou_loss = ltrb_giou_loss(cand_ltrb, cand_reg)

        cand_prob = logits[cand].detach().sigmoid().gather(1, cand_labels[:, None]).squeeze(1)
        matched, _ = self.matcher(
            -cand_prob * (ctr_targets + 1e-6), giou_loss.detach(), sel_gt[cand]
        )
        num_matched = mean_over_ranks(logits.new_tensor(float(matched.numel())), 1.0)
        ctr_sum = mean_over_ranks(ctr_targets.sum(), 1e-6)  # on every rank, candidates or not

        cand_pos = torch.nonzero(cand.flatten()).squeeze(1)  # flat (B·k) positions of candidates
        flat_logits = logits.flatten(0, 1)
        targets = torch.zeros_like(flat_logits)
        targets[cand_pos[matched], cand_labels[matched]] = 1
        weights = valid.flatten()[:, None].to(flat_logits.dtype).expand_as(flat_logits).clone()
        unmatched = torch.ones_like(cand_labels, dtype=torch.bool)
        unmatched[matched] = False
        weights[cand_pos[unmatched], cand_labels[unmatched]] = self.eos_coef
        cls = (
            sigmoid_focal_loss(flat_logits, targets, self.focal_alpha, self.focal_gamma) * weights
        ).sum()
        cls = cls / (2 * (num_matched + self.eos_coef * num_cand))

        if cand_pos.numel():
            loc = (giou_loss * ctr_targets).sum() / ctr_sum
            ctr = (
                F.binary_cross_entropy_with_logits(ctr_logits[cand], ctr_targets, reduction="sum")
                / num_cand
            )
        else:
            loc, ctr = ltrb.sum() * 0, ctr_logits.sum() * 0
        losses = {
            "loss_fcos_local_cls": local_cls,
            "loss_fcos_cls": cls,
            "loss_fcos_loc": loc,
            "loss_fcos_ctr": ctr,
        }
        return {name: value * self.weight_dict[name] for name, value in losses.items()}


@META_ARCH_REGISTRY.register()
class TSPFCOS(SetPredictionDetector):
    """TSP-FCOS: FoI classifier → top-``num_fois`` FoIs → encoder-only transformer → per-FoI
    class, centerness and ltrb box, trained with the restricted matching.

    Args:
        backbone: detectron2 ``FPN`` giving ``in_features`` (P3-P7, :class:`TSPTopBlock`).
        foi_head: :class:`FoIClassifier`.
        encoder: :class:`TransformerEncoder` (pre-norm layers and a final LayerNorm).
        criterion: :class:`TSPFCOSCriterion`.
        hidden_dim: the transformer width; the FoI features (both towers, concatenated) are
            projected to it (Linear + LayerNorm).
        num_fois: FoIs selected per image (``NUM_PROPOSAL 700``).
        random_drop: lower bound of the kept fraction in training (``RANDOM_PROPOSAL_DROP`` 0.7);
            1.0 disables the drop.
        center_sampling_radius: FCOS centre sampling (``POS_RADIUS 1.5``).
        test_score_thresh, test_topk_per_level, test_nms_thresh: inference as released (0.0,
            1000, 0.6); ``test_nms_thresh=None`` keeps the top ``test_topk`` without NMS.
        size_divisibility: padding multiple; None uses the backbone's (32).
        **kwargs: :class:`SetPredictionDetector` arguments (``test_topk`` = detections kept).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        foi_head: nn.Module,
        encoder: nn.Module,
        criterion: nn.Module,
        in_features: Sequence[str] = ("p3", "p4", "p5", "p6", "p7"),
        hidden_dim: int = 512,
        num_fois: int = 700,
        random_drop: float = 0.7,
        center_sampling_radius: float = 1.5,
        test_score_thresh: float = 0.0,
        test_topk_per_level: int = 1000,
        test_nms_thresh: Optional[float] = 0.6,
        size_divisibility: Optional[int] = None,
        **kwargs,
    ):
        if size_divisibility is None:
            size_divisibility = backbone.size_divisibility
        super().__init__(
            backbone=backbone,
            criterion=criterion,
            class_score="sigmoid",
            size_divisibility=size_divisibility,
            **kwargs,
        )
        shapes = backbone.output_shape()
        self.in_features = list(in_features)
        self.strides = [shapes[f].stride for f in self.in_features]
        channels = shapes[self.in_features[0]].channels
        self.foi_head = foi_head
        # FCOS locations as stride-sized boxes centred at (i + 0.5)·stride (the released locations)
        self.anchor_generator = DefaultAnchorGenerator(
            sizes=[[s] for s in self.strides], aspect_ratios=[1.0], strides=self.strides, offset=0.5
        )
        self.box2box_transform = Box2BoxTransformLinear(normalize_by_size=True)
        self.center_sampling_radius = center_sampling_radius  # read by FCOS._match_anchors
        self.input_proj = nn.Linear(2 * channels, hidden_dim)
        self.input_norm = nn.LayerNorm(hidden_dim)
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.level_embed = nn.Parameter(torch.ones(len(self.in_features), hidden_dim))
        self.encoder = encoder  # PyTorch default init, as released
        self.class_embed = nn.Linear(hidden_dim, self.num_classes)
        self.ctrness = nn.Linear(hidden_dim, 1)
        self.bbox_embed = nn.Linear(hidden_dim, 4)
        self.scales = nn.Parameter(torch.ones(len(self.in_features)))
        for layer in (self.class_embed, self.ctrness):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        self.num_fois = num_fois
        self.random_drop = random_drop
        self.test_score_thresh = test_score_thresh
        self.test_topk_per_level = test_topk_per_level
        self.test_nms_thresh = test_nms_thresh

    # ---------------------------------------------------------------- detectron2 interface
    def forward(self, batched_inputs: List[Dict]):
        if len(batched_inputs) == 0:
            raise ValueError("empty batch")
        images, padding_mask = self.preprocess_image(batched_inputs)
        if self.training:
            gt = [x["instances"].to(self.device) for x in batched_inputs]
            return self.criterion(self.compute_outputs(images, padding_mask, gt))
        results = self.detect(self.compute_outputs(images, padding_mask), images.image_sizes)
        return self.postprocess(results, batched_inputs)

    # ---------------------------------------------------------------- FoIs and the transformer
    def compute_outputs(
        self,
        images: ImageList,
        padding_mask: Tensor,
        gt_instances: Optional[List[Instances]] = None,
    ) -> Dict[str, Tensor]:
        """Selected FoIs and the transformer's predictions for them.

        Returns ``pred_logits`` (B, k, K), ``pred_boxes`` (B, k, 4) absolute xyxy in the padded
        input frame, ``pred_ltrb`` (B, k, 4) in stride units, ``pred_ctrness`` (B, k) logits,
        ``levels`` (B, k), ``valid`` (B, k) (False: padding FoIs), ``selected`` (B, k) flat
        location indices, and ``local_logits`` (B, R, K) of every location; in training also
        the FCOS targets ``fcos_labels``/``fcos_gt_index``/``fcos_reg_targets`` (B, R[, 4]).
        """
        features = self.backbone(images.tensor)
        features = [features[f] for f in self.in_features]
        masks = feature_masks(padding_mask, dict(zip(self.in_features, features)))
        masks = [masks[f] for f in self.in_features]
        logits, cls_feats, box_feats = self.foi_head(features)
        anchors = self.anchor_generator(features)

        b = images.tensor.shape[0]
        local_logits = _flatten_levels(logits)  # (B, R, K)
        tokens = torch.cat(
            [_flatten_levels(cls_feats), _flatten_levels(box_feats)], dim=-1
        )  # (B, R, 2C)
        pos = _flatten_levels(
            [self.position_embedding(m).to(tokens.dtype) for m in masks]
        )  # (B, R, d)
        valid = ~torch.cat([m.flatten(1) for m in masks], dim=1)  # (B, R)
        levels = torch.cat(
            [
                torch.full((len(a),), i, dtype=torch.long, device=self.device)
                for i, a in enumerate(anchors)
            ]
        )
        anchor_boxes = Boxes.cat(anchors).tensor  # (R, 4)

        outputs: Dict[str, Tensor] = {"local_logits": local_logits}
        with torch.no_grad():
            scores = local_logits.detach().sigmoid().max(-1).values
            positive = None
            if self.training:
                if gt_instances is None:
                    raise ValueError("TSPFCOS.compute_outputs needs gt_instances in training mode")
                labels, gt_index, reg_targets = self.fcos_targets(anchors, gt_instances)
                outputs.update(
                    fcos_labels=labels, fcos_gt_index=gt_index, fcos_reg_targets=reg_targets
                )
                positive = labels != self.num_classes
            selected = self.select_fois(scores, valid, positive)
        sel_levels = levels[selected]
        sel_valid = valid.gather(1, selected)
        src = self.input_norm(self.input_proj(_gather_rows(tokens, selected)))
        pos = _gather_rows(pos, selected) + self.level_embed[sel_levels]
        memory = self.encoder(src, pos=pos, key_padding_mask=unmask_empty_rows(~sel_valid))
        ltrb = F.relu(self.bbox_embed(memory)) * self.scales[sel_levels][..., None]
        boxes = self.box2box_transform.apply_deltas(
            ltrb.reshape(-1, 4).float(), anchor_boxes[selected.flatten()]
        ).view(b, -1, 4)
        outputs.update(
            pred_logits=self.class_embed(memory),
            pred_boxes=boxes,
            pred_ltrb=ltrb,
            pred_ctrness=self.ctrness(memory).squeeze(-1),
            levels=sel_levels,
            valid=sel_valid,
            selected=selected,
        )
        return outputs

    @torch.no_grad()
    def select_fois(
        self, scores: Tensor, valid: Tensor, positive: Optional[Tensor] = None
    ) -> Tensor:
        """Flat indices (B, k) of the FoIs fed to the transformer.

        The top ``num_fois`` objectness scores (max class probability) per image. In training,
        FCOS positives are boosted to 0.5·(p + 1) as released, and ranked before every other
        location, so all of them are selected (up to ``num_fois``); the released ranking lets
        a negative above (1 + p)/2 outrank a positive, which changes the selection only when
        more than ``num_fois`` - #positives negatives score above 0.5. Then a random subset of
        ``int(k·u)`` positions, ``u ~ U(random_drop, 1]``, is kept (the same positions in
        every image). Padding locations rank last; the released code ranks them like any other.
        """
        if positive is not None:
            scores = torch.where(positive, 0.5 * (scores + 1) + 1.0, scores)
        scores = torch.where(valid, scores, torch.full_like(scores, -1.0))
        k = min(self.num_fois, scores.shape[1])
        selected = scores.topk(k, dim=1).indices
        if self.training and self.random_drop < 1.0:
            keep = torch.randperm(k, device=selected.device)[
                : random_keep_count(k, self.random_drop)
            ]
            selected = selected[:, keep]
        return selected

    @torch.no_grad()
    def fcos_targets(
        self, anchors: List[Boxes], gt_instances: List[Instances]
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """detectron2's FCOS assignment (centre sampling, size ranges [0,64], [64,128], ...,
        ties to the smallest GT): per image and location, the class (``num_classes`` =
        background), the GT index unique over the batch (-1: none) and the ltrb targets in
        stride units."""
        anchor_boxes = Boxes.cat(anchors).tensor
        labels, gt_index, reg_targets, offset = [], [], [], 0
        for inst in gt_instances:
            r = len(anchor_boxes)
            if len(inst) == 0:
                labels.append(
                    torch.full((r,), self.num_classes, dtype=torch.long, device=self.device)
                )
                gt_index.append(torch.full((r,), -1, dtype=torch.long, device=self.device))
                reg_targets.append(anchor_boxes.new_zeros(r, 4))
                continue
            # detectron2's rule, called on this module (it reads self.center_sampling_radius)
            quality = FCOS._match_anchors(self, inst.gt_boxes, anchors)  # (M, R)
            best, index = quality.max(dim=0)
            matched = best > 1e-5
            labels.append(torch.where(matched, inst.gt_classes[index], self.num_classes))
            gt_index.append(torch.where(matched, index + offset, -1))
            reg_targets.append(
                self.box2box_transform.get_deltas(anchor_boxes, inst.gt_boxes.tensor[index])
            )
            offset += len(inst)
        return torch.stack(labels), torch.stack(gt_index), torch.stack(reg_targets)

    # ---------------------------------------------------------------- inference
    def detect(
        self, outputs: Dict[str, Tensor], image_sizes: List[Tuple[int, int]]
    ) -> List[Instances]:
        """As released: per level the top ``test_topk_per_level`` (FoI, class) pairs above
        ``test_score_thresh``, score √p (no centerness), class-wise NMS, top ``test_topk``."""
        probs = outputs["pred_logits"].sigmoid()
        results = []
        for prob, boxes, levels, valid, size in zip(
            probs, outputs["pred_boxes"], outputs["levels"], outputs["valid"], image_sizes
        ):
            keep_scores, keep_boxes, keep_classes = [], [], []
            for level in range(len(self.in_features)):
                idx = torch.nonzero((levels == level) & valid).squeeze(1)
                p = prob[idx].flatten()
                cand = torch.nonzero(p > self.test_score_thresh).squeeze(1)
                top = p[cand].topk(min(self.test_topk_per_level, cand.numel())).indices
                flat = cand[top]
                keep_scores.append(p[flat].sqrt())
                keep_boxes.append(boxes[idx[flat // prob.shape[1]]])
                keep_classes.append(flat % prob.shape[1])
            scores, boxes, classes = (
                torch.cat(keep_scores),
                torch.cat(keep_boxes),
                torch.cat(keep_classes),
            )
            if self.test_nms_thresh is not None:
                keep = batched_nms(boxes, scores, classes, self.test_nms_thresh)[: self.test_topk]
            else:
                keep = scores.topk(min(self.test_topk, scores.numel())).indices
            inst = Instances(size)
            inst.pred_boxes = Boxes(boxes[keep].float())
            inst.scores = scores[keep].float()
            inst.pred_classes = classes[keep]
            results.append(inst)
        return results
