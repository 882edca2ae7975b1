# The set criterion of the focal-loss variants (Deformable DETR, Conditional DETR, SMCA):
# sigmoid focal loss (alpha 0.25, gamma 2) and class / L1 / GIoU weights 2 / 5 / 2, with the
# same weights as Hungarian matching costs. Auxiliary-layer weights are derived in the criterion.
# The classification is the model's (`model.classification`), so one override switches the head,
# the loss and the matching cost together.
from detectron2.config import LazyCall as L

from detr_variants.modeling import HungarianMatcher, SetCriterion

focal_criterion = L(SetCriterion)(
    num_classes="${..num_classes}",
    matcher=L(HungarianMatcher)(
        cost_class=2.0,
        cost_bbox=5.0,
        cost_giou=2.0,
        classification="${..classification}",
        focal_alpha=0.25,
        focal_gamma=2.0,
    ),
    weight_dict={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    classification="${..classification}",
    focal_alpha=0.25,
    focal_gamma=2.0,
)
