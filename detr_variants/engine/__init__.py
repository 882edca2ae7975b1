from .devices import resolve_device
from .ema import EMAHook, ModelEMA
from .optim import param_groups
from .predictor import DefaultPredictor
from .trainer import SetPredictionTrainer, autocast_dtype, create_ddp_model

__all__ = [
    "resolve_device",
    "EMAHook",
    "ModelEMA",
    "param_groups",
    "DefaultPredictor",
    "SetPredictionTrainer",
    "autocast_dtype",
    "create_ddp_model",
]
