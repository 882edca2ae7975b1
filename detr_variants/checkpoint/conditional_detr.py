"""Official (Atten4Vis/ConditionalDETR) and HF ``ConditionalDetrForObjectDetection`` checkpoints →
:class:`~detr_variants.modeling.meta_arch.conditional_detr.ConditionalDETR`.

Our decoder layers keep the official names (``sa_*_proj``, ``ca_*_proj``, ``self_attn.out_proj``,
``cross_attn.out_proj``, ``norm1``, ``norm2``); their FFN lives in ``ffn`` (``linear1``,
``linear2``, ``norm``), as in DETR's shared encoder layer. The official and HF COCO heads have 91
rows indexed by COCO category id; they become detectron2's 80 contiguous classes.
"""

import re
from typing import Optional

import torch

from .convert import (
    OFFICIAL_DECODER_FFN,
    OFFICIAL_ENCODER_LAYER,
    StateDict,
    class_head_rows,
    convert_official_detr_layout,
    drop_batchnorm_counters,
    layer_tables,
    raise_unknown,
    register_converter,
)
from .hf_resnet import HF_BACKBONE_PREFIXES, hf_backbone_name

_OFFICIAL_DECODER = {name: name for name in ("self_attn", "cross_attn", "norm1", "norm2")}
_OFFICIAL_DECODER.update(
    {
        f"{attn}_{proj}_proj": f"{attn}_{proj}_proj"
        for attn in ("sa", "ca")
        for proj in ("qcontent", "qpos", "kcontent", "kpos", "v")
    }
)
_OFFICIAL_DECODER.update(ca_qpos_sine_proj="ca_qpos_sine_proj", **OFFICIAL_DECODER_FFN)
_OFFICIAL_LAYERS = layer_tables(OFFICIAL_ENCODER_LAYER, _OFFICIAL_DECODER)
_OFFICIAL_KEEP = (
    r"(transformer\.decoder\.(norm|query_scale|ref_point_head)|bbox_embed|query_embed|input_proj)\."
)


@register_converter("official", "conditional_detr")
def convert_official(state_dict: StateDict, num_classes: Optional[int] = None) -> StateDict:
    """Official checkpoint (``backbone.0.body.*`` torchvision ResNet, ``transformer.*``, heads).

    Args:
        num_classes: classes of the target model; ``None`` maps a 91-row COCO head to 80 classes
            and keeps any other head.
    """
    return convert_official_detr_layout(
        state_dict, _OFFICIAL_LAYERS, _OFFICIAL_KEEP, "official Conditional DETR", num_classes
    )


# HF module names inside a layer, current (transformers 5) and legacy (<= 4.x hub checkpoints).
_HF_ENCODER = {
    "self_attn.o_proj": "self_attn.out_proj",
    "self_attn.out_proj": "self_attn.out_proj",
    "self_attn_layer_norm": "norm",
    "final_layer_norm": "ffn.norm",
    "mlp.fc1": "ffn.linear1",
    "fc1": "ffn.linear1",
    "mlp.fc2": "ffn.linear2",
    "fc2": "ffn.linear2",
}
_HF_DECODER = {
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "final_layer_norm": "ffn.norm",
    "mlp.fc1": "ffn.linear1",
    "fc1": "ffn.linear1",
    "mlp.fc2": "ffn.linear2",
    "fc2": "ffn.linear2",
}
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
for _hf_module, _ours in (("self_attn", "self_attn"), ("encoder_attn", "cross_attn")):
    for _proj in ("o_proj", "out_proj"):
        _HF_DECODER[f"{_hf_module}.{_proj}"] = f"{_ours}.out_proj"
_HF_TOP = {
    "model.query_position_embeddings.": "query_embed.",
    "model.input_projection.": "input_proj.",
    "model.decoder.layernorm.": "decoder.norm.",
    "model.decoder.query_scale.": "decoder.query_scale.",
    "model.decoder.ref_point_head.": "decoder.ref_point_head.",
    "bbox_predictor.": "bbox_embed.",
    "class_labels_classifier.": "class_embed.",
}


def _hf_target(key: str) -> Optional[str]:
    """Our name of an HF parameter other than the encoder's q/k/v projections (None: unknown)."""
    if key.startswith(HF_BACKBONE_PREFIXES):
        return hf_backbone_name(key)
    layer = re.fullmatch(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(\w+)", key)
    if layer:
        part, index, module, leaf = layer.groups()
        table = _HF_ENCODER if part == "encoder" else _HF_DECODER
        return f"{part}.layers.{index}.{table[module]}.{leaf}" if module in table else None
    top = next((p for p in _HF_TOP if key.startswith(p)), None)
    return None if top is None else _HF_TOP[top] + key[len(top) :]


@register_converter("hf", "conditional_detr")
def convert_hf(state_dict: StateDict, num_classes: Optional[int] = None) -> StateDict:
    """HF ``ConditionalDetrForObjectDetection`` state dict → ours.

    Reads both the HF-ResNet backbone (``use_timm_backbone=False``, see :func:`hf_resnet_name`)
    and the timm one of the hub checkpoints (torchvision names), and both the current and the
    legacy (``sa_qcontent_proj``, ``fc1``, ``out_proj``, ``conv_encoder``) layer names. The
    encoder's separate q/k/v projections are stacked into ``in_proj_weight``/``in_proj_bias``.

    Args:
        num_classes: classes of the target model. ``None`` maps a 91-label COCO head (the hub
            checkpoints, label ids = COCO ids) to 80 classes and keeps any other head, e.g. a
            model trained with ``num_labels`` equal to the model's ``num_classes``.
    """
    out, qkv, unknown = {}, {}, []
    for key, value in drop_batchnorm_counters(state_dict).items():
        encoder_qkv = re.fullmatch(
            r"model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key
        )
        if encoder_qkv:
            index, which, leaf = encoder_qkv.groups()
            qkv.setdefault((index, leaf), {})[which] = value
            continue
        target = _hf_target(key)
        if target is None:
            unknown.append(key)
            continue
        out[target] = (
            class_head_rows(value, num_classes) if target.startswith("class_embed.") else value
        )
    for (index, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(
                f"encoder layer {index}: incomplete q/k/v projection {leaf}s ({sorted(parts)})"
            )
        out[f"encoder.layers.{index}.self_attn.in_proj_{leaf}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    raise_unknown(unknown, "HF Conditional DETR")
    return out
