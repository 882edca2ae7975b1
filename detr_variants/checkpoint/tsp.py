"""Official TSP-Detection (Edward-Sun/TSP-Detection) checkpoints → :class:`TSPFCOS` /
:class:`TSPRCNN`.

The released models are detectron2 models trained on detectron2's 80 contiguous COCO classes,
so only module names change: the ResNet (``backbone.bottom_up``), the FPN convs and the RPN /
box-predictor output layers keep theirs. Renamed: the FPN top block's ``MyConvBlock``
(``p6.conv``/``p6.bn`` → ``p6``/``p6.norm``), the FCOS towers (``fcos_head.cls_tower`` →
``foi_head.cls_subnet``, as detectron2's ``FCOSHead``), the transformer layers (``norm1``/
``norm2``/``linear*`` → ``norm``/``ffn.norm``/``ffn.linear*``), the RPN towers and the heads
(see the tables below). Persistent ``pixel_mean``/``pixel_std`` and anchor buffers are dropped.
"""

import re
from typing import List, Optional, Tuple

from .convert import StateDict, register_converter

_ENCODER_LAYER = [
    (r"\.norm1\.", ".norm."),
    (r"\.norm2\.", ".ffn.norm."),
    (r"\.linear([12])\.", r".ffn.linear\1."),
]

_COMMON: List[Tuple[str, str]] = [
    (r"^(backbone\.top_block\.p[67])\.conv\.", r"\1."),
    (r"^(backbone\.top_block\.p[67])\.bn\.", r"\1.norm."),
    (r"^(backbone\.(bottom_up|fpn_lateral\d|fpn_output\d)\.)", r"\1"),
]

_FCOS: List[Tuple[str, str]] = _COMMON + [
    (r"^fcos_head\.cls_tower\.", "foi_head.cls_subnet."),
    (r"^fcos_head\.bbox_tower\.", "foi_head.bbox_subnet."),
    (r"^fcos_head\.cls_logits\.", "foi_head.cls_score."),
    (r"^transformer_encoder\.", "encoder."),
    (r"^pyramid_position_embedding$", "level_embed"),
    (r"^enc_proj\.", "input_proj."),
    (r"^post_enc_proj_norm\.", "input_norm."),
    (r"^cls_logits\.", "class_embed."),
    (r"^bbox_pred\.", "bbox_embed."),
    (r"^(ctrness\.|scales$)", r"\1"),
]

_RPN = r"^proposal_generator\.rpn_head\."
_BOX = r"^roi_heads\.box_head\."
_RCNN: List[Tuple[str, str]] = _COMMON + [
    (_RPN + r"obj_conv\.(\d+)\.conv\.", r"proposal_generator.rpn_head.obj_convs.\1."),
    (_RPN + r"anchor_conv\.(\d+)\.conv\.", r"proposal_generator.rpn_head.anchor_convs.\1."),
    (_RPN + r"obj_bn_list\.", "proposal_generator.rpn_head.obj_norms."),
    (_RPN + r"anchor_bn_list\.", "proposal_generator.rpn_head.anchor_norms."),
    (_RPN + r"(objectness_logits|anchor_deltas)\.", r"proposal_generator.rpn_head.\1."),
    (_BOX + r"transformer_encoder\.", "roi_heads.box_head.encoder."),
    (_BOX + r"post_input_proj_norm\.", "roi_heads.box_head.input_norm."),
    (_BOX + r"dec_pos_embed_proj\.", "roi_heads.box_head.pos_proj."),
    (_BOX + r"input_proj\.", "roi_heads.box_head.input_proj."),
    (r"^(roi_heads\.box_predictor\.(cls_score|bbox_pred)\.)", r"\1"),
]

_DROPPED = re.compile(r"^(pixel_mean|pixel_std)$|anchor_generator\.cell_anchors\.")


def _convert(state_dict: StateDict, rules: List[Tuple[str, str]], arch: str) -> StateDict:
    out, unknown = {}, []
    for name, value in state_dict.items():
        if _DROPPED.search(name):
            continue
        new: Optional[str] = None
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, name)
            if n:
                break
            new = None
        if new is None:
            unknown.append(name)
            continue
        if "encoder.layers." in new:
            head, _, rest = new.partition("encoder.layers.")
            for pattern, repl in _ENCODER_LAYER:
                rest = re.sub(pattern, repl, rest)
            new = head + "encoder.layers." + rest
        out[new] = value
    if unknown:
        raise KeyError(
            f"{len(unknown)} keys of the official {arch} checkpoint are not understood: "
            f"{', '.join(sorted(unknown)[:8])}" + (" ..." if len(unknown) > 8 else "")
        )
    return out


@register_converter("official", "tsp_fcos")
def convert_official_fcos(state_dict: StateDict) -> StateDict:
    """Official ``MyFCOS`` checkpoint → :class:`TSPFCOS` (``tsp/tsp_fcos_*`` configs)."""
    return _convert(state_dict, _FCOS, "TSP-FCOS")


@register_converter("official", "tsp_rcnn")
def convert_official_rcnn(state_dict: StateDict) -> StateDict:
    """Official TSP-RCNN (``GeneralizedRCNN`` + ``TransformerROIHeads``) checkpoint →
    :class:`TSPRCNN` (``tsp/tsp_rcnn_*`` configs). The released scripts never train the
    cascade heads; their per-stage names (``box_head.<stage>.``) are refused as not understood."""
    return _convert(state_dict, _RCNN, "TSP-RCNN")
