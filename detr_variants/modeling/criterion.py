"""Set criterion: losses between matched predictions and ground truth (DETR, Sec. 3.1)."""

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.utils import comm
from torch import Tensor, nn

from ..layers.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .classification import check_classification


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Elementwise focal loss (Lin et al. 2017) on sigmoid probabilities; alpha < 0 disables weighting."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


class SetCriterion(nn.Module):
    """Hungarian-matched class, L1 and GIoU losses, for the final and every auxiliary output.

    Loss weights live here, not in configs: every entry of ``outputs["aux_outputs"]`` (one per
    intermediate decoder layer) and ``outputs["enc_outputs"]`` (two-stage proposals, trained
    class-agnostically: every label 0, as the official Deformable DETR) gets the same weights as
    the final layer, so changing the number of decoder layers needs no other change. A focal
    head's width sets its classes, so the proposals' one-logit head needs no other criterion.
    The returned losses are already weighted; their sum is the training loss.

    Args:
        num_classes: foreground classes (detectron2 contiguous ids).
        matcher: e.g. :class:`HungarianMatcher`.
        weight_dict: weights of ``loss_class``, ``loss_bbox`` and ``loss_giou``.
        classification: ``"sigmoid"`` (sigmoid focal loss, summed / num_boxes, as Deformable
            DETR) or ``"softmax"`` (cross-entropy over classes + no-object with ``eos_coef`` on
            no-object, as DETR); see :mod:`~detr_variants.modeling.classification`.
    """

    empty_weight: Tensor  # with classification="softmax": the class weights of the cross-entropy

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        classification: str = "sigmoid",
        eos_coef: float = 0.1,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        unknown = set(weight_dict) - {"loss_class", "loss_bbox", "loss_giou"}
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.classification = check_classification(classification)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.eos_coef = eos_coef
        if classification == "softmax":
            empty_weight = torch.ones(num_classes + 1)
            empty_weight[-1] = eos_coef
            self.register_buffer("empty_weight", empty_weight, persistent=False)

    def loss_class(self, outputs, targets, indices, num_boxes: float) -> Tensor:
        logits = outputs["pred_logits"].float()
        b, q = logits.shape[:2]
        # focal heads may have fewer columns than classes: a class-agnostic (proposal) head has 1
        background = logits.shape[-1] - 1 if self.classification == "softmax" else logits.shape[-1]
        target_classes = torch.full((b, q), background, dtype=torch.long, device=logits.device)
        batch_idx, src_idx = _flat_indices(indices)
        target_classes[batch_idx, src_idx] = torch.cat(
            [t["labels"][j] for t, (_, j) in zip(targets, indices)]
        )
        if self.classification == "softmax":
            return F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        # One-hot over the real classes only: "no object" is the all-zero target.
        onehot = F.one_hot(target_classes, background + 1)[..., :-1].to(logits.dtype)
        loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma)
        return loss.sum() / num_boxes

    def loss_boxes(self, outputs, targets, indices, num_boxes: float) -> Dict[str, Tensor]:
        batch_idx, src_idx = _flat_indices(indices)
        src = outputs["pred_boxes"][batch_idx, src_idx].float()
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).float()
        giou = generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        return {
            "loss_bbox": F.l1_loss(src, tgt, reduction="none").sum() / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes,
        }

    def losses_for(self, outputs, targets, num_boxes: float) -> Dict[str, Tensor]:
        """Unweighted losses of one set of predictions against ``targets``."""
        indices = self.matcher(outputs, targets)
        losses = {"loss_class": self.loss_class(outputs, targets, indices, num_boxes)}
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        return losses

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """``targets``: per image ``labels`` (G,) and normalised cxcywh ``boxes`` (G, 4)."""
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        groups = [("", outputs, targets)]
        groups += [(f"_{i}", aux, targets) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:  # two-stage proposals: class-agnostic targets
            agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            groups.append(("_enc", outputs["enc_outputs"], agnostic))
        check_finite_predictions([(suffix, preds) for suffix, preds, _ in groups])
        losses = {}
        for suffix, preds, tgts in groups:
            for name, value in self.losses_for(preds, tgts, num_boxes).items():
                losses[name + suffix] = value * self.weight_dict.get(name, 0.0)
        return losses

    @staticmethod
    def num_boxes(targets: List[Dict[str, Tensor]], device) -> float:
        """GT boxes per process, averaged over processes and clamped to at least 1."""
        n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(n)
        return torch.clamp(n / comm.get_world_size(), min=1).item()


# The loss terms each prediction feeds.
_LOSS_INPUTS = {"pred_logits": ("loss_class",), "pred_boxes": ("loss_bbox", "loss_giou")}


def check_finite_predictions(groups: List[Tuple[str, Dict[str, Tensor]]]) -> None:
    """Raises ``FloatingPointError`` naming every non-finite prediction and the loss terms it
    feeds, before matching would trip over NaN boxes (the GIoU's xyxy check fails first).

    Args:
        groups: (loss-name suffix, outputs) pairs: ``""`` for the last layer, ``"_i"`` for
            ``aux_outputs[i]``, ``"_enc"`` for ``enc_outputs``.
    """
    preds = [(suffix, key, out[key]) for suffix, out in groups for key in _LOSS_INPUTS]
    if torch.stack([t.isfinite().all() for *_, t in preds]).all():  # one sync for all of them
        return
    bad = [
        f"{_output_name(suffix)}{key} ({', '.join(n + suffix for n in _LOSS_INPUTS[key])})"
        for suffix, key, t in preds
        if not t.isfinite().all()
    ]
    raise FloatingPointError(f"non-finite predictions, the training diverged: {'; '.join(bad)}")


def _output_name(suffix: str) -> str:
    if suffix == "_enc":
        return "enc_outputs."
    return f"aux_outputs[{suffix[1:]}]." if suffix else ""


def _flat_indices(indices: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx
