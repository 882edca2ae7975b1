import math

import pytest
import torch
import torch.nn.functional as F

from detr_variants.modeling.criterion import SetCriterion, sigmoid_focal_loss


class FixedMatcher(torch.nn.Module):
    """Matches prediction i to GT i, so the losses can be computed by hand."""

    def forward(self, outputs, targets):
        return [(torch.arange(len(t["labels"])), torch.arange(len(t["labels"]))) for t in targets]


def _case():
    logits = torch.tensor(
        [[[2.0, -1.0, 0.5], [0.0, 1.0, -0.5]]]
    )  # 1 image, 2 queries, 2 classes + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])}]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


def test_ce_l1_giou_by_hand():
    outputs, targets = _case()
    crit = SetCriterion(
        num_classes=2,
        matcher=FixedMatcher(),
        classification="softmax",
        eos_coef=0.1,
        weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    )
    losses = crit(outputs, targets)
    # query 0 -> class 1 (weight 1), query 1 -> no-object (weight 0.1); weighted mean
    lp0 = F.log_softmax(outputs["pred_logits"][0, 0], -1)[1].item()
    lp1 = F.log_softmax(outputs["pred_logits"][0, 1], -1)[2].item()
    expect_ce = -(1.0 * lp0 + 0.1 * lp1) / 1.1
    assert losses["loss_class"].item() == pytest.approx(expect_ce, rel=1e-5)
    # L1: |0.2-0.4| = 0.2, one box
    assert losses["loss_bbox"].item() == pytest.approx(5.0 * 0.2, rel=1e-5)
    # GIoU: pred [0.4,0.4,0.6,0.6] inside target [0.3,0.4,0.7,0.6]: iou = 0.04/0.08, enclosing = union
    assert losses["loss_giou"].item() == pytest.approx(2.0 * (1 - 0.5), rel=1e-5)


def test_focal_by_hand_and_num_boxes_clamp():
    outputs, targets = _case()
    outputs["pred_logits"] = outputs["pred_logits"][
        ..., :2
    ]  # sigmoid heads have no no-object column
    crit = SetCriterion(
        num_classes=2,
        matcher=FixedMatcher(),
        classification="sigmoid",
        weight_dict={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    )
    losses = crit(outputs, targets)
    expect = 0.0
    onehot = [[0.0, 1.0], [0.0, 0.0]]
    for q in range(2):
        for c in range(2):
            x, t = outputs["pred_logits"][0, q, c].item(), onehot[q][c]
            p = 1 / (1 + math.exp(-x))
            p_t = p if t else 1 - p
            alpha = 0.25 if t else 0.75
            expect += -alpha * (1 - p_t) ** 2 * math.log(p_t)
    assert losses["loss_class"].item() == pytest.approx(2.0 * expect, rel=1e-5)
    # zero GT: num_boxes clamps to 1, box losses vanish, class loss is the all-negative focal sum
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    losses = crit(outputs, empty)
    all_neg = sigmoid_focal_loss(outputs["pred_logits"], torch.zeros(1, 2, 2)).sum().item()
    assert losses["loss_class"].item() == pytest.approx(2.0 * all_neg, rel=1e-5)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0


def test_aux_and_encoder_outputs_weighted_like_the_final_layer():
    outputs, targets = _case()
    outputs["pred_logits"] = outputs["pred_logits"][..., :2]
    final = {k: v.clone() for k, v in outputs.items()}
    outputs["aux_outputs"] = [dict(final), dict(final)]
    outputs["enc_outputs"] = dict(final)
    crit = SetCriterion(
        num_classes=2,
        matcher=FixedMatcher(),
        weight_dict={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    )
    losses = crit(outputs, targets)
    assert set(losses) == {
        f"{n}{s}"
        for n in ("loss_class", "loss_bbox", "loss_giou")
        for s in ("", "_0", "_1", "_enc")
    }
    for s in ("_0", "_1"):
        assert losses["loss_bbox" + s] == losses["loss_bbox"]
        assert losses["loss_class" + s] == losses["loss_class"]
    # encoder proposals are class-agnostic: the GT label becomes 0
    agnostic = crit.losses_for(final, [{**targets[0], "labels": torch.tensor([0])}], 1.0)
    assert losses["loss_class_enc"].item() == pytest.approx(2.0 * agnostic["loss_class"].item())


def test_unknown_loss_weight_is_an_error():
    with pytest.raises(ValueError):
        SetCriterion(num_classes=2, matcher=FixedMatcher(), weight_dict={"loss_ce": 1.0})
