"""Official SMCA checkpoints (gaopengcuhk/SMCA-DETR, DETR naming) →
:class:`~detr_variants.modeling.meta_arch.smca_detr.SMCADETR` (``official``/``smca``) and the
released multi-scale model (``Multi_scale_SMCA.zip``) →
:class:`~detr_variants.modeling.meta_arch.smca_detr.ReleasedMultiScaleSMCADETR`
(``official``/``smca_ms_released``).

The released model is DETR's with, per decoder layer, ``norm4`` (our ``prior_norm``), ``point2``
(per-head centre offsets, our ``modulation.offsets``) and ``point3`` (scales, our
``modulation.scales``; 16 outputs for ``--dynamic_scale type3`` = our ``scale_type="independent"``,
8 for type2 = ``"single"``, none for type1 = ``"fixed"``), and in layer 0 ``point1``, the centre MLP
(our ``decoder.center_head``). Its class head has 92 sigmoid outputs indexed by COCO category id
(column 91 is never a target); they become detectron2's 80 contiguous classes.
"""

from typing import List, Optional

from .convert import (
    OFFICIAL_DECODER_FFN,
    OFFICIAL_ENCODER_LAYER,
    OFFICIAL_FFN,
    StateDict,
    convert_official_detr_layout,
    official_detr_layout,
    register_converter,
)
from .names import Row, same

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
# layer 0's point1 is the centre MLP (our decoder.center_head); no other layer has one
_CENTER_HEAD: List[Row] = [
    ("transformer.decoder.layers.0.point1.{leaf+}", "decoder.center_head.{leaf+}")
]
_DECODER_NORM: List[Row] = [("transformer.decoder.norm.{leaf+}", "decoder.norm.{leaf+}")]
OFFICIAL_NAMES = official_detr_layout(
    OFFICIAL_ENCODER_LAYER,
    _DECODER,
    _CENTER_HEAD + _DECODER_NORM + same("input_proj", "query_embed", "bbox_embed"),
)


@register_converter("official", "smca")
def convert_official(state_dict: StateDict, num_classes: Optional[int] = None) -> StateDict:
    """Official single-scale SMCA checkpoint (:data:`OFFICIAL_NAMES`) → ours.

    Args:
        num_classes: classes of the target model; ``None`` maps a 92-row COCO head to 80 classes
            and keeps any other head.
    """
    out = convert_official_detr_layout(state_dict, OFFICIAL_NAMES, "official SMCA", num_classes)
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


# ---------------------------------------------------------------- the released multi-scale model
_MS_LEVELS = ("8", "16", "32", "64")  # the released names of the encoder's levels (strides)
_MS_ENCODER = {
    "conv_1": "input_conv",
    "conv_2": "output_conv",
    "norm1": "norm",
    "norm2": "ffn.norm",
    **OFFICIAL_FFN,
    **{f"self_attn_{s}": f"level_convs.{i}" for i, s in enumerate(_MS_LEVELS)},
    # one conv per pair of adjacent levels (models/transformer.py) or one for all pairs
    # (models/transformer_44_dot_4.py)
    **{f"high_to_low_{i + 1}": f"down_convs.{i}" for i in range(len(_MS_LEVELS) - 1)},
    **{f"low_to_high_{i + 1}": f"up_convs.{i}" for i in range(len(_MS_LEVELS) - 1)},
    "high_to_low": "down_convs.0",
    "low_to_high": "up_convs.0",
}
RELEASED_MS_NAMES = official_detr_layout(
    _MS_ENCODER,
    {**_DECODER, "point4": "scale_selection"},
    _CENTER_HEAD
    + _DECODER_NORM
    + [
        (f"input_proj_{name}.{{leaf+}}", f"neck.input_proj.{i}.{{leaf+}}")
        for i, name in enumerate(("512", "1024", "2048", "2048_3"))
    ]
    + [
        ("transformer.level_embed", "neck.level_embed"),
        ("transformer.conv.{leaf+}", "memory_downsample.{leaf+}"),
    ]
    + same("query_embed", "bbox_embed"),
)


@register_converter("official", "smca_ms_released")
def convert_official_multi_scale(
    state_dict: StateDict, num_classes: Optional[int] = None
) -> StateDict:
    """Released multi-scale SMCA checkpoint (``Multi_scale_SMCA.zip``) → ours.

    ``input_proj_512/1024/2048`` (C3-C5) and ``input_proj_2048_3`` (P6) become ``input_proj.0-3``,
    ``transformer.conv`` (the stride-2 conv on the C3 memory) ``memory_downsample``, the encoder's
    ``conv_1``/``self_attn_{8,16,32,64}``/``high_to_low*``/``low_to_high*``/``conv_2``
    ``input_conv``/``level_convs``/``down_convs``/``up_convs``/``output_conv``, the decoder's
    ``point4`` (scale selection) ``scale_selection``; the rest as :func:`convert_official`, the
    92-row class head included (:data:`RELEASED_MS_NAMES`). Unknown keys raise a ``KeyError``.
    """
    return convert_official_detr_layout(
        state_dict, RELEASED_MS_NAMES, "official multi-scale SMCA", num_classes
    )
