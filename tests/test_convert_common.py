import pytest
import torch

from detr_variants.checkpoint import (
    COCO_THING_IDS,
    conditional_detr,
    convert_checkpoint,
    deformable_detr,
    detr,
    known_converters,
    smca,
    tsp,
)
from detr_variants.checkpoint.convert import (
    OFFICIAL_ENCODER_LAYER,
    coco_class_rows,
    convert_official_detr_layout,
    official_detr_layout,
    torchvision_resnet_name,
)
from detr_variants.checkpoint.names import NameTable, rename_back
from detr_variants.modeling.backbone import make_resnet


def test_coco_ids_match_detectron2():
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    assert COCO_THING_IDS == [c["id"] for c in COCO_CATEGORIES if c["isthing"]]


def test_class_rows_keep_contiguous_classes_and_no_object():
    w = torch.arange(92, dtype=torch.float32)[:, None]
    out = coco_class_rows(w, extra_rows=1)
    assert out.shape == (81, 1)
    assert out[0].item() == 1 and out[79].item() == 90 and out[80].item() == 91


def test_torchvision_resnet_names_cover_a_detectron2_resnet():
    """Every torchvision R50 name maps onto a distinct detectron2 ResNet parameter or buffer."""
    import torchvision

    tv = torchvision.models.resnet50().state_dict()
    d2 = make_resnet(
        depth=50, out_features=["res2", "res3", "res4", "res5"], norm="FrozenBN"
    ).state_dict()
    mapped = {
        torchvision_resnet_name(k) for k in tv if not k.startswith("fc.") and "num_batches" not in k
    }
    assert None not in mapped
    assert mapped == set(d2)


def test_unknown_converter_is_a_clear_error():
    with pytest.raises(KeyError, match="no converter"):
        convert_checkpoint({}, "official", "nonexistent")


@pytest.mark.parametrize(
    "source", ["official/conditional_detr", "official/smca", "official/deformable_detr"]
)
def test_official_converters_name_unknown_keys(source):
    """A key outside the DETR layout (or an unknown module inside a layer) is an error naming it."""
    for key in ("transformer.some_new_head.weight", "transformer.encoder.layers.0.adapter.weight"):
        with pytest.raises(KeyError, match=key.replace(".", r"\.")):
            convert_checkpoint({key: torch.zeros(1)}, *source.split("/"))


def test_official_detr_layout_renames_keeps_and_skips():
    layers = official_detr_layout(
        OFFICIAL_ENCODER_LAYER,
        {"norm1": "norm1"},
        [
            ("transformer.decoder.norm.{leaf+}", "decoder.norm.{leaf+}"),
            ("transformer.decoder.copy.{leaf+}", None),
        ],
    )
    state = {
        "backbone.0.body.layer1.0.bn1.running_var": torch.ones(1),
        "backbone.0.body.layer1.0.bn1.num_batches_tracked": torch.zeros(()),
        "transformer.encoder.layers.2.linear1.weight": torch.zeros(1),
        "transformer.encoder.layers.2.norm1.bias": torch.zeros(1),
        "transformer.decoder.layers.0.norm1.weight": torch.zeros(1),
        "transformer.decoder.norm.weight": torch.zeros(1),
        "transformer.decoder.copy.weight": torch.zeros(1),
        "class_embed.bias": torch.arange(91.0),
    }
    out = convert_official_detr_layout(state, layers, "test")
    assert set(out) == {
        "backbone.res2.0.conv1.norm.running_var",
        "encoder.layers.2.ffn.linear1.weight",
        "encoder.layers.2.norm.bias",
        "decoder.layers.0.norm1.weight",
        "decoder.norm.weight",
        "class_embed.bias",
    }
    assert out["class_embed.bias"].tolist() == [float(i) for i in COCO_THING_IDS]


def test_name_table_fields_directions_and_order():
    """``{f}`` is one segment or part of one, ``{f+}`` one or more; the first row wins each way;
    a row without ours drops; rows whose sides differ in fields are refused."""
    table = NameTable(
        [
            ("a.{i}.bn{j}.{leaf}", "x.{i}.conv{j}.norm.{leaf}"),
            ("a.{i}.{rest+}", "x.{i}.{rest+}"),
            ("a_legacy.{i}.{rest+}", "x.{i}.{rest+}"),
            ("dropped.{rest+}", None),
        ]
    )
    assert table.to_ours("a.3.bn2.weight") == "x.3.conv2.norm.weight"
    assert table.to_ours("a.3.bn2.sub.weight") == "x.3.bn2.sub.weight"  # {leaf}: one segment
    assert table.to_ours("a_legacy.0.m.weight") == "x.0.m.weight"
    assert table.to_official("x.0.m.weight") == "a.0.m.weight"  # the first row's name
    assert table.to_official("x.1.conv3.norm.bias") == "a.1.bn3.bias"
    assert table.lookup("dropped.w") == (True, None) and table.lookup("b.w") == (False, None)
    assert table.to_official("y.0") is None
    with pytest.raises(KeyError, match="no released name for y.0"):
        rename_back({"y.0": torch.zeros(1)}, table)
    with pytest.raises(ValueError, match="different fields"):
        NameTable([("a.{i}.w", "x.w")])


# Released names → ours, written out by hand from the official repositories' module definitions
# and the HF models' state dicts (not derived from the converters' tables): the anchor of the
# tests that build released state dicts by inverting those tables.
LITERAL_NAMES = {
    "official/detr": {
        "backbone.0.body.conv1.weight": "backbone.stem.conv1.weight",
        "backbone.0.body.layer3.5.bn2.running_mean": "backbone.res4.5.conv2.norm.running_mean",
        "backbone.0.body.layer2.0.downsample.0.weight": "backbone.res3.0.shortcut.weight",
        "transformer.encoder.layers.5.norm1.weight": "encoder.layers.5.norm.weight",
        "transformer.encoder.layers.0.norm2.bias": "encoder.layers.0.ffn.norm.bias",
        "transformer.encoder.layers.1.self_attn.in_proj_weight": (
            "encoder.layers.1.self_attn.in_proj_weight"
        ),
        "transformer.decoder.layers.2.multihead_attn.out_proj.weight": (
            "decoder.layers.2.cross_attn.out_proj.weight"
        ),
        "transformer.decoder.layers.4.norm3.weight": "decoder.layers.4.ffn.norm.weight",
        "transformer.decoder.layers.0.linear2.bias": "decoder.layers.0.ffn.linear2.bias",
        "transformer.decoder.norm.weight": "decoder.norm.weight",
        "input_proj.weight": "input_proj.weight",
        "query_embed.weight": "query_embed.weight",
        "bbox_embed.layers.2.bias": "bbox_embed.layers.2.bias",
    },
    "hf/detr": {
        "model.backbone.conv_encoder.model.layer1.0.bn3.weight": (
            "backbone.res2.0.conv3.norm.weight"
        ),
        "model.backbone.model.embedder.embedder.normalization.running_var": (
            "backbone.stem.conv1.norm.running_var"
        ),
        "model.backbone.model.encoder.stages.2.layers.1.layer.0.convolution.weight": (
            "backbone.res4.1.conv1.weight"
        ),
        "model.encoder.layers.1.self_attn_layer_norm.bias": "encoder.layers.1.norm.bias",
        "model.encoder.layers.0.mlp.fc1.weight": "encoder.layers.0.ffn.linear1.weight",
        "model.decoder.layers.2.encoder_attn.o_proj.bias": (
            "decoder.layers.2.cross_attn.out_proj.bias"
        ),
        "model.decoder.layers.1.encoder_attn_layer_norm.weight": "decoder.layers.1.norm2.weight",
        "model.decoder.layers.0.final_layer_norm.weight": "decoder.layers.0.ffn.norm.weight",
        "model.decoder.layernorm.bias": "decoder.norm.bias",
        "model.query_position_embeddings.weight": "query_embed.weight",
        "model.input_projection.weight": "input_proj.weight",
        "bbox_predictor.layers.1.weight": "bbox_embed.layers.1.weight",
    },
    "official/conditional_detr": {
        "backbone.0.body.layer4.2.conv3.weight": "backbone.res5.2.conv3.weight",
        "transformer.encoder.layers.3.linear1.weight": "encoder.layers.3.ffn.linear1.weight",
        "transformer.decoder.layers.0.ca_qpos_proj.weight": "decoder.layers.0.ca_qpos_proj.weight",
        "transformer.decoder.layers.3.sa_kcontent_proj.bias": (
            "decoder.layers.3.sa_kcontent_proj.bias"
        ),
        "transformer.decoder.layers.1.ca_qpos_sine_proj.weight": (
            "decoder.layers.1.ca_qpos_sine_proj.weight"
        ),
        "transformer.decoder.layers.2.cross_attn.out_proj.weight": (
            "decoder.layers.2.cross_attn.out_proj.weight"
        ),
        "transformer.decoder.layers.2.norm3.bias": "decoder.layers.2.ffn.norm.bias",
        "transformer.decoder.query_scale.layers.1.weight": "decoder.query_scale.layers.1.weight",
        "transformer.decoder.ref_point_head.layers.0.bias": "decoder.ref_point_head.layers.0.bias",
        "transformer.decoder.norm.weight": "decoder.norm.weight",
    },
    "hf/conditional_detr": {
        "model.decoder.layers.0.encoder_attn.q_pos_proj.weight": (
            "decoder.layers.0.ca_qpos_proj.weight"
        ),
        "model.decoder.layers.1.self_attn.k_content_proj.bias": (
            "decoder.layers.1.sa_kcontent_proj.bias"
        ),
        "model.decoder.layers.1.encoder_attn.q_pos_sine_proj.weight": (
            "decoder.layers.1.ca_qpos_sine_proj.weight"
        ),
        "model.decoder.layers.2.self_attn.o_proj.weight": (
            "decoder.layers.2.self_attn.out_proj.weight"
        ),
        "model.decoder.layers.2.mlp.fc2.bias": "decoder.layers.2.ffn.linear2.bias",
        "model.decoder.query_scale.layers.0.weight": "decoder.query_scale.layers.0.weight",
        "model.decoder.ref_point_head.layers.1.bias": "decoder.ref_point_head.layers.1.bias",
        "model.encoder.layers.1.final_layer_norm.bias": "encoder.layers.1.ffn.norm.bias",
        "class_labels_classifier.weight": "class_embed.weight",
    },
    "official/deformable_detr": {
        "backbone.0.body.layer2.3.conv2.weight": "backbone.res3.3.conv2.weight",
        "transformer.encoder.layers.2.self_attn.sampling_offsets.weight": (
            "encoder.layers.2.self_attn.sampling_offsets.weight"
        ),
        "transformer.encoder.layers.0.norm1.bias": "encoder.layers.0.norm.bias",
        "transformer.decoder.layers.0.cross_attn.sampling_offsets.weight": (
            "decoder.layers.0.cross_attn.sampling_offsets.weight"
        ),
        "transformer.decoder.layers.1.cross_attn.attention_weights.bias": (
            "decoder.layers.1.cross_attn.attention_weights.bias"
        ),
        # the official decoder layer: norm2 after self-attention, norm1 after cross-attention
        "transformer.decoder.layers.1.norm2.weight": "decoder.layers.1.norm1.weight",
        "transformer.decoder.layers.1.norm1.weight": "decoder.layers.1.norm2.weight",
        "transformer.decoder.layers.3.norm3.bias": "decoder.layers.3.ffn.norm.bias",
        "transformer.decoder.layers.2.self_attn.in_proj_weight": (
            "decoder.layers.2.self_attn.in_proj_weight"
        ),
        "transformer.decoder.bbox_embed.4.layers.2.weight": "decoder.bbox_embed.4.layers.2.weight",
        "transformer.level_embed": "neck.level_embed",
        "transformer.reference_points.weight": "reference_points.weight",
        "input_proj.3.1.weight": "neck.input_proj.3.1.weight",
        "query_embed.weight": "query_embed.weight",
        "bbox_embed.5.layers.0.bias": "bbox_embed.5.layers.0.bias",
    },
    "hf/deformable_detr": {
        "model.backbone.conv_encoder.model.layer3.1.conv1.weight": "backbone.res4.1.conv1.weight",
        "model.encoder.layers.3.self_attn.value_proj.weight": (
            "encoder.layers.3.self_attn.value_proj.weight"
        ),
        "model.encoder.layers.1.self_attn_layer_norm.weight": "encoder.layers.1.norm.weight",
        "model.encoder.layers.0.fc2.bias": "encoder.layers.0.ffn.linear2.bias",
        "model.decoder.layers.2.encoder_attn.output_proj.weight": (
            "decoder.layers.2.cross_attn.output_proj.weight"
        ),
        "model.decoder.layers.2.self_attn_layer_norm.bias": "decoder.layers.2.norm1.bias",
        "model.decoder.layers.2.encoder_attn_layer_norm.bias": "decoder.layers.2.norm2.bias",
        "model.decoder.layers.0.self_attn.out_proj.weight": (
            "decoder.layers.0.self_attn.out_proj.weight"
        ),
        "model.decoder.layers.1.mlp.fc1.weight": "decoder.layers.1.ffn.linear1.weight",
        "model.decoder.bbox_embed.1.layers.0.weight": "decoder.bbox_embed.1.layers.0.weight",
        "model.input_proj.2.0.weight": "neck.input_proj.2.0.weight",
        "model.level_embed": "neck.level_embed",
        "model.query_position_embeddings.weight": "query_embed.weight",
        "model.pos_trans_norm.bias": "pos_trans_norm.bias",
    },
    "official/smca": {
        "backbone.0.body.layer1.2.bn1.weight": "backbone.res2.2.conv1.norm.weight",
        "transformer.encoder.layers.4.norm2.weight": "encoder.layers.4.ffn.norm.weight",
        "transformer.decoder.layers.0.point1.layers.2.weight": (
            "decoder.center_head.layers.2.weight"
        ),
        "transformer.decoder.layers.3.point2.bias": "decoder.layers.3.modulation.offsets.bias",
        "transformer.decoder.layers.5.point3.weight": "decoder.layers.5.modulation.scales.weight",
        "transformer.decoder.layers.1.norm4.weight": "decoder.layers.1.prior_norm.weight",
        "transformer.decoder.layers.1.multihead_attn.in_proj_bias": (
            "decoder.layers.1.cross_attn.in_proj_bias"
        ),
        "transformer.decoder.norm.bias": "decoder.norm.bias",
        "input_proj.bias": "input_proj.bias",
    },
    "official/smca_ms_released": {
        "input_proj_512.weight": "neck.input_proj.0.weight",
        "input_proj_2048_3.bias": "neck.input_proj.3.bias",
        "transformer.level_embed": "neck.level_embed",
        "transformer.conv.weight": "memory_downsample.weight",
        "transformer.encoder.layers.1.conv_1.weight": "encoder.layers.1.input_conv.weight",
        "transformer.encoder.layers.0.self_attn_16.weight": "encoder.layers.0.level_convs.1.weight",
        "transformer.encoder.layers.0.high_to_low_2.bias": "encoder.layers.0.down_convs.1.bias",
        "transformer.encoder.layers.1.low_to_high.weight": "encoder.layers.1.up_convs.0.weight",
        "transformer.decoder.layers.2.point4.weight": "decoder.layers.2.scale_selection.weight",
        "transformer.decoder.layers.0.point1.layers.0.bias": "decoder.center_head.layers.0.bias",
    },
    "official/tsp_fcos": {
        "backbone.bottom_up.res3.0.conv1.weight": "backbone.bottom_up.res3.0.conv1.weight",
        "backbone.fpn_lateral4.weight": "backbone.fpn_lateral4.weight",
        "backbone.top_block.p6.conv.weight": "backbone.top_block.p6.weight",
        "backbone.top_block.p7.bn.running_var": "backbone.top_block.p7.norm.running_var",
        "fcos_head.cls_tower.3.weight": "foi_head.cls_subnet.3.weight",
        "fcos_head.cls_logits.bias": "foi_head.cls_score.bias",
        "transformer_encoder.layers.2.norm1.weight": "encoder.layers.2.norm.weight",
        "transformer_encoder.layers.0.linear2.weight": "encoder.layers.0.ffn.linear2.weight",
        "pyramid_position_embedding": "level_embed",
        "enc_proj.weight": "input_proj.weight",
        "post_enc_proj_norm.bias": "input_norm.bias",
        "cls_logits.weight": "class_embed.weight",
        "bbox_pred.bias": "bbox_embed.bias",
        "scales": "scales",
    },
    "official/tsp_rcnn": {
        "backbone.top_block.p6.bn.weight": "backbone.top_block.p6.norm.weight",
        "proposal_generator.rpn_head.obj_conv.1.conv.weight": (
            "proposal_generator.rpn_head.obj_convs.1.weight"
        ),
        "proposal_generator.rpn_head.anchor_bn_list.0.running_mean": (
            "proposal_generator.rpn_head.anchor_norms.0.running_mean"
        ),
        "proposal_generator.rpn_head.anchor_deltas.weight": (
            "proposal_generator.rpn_head.anchor_deltas.weight"
        ),
        "roi_heads.box_head.transformer_encoder.layers.1.norm2.bias": (
            "roi_heads.box_head.encoder.layers.1.ffn.norm.bias"
        ),
        "roi_heads.box_head.post_input_proj_norm.weight": "roi_heads.box_head.input_norm.weight",
        "roi_heads.box_head.dec_pos_embed_proj.weight": "roi_heads.box_head.pos_proj.weight",
        "roi_heads.box_predictor.cls_score.weight": "roi_heads.box_predictor.cls_score.weight",
    },
}
# names that a converter also reads (legacy HF names, the SMCA layout with one shared conv) and
# whose name of ours the table inverts to the other (current, per-pair) name
ALTERNATIVE_NAMES = {
    "model.backbone.conv_encoder.model.layer1.0.bn3.weight",
    "model.backbone.conv_encoder.model.layer3.1.conv1.weight",
    "model.encoder.layers.0.fc2.bias",
    "model.decoder.layers.0.self_attn.out_proj.weight",
    "transformer.encoder.layers.1.low_to_high.weight",
}
TABLES = {
    "official/detr": detr.OFFICIAL_NAMES,
    "hf/detr": detr.HF_NAMES,
    "official/conditional_detr": conditional_detr.OFFICIAL_NAMES,
    "hf/conditional_detr": conditional_detr.HF_NAMES,
    "official/deformable_detr": deformable_detr.OFFICIAL_NAMES,
    "hf/deformable_detr": deformable_detr.HF_NAMES,
    "official/smca": smca.OFFICIAL_NAMES,
    "official/smca_ms_released": smca.RELEASED_MS_NAMES,
    "official/tsp_fcos": tsp.FCOS_NAMES,
    "official/tsp_rcnn": tsp.RCNN_NAMES,
}


def test_every_converter_has_literal_names():
    assert sorted(LITERAL_NAMES) == sorted(f"{s}/{a}" for s, a in known_converters())


@pytest.mark.parametrize("converter", sorted(LITERAL_NAMES))
def test_converters_map_literal_released_names(converter):
    """Each released name, written out, lands on the written-out name of ours through the
    registered converter (value compared exactly), and the converter's table inverts ours back to
    it (the direction the tests build released state dicts with), or for an alternative name to
    another released name that converts to the same."""
    names = LITERAL_NAMES[converter]
    released = {name: torch.full((2,), float(i)) for i, name in enumerate(names)}
    if converter == "official/detr":  # the released head is required (92 rows, COCO ids)
        released |= {"class_embed.weight": torch.zeros(92, 2), "class_embed.bias": torch.zeros(92)}
    converted = convert_checkpoint(released, *converter.split("/"))
    for name, ours in names.items():
        assert torch.equal(converted[ours], released[name]), name
        back = TABLES[converter].to_official(ours)
        if name in ALTERNATIVE_NAMES:
            assert back != name and TABLES[converter].to_ours(back) == ours, (name, back)
        else:
            assert back == name, ours
