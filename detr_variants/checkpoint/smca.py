"""Official single-scale SMCA checkpoints (gaopengcuhk/SMCA-DETR, DETR naming) →
:class:`~detr_variants.modeling.meta_arch.smca_detr.SMCADETR`.

The released model is DETR's with, per decoder layer, ``norm4`` (our ``prior_norm``), ``point2``
(per-head centre offsets, our ``modulation.offsets``) and ``point3`` (scales, our
``modulation.scales``; 16 outputs for ``--dynamic_scale type3`` = our ``scale_type="independent"``,
8 for type2 = ``"single"``, none for type1 = ``"fixed"``), and in layer 0 ``point1``, the centre MLP
(our ``decoder.center_head``). Its class head has 92 sigmoid outputs indexed by COCO category id
(column 91 is never a target); they become detectron2's 80 contiguous classes.
"""
import re
from typing import Dict, Optional

from torch import Tensor

from .convert import (StateDict, class_head_rows, drop_batchnorm_counters, register_converter,
                      torchvision_resnet_name)

_ENCODER = {"self_attn": "self_attn", "linear1": "ffn.linear1", "linear2": "ffn.linear2", "norm1": "norm",
            "norm2": "ffn.norm"}
_DECODER = {"self_attn": "self_attn", "multihead_attn": "cross_attn", "linear1": "ffn.linear1",
            "linear2": "ffn.linear2", "norm1": "norm1", "norm2": "norm2", "norm3": "ffn.norm", "norm4": "prior_norm",
            "point2": "modulation.offsets", "point3": "modulation.scales"}
_TOP = ("input_proj.", "query_embed.", "bbox_embed.")



def _layer_target(part: str, index: str, rest: str) -> Optional[str]:
    module, _, leaf = rest.partition(".")
    if part == "decoder" and module == "point1":
        return f"decoder.center_head.{leaf}" if index == "0" else None
    table = _ENCODER if part == "encoder" else _DECODER
    return f"{part}.layers.{index}.{table[module]}.{leaf}" if module in table else None


@register_converter("official", "smca")
def convert_official(state_dict: StateDict, num_classes: Optional[int] = None) -> StateDict:
    """Official single-scale SMCA checkpoint → ours.

    Args:
        num_classes: classes of the target model; ``None`` maps a 92-row COCO head to 80 classes
            and keeps any other head.
    """
    out: Dict[str, Tensor] = {}
    unknown = []
    for key, value in drop_batchnorm_counters(state_dict).items():
        layer = re.fullmatch(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)", key)
        if key.startswith("backbone.0.body."):
            name = torchvision_resnet_name(key[len("backbone.0.body."):])
            target = None if name is None else "backbone." + name
        elif layer:
            target = _layer_target(*layer.groups())
        elif key.startswith("transformer.decoder.norm."):
            target = key[len("transformer."):]
        elif key.startswith("class_embed."):
            target, value = key, class_head_rows(value, num_classes)
        elif key.startswith(_TOP):
            target = key
        else:
            target = None
        if target is None:
            unknown.append(key)
        else:
            out[target] = value
    for key, value in out.items():  # type4 (a cross term per head) has no equivalent here
        offsets = out.get(key.replace(".scales.", ".offsets."))
        if (key.endswith("modulation.scales.weight") and offsets is not None
                and 2 * value.shape[0] == 3 * offsets.shape[0]):
            raise ValueError(f"{key}: a --dynamic_scale type4 checkpoint (3 scales per head); only type1/2/3 "
                             "(fixed / single / independent scales) are implemented")
    if unknown:
        raise KeyError(f"{len(unknown)} official SMCA keys not understood: {', '.join(sorted(unknown)[:8])}"
                       + (" ..." if len(unknown) > 8 else ""))
    return out
