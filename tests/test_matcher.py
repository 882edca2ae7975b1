import itertools

import pytest
import torch

from detr_variants.layers.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from detr_variants.modeling.matcher import HungarianMatcher, focal_class_cost


def _random_problem(b, q, c, sizes, seed):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(b, q, c, generator=g),
        "pred_boxes": torch.rand(b, q, 4, generator=g) * 0.5 + 0.25,
    }
    targets = [
        {
            "labels": torch.randint(0, c - 1, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.25,
        }
        for n in sizes
    ]
    return outputs, targets


def _cost_by_hand(matcher, logits, boxes, target):
    """The cost of one image, written independently of the batched implementation."""
    if matcher.classification == "softmax":
        cost_class = -logits.softmax(-1)[:, target["labels"]]
    else:
        cost_class = focal_class_cost(logits, target["labels"])
    cost_bbox = torch.cdist(boxes, target["boxes"], p=1)
    giou = generalized_box_iou(
        box_cxcywh_to_xyxy(boxes)[:, None], box_cxcywh_to_xyxy(target["boxes"])[None]
    )
    return (
        matcher.cost_class * cost_class + matcher.cost_bbox * cost_bbox - matcher.cost_giou * giou
    )


@pytest.mark.parametrize("classification", ["softmax", "sigmoid"])
@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_optimum(classification, seed):
    matcher = HungarianMatcher(
        cost_class=2, cost_bbox=5, cost_giou=2, classification=classification
    )
    sizes = [3, 0, 4, 1]
    outputs, targets = _random_problem(len(sizes), 6, 5, sizes, seed)
    indices = matcher(outputs, targets)
    for i, (rows, cols) in enumerate(indices):
        n = sizes[i]
        assert len(rows) == len(cols) == n
        assert len(set(rows.tolist())) == n and sorted(cols.tolist()) == list(range(n))
        if n == 0:
            continue
        cost = _cost_by_hand(
            matcher, outputs["pred_logits"][i], outputs["pred_boxes"][i], targets[i]
        )
        found = cost[rows, cols].sum().item()
        best = min(
            sum(cost[p[j], j].item() for j in range(n)) for p in itertools.permutations(range(6), n)
        )
        assert found == pytest.approx(best, abs=1e-4)


def test_all_images_without_gt():
    outputs, targets = _random_problem(2, 5, 3, [0, 0], 0)
    for rows, cols in HungarianMatcher()(outputs, targets):
        assert rows.numel() == 0 and cols.numel() == 0


def test_rejects_non_finite_costs():
    outputs, targets = _random_problem(1, 4, 3, [2], 0)
    outputs["pred_logits"][0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        HungarianMatcher()(outputs, targets)
