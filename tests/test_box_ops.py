import pytest
import torch

from detr_variants.layers.box_ops import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
)


def test_cxcywh_xyxy_round_trip():
    torch.manual_seed(0)
    boxes = torch.rand(50, 4)
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes, atol=1e-6)
    assert torch.equal(
        box_cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])), torch.tensor([0.4, 0.3, 0.6, 0.7])
    )


def test_giou_known_values():
    a = torch.tensor([0.0, 0.0, 2.0, 2.0])
    # identical: 1; half-overlapping: iou 1/3, enclosing = union so giou = iou
    assert generalized_box_iou(a, a).item() == pytest.approx(1.0)
    b = torch.tensor([1.0, 0.0, 3.0, 2.0])
    assert generalized_box_iou(a, b).item() == pytest.approx(1 / 3)
    # disjoint: iou 0, enclosing area 2x4=8 over union 8 -> (0,0,2,2) and (2,... ) touching
    c = torch.tensor([4.0, 0.0, 6.0, 2.0])
    assert box_iou(a, c).item() == 0
    assert generalized_box_iou(a, c).item() == pytest.approx(0 - (12 - 8) / 12)


def test_pairwise_by_broadcasting():
    torch.manual_seed(0)
    a = box_cxcywh_to_xyxy(torch.rand(5, 4) * 0.5 + 0.25)
    b = box_cxcywh_to_xyxy(torch.rand(3, 4) * 0.5 + 0.25)
    pairwise = generalized_box_iou(a[:, None], b[None])
    assert pairwise.shape == (5, 3)
    for i in range(5):
        for j in range(3):
            assert pairwise[i, j] == pytest.approx(generalized_box_iou(a[i], b[j]).item(), abs=1e-6)


def test_giou_rejects_degenerate_boxes():
    with pytest.raises(ValueError):
        generalized_box_iou(torch.tensor([1.0, 1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_inverse_sigmoid():
    x = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(inverse_sigmoid(x).sigmoid(), x, atol=1e-6)
    assert torch.isfinite(inverse_sigmoid(torch.tensor([0.0, 1.0]))).all()
