"""Bipartite matching between predictions and ground truth (DETR, Sec. 3.1)."""

from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..layers.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .classification import check_classification


def focal_class_cost(
    logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Deformable DETR's focal matching cost, gathered at the GT labels.

    Args:
        logits: (..., Q, C) class logits; labels: (..., G) class ids. Returns (..., Q, G).
    """
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return _gather_labels(pos - neg, labels)


def softmax_class_cost(logits: Tensor, labels: Tensor) -> Tensor:
    """DETR's matching cost ``-p(class)``, with p from the softmax over classes + no-object."""
    return -_gather_labels(logits.softmax(-1), labels)


def _gather_labels(per_class: Tensor, labels: Tensor) -> Tensor:
    index = labels.unsqueeze(-2).expand(*per_class.shape[:-1], labels.shape[-1])
    return per_class.gather(-1, index)


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising ``w_class·C_class + w_L1·||b - b̂||₁ - w_GIoU·GIoU``.

    The cost is built for the whole batch padded to the largest GT count (never the cross-image
    blocks of the official code), moved to the CPU once, and solved per image with
    ``scipy.optimize.linear_sum_assignment``. Boxes are normalised cxcywh. ``C_class`` is
    :func:`focal_class_cost` with ``classification="sigmoid"`` and :func:`softmax_class_cost`
    with ``"softmax"`` (see :mod:`~detr_variants.modeling.classification`).
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        classification: str = "sigmoid",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.classification = check_classification(classification)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: List[Dict[str, Tensor]]
    ):
        """Returns the (B, Q, G_max) cost and the per-image GT counts."""
        sizes = [len(t["labels"]) for t in targets]
        b, q = pred_logits.shape[:2]
        g = max(sizes, default=0)
        labels = pred_logits.new_zeros((b, g), dtype=torch.long)
        boxes = pred_boxes.new_tensor([0.5, 0.5, 1.0, 1.0]).repeat(b, g, 1)  # valid dummy boxes
        for i, t in enumerate(targets):
            labels[i, : sizes[i]] = t["labels"]
            boxes[i, : sizes[i]] = t["boxes"]
        logits, pred_boxes = pred_logits.float(), pred_boxes.float()
        if self.classification == "sigmoid":
            cost_class = focal_class_cost(logits, labels, self.focal_alpha, self.focal_gamma)
        else:
            cost_class = softmax_class_cost(logits, labels)
        cost_bbox = (pred_boxes[:, :, None] - boxes[:, None]).abs().sum(-1)
        cost_giou = -generalized_box_iou(
            box_cxcywh_to_xyxy(pred_boxes)[:, :, None], box_cxcywh_to_xyxy(boxes)[:, None]
        )
        cost = (
            self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou
        )
        return cost, sizes

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """Returns, per image, (prediction indices, GT indices) of the optimal assignment."""
        cost, sizes = self.cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], targets)
        cost = cost.cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError("matching cost is not finite; the predictions diverged")
        indices = []
        for i, n in enumerate(sizes):
            rows, cols = linear_sum_assignment(cost[i, :, :n].numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long))
            )
        return indices


@torch.no_grad()
def restricted_match(cost: Tensor, candidate_gt: Tensor) -> Tuple[Tensor, Tensor]:
    """TSP's restricted bipartite matching (Sun et al. 2021, Sec. 5.3): prediction ``i`` may only
    be matched to the ground truth ``candidate_gt[i]`` (``-1``: to none), and each ground truth
    takes its candidate of lowest ``cost``.

    The candidate sets are disjoint (FCOS positives are assigned to one GT, RoIs to their
    highest-IoU GT), so this per-GT argmin is the minimum-cost maximum matching: no prediction
    is given to two GTs. Ties go to the lower prediction index.

    Args:
        cost: (N,) the cost of each prediction against its candidate GT.
        candidate_gt: (N,) long, the GT each prediction is a candidate of, or -1. GT indices must
            be unique over the whole batch when N spans several images.

    Returns:
        (prediction indices, GT indices), sorted by GT index.
    """
    pred = torch.nonzero(candidate_gt >= 0).squeeze(1)
    if pred.numel() == 0:
        return pred, pred.clone()
    gts, costs = candidate_gt[pred], cost[pred].float()
    order = torch.argsort(costs, stable=True)
    order = order[torch.argsort(gts[order], stable=True)]  # by GT, then by cost
    gts = gts[order]
    first = torch.ones_like(gts, dtype=torch.bool)
    first[1:] = gts[1:] != gts[:-1]
    return pred[order][first], gts[first]


class RestrictedMatcher(nn.Module):
    """TSP's matcher: cost ``w_class·C_class + w_GIoU·C_GIoU`` per prediction against the one GT
    it is a candidate of, then :func:`restricted_match`.

    TSP-FCOS uses ``C_class = -p_gt·centerness`` and ``C_GIoU = 1 - GIoU`` on FCOS-positive
    FoIs; TSP-RCNN ``C_class = -softmax_gt`` and the GIoU loss of the decoded box on RoIs with
    IoU >= 0.5 (``GIOU_WEIGHT 2`` in both released recipes).
    """

    def __init__(self, cost_class: float = 1.0, cost_giou: float = 2.0):
        super().__init__()
        self.cost_class = cost_class
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(
        self, class_cost: Tensor, giou_cost: Tensor, candidate_gt: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """All (N,); returns (prediction indices, GT indices) as :func:`restricted_match`."""
        cost = self.cost_class * class_cost.float() + self.cost_giou * giou_cost.float()
        return restricted_match(cost, candidate_gt)
