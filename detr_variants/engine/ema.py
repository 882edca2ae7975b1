"""Exponential moving average of model weights, evaluated in place of the raw weights."""

import copy
import math
from contextlib import contextmanager

import torch
from detectron2.engine import HookBase
from torch import nn


class ModelEMA(nn.Module):
    """Keeps ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    The decay warms up as ``decay * (1 - exp(-updates / warmup))`` so early averages are not
    dominated by the random initialisation. Buffers (e.g. BatchNorm statistics) are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: float = 2000.0):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self._param_names = {name for name, _ in self.module.named_parameters()}
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = (
            self.decay * (1 - math.exp(-self.updates.item() / self.warmup))
            if self.warmup > 0
            else self.decay
        )
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            if name in self._param_names:
                ema_state[name].lerp_(value.detach(), 1 - d)
            else:
                ema_state[name].copy_(value)

    @contextmanager
    def swapped_into(self, model: nn.Module):
        """Temporarily loads the EMA weights into ``model`` (e.g. for evaluation)."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.module.state_dict())
        try:
            yield model
        finally:
            model.load_state_dict(backup)


class EMAHook(HookBase):
    """Updates a :class:`ModelEMA` after every training step."""

    def __init__(self, ema: ModelEMA, model: nn.Module):
        self.ema = ema
        self.model = model

    def after_step(self):
        self.ema.update(self.model)
