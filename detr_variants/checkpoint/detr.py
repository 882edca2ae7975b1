"""Official (facebookresearch/detr) and HF ``DetrForObjectDetection`` checkpoints →
:class:`~detr_variants.modeling.meta_arch.detr.DETR`, and the HF layout that DETR's descendants
in ``transformers`` share.

The released DETR head is a softmax over 92 rows: rows 0-90 are indexed by raw COCO category id
(ten of them never a target) and row 91 is no-object. Ours has ``num_classes + 1`` rows with
no-object last, so the 80 thing rows are taken by COCO id *and* row 91 is kept, as the official
``d2/converter.py`` does (the generic :func:`~.convert.class_head_rows` would drop it).
"""

import re
from typing import Callable, Dict, Optional, Set, Tuple

import torch
from torch import Tensor

from .convert import (
    OFFICIAL_DECODER_FFN,
    OFFICIAL_ENCODER_LAYER,
    StateDict,
    coco_class_rows,
    convert_official_detr_layout,
    drop_batchnorm_counters,
    layer_tables,
    raise_unknown,
    register_converter,
)
from .hf_resnet import HF_BACKBONE_PREFIXES, hf_backbone_name


def softmax_head_rows(weight: Tensor, num_classes: Optional[int] = None) -> Tensor:
    """A released softmax class head (weight or bias, no-object last) → ``num_classes + 1`` rows.

    92 rows (COCO ids 0-90 + no-object) become the 80 contiguous COCO classes + no-object (with
    ``num_classes`` None or 80); a head of ``num_classes + 1`` rows is kept; with ``num_classes``
    None any other size is kept.
    """
    rows = weight.shape[0]
    if rows == 92 and num_classes in (None, 80):
        return coco_class_rows(weight, extra_rows=1)
    if num_classes is None or rows == num_classes + 1:
        return weight
    raise ValueError(
        f"softmax class head has {rows} rows; cannot make {num_classes} classes + no-object of it"
    )


# ---------------------------------------------------------------------------- official
_OFFICIAL_DECODER = {
    "self_attn": "self_attn",
    "multihead_attn": "cross_attn",
    "norm1": "norm1",
    "norm2": "norm2",
    **OFFICIAL_DECODER_FFN,
}
_OFFICIAL_LAYERS = layer_tables(OFFICIAL_ENCODER_LAYER, _OFFICIAL_DECODER)
_OFFICIAL_KEEP = r"(transformer\.decoder\.norm|input_proj|query_embed|bbox_embed)\."


@register_converter("official", "detr")
def convert_official(state_dict: StateDict, num_classes: Optional[int] = None) -> StateDict:
    """Official DETR checkpoint (``detr-r50-e632da11.pth``, ``-dc5``, ``-r101`` ...) → ours.

    The layout of ``models/detr.py`` and ``models/transformer.py``: a torchvision ResNet under
    ``backbone.0.body.``, ``transformer.{encoder,decoder}.layers.<i>`` (decoder cross-attention
    ``multihead_attn``), ``transformer.decoder.norm``, ``query_embed``, ``input_proj``,
    ``class_embed`` and ``bbox_embed``. DC5 and R101 checkpoints differ only in the backbone's
    depth and dilation, which the config sets. Panoptic checkpoints (``detr.*`` and mask-head
    keys) are rejected.

    Args:
        num_classes: foreground classes of the target model; ``None`` maps a 92-row COCO head to
            80 classes + no-object and keeps any other head.
    """
    out = convert_official_detr_layout(
        state_dict, _OFFICIAL_LAYERS, _OFFICIAL_KEEP, "official DETR", skip=("class_embed.",)
    )
    for leaf in ("weight", "bias"):
        key = f"class_embed.{leaf}"
        if key not in state_dict:
            raise KeyError(f"official DETR checkpoint without {key}")
        out[key] = softmax_head_rows(state_dict[key], num_classes)
    return out


# ---------------------------------------------------------------------------- HF transformers
# Module names inside an HF layer, current (transformers 5) and legacy (<= 4.x hub checkpoints).
HF_FFN = {
    "final_layer_norm": "ffn.norm",
    "mlp.fc1": "ffn.linear1",
    "fc1": "ffn.linear1",
    "mlp.fc2": "ffn.linear2",
    "fc2": "ffn.linear2",
}
HF_ENCODER = {
    "self_attn.o_proj": "self_attn.out_proj",
    "self_attn.out_proj": "self_attn.out_proj",
    "self_attn_layer_norm": "norm",
    **HF_FFN,
}
HF_DECODER = {
    "self_attn.o_proj": "self_attn.out_proj",
    "self_attn.out_proj": "self_attn.out_proj",
    "encoder_attn.o_proj": "cross_attn.out_proj",
    "encoder_attn.out_proj": "cross_attn.out_proj",
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    **HF_FFN,
}
HF_TOP = {
    "model.query_position_embeddings.": "query_embed.",
    "model.input_projection.": "input_proj.",
    "model.decoder.layernorm.": "decoder.norm.",
    "bbox_predictor.": "bbox_embed.",
    "class_labels_classifier.": "class_embed.",
}
_HF_LAYER = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(\w+)")
_HF_QKV = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(\w+)\.([qkv])_proj\.(weight|bias)")


def convert_hf_detr_layout(
    state_dict: StateDict,
    decoder: Dict[str, str],
    top: Dict[str, str],
    stacked: Set[Tuple[str, str]],
    head_rows: Callable[[Tensor], Tensor],
    what: str,
) -> StateDict:
    """The layout of HF ``DetrForObjectDetection`` and the models ``transformers`` derives from it.

    The backbone is read by :func:`~.hf_resnet.hf_backbone_name` (HF ResNet or the hub's timm
    ResNet). Layer modules are renamed by :data:`HF_ENCODER` / ``decoder``, other keys by the
    prefixes of ``top``. Attentions ``(part, hf_module)`` in ``stacked`` (``("decoder",
    "encoder_attn")`` ...) have separate q/k/v projections, which are stacked into our
    ``in_proj_weight``/``in_proj_bias`` in q, k, v order as ``nn.MultiheadAttention`` expects.
    The class head goes through ``head_rows``. Unknown keys and incomplete q/k/v raise.
    """
    ours_of = {"self_attn": "self_attn", "encoder_attn": "cross_attn"}
    out, qkv, unknown = {}, {}, []
    for key, value in drop_batchnorm_counters(state_dict).items():
        proj = _HF_QKV.fullmatch(key)
        if proj and (proj.group(1), proj.group(3)) in stacked:
            part, index, module, which, leaf = proj.groups()
            target = f"{part}.layers.{index}.{ours_of[module]}.in_proj_{leaf}"
            qkv.setdefault(target, {})[which] = value
            continue
        target = _hf_target(key, decoder, top)
        if target is None:
            unknown.append(key)
        else:
            out[target] = head_rows(value) if target.startswith("class_embed.") else value
    for target, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{target}: incomplete q/k/v projections ({sorted(parts)})")
        out[target] = torch.cat([parts["q"], parts["k"], parts["v"]])
    raise_unknown(unknown, what)
    return out


def _hf_target(key: str, decoder: Dict[str, str], top: Dict[str, str]) -> Optional[str]:
    if key.startswith(HF_BACKBONE_PREFIXES):
        return hf_backbone_name(key)
    layer = _HF_LAYER.fullmatch(key)
    if layer:
        part, index, module, leaf = layer.groups()
        table = HF_ENCODER if part == "encoder" else decoder
        return f"{part}.layers.{index}.{table[module]}.{leaf}" if module in table else None
    prefix = next((p for p in top if key.startswith(p)), None)
    return None if prefix is None else top[prefix] + key[len(prefix) :]


_HF_STACKED = {("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "encoder_attn")}


@register_converter("hf", "detr")
def convert_hf(state_dict: StateDict, num_classes: Optional[int] = None) -> StateDict:
    """HF ``DetrForObjectDetection`` state dict (e.g. ``facebook/detr-resnet-50``) → ours.

    Reads the HF-ResNet backbone (``use_timm_backbone=False``) and the timm one of the hub
    checkpoints, current and legacy (``out_proj``, ``fc1``, ``conv_encoder``) names. The hub's
    head has ``num_labels + 1 = 92`` rows, label id = COCO id and no-object last, as the
    official one.

    Args:
        num_classes: as in :func:`convert_official`.
    """
    return convert_hf_detr_layout(
        state_dict,
        HF_DECODER,
        HF_TOP,
        _HF_STACKED,
        lambda head: softmax_head_rows(head, num_classes),
        "HF DETR",
    )
