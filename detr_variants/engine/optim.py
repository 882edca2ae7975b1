"""Parameter groups with per-name learning-rate multipliers (e.g. backbone ×0.1)."""
from typing import Dict, List, Optional

from torch import nn


def param_groups(model: nn.Module, base_lr: float, weight_decay: float,
                 lr_multipliers: Optional[Dict[str, float]] = None,
                 weight_decay_norm: Optional[float] = None) -> List[Dict]:
    """One optimizer group per distinct (lr, weight decay) over the trainable parameters.

    Args:
        lr_multipliers: ``{substring: factor}``; a parameter gets the factor of the first key
            contained in its name (e.g. ``{"backbone": 0.1, "sampling_offsets": 0.1}``).
        weight_decay_norm: weight decay of normalisation-layer parameters; ``None`` treats them
            like the rest (the DETR family decays every parameter).
    """
    lr_multipliers = dict(lr_multipliers or {})
    norm_params = set()
    if weight_decay_norm is not None:
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)):
                norm_params.update(id(p) for p in module.parameters(recurse=False))
    groups: Dict[tuple, Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        factor = next((f for key, f in lr_multipliers.items() if key in name), 1.0)
        wd = weight_decay_norm if id(p) in norm_params else weight_decay
        group = groups.setdefault((factor, wd), {"params": [], "lr": base_lr * factor, "weight_decay": wd})
        group["params"].append(p)
    return list(groups.values())
