"""Deformable DETR: official (fundamentalvision/Deformable-DETR) and HF-transformers
(``DeformableDetrForObjectDetection``) checkpoints → :class:`DeformableDETR`."""

import re
from typing import Dict, List, Tuple

import torch

from .convert import (
    OFFICIAL_DECODER_FFN,
    OFFICIAL_ENCODER_LAYER,
    StateDict,
    class_head_rows,
    convert_official_detr_layout,
    layer_tables,
    neck_names,
    register_converter,
)
from .hf_resnet import hf_backbone_name

# official decoder layers: norm2 after self-attention, norm1 after cross-attention
_OFFICIAL_LAYERS = layer_tables(
    OFFICIAL_ENCODER_LAYER,
    {
        "self_attn": "self_attn",
        "cross_attn": "cross_attn",
        "norm2": "norm1",
        "norm1": "norm2",
        **OFFICIAL_DECODER_FFN,
    },
)
_OFFICIAL_KEEP = (
    r"(input_proj|query_embed|bbox_embed|transformer\.decoder\.bbox_embed)\."
    r"|transformer\.(level_embed|reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\b"
)

_HF_LAYER_RULES: List[Tuple[str, str]] = [
    (r"^model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.layers.\1.norm."),
    (r"^model\.encoder\.layers\.(\d+)\.(?:mlp\.)?fc(\d)\.", r"encoder.layers.\1.ffn.linear\2."),
    (r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.ffn.norm."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn\.", r"encoder.layers.\1.self_attn."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"decoder.layers.\1.norm1."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"decoder.layers.\1.norm2."),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"decoder.layers.\1.ffn.norm."),
    (r"^model\.decoder\.layers\.(\d+)\.(?:mlp\.)?fc(\d)\.", r"decoder.layers.\1.ffn.linear\2."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.", r"decoder.layers.\1.cross_attn."),
    (
        r"^model\.decoder\.layers\.(\d+)\.self_attn\.(?:o_proj|out_proj)\.",
        r"decoder.layers.\1.self_attn.out_proj.",
    ),
    (r"^model\.decoder\.bbox_embed\.", "decoder.bbox_embed."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (
        r"^model\.(level_embed|reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm|input_proj)\b",
        r"\1",
    ),
]


def pop_proposal_head(state_dict: StateDict, head: str, layer: str) -> StateDict:
    """Two-stage releases score proposals with class head ``L`` (after the ``L`` decoder layers'
    heads): official and HF rank encoder tokens by its column 0 and train it with every label set
    to 0, so with COCO's 91 rows it is the column of id 0, which no thing class uses. Removes that
    head from ``state_dict`` and returns its row 0 as our one-logit ``proposal_class_embed``.

    Args:
        head: the class heads' prefix (``class_embed.``); layer: the decoder layers' prefix.
    """
    layers = {k[len(layer) :].split(".")[0] for k in state_dict if k.startswith(layer)}
    out: StateDict = {}
    for leaf in ("weight", "bias"):
        key = f"{head}{len(layers)}.{leaf}"
        if key not in state_dict:
            raise KeyError(f"two-stage checkpoint without its proposal head {key}")
        out[f"proposal_class_embed.{leaf}"] = state_dict.pop(key)[:1]
    return out


def _rename(name: str, rules: List[Tuple[str, str]]):
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return None


@register_converter("official", "deformable_detr")
def convert_official(state_dict: StateDict) -> StateDict:
    """Official names: torchvision ResNet under ``backbone.0.body``, ``transformer.*``, heads at the
    top, 91-way class heads (80 thing rows kept; two-stage: see :func:`pop_proposal_head`).
    ``transformer.decoder.class_embed`` duplicates ``class_embed`` and is dropped (our decoder holds
    only the box heads it refines with)."""
    proposal = {}
    if "transformer.enc_output.weight" in state_dict:
        proposal = pop_proposal_head(state_dict, "class_embed.", "transformer.decoder.layers.")
    out = convert_official_detr_layout(
        state_dict,
        _OFFICIAL_LAYERS,
        _OFFICIAL_KEEP,
        "official Deformable DETR",
        skip=("transformer.decoder.class_embed.",),
    )
    return neck_names({**out, **proposal})


@register_converter("hf", "deformable_detr")
def convert_hf(state_dict: StateDict) -> StateDict:
    """HF ``DeformableDetrForObjectDetection``, with an HF ResNet (``use_timm_backbone=False``) or
    the timm ResNet of the hub checkpoints, current or legacy (``fc1``, ``out_proj``) layer names.
    The decoder self-attention's separate q/k/v projections are packed into
    ``nn.MultiheadAttention``'s ``in_proj``; ``model.decoder.class_embed`` duplicates
    ``class_embed`` and is dropped. Class heads as the official ones (91 rows indexed by COCO id →
    80; two-stage: see :func:`pop_proposal_head`)."""
    out: StateDict = {}
    if "model.enc_output.weight" in state_dict:
        out.update(pop_proposal_head(state_dict, "class_embed.", "model.decoder.layers."))
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, value in state_dict.items():
        m = re.match(
            r"^model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", name
        )
        if m:
            qkv.setdefault(f"decoder.layers.{m.group(1)}.self_attn.in_proj_{m.group(3)}", {})[
                m.group(2)
            ] = value
            continue
        if name.startswith("model.backbone."):
            new = hf_backbone_name(name)
        elif name.startswith("model.decoder.class_embed."):
            continue
        elif name.startswith("bbox_embed."):
            new = name
        elif name.startswith("class_embed."):
            new, value = name, class_head_rows(value)
        else:
            new = _rename(name, _HF_LAYER_RULES)
        if new is None:
            if name.endswith("num_batches_tracked"):
                continue
            raise KeyError(f"unexpected key in the HF Deformable DETR state dict: {name}")
        out[new] = value
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return neck_names(out)
