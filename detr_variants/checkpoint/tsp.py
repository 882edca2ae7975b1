"""Official TSP-Detection (Edward-Sun/TSP-Detection) checkpoints → :class:`TSPFCOS` /
:class:`TSPRCNN`.

The released models are detectron2 models trained on detectron2's 80 contiguous COCO classes,
so only module names change: the ResNet (``backbone.bottom_up``), the FPN convs and the RPN /
box-predictor output layers keep theirs. Renamed: the FPN top block's ``MyConvBlock``
(``p6.conv``/``p6.bn`` → ``p6``/``p6.norm``), the FCOS towers (``fcos_head.cls_tower`` →
``foi_head.cls_subnet``, as detectron2's ``FCOSHead``), the transformer layers (``norm1``/
``norm2``/``linear*`` → ``norm``/``ffn.norm``/``ffn.linear*``), the RPN towers and the heads
(:data:`FCOS_NAMES`, :data:`RCNN_NAMES`). Persistent ``pixel_mean``/``pixel_std`` and anchor
buffers are dropped.
"""

from typing import List

from .convert import StateDict, register_converter
from .names import NameTable, Row, module_rows, rename, same


def _encoder(official: str, ours: str) -> List[Row]:
    """The transformer encoder under ``official`` / ``ours``: DETR's layer names (``norm1``/
    ``norm2``/``linear*`` → ``norm``/``ffn.norm``/``ffn.linear*``), other names kept."""
    layer = {"self_attn": "self_attn", "norm1": "norm", "norm2": "ffn.norm"}
    layer |= {f"linear{j}": f"ffn.linear{j}" for j in (1, 2)}
    return module_rows(f"{official}.layers", f"{ours}.layers", layer) + [
        (f"{official}.{{leaf+}}", f"{ours}.{{leaf+}}")
    ]


_COMMON: List[Row] = [
    ("pixel_mean", None),  # persistent buffers of the released models
    ("pixel_std", None),
    ("{module+}.anchor_generator.cell_anchors.{i}", None),
    *[
        row
        for p in ("p6", "p7")
        for row in [
            (f"backbone.top_block.{p}.conv.{{leaf}}", f"backbone.top_block.{p}.{{leaf}}"),
            (f"backbone.top_block.{p}.bn.{{leaf}}", f"backbone.top_block.{p}.norm.{{leaf}}"),
        ]
    ],
    *same("backbone.bottom_up", "backbone.fpn_lateral{n}", "backbone.fpn_output{n}"),
]

FCOS_NAMES = NameTable(
    _COMMON
    + [
        ("fcos_head.cls_tower.{leaf+}", "foi_head.cls_subnet.{leaf+}"),
        ("fcos_head.bbox_tower.{leaf+}", "foi_head.bbox_subnet.{leaf+}"),
        ("fcos_head.cls_logits.{leaf+}", "foi_head.cls_score.{leaf+}"),
        *_encoder("transformer_encoder", "encoder"),
        ("pyramid_position_embedding", "level_embed"),
        ("enc_proj.{leaf+}", "input_proj.{leaf+}"),
        ("post_enc_proj_norm.{leaf+}", "input_norm.{leaf+}"),
        ("cls_logits.{leaf+}", "class_embed.{leaf+}"),
        ("bbox_pred.{leaf+}", "bbox_embed.{leaf+}"),
        ("scales", "scales"),
        *same("ctrness"),
    ]
)

_RPN = "proposal_generator.rpn_head"
_BOX = "roi_heads.box_head"
RCNN_NAMES = NameTable(
    _COMMON
    + [
        *[
            (f"{_RPN}.{t}_conv.{{i}}.conv.{{leaf+}}", f"{_RPN}.{t}_convs.{{i}}.{{leaf+}}")
            for t in ("obj", "anchor")
        ],
        *[
            (f"{_RPN}.{t}_bn_list.{{leaf+}}", f"{_RPN}.{t}_norms.{{leaf+}}")
            for t in ("obj", "anchor")
        ],
        *same(f"{_RPN}.objectness_logits", f"{_RPN}.anchor_deltas"),
        *_encoder(f"{_BOX}.transformer_encoder", f"{_BOX}.encoder"),
        (f"{_BOX}.post_input_proj_norm.{{leaf+}}", f"{_BOX}.input_norm.{{leaf+}}"),
        (f"{_BOX}.dec_pos_embed_proj.{{leaf+}}", f"{_BOX}.pos_proj.{{leaf+}}"),
        *same(f"{_BOX}.input_proj"),
        *same("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"),
    ]
)


@register_converter("official", "tsp_fcos")
def convert_official_fcos(state_dict: StateDict) -> StateDict:
    """Official ``MyFCOS`` checkpoint → :class:`TSPFCOS` (``tsp/tsp_fcos_*`` configs)."""
    return rename(state_dict, FCOS_NAMES, "official TSP-FCOS")


@register_converter("official", "tsp_rcnn")
def convert_official_rcnn(state_dict: StateDict) -> StateDict:
    """Official TSP-RCNN (``GeneralizedRCNN`` + ``TransformerROIHeads``) checkpoint →
    :class:`TSPRCNN` (``tsp/tsp_rcnn_*`` configs). The released scripts never train the
    cascade heads; their per-stage names (``box_head.<stage>.``) are refused as not understood."""
    return rename(state_dict, RCNN_NAMES, "official TSP-RCNN")
