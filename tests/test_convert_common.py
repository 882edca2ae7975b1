import pytest
import torch

from detr_variants.checkpoint import COCO_THING_IDS, convert_checkpoint
from detr_variants.checkpoint.convert import (
    OFFICIAL_ENCODER_LAYER,
    coco_class_rows,
    convert_official_detr_layout,
    layer_tables,
    torchvision_resnet_name,
)
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
    layers = layer_tables(OFFICIAL_ENCODER_LAYER, {"norm1": "norm1"})
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
    out = convert_official_detr_layout(
        state, layers, r"transformer\.decoder\.norm\.", "test", skip=("transformer.decoder.copy.",)
    )
    assert set(out) == {
        "backbone.res2.0.conv1.norm.running_var",
        "encoder.layers.2.ffn.linear1.weight",
        "encoder.layers.2.norm.bias",
        "decoder.layers.0.norm1.weight",
        "decoder.norm.weight",
        "class_embed.bias",
    }
    assert out["class_embed.bias"].tolist() == [float(i) for i in COCO_THING_IDS]
