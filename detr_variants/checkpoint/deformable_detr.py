"""Deformable DETR: official (fundamentalvision/Deformable-DETR) and HF-transformers
(``DeformableDetrForObjectDetection``) checkpoints → :class:`DeformableDETR`."""

from .convert import (
    OFFICIAL_DECODER_FFN,
    OFFICIAL_ENCODER_LAYER,
    StateDict,
    class_head_rows,
    convert_official_detr_layout,
    official_detr_layout,
    register_converter,
)
from .detr import convert_hf_detr_layout
from .hf_resnet import HF_BACKBONE
from .names import BATCHNORM_COUNTERS, NameTable, module_rows, same

# modules of the two-stage proposal generation, kept by name
_TWO_STAGE = ("reference_points", "enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm")

OFFICIAL_NAMES = official_detr_layout(
    OFFICIAL_ENCODER_LAYER,
    # official decoder layers: norm2 after self-attention, norm1 after cross-attention
    {
        "self_attn": "self_attn",
        "cross_attn": "cross_attn",
        "norm2": "norm1",
        "norm1": "norm2",
        **OFFICIAL_DECODER_FFN,
    },
    [
        ("transformer.decoder.class_embed.{leaf+}", None),  # a duplicate of class_embed
        ("transformer.decoder.bbox_embed.{leaf+}", "decoder.bbox_embed.{leaf+}"),
        ("input_proj.{leaf+}", "neck.input_proj.{leaf+}"),
        ("transformer.level_embed", "neck.level_embed"),
        *same("query_embed", "bbox_embed"),
        *[(f"transformer.{m}.{{leaf+}}", f"{m}.{{leaf+}}") for m in _TWO_STAGE],
    ],
)

# HF layer modules, current (``mlp.fc1``, ``o_proj``) and legacy (``fc1``, ``out_proj``) names
_HF_FFN = {
    "final_layer_norm": "ffn.norm",
    **{f"{mlp}fc{j}": f"ffn.linear{j}" for j in (1, 2) for mlp in ("mlp.", "")},
}
HF_NAMES = NameTable(
    BATCHNORM_COUNTERS
    + list(HF_BACKBONE.rows)
    + module_rows(
        "model.encoder.layers",
        "encoder.layers",
        {"self_attn_layer_norm": "norm", "self_attn": "self_attn", **_HF_FFN},
    )
    + module_rows(
        "model.decoder.layers",
        "decoder.layers",
        {
            "self_attn_layer_norm": "norm1",
            "self_attn.o_proj": "self_attn.out_proj",
            "self_attn.out_proj": "self_attn.out_proj",
            "encoder_attn_layer_norm": "norm2",
            "encoder_attn": "cross_attn",
            **_HF_FFN,
        },
    )
    + [
        ("model.decoder.class_embed.{leaf+}", None),  # a duplicate of class_embed
        ("model.decoder.bbox_embed.{leaf+}", "decoder.bbox_embed.{leaf+}"),
        ("model.query_position_embeddings.{leaf+}", "query_embed.{leaf+}"),
        ("model.input_proj.{leaf+}", "neck.input_proj.{leaf+}"),
        ("model.level_embed", "neck.level_embed"),
        *[(f"model.{m}.{{leaf+}}", f"{m}.{{leaf+}}") for m in _TWO_STAGE],
        *same("class_embed", "bbox_embed"),
    ]
)


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


@register_converter("official", "deformable_detr")
def convert_official(state_dict: StateDict) -> StateDict:
    """Official names (:data:`OFFICIAL_NAMES`): torchvision ResNet under ``backbone.0.body``,
    ``transformer.*``, heads at the top, 91-way class heads (80 thing rows kept; two-stage: see
    :func:`pop_proposal_head`). ``transformer.decoder.class_embed`` duplicates ``class_embed`` and
    is dropped (our decoder holds only the box heads it refines with)."""
    proposal = {}
    if "transformer.enc_output.weight" in state_dict:
        proposal = pop_proposal_head(state_dict, "class_embed.", "transformer.decoder.layers.")
    out = convert_official_detr_layout(state_dict, OFFICIAL_NAMES, "official Deformable DETR")
    return {**out, **proposal}


@register_converter("hf", "deformable_detr")
def convert_hf(state_dict: StateDict) -> StateDict:
    """HF ``DeformableDetrForObjectDetection`` (:data:`HF_NAMES`), with an HF ResNet
    (``use_timm_backbone=False``) or the timm ResNet of the hub checkpoints, current or legacy
    (``fc1``, ``out_proj``) layer names. The decoder self-attention's separate q/k/v projections
    are packed into ``nn.MultiheadAttention``'s ``in_proj``; ``model.decoder.class_embed``
    duplicates ``class_embed`` and is dropped. Class heads as the official ones (91 rows indexed
    by COCO id → 80; two-stage: see :func:`pop_proposal_head`)."""
    proposal = {}
    if "model.enc_output.weight" in state_dict:
        proposal = pop_proposal_head(state_dict, "class_embed.", "model.decoder.layers.")
    out = convert_hf_detr_layout(
        state_dict, HF_NAMES, {("decoder", "self_attn")}, class_head_rows, "HF Deformable DETR"
    )
    return {**out, **proposal}
