from .base import SetPredictionDetector, set_prediction_outputs
from .detr import DETR

__all__ = ["SetPredictionDetector", "set_prediction_outputs", "DETR"]
