import pytest
import torch

from detr_variants.checkpoint import COCO_THING_IDS, convert_checkpoint
from detr_variants.checkpoint.convert import coco_class_rows, torchvision_resnet_name
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
    d2 = make_resnet(depth=50, out_features=["res2", "res3", "res4", "res5"], norm="FrozenBN").state_dict()
    mapped = {torchvision_resnet_name(k) for k in tv if not k.startswith("fc.") and "num_batches" not in k}
    assert None not in mapped
    assert mapped == set(d2)


def test_unknown_converter_is_a_clear_error():
    with pytest.raises(KeyError, match="no converter"):
        convert_checkpoint({}, "official", "nonexistent")
