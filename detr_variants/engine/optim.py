"""Parameter groups with per-name learning-rate multipliers (e.g. backbone ×0.1), and TSP's
hybrid SGD + AdamW optimizer."""

from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn


def param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    lr_multipliers: Optional[Dict[str, float]] = None,
    weight_decay_norm: Optional[float] = None,
) -> List[Dict]:
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
        group = groups.setdefault(
            (factor, wd), {"params": [], "lr": base_lr * factor, "weight_decay": wd}
        )
        group["params"].append(p)
    return list(groups.values())


def hybrid_param_groups(
    model: nn.Module,
    lr: float,
    adamw_lr: float,
    weight_decay: float,
    adamw_params: Sequence[str] = ("transformer",),
    lr_multipliers: Optional[Dict[str, float]] = None,
    weight_decay_norm: Optional[float] = None,
) -> List[Dict]:
    """:func:`param_groups`, each split into an SGD part (base lr ``lr``) and an AdamW part (base
    lr ``adamw_lr``): a parameter goes to AdamW when its name contains one of ``adamw_params``.

    The groups carry ``"optimizer": "sgd" | "adamw"`` for :class:`HybridOptimizer`.
    """
    adamw_ids = {
        id(p) for name, p in model.named_parameters() if any(k in name for k in adamw_params)
    }
    groups = []
    for group in param_groups(model, 1.0, weight_decay, lr_multipliers, weight_decay_norm):
        for kind, base_lr, to_adamw in (("sgd", lr, False), ("adamw", adamw_lr, True)):
            params = [p for p in group["params"] if (id(p) in adamw_ids) == to_adamw]
            if params:
                groups.append(
                    {
                        "params": params,
                        "lr": base_lr * group["lr"],
                        "weight_decay": group["weight_decay"],
                        "optimizer": kind,
                    }
                )
    return groups


class HybridOptimizer(torch.optim.Optimizer):
    """SGD with momentum for some parameter groups and AdamW for the others, as one optimizer
    (TSP's released ``HybridOptimizer``: the transformer in AdamW, everything else in SGD).

    It holds a ``torch.optim.SGD`` and a ``torch.optim.AdamW``; ``param_groups`` is the list of
    their (shared) group dicts, so detectron2's ``LRMultiplier`` scales every group's own
    initial lr, and ``state_dict``/``load_state_dict`` save and restore both.

    Args:
        params: parameter groups, each with ``"optimizer": "sgd"`` (the default) or ``"adamw"``
            (see :func:`hybrid_param_groups`); a group's ``lr``/``weight_decay`` win over the
            defaults below.
        lr, momentum: SGD defaults. adamw_lr, betas, eps: AdamW defaults.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        adamw_lr: Optional[float] = None,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        groups = [g if isinstance(g, dict) else {"params": [g]} for g in params]
        kinds = {g.setdefault("optimizer", "sgd") for g in groups}
        if not kinds <= {"sgd", "adamw"}:
            raise ValueError(
                f"unknown optimizer kinds {sorted(kinds - {'sgd', 'adamw'})}; use 'sgd' or 'adamw'"
            )
        adamw_lr = lr if adamw_lr is None else adamw_lr
        for g in groups:
            g.setdefault("lr", adamw_lr if g["optimizer"] == "adamw" else lr)
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay))
        sgd = [g for g in self.param_groups if g["optimizer"] == "sgd"]
        adamw = [g for g in self.param_groups if g["optimizer"] == "adamw"]
        self.sgd = (
            torch.optim.SGD(sgd, lr=lr, momentum=momentum, weight_decay=weight_decay)
            if sgd
            else None
        )
        self.adamw = (
            torch.optim.AdamW(
                adamw, lr=adamw_lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay
            )
            if adamw
            else None
        )
        self._sync_groups()

    def _optimizers(self) -> List[torch.optim.Optimizer]:
        return [o for o in (self.sgd, self.adamw) if o is not None]

    def _sync_groups(self) -> None:
        # the inner optimizers own the group dicts; ours are the same objects
        self.param_groups = [g for o in self._optimizers() for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self._optimizers():
            optimizer.step()
        return loss

    def state_dict(self) -> Dict:
        return {
            "sgd": None if self.sgd is None else self.sgd.state_dict(),
            "adamw": None if self.adamw is None else self.adamw.state_dict(),
        }

    def load_state_dict(self, state_dict: Dict) -> None:
        for name in ("sgd", "adamw"):
            optimizer, state = getattr(self, name), state_dict.get(name)
            if (optimizer is None) != (state is None):
                raise ValueError(
                    f"the checkpoint's {name} state does not match this optimizer's groups"
                )
            if optimizer is not None:
                optimizer.load_state_dict(state)
        self._sync_groups()  # load_state_dict replaces the inner group dicts
