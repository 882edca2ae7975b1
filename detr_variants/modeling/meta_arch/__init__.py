from .base import SetPredictionDetector, set_prediction_outputs
from .conditional_detr import ConditionalDETR
from .deformable_detr import DeformableDETR
from .detr import DETR
from .smca_detr import SMCADETR, MultiScaleSMCADETR, ReleasedMultiScaleSMCADETR

__all__ = [
    "SetPredictionDetector",
    "set_prediction_outputs",
    "DETR",
    "DeformableDETR",
    "ConditionalDETR",
    "SMCADETR",
    "MultiScaleSMCADETR",
    "ReleasedMultiScaleSMCADETR",
]
