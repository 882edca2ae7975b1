"""The multi-level neck shared by Deformable DETR and multi-scale SMCA."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from torch import nn

from detr_variants.layers.position_encoding import PositionEmbeddingSine
from detr_variants.modeling.neck import MultiLevelNeck

SHAPES = {
    "res3": ShapeSpec(channels=8, stride=8),
    "res4": ShapeSpec(channels=12, stride=16),
    "res5": ShapeSpec(channels=16, stride=32),
}


def neck(**kwargs):
    torch.manual_seed(0)
    args = dict(
        input_shapes=SHAPES,
        in_features=["res3", "res4", "res5"],
        hidden_dim=64,
        num_levels=5,
        position_embedding=PositionEmbeddingSine(32, normalize=True),
    )
    return MultiLevelNeck(**{**args, **kwargs})


def inputs(h=75, w=70, valid=(75, 41)):
    """Backbone-like maps of an image padded from ``valid`` to (h, w), and their masks."""
    g = torch.Generator().manual_seed(1)
    padding = torch.ones(1, h, w, dtype=torch.bool)
    padding[:, : valid[0], : valid[1]] = False
    features, masks = {}, {}
    for name, s in SHAPES.items():
        size = (-(-h // s.stride), -(-w // s.stride))
        features[name] = torch.randn(1, s.channels, *size, generator=g)
        masks[name] = F.interpolate(padding[None].float(), size=size).to(torch.bool)[0]
    return features, masks, padding


def test_levels_strides_and_the_extra_convs():
    """1x1 convs on C3-C5; the first extra 3x3 stride-2 conv reads raw C5, the next the previous
    level; GN after each conv with norm="GN"; tolerance 1e-6."""
    n = neck(norm="GN")
    assert n.strides == [8, 16, 32, 64, 128]
    assert [p[0].kernel_size for p in n.input_proj] == [(1, 1)] * 3 + [(3, 3)] * 2
    assert [p[0].in_channels for p in n.input_proj] == [8, 12, 16, 16, 64]
    assert all(isinstance(p[1], nn.GroupNorm) and p[1].num_groups == 32 for p in n.input_proj)
    features, masks, padding = inputs()
    srcs, level_masks, pos = n(features, masks, padding)
    assert [tuple(s.shape) for s in srcs] == [
        (1, 64, 10, 9),
        (1, 64, 5, 5),
        (1, 64, 3, 3),
        (1, 64, 2, 2),
        (1, 64, 1, 1),
    ]
    with torch.no_grad():
        assert torch.allclose(srcs[3], n.input_proj[3](features["res5"]), atol=1e-6)
        assert torch.allclose(srcs[4], n.input_proj[4](srcs[3]), atol=1e-6)
    assert all(m.shape[-2:] == s.shape[-2:] for m, s in zip(level_masks, srcs))
    for lvl, (m, p) in enumerate(zip(level_masks, pos)):
        expected = n.position_embedding(m) + n.level_embed[lvl].view(1, -1, 1, 1)
        assert torch.allclose(p, expected, atol=1e-6)


def test_extra_level_masks_from_the_image_or_the_previous_level():
    """The two resizings differ for this padding (the image's, Deformable DETR; the previous
    level's, the released multi-scale SMCA); the backbone levels keep the backbone's masks."""
    features, masks, padding = inputs(h=64, w=160, valid=(64, 33))
    _, from_image, _ = neck(extra_mask_source="image")(features, masks, padding)
    _, from_previous, _ = neck(extra_mask_source="previous")(features, masks, padding)
    for lvl, name in enumerate(SHAPES):
        assert torch.equal(from_image[lvl], masks[name]) and torch.equal(
            from_previous[lvl], masks[name]
        )
    resize = lambda m, like: F.interpolate(m[None].float(), size=like.shape[-2:]).bool()[0]  # noqa: E731
    assert torch.equal(from_image[3], resize(padding, from_image[3]))
    assert torch.equal(from_previous[3], resize(masks["res5"], from_previous[3]))
    assert torch.equal(from_previous[4], resize(from_previous[3], from_previous[4]))
    assert not torch.equal(from_image[3], from_previous[3])  # the option matters here
    with pytest.raises(ValueError, match="extra_mask_source"):
        neck(extra_mask_source="last")


def test_without_level_embedding_and_bad_arguments():
    n = neck(level_embed=False, num_levels=3)
    features, masks, padding = inputs()
    _, level_masks, pos = n(features, masks, padding)
    assert n.level_embed is None
    assert all(torch.equal(p, n.position_embedding(m)) for p, m in zip(pos, level_masks))
    with pytest.raises(ValueError, match="at least len"):
        neck(num_levels=2)
    with pytest.raises(ValueError, match="has no"):
        neck(in_features=["res2", "res5"])


class Owner(nn.Module):
    def __init__(self):
        super().__init__()
        self.neck = neck(norm="GN", num_levels=4)


def test_a_detector_holds_the_neck_as_a_child():
    """Its parameters are ``neck.input_proj.N.*`` and ``neck.level_embed`` (what the converters
    write); dtype moves and loading reach them (tolerance 0: the same tensors)."""
    owner = Owner()
    keys = set(owner.state_dict())
    assert "neck.level_embed" in keys and "neck.input_proj.3.1.weight" in keys
    assert all(k.startswith("neck.") for k in keys)
    owner.double()
    features, masks, padding = inputs()
    srcs, _, pos = owner.neck({k: v.double() for k, v in features.items()}, masks, padding)
    assert srcs[0].dtype == pos[0].dtype == torch.float64
    state = {k: torch.randn_like(v) for k, v in owner.state_dict().items()}
    owner.load_state_dict(state)
    assert torch.equal(owner.neck.level_embed, state["neck.level_embed"])
