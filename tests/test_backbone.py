import pickle

import torch
from detectron2.checkpoint import DetectionCheckpointer

from detr_variants.model_zoo import get_config
from detr_variants.modeling.backbone import feature_masks, make_resnet
from detectron2.config import instantiate


def test_loads_a_detectron2_model_zoo_style_checkpoint(tmp_path):
    """A ``.pkl`` laid out like detectron2://ImageNetPretrained/torchvision/R-50.pkl (bare ResNet
    names, numpy arrays, name-matching heuristics) loads into the detector's backbone."""
    cfg = get_config("detr/detr_r18_synthetic")
    cfg.model.backbone.norm = "FrozenBN"
    model = instantiate(cfg.model)
    reference = make_resnet(depth=18, norm="FrozenBN")
    torch.manual_seed(1)
    blobs = {}
    for name, tensor in list(reference.state_dict().items()):
        blobs[name] = torch.randn_like(tensor.float()).numpy()
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": blobs, "__author__": "torchvision", "matching_heuristics": True}, f)

    DetectionCheckpointer(model).load(str(path))
    loaded = model.backbone.state_dict()
    for name, value in blobs.items():
        assert torch.equal(loaded[name], torch.from_numpy(value)), name


def test_strides_channels_and_dc5():
    r50 = make_resnet(depth=50, out_features=["res3", "res4", "res5"])
    shapes = r50.output_shape()
    assert [shapes[k].stride for k in ("res3", "res4", "res5")] == [8, 16, 32]
    assert shapes["res5"].channels == 2048
    dc5 = make_resnet(depth=50, dc5=True)
    assert dc5.output_shape()["res5"].stride == 16
    res5 = dc5.res5
    # torchvision's DC5: the first res5 block keeps dilation 1, the others use 2
    assert [blk.conv2.dilation[0] for blk in res5] == [1, 2, 2]
    out = dc5(torch.zeros(1, 3, 64, 64))["res5"]
    assert out.shape[-2:] == (4, 4)


def test_freeze_at_freezes_stem_and_res2():
    r = make_resnet(depth=18, freeze_at=2)
    assert not any(p.requires_grad for p in r.stem.parameters())
    assert not any(p.requires_grad for p in r.res2.parameters())
    assert all(p.requires_grad for p in r.res3.parameters())


def test_feature_masks_follow_the_image_mask():
    mask = torch.ones(1, 64, 96, dtype=torch.bool)
    mask[:, :32, :64] = False
    masks = feature_masks(mask, {"res5": torch.zeros(1, 8, 2, 3)})
    assert masks["res5"].tolist() == [[[False, False, True], [True, True, True]]]
