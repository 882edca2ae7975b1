"""Official (facebookresearch/detr) and HF ``DetrForObjectDetection`` checkpoints →
:class:`~detr_variants.modeling.meta_arch.detr.DETR`, and the HF layout that DETR's descendants
in ``transformers`` share.

The released DETR head is a softmax over 92 rows: rows 0-90 are indexed by raw COCO category id
(ten of them never a target) and row 91 is no-object. Ours has ``num_classes + 1`` rows with
no-object last, so the 80 thing rows are taken by COCO id *and* row 91 is kept, as the official
``d2/converter.py`` does (the generic :func:`~.convert.class_head_rows` would drop it).
"""

import re
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

from .convert import (
    OFFICIAL_DECODER_FFN,
    OFFICIAL_ENCODER_LAYER,
    StateDict,
    coco_class_rows,
    convert_with_class_heads,
    official_detr_layout,
    register_converter,
)
from .hf_resnet import HF_BACKBONE
from .names import BATCHNORM_COUNTERS, NameTable, Row, same


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
OFFICIAL_NAMES = official_detr_layout(
    OFFICIAL_ENCODER_LAYER,
    _OFFICIAL_DECODER,
    [("transformer.decoder.norm.{leaf+}", "decoder.norm.{leaf+}")]
    + same("input_proj", "query_embed", "bbox_embed"),
)


@register_converter("official", "detr")
def convert_official(state_dict: StateDict, num_classes: Optional[int] = None) -> StateDict:
    """Official DETR checkpoint (``detr-r50-e632da11.pth``, ``-dc5``, ``-r101`` ...) → ours.

    The layout of ``models/detr.py`` and ``models/transformer.py`` (:data:`OFFICIAL_NAMES`): a
    torchvision ResNet under ``backbone.0.body.``, ``transformer.{encoder,decoder}.layers.<i>``
    (decoder cross-attention ``multihead_attn``), ``transformer.decoder.norm``, ``query_embed``,
    ``input_proj``, ``class_embed`` and ``bbox_embed``. DC5 and R101 checkpoints differ only in
    the backbone's depth and dilation, which the config sets. Panoptic checkpoints (``detr.*``
    and mask-head keys) are rejected.

    Args:
        num_classes: foreground classes of the target model; ``None`` maps a 92-row COCO head to
            80 classes + no-object and keeps any other head.
    """
    for leaf in ("weight", "bias"):
        if f"class_embed.{leaf}" not in state_dict:
            raise KeyError(f"official DETR checkpoint without class_embed.{leaf}")
    return convert_with_class_heads(
        state_dict,
        OFFICIAL_NAMES,
        lambda head: softmax_head_rows(head, num_classes),
        "official DETR",
    )


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
HF_TOP: List[Row] = [
    ("model.query_position_embeddings.{leaf+}", "query_embed.{leaf+}"),
    ("model.input_projection.{leaf+}", "input_proj.{leaf+}"),
    ("model.decoder.layernorm.{leaf+}", "decoder.norm.{leaf+}"),
    ("bbox_predictor.{leaf+}", "bbox_embed.{leaf+}"),
    ("class_labels_classifier.{leaf+}", "class_embed.{leaf+}"),
]


def hf_detr_layout(decoder: Dict[str, str], top: Sequence[Row]) -> NameTable:
    """The names of HF ``DetrForObjectDetection`` and the models ``transformers`` derives from it:
    the backbone (:data:`~.hf_resnet.HF_BACKBONE`), the modules of
    ``model.{encoder,decoder}.layers.<i>`` renamed by :data:`HF_ENCODER` / ``decoder`` (a module
    name may hold dots, ``mlp.fc1``; the parameter is its last segment) and the ``top`` rows."""
    layers = [
        (f"model.{part}.layers.{{i}}.{module}.{{leaf}}", f"{part}.layers.{{i}}.{ours}.{{leaf}}")
        for part, modules in (("encoder", HF_ENCODER), ("decoder", decoder))
        for module, ours in modules.items()
    ]
    return NameTable(BATCHNORM_COUNTERS + list(HF_BACKBONE.rows) + layers + list(top))


_HF_QKV = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(\w+)\.([qkv])_proj\.(weight|bias)")


def convert_hf_detr_layout(
    state_dict: StateDict,
    table: NameTable,
    stacked: Set[Tuple[str, str]],
    head_rows: Callable[[Tensor], Tensor],
    what: str,
) -> StateDict:
    """A state dict in the layout of :func:`hf_detr_layout` (``table``) → ours.

    Attentions ``(part, hf_module)`` in ``stacked`` (``("decoder", "encoder_attn")`` ...) have
    separate q/k/v projections, which are stacked into our ``in_proj_weight``/``in_proj_bias`` in
    q, k, v order as ``nn.MultiheadAttention`` expects. The class head goes through
    ``head_rows``. Unknown keys and incomplete q/k/v raise.
    """
    ours_of = {"self_attn": "self_attn", "encoder_attn": "cross_attn"}
    rest: StateDict = {}
    qkv: Dict[str, StateDict] = {}
    for key, value in state_dict.items():
        proj = _HF_QKV.fullmatch(key)
        if proj and (proj.group(1), proj.group(3)) in stacked:
            part, index, module, which, leaf = proj.groups()
            target = f"{part}.layers.{index}.{ours_of[module]}.in_proj_{leaf}"
            qkv.setdefault(target, {})[which] = value
        else:
            rest[key] = value
    out = convert_with_class_heads(rest, table, head_rows, what)
    for target, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{target}: incomplete q/k/v projections ({sorted(parts)})")
        out[target] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


HF_NAMES = hf_detr_layout(HF_DECODER, HF_TOP)
_HF_STACKED = {("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "encoder_attn")}


@register_converter("hf", "detr")
def convert_hf(state_dict: StateDict, num_classes: Optional[int] = None) -> StateDict:
    """HF ``DetrForObjectDetection`` state dict (e.g. ``facebook/detr-resnet-50``) → ours.

    Reads the HF-ResNet backbone (``use_timm_backbone=False``) and the timm one of the hub
    checkpoints, current and legacy (``out_proj``, ``fc1``, ``conv_encoder``) names
    (:data:`HF_NAMES`). The hub's head has ``num_labels + 1 = 92`` rows, label id = COCO id and
    no-object last, as the official one.

    Args:
        num_classes: as in :func:`convert_official`.
    """
    return convert_hf_detr_layout(
        state_dict,
        HF_NAMES,
        _HF_STACKED,
        lambda head: softmax_head_rows(head, num_classes),
        "HF DETR",
    )
