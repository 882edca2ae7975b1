"""Official single-scale SMCA checkpoints (gaopengcuhk/SMCA-DETR, DETR naming) →
:class:`~detr_variants.modeling.meta_arch.smca_detr.SMCADETR`.

The released model is DETR's with, per decoder layer, ``norm4`` (our ``prior_norm``), ``point2``
(per-head centre offsets, our ``modulation.offsets``) and ``point3`` (scales, our
``modulation.scales``; 16 outputs for ``--dynamic_scale type3`` = our ``scale_type="independent"``,
8 for type2 = ``"single"``, none for type1 = ``"fixed"``), and in layer 0 ``point1``, the centre MLP
(our ``decoder.center_head``). Its class head has 92 sigmoid outputs indexed by COCO category id
(column 91 is never a target); they become detectron2's 80 contiguous classes.
"""

from typing import Optional

from .convert import (
    OFFICIAL_DECODER_FFN,
    OFFICIAL_ENCODER_LAYER,
    StateDict,
    convert_official_detr_layout,
    layer_tables,
    register_converter,
)

_DECODER = {
    "self_attn": "self_attn",
    "multihead_attn": "cross_attn",
    "norm1": "norm1",
    "norm2": "norm2",
    "norm4": "prior_norm",
    "point2": "modulation.offsets",
    "point3": "modulation.scales",
    **OFFICIAL_DECODER_FFN,
}
_LAYERS = layer_tables(OFFICIAL_ENCODER_LAYER, _DECODER)
_KEEP = r"(transformer\.decoder\.norm|input_proj|query_embed|bbox_embed)\."


def _layer_target(part: str, index: str, rest: str) -> Optional[str]:
    if part == "decoder" and rest.startswith("point1."):  # the centre MLP, only in layer 0
        return "decoder.center_head." + rest[len("point1.") :] if index == "0" else None
    return _LAYERS(part, index, rest)


@register_converter("official", "smca")
def convert_official(state_dict: StateDict, num_classes: Optional[int] = None) -> StateDict:
    """Official single-scale SMCA checkpoint → ours.

    Args:
        num_classes: classes of the target model; ``None`` maps a 92-row COCO head to 80 classes
            and keeps any other head.
    """
    out = convert_official_detr_layout(
        state_dict, _layer_target, _KEEP, "official SMCA", num_classes
    )
    for key, value in out.items():  # type4 (a cross term per head) has no equivalent here
        offsets = out.get(key.replace(".scales.", ".offsets."))
        if (
            key.endswith("modulation.scales.weight")
            and offsets is not None
            and 2 * value.shape[0] == 3 * offsets.shape[0]
        ):
            raise ValueError(
                f"{key}: a --dynamic_scale type4 checkpoint (3 scales per head); only type1/2/3 "
                "(fixed / single / independent scales) are implemented"
            )
    return out
