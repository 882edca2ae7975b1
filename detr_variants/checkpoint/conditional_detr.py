"""Official (Atten4Vis/ConditionalDETR) and HF ``ConditionalDetrForObjectDetection`` checkpoints →
:class:`~detr_variants.modeling.meta_arch.conditional_detr.ConditionalDETR`.

Our decoder layers keep the official names (``sa_*_proj``, ``ca_*_proj``, ``self_attn.out_proj``,
``cross_attn.out_proj``, ``norm1``, ``norm2``); their FFN lives in ``ffn`` (``linear1``,
``linear2``, ``norm``), as in DETR's shared encoder layer. The official and HF COCO heads have 91
rows indexed by COCO category id; they become detectron2's 80 contiguous classes.
"""

from typing import Optional

from .convert import (
    OFFICIAL_DECODER_FFN,
    OFFICIAL_ENCODER_LAYER,
    StateDict,
    class_head_rows,
    convert_official_detr_layout,
    official_detr_layout,
    register_converter,
)
from .detr import HF_DECODER, HF_TOP, convert_hf_detr_layout, hf_detr_layout
from .names import same

_OFFICIAL_DECODER = {name: name for name in ("self_attn", "cross_attn", "norm1", "norm2")}
_OFFICIAL_DECODER.update(
    {
        f"{attn}_{proj}_proj": f"{attn}_{proj}_proj"
        for attn in ("sa", "ca")
        for proj in ("qcontent", "qpos", "kcontent", "kpos", "v")
    }
)
_OFFICIAL_DECODER.update(ca_qpos_sine_proj="ca_qpos_sine_proj", **OFFICIAL_DECODER_FFN)
OFFICIAL_NAMES = official_detr_layout(
    OFFICIAL_ENCODER_LAYER,
    _OFFICIAL_DECODER,
    [
        (f"transformer.decoder.{module}.{{leaf+}}", f"decoder.{module}.{{leaf+}}")
        for module in ("norm", "query_scale", "ref_point_head")
    ]
    + same("bbox_embed", "query_embed", "input_proj"),
)


@register_converter("official", "conditional_detr")
def convert_official(state_dict: StateDict, num_classes: Optional[int] = None) -> StateDict:
    """Official checkpoint (``backbone.0.body.*`` torchvision ResNet, ``transformer.*``, heads;
    :data:`OFFICIAL_NAMES`).

    Args:
        num_classes: classes of the target model; ``None`` maps a 91-row COCO head to 80 classes
            and keeps any other head.
    """
    return convert_official_detr_layout(
        state_dict, OFFICIAL_NAMES, "official Conditional DETR", num_classes
    )


# HF decoder modules: DETR's (norms, FFN, out projections) + the conditional q/k projections,
# current (``self_attn.q_content_proj``) and legacy (``sa_qcontent_proj``) names.
_HF_DECODER = dict(HF_DECODER)
for _hf, _ours in [
    ("q_content_proj", "qcontent_proj"),
    ("q_pos_proj", "qpos_proj"),
    ("k_content_proj", "kcontent_proj"),
    ("k_pos_proj", "kpos_proj"),
    ("v_proj", "v_proj"),
    ("q_pos_sine_proj", "qpos_sine_proj"),
]:
    for _hf_module, _prefix in (("self_attn", "sa_"), ("encoder_attn", "ca_")):
        _HF_DECODER[f"{_hf_module}.{_hf}"] = _HF_DECODER[_prefix + _ours] = _prefix + _ours
HF_NAMES = hf_detr_layout(
    _HF_DECODER,
    HF_TOP
    + [
        (f"model.decoder.{module}.{{leaf+}}", f"decoder.{module}.{{leaf+}}")
        for module in ("query_scale", "ref_point_head")
    ],
)


@register_converter("hf", "conditional_detr")
def convert_hf(state_dict: StateDict, num_classes: Optional[int] = None) -> StateDict:
    """HF ``ConditionalDetrForObjectDetection`` state dict → ours.

    Reads both the HF-ResNet backbone (``use_timm_backbone=False``, see
    :data:`~.hf_resnet.HF_RESNET`) and the timm one of the hub checkpoints (torchvision names),
    and both the current and the legacy (``sa_qcontent_proj``, ``fc1``, ``out_proj``,
    ``conv_encoder``) layer names (:data:`HF_NAMES`). Only the encoder's self-attention has
    separate q/k/v projections to stack; the decoder's conditional projections keep their names.

    Args:
        num_classes: classes of the target model. ``None`` maps a 91-label COCO head (the hub
            checkpoints, label ids = COCO ids) to 80 classes and keeps any other head, e.g. a
            model trained with ``num_labels`` equal to the model's ``num_classes``.
    """
    return convert_hf_detr_layout(
        state_dict,
        HF_NAMES,
        {("encoder", "self_attn")},
        lambda head: class_head_rows(head, num_classes),
        "HF Conditional DETR",
    )
