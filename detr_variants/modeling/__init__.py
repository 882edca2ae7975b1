from .backbone import feature_masks, make_resnet
from .criterion import SetCriterion, sigmoid_focal_loss
from .matcher import HungarianMatcher, RestrictedMatcher
from .meta_arch import (
    DETR,
    SMCADETR,
    ConditionalDETR,
    DeformableDETR,
    MultiScaleSMCADETR,
    SetPredictionDetector,
)
from .tsp import TSPFCOS, TSPRCNN

__all__ = [
    "feature_masks",
    "make_resnet",
    "SetCriterion",
    "sigmoid_focal_loss",
    "HungarianMatcher",
    "DETR",
    "ConditionalDETR",
    "DeformableDETR",
    "SetPredictionDetector",
    "SMCADETR",
    "MultiScaleSMCADETR",
    "RestrictedMatcher",
    "TSPFCOS",
    "TSPRCNN",
]
