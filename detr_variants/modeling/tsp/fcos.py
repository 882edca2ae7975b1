"""TSP-FCOS (Sun et al. 2021, "Rethinking Transformer-based Set Prediction for Object Detection").

FCOS's towers on an FPN (P3-P7) act as a feature-of-interest (FoI) classifier; the top 700
FoIs go through an encoder-only transformer whose outputs are matched one-to-one to the ground
truth with the restricted matching (each GT takes its best FCOS-positive FoI). detectron2
provides the FPN, the FCOS towers (``FCOSHead``) and class-wise NMS; the FCOS assignment is the
released one (:func:`fcos_assignment`), which differs from detectron2's ``FCOS._match_anchors``.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec, batched_nms
from detectron2.modeling import META_ARCH_REGISTRY, Backbone
from detectron2.modeling.meta_arch.fcos import FCOSHead
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from ...layers.position_encoding import PositionEmbeddingSine
from ..criterion import sigmoid_focal_loss
from ..meta_arch.base import SetPredictionDetector
from .common import mean_over_ranks, random_keep_count, unmask_empty_rows


def _flatten_levels(maps: List[Tensor]) -> Tensor:
    """Per-level (B, C, H, W) maps → (B, ΣHW, C), level after level, row-major."""
    return torch.cat([x.flatten(2).transpose(1, 2) for x in maps], dim=1)


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B, R, C), index (B, k) → (B, k, C)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


# ------------------------------------------------------------------ locations and assignment
def fcos_locations(
    shapes: Sequence[Tuple[int, int]], strides: Sequence[int], device=None
) -> Tuple[Tensor, Tensor]:
    """FCOS locations ``(j·s + s//2, i·s + s//2)`` of every level, level after level, row-major
    (``compute_locations`` of the released code): (R, 2) xy and the (R,) level index."""
    points, levels = [], []
    for level, ((h, w), s) in enumerate(zip(shapes, strides)):
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device) * s + s // 2,
            torch.arange(w, dtype=torch.float32, device=device) * s + s // 2,
            indexing="ij",
        )
        points.append(torch.stack([xs.flatten(), ys.flatten()], dim=1))
        levels.append(torch.full((h * w,), level, dtype=torch.long, device=device))
    return torch.cat(points), torch.cat(levels)


def fcos_assignment(
    points: Tensor,
    strides: Tensor,
    size_ranges: Tensor,
    gt_boxes: Tensor,
    gt_classes: Tensor,
    num_classes: int,
    radius: float = 1.5,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The released FCOS assignment (``compute_targets_for_locations``, ``get_sample_region``).

    A location is a candidate of a GT when it lies strictly inside the GT box clipped to the
    centre region ``centre ± radius·stride`` and the largest of its (l, t, r, b) distances lies
    in its level's range, bounds included (``>=``, ``<=``; detectron2's ``FCOS._match_anchors``
    excludes them). Among several GTs the one of smallest area wins, exact areas, the first on
    equal ones (detectron2 ranks ``1e8 - area`` in float32, which ties areas a few px² apart).

    Args:
        points: (R, 2) location xy. strides: (R,) their level's stride.
        size_ranges: (R, 2) inclusive [low, high] of max(l, t, r, b) per location.
        gt_boxes: (M, 4) xyxy. gt_classes: (M,).

    Returns:
        labels (R,) (``num_classes``: background), the GT index (R,) (-1: none) and the ltrb
        targets (R, 4) in stride units.
    """
    r = len(points)
    if len(gt_boxes) == 0:
        return (
            torch.full((r,), num_classes, dtype=torch.long, device=points.device),
            torch.full((r,), -1, dtype=torch.long, device=points.device),
            points.new_zeros(r, 4),
        )
    x, y = points[:, 0, None], points[:, 1, None]  # (R, 1)
    x1, y1, x2, y2 = gt_boxes.unbind(1)  # (M,)
    ltrb = torch.stack([x - x1, y - y1, x2 - x, y2 - y], dim=2)  # (R, M, 4)
    cx, cy = (x1 + x2) * 0.5, (y1 + y2) * 0.5
    reach = strides[:, None].float() * radius  # (R, 1)
    inner = torch.stack(
        [
            x - torch.maximum(cx - reach, x1),
            y - torch.maximum(cy - reach, y1),
            torch.minimum(cx + reach, x2) - x,
            torch.minimum(cy + reach, y2) - y,
        ],
        dim=2,
    )
    largest = ltrb.max(dim=2).values
    candidate = (inner.min(dim=2).values > 0) & (largest >= size_ranges[:, :1])
    candidate &= largest <= size_ranges[:, 1:]
    area = (x2 - x1) * (y2 - y1)
    loc_area = torch.where(candidate, area[None], torch.full_like(largest, math.inf))
    min_area, index = loc_area.min(dim=1)  # the first of equal minima, as released
    matched = min_area != math.inf
    labels = torch.where(matched, gt_classes[index], num_classes)
    reg = ltrb[torch.arange(r, device=points.device), index] / strides[:, None].float()
    return labels, torch.where(matched, index, -1), reg


# ------------------------------------------------------------------ padding masks
def own_extent_masks(
    image_sizes: Sequence[Tuple[int, int]],
    size_divisibility: int,
    shapes: Sequence[Tuple[int, int]],
    strides: Sequence[int],
    device=None,
) -> List[Tensor]:
    """Per level (B, H, W), True beyond each image's own padded extent: the image rounded up to
    ``size_divisibility``, i.e. the feature map it has alone (``ceil(extent / stride)`` cells).
    At batch size 1 nothing is masked, as in the released code; in a batch, the padding that
    only other images cause is."""
    d = max(size_divisibility, 1)
    masks = []
    for (h, w), s in zip(shapes, strides):
        m = torch.ones((len(image_sizes), h, w), dtype=torch.bool, device=device)
        for i, (ih, iw) in enumerate(image_sizes):
            # ceil to the multiple of d, then to cells (positive floor division: ONNX truncates)
            eh, ew = (ih + d - 1) // d * d, (iw + d - 1) // d * d
            m[i, : (eh + s - 1) // s, : (ew + s - 1) // s] = False
        masks.append(m)
    return masks


def official_masks(
    image_sizes: Sequence[Tuple[int, int]],
    padded_shape: Tuple[int, int],
    shapes: Sequence[Tuple[int, int]],
    device=None,
) -> List[Tensor]:
    """The released masks (``MyFCOS._forward``): built at the largest unpadded image size and
    resized (nearest) step by step to res1 (half, rounded up), res2 (a quarter of the padded
    input) and each level, so padding up to ``size_divisibility`` counts as image."""
    h = max(s[0] for s in image_sizes)
    w = max(s[1] for s in image_sizes)
    mask = torch.ones((len(image_sizes), h, w), dtype=torch.bool, device=device)
    for i, (ih, iw) in enumerate(image_sizes):
        mask[i, :ih, :iw] = False
    ph, pw = padded_shape
    steps = [((h + 1) // 2, (w + 1) // 2), (-(-ph // 4), -(-pw // 4)), *shapes]
    masks = []
    for size in steps:
        mask = F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]
        masks.append(mask)
    return masks[2:]


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
        """:meth:`TSPFCOS.encode` outputs with the :meth:`TSPFCOS.fcos_targets` entries."""
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
        sizes_of_interest: FCOS level boundaries of max(l, t, r, b) (``SIZES_OF_INTEREST``),
            inclusive as released.
        official_padding: False (default): each image's own padded extent is image and the
            padding only other images of the batch cause is masked (never selected, masked in
            attention, outside the position encoding's normalisation), so results do not depend
            on the batch; at batch size 1 this is the released behaviour. True: the released
            masks for any batch (:func:`official_masks`; the encoder sees no padding mask).
        test_score_thresh, test_topk_per_level, test_nms_thresh: inference as released (0.0,
            1000, 0.6); ``test_nms_thresh=None`` keeps the top ``test_topk`` without NMS.
        size_divisibility: padding multiple; None uses the backbone's (32).
        **kwargs: :class:`SetPredictionDetector` arguments (``test_topk`` = detections kept).
    """

    classifications: Sequence[str] = ("sigmoid",)

    def __init__(
        self,
        *,
        backbone: Backbone,
        foi_head: nn.Module,
        encoder: nn.Module,
        criterion: nn.Module,
        in_features: Sequence[str] = ("p3", "p4", "p5", "p6", "p7"),
        hidden_dim: int = 512,
        num_fois: int = 700,
        random_drop: float = 0.7,
        center_sampling_radius: float = 1.5,
        sizes_of_interest: Sequence[float] = (64, 128, 256, 512),
        official_padding: bool = False,
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
            size_divisibility=size_divisibility,
            **kwargs,
        )
        shapes = backbone.output_shape()
        self.in_features = list(in_features)
        self.strides = [shapes[f].stride for f in self.in_features]
        if len(sizes_of_interest) != len(self.in_features) - 1:
            raise ValueError(
                f"need {len(self.in_features) - 1} sizes_of_interest for {len(self.in_features)} "
                f"levels, got {list(sizes_of_interest)}"
            )
        bounds = [-1.0, *map(float, sizes_of_interest), math.inf]  # the released [-1, 64], ...
        self.size_ranges = list(zip(bounds[:-1], bounds[1:]))
        channels = shapes[self.in_features[0]].channels
        self.foi_head = foi_head
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
        self.center_sampling_radius = center_sampling_radius
        self.official_padding = official_padding
        self.test_score_thresh = test_score_thresh
        self.test_topk_per_level = test_topk_per_level
        self.test_nms_thresh = test_nms_thresh

    # ---------------------------------------------------------------- base-class hooks
    def losses(
        self, batched_inputs: List[Dict], images: ImageList, padding_mask: Tensor
    ) -> Dict[str, Tensor]:
        """FCOS targets first: the FCOS positives are boosted in the FoI ranking."""
        dense = self.dense_outputs(images)
        targets = self.fcos_targets(
            dense["locations"], dense["levels"], [x["instances"] for x in batched_inputs]
        )
        positive = targets["fcos_labels"] != self.num_classes
        selected = self.select_fois(dense["scores"], dense["valid"], positive)
        return self.criterion(self.encode(dense, selected) | targets)

    def predict(self, images: ImageList, padding_mask: Tensor) -> List[Instances]:
        return self.detect(self.compute_outputs(images, padding_mask), images.image_sizes)

    def compute_outputs(self, images: ImageList, padding_mask: Optional[Tensor] = None) -> Dict:
        """The transformer's predictions for the top FoIs (no GT: no positive boost).

        ``padding_mask`` is unused: TSP's masks follow ``images.image_sizes`` (see
        ``official_padding``). Returns ``pred_logits`` (B, k, K), ``pred_boxes`` (B, k, 4)
        absolute xyxy in the padded input frame, ``pred_ltrb`` (B, k, 4) in stride units,
        ``pred_ctrness`` (B, k) logits, ``levels`` (B, k), ``valid`` (B, k) (False: padding
        FoIs), ``selected`` (B, k) flat location indices and ``local_logits`` (B, R, K).
        """
        dense = self.dense_outputs(images)
        return self.encode(dense, self.select_fois(dense["scores"], dense["valid"]))

    # ---------------------------------------------------------------- steps
    def dense_outputs(self, images: ImageList) -> Dict[str, Tensor]:
        """Every location's FoI-classifier logits and objectness, tower features, position
        encoding (+ level embedding), validity, level and xy."""
        features = self.backbone(images.tensor)
        features = [features[f] for f in self.in_features]
        shapes = [tuple(x.shape[-2:]) for x in features]
        logits, cls_feats, box_feats = self.foi_head(features)
        if self.official_padding:
            masks = official_masks(
                images.image_sizes, images.tensor.shape[-2:], shapes, self.device
            )
        else:
            masks = own_extent_masks(
                images.image_sizes, self.size_divisibility, shapes, self.strides, self.device
            )
        locations, levels = fcos_locations(shapes, self.strides, self.device)
        local_logits = _flatten_levels(logits)  # (B, R, K)
        tokens = torch.cat([_flatten_levels(cls_feats), _flatten_levels(box_feats)], dim=-1)
        pos = _flatten_levels([self.position_embedding(m).to(tokens.dtype) for m in masks])
        valid = ~torch.cat([m.flatten(1) for m in masks], dim=1)  # (B, R)
        if self.official_padding:
            valid = torch.ones_like(valid)  # released: padding ranks and attends as image
        return {
            "local_logits": local_logits,
            "scores": local_logits.detach().sigmoid().max(-1).values,
            "tokens": tokens,
            "pos": pos + self.level_embed[levels],
            "valid": valid,
            "levels": levels,
            "locations": locations,
        }

    @torch.no_grad()
    def select_fois(
        self, scores: Tensor, valid: Tensor, positive: Optional[Tensor] = None
    ) -> Tensor:
        """Flat indices (B, k) of the FoIs fed to the transformer, as released: the top
        ``num_fois`` objectness scores (max class probability), FCOS positives (training)
        scored 0.5·(p + 1), so a negative above that still outranks them. Then a random subset
        of ``int(k·u)`` positions, ``u ~ U(random_drop, 1]``, is kept (the same positions in
        every image). Invalid (other images') padding ranks last."""
        if positive is not None:
            scores = torch.where(positive, 0.5 * (scores + 1), scores)
        scores = torch.where(valid, scores, torch.full_like(scores, -1.0))
        n = scores.shape[1]
        # torch.sym_min keeps an exported size symbolic; eager (int) and jit traces (a 0-d tensor,
        # as fvcore's FLOP counter traces) take Python's min
        k = (
            torch.sym_min(self.num_fois, n)
            if isinstance(n, torch.SymInt)
            else min(self.num_fois, n)
        )
        selected = scores.topk(k, dim=1).indices
        if self.training and self.random_drop < 1.0:
            n = int(k)  # training is eager: a plain int
            keep = torch.randperm(n, device=selected.device)[
                : random_keep_count(n, self.random_drop)
            ]
            selected = selected[:, keep]
        return selected

    def encode(self, dense: Dict[str, Tensor], selected: Tensor) -> Dict[str, Tensor]:
        """The encoder over the selected FoIs and the per-FoI class, box and centerness heads."""
        levels = dense["levels"][selected]
        valid = dense["valid"].gather(1, selected)
        src = self.input_norm(self.input_proj(_gather_rows(dense["tokens"], selected)))
        pos = _gather_rows(dense["pos"], selected)
        memory = self.encoder(src, pos=pos, key_padding_mask=unmask_empty_rows(~valid))
        ltrb = F.relu(self.bbox_embed(memory)) * self.scales[levels][..., None]
        xy = dense["locations"][selected]  # (B, k, 2)
        stride = levels.new_tensor(self.strides, dtype=torch.float32)[levels][..., None]
        distances = ltrb.float() * stride
        boxes = torch.cat([xy - distances[..., :2], xy + distances[..., 2:]], dim=-1)
        return {
            "local_logits": dense["local_logits"],
            "pred_logits": self.class_embed(memory),
            "pred_boxes": boxes,
            "pred_ltrb": ltrb,
            "pred_ctrness": self.ctrness(memory).squeeze(-1),
            "levels": levels,
            "valid": valid,
            "selected": selected,
        }

    @torch.no_grad()
    def fcos_targets(
        self, locations: Tensor, levels: Tensor, gt_instances: List[Instances]
    ) -> Dict[str, Tensor]:
        """:func:`fcos_assignment` per image: ``fcos_labels`` (B, R), ``fcos_gt_index`` (B, R),
        unique over the batch (-1: none), and ``fcos_reg_targets`` (B, R, 4)."""
        strides = levels.new_tensor(self.strides, dtype=torch.float32)[levels]
        size_ranges = locations.new_tensor(self.size_ranges)[levels]
        labels, gt_index, reg_targets, offset = [], [], [], 0
        for inst in gt_instances:
            inst = inst.to(self.device)
            classes = inst.gt_classes.long()
            if len(classes) and (classes.min() < 0 or classes.max() >= self.num_classes):
                raise ValueError(
                    f"GT class ids must be in [0, {self.num_classes}); got "
                    f"{classes.unique().tolist()} (does num_classes match the dataset?)"
                )
            lab, index, reg = fcos_assignment(
                locations,
                strides,
                size_ranges,
                inst.gt_boxes.tensor.float(),
                classes,
                self.num_classes,
                self.center_sampling_radius,
            )
            labels.append(lab)
            gt_index.append(torch.where(index >= 0, index + offset, -1))
            reg_targets.append(reg)
            offset += len(inst)
        return {
            "fcos_labels": torch.stack(labels),
            "fcos_gt_index": torch.stack(gt_index),
            "fcos_reg_targets": torch.stack(reg_targets),
        }

    # ---------------------------------------------------------------- inference
    def detect(
        self, outputs: Dict[str, Tensor], image_sizes: List[Tuple[int, int]]
    ) -> List[Instances]:
        """:func:`tsp_fcos_detections` with the model's test settings."""
        return tsp_fcos_detections(
            outputs["pred_logits"],
            outputs["pred_boxes"],
            outputs["levels"],
            outputs["valid"],
            image_sizes,
            num_levels=len(self.in_features),
            score_thresh=self.test_score_thresh,
            topk_per_level=self.test_topk_per_level,
            nms_thresh=self.test_nms_thresh,
            topk=self.test_topk,
        )


def tsp_fcos_detections(
    logits: Tensor,
    boxes: Tensor,
    levels: Tensor,
    valid: Tensor,
    image_sizes: List[Tuple[int, int]],
    *,
    num_levels: int,
    score_thresh: float = 0.0,
    topk_per_level: int = 1000,
    nms_thresh: Optional[float] = 0.6,
    topk: int = 100,
) -> List[Instances]:
    """TSP-FCOS inference as released: per level the top ``topk_per_level`` (FoI, class) pairs
    above ``score_thresh``, score √p (no centerness), class-wise NMS (``nms_thresh=None``: none),
    top ``topk``. ``logits`` (B, k, K), ``boxes`` (B, k, 4) absolute xyxy, ``levels`` and
    ``valid`` (B, k) of the selected FoIs. ``query_indices`` holds each detection's FoI (its
    column among the selected FoIs)."""
    probs = logits.sigmoid()
    results = []
    for prob, boxes_i, levels_i, valid_i, size in zip(probs, boxes, levels, valid, image_sizes):
        keep_scores, keep_boxes, keep_classes, keep_fois = [], [], [], []
        for level in range(num_levels):
            idx = torch.nonzero((levels_i == level) & valid_i).squeeze(1)
            p = prob[idx].flatten()
            cand = torch.nonzero(p > score_thresh).squeeze(1)
            top = p[cand].topk(min(topk_per_level, cand.numel())).indices
            flat = cand[top]
            keep_scores.append(p[flat].sqrt())
            keep_fois.append(idx[flat // prob.shape[1]])
            keep_boxes.append(boxes_i[keep_fois[-1]])
            keep_classes.append(flat % prob.shape[1])
        scores, kept_boxes, classes, fois = (
            torch.cat(keep_scores),
            torch.cat(keep_boxes),
            torch.cat(keep_classes),
            torch.cat(keep_fois),
        )
        if nms_thresh is not None:
            keep = batched_nms(kept_boxes, scores, classes, nms_thresh)[:topk]
        else:
            keep = scores.topk(min(topk, scores.numel())).indices
        inst = Instances(size)
        inst.pred_boxes = Boxes(kept_boxes[keep].float())
        inst.scores = scores[keep].float()
        inst.pred_classes = classes[keep]
        inst.query_indices = fois[keep]
        results.append(inst)
    return results
