"""Deformable DETR: official (fundamentalvision/Deformable-DETR) and HF-transformers
(``DeformableDetrForObjectDetection``) checkpoints → :class:`DeformableDETR`."""
import re
from typing import Dict, List, Tuple

import torch

from .convert import StateDict, class_head_rows, register_converter, torchvision_resnet_name
from .hf_resnet import hf_backbone_name

# (pattern, replacement) applied to names inside encoder / decoder layers, official → ours.
_OFFICIAL_LAYER_RULES: List[Tuple[str, str]] = [
    (r"^transformer\.encoder\.layers\.(\d+)\.norm1\.", r"encoder.layers.\1.norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.linear(\d)\.", r"encoder.layers.\1.ffn.linear\2."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm2\.", r"encoder.layers.\1.ffn.norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.self_attn\.", r"encoder.layers.\1.self_attn."),
    # official decoder: norm2 after self-attention, norm1 after cross-attention
    (r"^transformer\.decoder\.layers\.(\d+)\.norm2\.", r"decoder.layers.\1.norm1."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm1\.", r"decoder.layers.\1.norm2."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm3\.", r"decoder.layers.\1.ffn.norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.linear(\d)\.", r"decoder.layers.\1.ffn.linear\2."),
    (r"^transformer\.decoder\.layers\.(\d+)\.(self_attn|cross_attn)\.", r"decoder.layers.\1.\2."),
    (r"^transformer\.decoder\.bbox_embed\.", "decoder.bbox_embed."),
    (r"^transformer\.(level_embed|reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\b", r"\1"),
]

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
    (r"^model\.decoder\.layers\.(\d+)\.self_attn\.(?:o_proj|out_proj)\.", r"decoder.layers.\1.self_attn.out_proj."),
    (r"^model\.decoder\.bbox_embed\.", "decoder.bbox_embed."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.(level_embed|reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm|input_proj)\b",
     r"\1"),
]


def _rename(name: str, rules: List[Tuple[str, str]]):
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return None



@register_converter("official", "deformable_detr")
def convert_official(state_dict: StateDict) -> StateDict:
    """Official names: torchvision ResNet under ``backbone.0.body``, ``transformer.*``, heads at the
    top, 91-way class heads. ``transformer.decoder.class_embed`` duplicates ``class_embed`` and is
    dropped (our decoder holds only the box heads it refines with)."""
    out: StateDict = {}
    for name, value in state_dict.items():
        if name.startswith("backbone.0.body."):
            new = torchvision_resnet_name(name[len("backbone.0.body."):])
            new = None if new is None else "backbone." + new
        elif name.startswith("transformer.decoder.class_embed."):
            continue
        elif name.startswith(("input_proj.", "query_embed.", "bbox_embed.")):
            new = name
        elif name.startswith("class_embed."):
            new, value = name, class_head_rows(value)
        else:
            new = _rename(name, _OFFICIAL_LAYER_RULES)
        if new is None:
            if name.endswith("num_batches_tracked"):
                continue
            raise KeyError(f"unexpected key in the official Deformable DETR checkpoint: {name}")
        out[new] = value
    return out


@register_converter("hf", "deformable_detr")
def convert_hf(state_dict: StateDict) -> StateDict:
    """HF ``DeformableDetrForObjectDetection``, with an HF ResNet (``use_timm_backbone=False``) or
    the timm ResNet of the hub checkpoints, current or legacy (``fc1``, ``out_proj``) layer names.
    The decoder self-attention's separate q/k/v projections are packed into
    ``nn.MultiheadAttention``'s ``in_proj``; ``model.decoder.class_embed`` duplicates
    ``class_embed`` and is dropped."""
    out: StateDict = {}
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, value in state_dict.items():
        m = re.match(r"^model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", name)
        if m:
            qkv.setdefault(f"decoder.layers.{m.group(1)}.self_attn.in_proj_{m.group(3)}", {})[m.group(2)] = value
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
    return out
