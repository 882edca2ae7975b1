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

from typing import Optional

from .convert import (
    OFFICIAL_DECODER_FFN,
    OFFICIAL_ENCODER_LAYER,
    OFFICIAL_FFN,
    LayerTarget,
    StateDict,
    convert_official_detr_layout,
    layer_tables,
    neck_names,
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


def _with_center_head(layers: LayerTarget) -> LayerTarget:
    """``layers`` plus layer 0's ``point1`` (the centre MLP, our ``decoder.center_head``)."""

    def target(part: str, index: str, rest: str) -> Optional[str]:
        if part == "decoder" and rest.startswith("point1."):
            return "decoder.center_head." + rest[len("point1.") :] if index == "0" else None
        return layers(part, index, rest)

    return target


_layer_target = _with_center_head(_LAYERS)


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
_MS_LAYERS = _with_center_head(layer_tables(_MS_ENCODER, {**_DECODER, "point4": "scale_selection"}))
_MS_RENAMES = {  # checked in order: input_proj_2048_3 before input_proj_2048
    "input_proj_512.": "input_proj.0.",
    "input_proj_1024.": "input_proj.1.",
    "input_proj_2048_3.": "input_proj.3.",
    "input_proj_2048.": "input_proj.2.",
    "transformer.conv.": "memory_downsample.",
}
_MS_KEEP = (
    r"(transformer\.decoder\.norm|input_proj|memory_downsample|query_embed|bbox_embed)\."
    r"|transformer\.level_embed$"
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
    92-row class head included. Unknown keys raise a ``KeyError``.
    """
    renamed = {}
    for key, value in state_dict.items():
        old = next((o for o in _MS_RENAMES if key.startswith(o)), None)
        renamed[key if old is None else _MS_RENAMES[old] + key[len(old) :]] = value
    return neck_names(
        convert_official_detr_layout(
            renamed, _MS_LAYERS, _MS_KEEP, "official multi-scale SMCA", num_classes
        )
    )
