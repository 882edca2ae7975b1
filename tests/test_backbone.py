import pickle

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate

from detr_variants.model_zoo import get_config
from detr_variants.modeling.backbone import feature_masks, make_resnet


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


def test_frozen_batchnorm_is_folded_into_the_convolutions_without_changing_the_function():
    """make_resnet runs each conv + FrozenBN as one convolution: same state-dict keys, same outputs
    and parameter gradients as detectron2's conv then FrozenBN (float64)."""
    from detectron2.layers import Conv2d, FrozenBatchNorm2d

    from detr_variants.modeling.backbone import FrozenBNConv2d

    folded = make_resnet(
        depth=18, out_features=["res4", "res5"], norm="FrozenBN", freeze_at=2
    ).double()
    plain = make_resnet(
        depth=18, out_features=["res4", "res5"], norm="FrozenBN", freeze_at=2
    ).double()
    for m in plain.modules():
        if type(m) is FrozenBNConv2d:
            m.__class__ = Conv2d  # undo the fold: detectron2's own forward
    assert not any(
        type(m) is Conv2d and isinstance(m.norm, FrozenBatchNorm2d) for m in folded.modules()
    )
    assert list(folded.state_dict()) == list(plain.state_dict())
    torch.manual_seed(0)
    state = {
        k: torch.rand_like(v) + 0.5
        if k.endswith("running_var")
        else torch.randn_like(v) * 0.1
        if ".norm." in k
        else v
        for k, v in folded.state_dict().items()
    }
    folded.load_state_dict(state)
    plain.load_state_dict(state)
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    results = []
    for model in (folded, plain):
        with (
            torch.no_grad()
        ):  # detectron2's FrozenBN runs F.batch_norm here, x * s + t under autograd
            inference = model(x)
        out = model(x)
        trainable = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(sum(o.square().sum() for o in out.values()), trainable)
        results.append((inference, out, grads))
    (inference, out, grads), (inference_ref, out_ref, grads_ref) = results
    for name in out:
        torch.testing.assert_close(inference[name], inference_ref[name], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out[name], out_ref[name], rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)
