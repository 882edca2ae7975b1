import math

import torch

from detr_variants.layers.position_encoding import (
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    sine_embed_coordinates,
)


def test_sine_values_by_hand():
    """A 2x3 map with the last column padded: x runs 1..2 over the valid width, normalised to 2π."""
    mask = torch.tensor([[[False, False, True], [False, False, True]]])
    pos = PositionEmbeddingSine(num_pos_feats=4, normalize=True)(mask)
    assert pos.shape == (1, 8, 2, 3)
    eps = 1e-6
    x = 2 / (2 + eps) * 2 * math.pi  # column 1 (second valid column): cumsum 2 over valid width 2
    y = 1 / (2 + eps) * 2 * math.pi  # row 0: cumsum 1 over height 2
    dim_t = [10000 ** (2 * (i // 2) / 4) for i in range(4)]
    expect_x = [
        math.sin(x / dim_t[0]),
        math.cos(x / dim_t[1]),
        math.sin(x / dim_t[2]),
        math.cos(x / dim_t[3]),
    ]
    expect_y = [
        math.sin(y / dim_t[0]),
        math.cos(y / dim_t[1]),
        math.sin(y / dim_t[2]),
        math.cos(y / dim_t[3]),
    ]
    assert torch.allclose(pos[0, :4, 0, 1], torch.tensor(expect_y), atol=1e-6)
    assert torch.allclose(pos[0, 4:, 0, 1], torch.tensor(expect_x), atol=1e-6)


def test_sine_offset_and_padding_invariance():
    """The encoding of valid cells does not depend on how much padding follows them."""
    small = torch.zeros(1, 4, 5, dtype=torch.bool)
    padded = torch.ones(1, 6, 9, dtype=torch.bool)
    padded[:, :4, :5] = False
    for offset in (0.0, -0.5):
        enc = PositionEmbeddingSine(64, offset=offset)
        assert torch.allclose(enc(small), enc(padded)[..., :4, :5], atol=1e-6)
    # Deformable DETR's -0.5 offset puts the first cell at half a cell
    a = PositionEmbeddingSine(2, offset=-0.5)(small)
    y0 = 0.5 / (4 + 1e-6) * 2 * math.pi
    assert abs(a[0, 0, 0, 0].item() - math.sin(y0)) < 1e-6


def test_learned_shape_and_limit():
    enc = PositionEmbeddingLearned(16)
    out = enc(torch.zeros(2, 3, 4, dtype=torch.bool))
    assert out.shape == (2, 32, 3, 4)
    assert torch.equal(out[0, :16, 1, 2], enc.col_embed.weight[2])


def test_sine_embed_coordinates():
    coords = torch.tensor([[0.25, 0.75]])
    out = sine_embed_coordinates(coords, num_pos_feats=4)
    assert out.shape == (1, 8)
    x = 0.25 * 2 * math.pi
    assert abs(out[0, 0].item() - math.sin(x)) < 1e-6
    assert abs(out[0, 1].item() - math.cos(x)) < 1e-6
    y = 0.75 * 2 * math.pi
    assert abs(out[0, 4].item() - math.sin(y)) < 1e-6
