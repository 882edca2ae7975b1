"""SMCA: the Gaussian prior, the modulated co-attention, scale selection, the multi-scale encoder,
the box head, configs and the official converter."""

import math

import pytest
import torch
from detectron2.config import instantiate
from torch import nn

from detr_variants.checkpoint import Checkpointer, convert_checkpoint
from detr_variants.checkpoint.smca import OFFICIAL_NAMES
from detr_variants.layers import TransformerEncoderLayer
from detr_variants.layers.smca_attention import (
    GaussianModulatedAttention,
    MultiScaleEncoder,
    SMCADecoderLayer,
    SpatialModulation,
    gaussian_log_prior,
    parse_encoder_layout,
)
from detr_variants.model_zoo import get_config
from detr_variants.modeling.meta_arch.smca_detr import (
    SMCADETR,
    MultiScaleSMCADETR,
    ReleasedMultiScaleSMCADETR,
)
from helpers import (
    build_tiny,
    image_input,
    set_prediction_train_step,
    to_official_detr_names,
)

SINGLE, MULTI = "smca_detr/smca_r18_synthetic", "smca_detr/smca_ms_r18_synthetic"
COCO_CONFIGS = [
    "smca_r50_50ep",
    "smca_r50_108ep",
    "smca_ms_r50_50ep",
    "smca_ms_r50_108ep",
    "smca_ms_r101_50ep",
]


@pytest.fixture(scope="module")
def single():
    return build_tiny(SINGLE)


@pytest.fixture(scope="module")
def multi():
    return build_tiny(MULTI)


def padded_batch():
    """Two images of different sizes: each is padded differently in the batch."""
    return [
        image_input(96, 128, [[10, 10, 60, 50], [30, 40, 90, 90]], [1, 4], seed=0),
        image_input(80, 100, [], [], seed=1),
    ]  # an image without objects


# ------------------------------------------------------------------ the spatial prior
def test_gaussian_prior_equals_hand_computation():
    """3x4 map, one query, two heads, explicit numbers: log G = -(s_x (x-c_x)^2 + s_y (y-c_y)^2) / 8.

    Normalised centre (0.5, 0.25) of an unpadded 4x3-cell image → (2, 0.75) cells. Head 0: offset
    (0, 0), scale parameters (1, 2) → s = (1, 4). Head 1: offset (-1, 0.25) → centre (1, 1), scale
    parameters (0.5, 1) → s = (0.25, 1). All values are exact in binary; tolerance 1e-6."""
    mod = SpatialModulation(
        d_model=4, num_heads=2, scale_type="independent", multi_head=True, beta=8.0
    )
    assert (mod.scales.weight == 0).all() and (mod.scales.bias == 1).all()  # s = 1 at init
    with torch.no_grad():
        mod.offsets.weight.zero_()
        mod.offsets.bias.copy_(torch.tensor([0.0, 0.0, -1.0, 0.25]))  # (head, xy)
        mod.scales.bias.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))  # squared: (1, 4), (0.25, 1)
    x = torch.randn(1, 1, 4)
    centers = torch.tensor([[[0.5, 0.25]]])
    level_sizes = torch.tensor([[[4.0, 3.0]]])  # (w, h) in cells
    (prior,) = mod(x, centers, level_sizes, [(3, 4)])
    assert prior.shape == (1, 2, 1, 12)
    head0 = [
        [-0.78125, -0.40625, -0.28125, -0.40625],
        [-0.53125, -0.15625, -0.03125, -0.15625],
        [-1.28125, -0.90625, -0.78125, -0.90625],
    ]
    head1 = [
        [-0.15625, -0.125, -0.15625, -0.25],
        [-0.03125, 0.0, -0.03125, -0.125],
        [-0.15625, -0.125, -0.15625, -0.25],
    ]
    expected = torch.tensor([head0, head1]).view(1, 2, 1, 12)
    assert torch.allclose(prior, expected, atol=1e-6)
    # the function alone, with the same centres and scales
    c = torch.tensor([[[[2.0, 0.75], [1.0, 1.0]]]])
    s = torch.tensor([[[[1.0, 4.0], [0.25, 1.0]]]])
    assert torch.allclose(gaussian_log_prior(c, s, 3, 4, 8.0), expected, atol=1e-6)


@pytest.mark.parametrize(
    "scale_type,multi_head,n_offsets,n_scales",
    [
        ("fixed", True, 16, 0),
        ("single", True, 16, 8),
        ("independent", True, 16, 16),
        ("independent", False, 0, 2),
        ("single", False, 0, 1),
    ],
)
def test_scale_and_head_options(scale_type, multi_head, n_offsets, n_scales):
    """Table 2's options: fixed s = 1, one scale per head, independent (s_x, s_y); head-shared
    modulation has no offsets and gives every head the same prior (tolerance 0: copies)."""
    mod = SpatialModulation(256, 8, scale_type=scale_type, multi_head=multi_head)
    assert (0 if mod.offsets is None else mod.offsets.out_features) == n_offsets
    assert (0 if mod.scales is None else mod.scales.out_features) == n_scales
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        if mod.scales is not None:
            mod.scales.weight.normal_()
        c, s = mod.centers_and_scales(
            x, torch.rand(2, 5, 2), torch.tensor([[[6.0, 4.0]], [[5.0, 3.0]]])
        )
    assert c.shape == s.shape == (2, 5, 1, 8, 2)
    if scale_type == "fixed":
        assert (s == 1).all()
    if scale_type == "single":
        assert torch.equal(s[..., 0], s[..., 1])
    if not multi_head:
        assert torch.equal(c, c[:, :, :, :1].expand_as(c)) and torch.equal(
            s, s[:, :, :, :1].expand_as(s)
        )


def _manual_attention(attn, query, key, value, mask, bias=None):
    """softmax(q_h k_hᵀ/√d_h + bias, −inf at padding) v_h → out_proj, written out."""
    e, h = attn.embed_dim, attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q, k, v = (
        torch.nn.functional.linear(x, w[i * e : (i + 1) * e], b[i * e : (i + 1) * e])
        for i, x in enumerate((query, key, value))
    )
    split = lambda t: t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)  # noqa: E731
    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(e // h)
    logits = logits.masked_fill(mask[:, None, None, :], float("-inf"))
    if bias is not None:
        logits = logits + bias
    out = logits.softmax(-1) @ split(v)
    return attn.out_proj(out.transpose(1, 2).reshape(query.shape[0], query.shape[1], e)), logits


def test_prior_is_added_to_the_attention_logits_before_the_softmax():
    """Co-attention with a prior = softmax(q·kᵀ/√d + log G) v after the key-padding −inf fill;
    tolerance 1e-5."""
    torch.manual_seed(0)
    attn = GaussianModulatedAttention(16, 2).eval()
    query, key, value = torch.randn(2, 3, 16), torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 8:] = True
    prior = -torch.rand(2, 2, 3, 12) * 3
    expected, _ = _manual_attention(attn, query, key, value, mask, prior)
    with torch.no_grad():
        out = attn(query, key, value, key_padding_mask=mask, priors=[prior])
    assert torch.allclose(out, expected, atol=1e-5)
    # a very strong prior on one cell makes each query read (almost) only that cell's value
    peaked = torch.full((2, 2, 3, 12), -1e4)
    peaked[..., 5] = 0
    with torch.no_grad():
        out = attn(query, key, value, key_padding_mask=mask, priors=[peaked])
        v5 = nn.functional.linear(value[:, 5], attn.in_proj_weight[32:], attn.in_proj_bias[32:])
    assert torch.allclose(out, attn.out_proj(v5)[:, None].expand(-1, 3, -1), atol=1e-5)


def test_without_modulation_equals_nn_multihead_attention():
    """No prior, no level weights: exactly nn.MultiheadAttention with the same weights (same
    parameter names); tolerance 1e-5, with key padding."""
    torch.manual_seed(1)
    ours = GaussianModulatedAttention(32, 4, dropout=0.1).eval()
    with torch.no_grad():
        ours.in_proj_bias.normal_()
        ours.out_proj.bias.normal_()
    ref = nn.MultiheadAttention(32, 4, dropout=0.1, batch_first=True).eval()
    ref.load_state_dict(ours.state_dict())
    query, key, value = torch.randn(2, 5, 32), torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 6:] = True
    with torch.no_grad():
        expected = ref(query, key, value, key_padding_mask=mask, need_weights=False)[0]
        assert torch.allclose(ours(query, key, value, key_padding_mask=mask), expected, atol=1e-5)
        assert torch.allclose(
            ours(query, key, value), ref(query, key, value, need_weights=False)[0], atol=1e-5
        )


# ------------------------------------------------------------------ multi-scale pieces
def test_scale_selection_weights_sum_to_one_and_weight_per_scale_softmaxes():
    """α = softmax over scales per query (sums to 1, tolerance 1e-6); the co-attention output is
    Σ_l α_l · softmax_l(logits_l + log G_l) v_l (eq. 8-9), a softmax per scale; tolerance 1e-5."""
    torch.manual_seed(2)
    layer = SMCADecoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, num_levels=3)
    x = torch.randn(2, 7, 32)
    alpha = layer.scale_weights(x)
    assert alpha.shape == (2, 7, 3) and (alpha >= 0).all()
    assert torch.allclose(alpha.sum(-1), torch.ones(2, 7), atol=1e-6)
    assert SMCADecoderLayer(d_model=32, nhead=4, num_levels=1).scale_selection is None
    assert (
        SMCADecoderLayer(d_model=32, nhead=4, num_levels=3, scale_selection=False).scale_weights(x)
        is None
    )

    attn = layer.cross_attn.eval()
    lengths = [6, 4, 2]
    query, key, value = torch.randn(2, 7, 32), torch.randn(2, 12, 32), torch.randn(2, 12, 32)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, [4, 5, 9]] = True
    priors = [-torch.rand(2, 4, 7, n) * 2 for n in lengths]
    with torch.no_grad():
        out = attn(
            query,
            key,
            value,
            key_padding_mask=mask,
            priors=priors,
            level_lengths=lengths,
            level_weights=alpha,
        )
        _, logits = _manual_attention(attn, query, key, value, mask, torch.cat(priors, -1))
        v = nn.functional.linear(value, attn.in_proj_weight[64:], attn.in_proj_bias[64:]).view(
            2, 12, 4, 8
        )
        per_scale = [l.softmax(-1) for l in logits.split(lengths, -1)]
        mixed = sum(
            alpha.transpose(1, 2)[:, None, i, :, None] * (p @ v_l.transpose(1, 2))
            for i, (p, v_l) in enumerate(zip(per_scale, v.split(lengths, 1)))
        )
        expected = attn.out_proj(mixed.transpose(1, 2).reshape(2, 7, 32))
        assert torch.allclose(out, expected, atol=1e-5)
        # without scale selection: one softmax over the tokens of all scales
        joint = attn(query, key, value, key_padding_mask=mask, priors=priors, level_lengths=lengths)
        assert torch.allclose(
            joint,
            _manual_attention(attn, query, key, value, mask, torch.cat(priors, -1))[0],
            atol=1e-5,
        )


def test_intra_scale_block_runs_the_shared_layer_on_each_scale_separately():
    """An intra block = its one layer applied to every scale alone (weights shared across scales);
    a multi block = the layer over all scales concatenated. Tolerance 1e-5."""
    torch.manual_seed(3)
    layer = TransformerEncoderLayer(32, 4, 64, dropout=0.0)
    lengths = [12, 6, 2]
    src, pos = torch.randn(2, 20, 32), torch.randn(2, 20, 32)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1, [9, 10, 11, 16, 17]] = True
    intra, multi = (
        MultiScaleEncoder(layer, "intra").eval(),
        MultiScaleEncoder(layer, "multi").eval(),
    )
    with torch.no_grad():
        shared = intra.layers[0]
        expected = torch.cat(
            [
                shared(s, pos=p, key_padding_mask=m)
                for s, p, m in zip(
                    src.split(lengths, 1), pos.split(lengths, 1), mask.split(lengths, 1)
                )
            ],
            1,
        )
        assert torch.allclose(intra(src, pos, mask, lengths), expected, atol=1e-5)
        joint = multi.layers[0](src, pos=pos, key_padding_mask=mask)
        assert torch.allclose(multi(src, pos, mask, lengths), joint, atol=1e-5)
        assert (joint - expected).abs().max() > 1e-2  # the two blocks do differ
    names = [n for n, _ in MultiScaleEncoder(layer, "2intra-multi-2intra").named_parameters()]
    assert len({n.split(".")[1] for n in names}) == 5  # one layer (one set of weights) per block


def test_encoder_layouts():
    assert parse_encoder_layout("2intra-multi-2intra") == [
        "intra",
        "intra",
        "multi",
        "intra",
        "intra",
    ]
    assert parse_encoder_layout("5Intra") == ["intra"] * 5
    assert parse_encoder_layout("3multi") == ["multi"] * 3
    assert parse_encoder_layout(["intra", "multi"]) == ["intra", "multi"]
    with pytest.raises(ValueError, match="bad encoder block"):
        parse_encoder_layout("2intra-inter")


# ------------------------------------------------------------------ the detector
def test_registered_heads_and_init(single, multi):
    from detectron2.modeling import META_ARCH_REGISTRY

    assert META_ARCH_REGISTRY.get("SMCADETR") is SMCADETR
    assert META_ARCH_REGISTRY.get("MultiScaleSMCADETR") is MultiScaleSMCADETR
    for model in (single, multi):
        assert model.classification == "sigmoid" and model.test_topk == 100
        assert model.class_embed.out_features == model.num_classes  # no 92-way head
        assert torch.allclose(
            model.class_embed.bias, torch.full_like(model.class_embed.bias, -math.log(99))
        )
        assert [layer.out_features for layer in model.decoder.center_head.layers] == [256, 256, 2]
        for layer in model.decoder.layers:  # scales start at s = 1 despite DETR's xavier init
            assert (layer.modulation.scales.weight == 0).all() and (
                layer.modulation.scales.bias == 1
            ).all()
            assert layer.modulation.offsets.out_features == 2 * 8 * layer.num_levels
    assert single.strides == [32] and multi.strides == [16, 32, 64]
    assert [p.kernel_size for p in multi.neck.input_proj] == [(1, 1), (1, 1), (3, 3)]
    assert (
        multi.neck.input_proj[2].in_channels == multi.backbone.output_shape()["res5"].channels
    )  # raw C5
    assert multi.decoder.layers[0].scale_selection.out_features == 3


def _capture_modulation(model, batch):
    seen = {"modulation": [], "center": [], "bbox": [], "hs": []}
    hooks = [
        model.decoder.center_head.register_forward_hook(
            lambda m, a, out: seen["center"].append(out)
        ),
        model.bbox_embed.register_forward_hook(lambda m, a, out: seen["bbox"].append(out)),
        model.decoder.register_forward_hook(lambda m, a, out: seen["hs"].append(out[0])),
    ]
    for layer in model.decoder.layers:
        hooks.append(
            layer.modulation.register_forward_pre_hook(lambda m, a: seen["modulation"].append(a))
        )
    model.eval()
    with torch.no_grad():
        images, mask = model.preprocess_image(batch)
        out = model.compute_outputs(images, mask)
    for h in hooks:
        h.remove()
    return seen, out, images


@pytest.mark.parametrize("which", ["single", "multi"])
def test_centre_prior_from_layer0_in_unpadded_cells_and_box_head(which, single, multi):
    """The normalised centre is sigmoid(center_head(layers[0].prior_norm(query_pos))) for every
    layer; each level's size is the *unpadded* image size / stride; boxes are
    sigmoid(bbox_embed(h) + [centre logit, 0, 0]) in every layer. Tolerance 1e-5."""
    model = single if which == "single" else multi
    seen, out, images = _capture_modulation(model, padded_batch())
    query_pos = model.query_positions(2)
    with torch.no_grad():
        logits = model.decoder.center_head(model.decoder.layers[0].prior_norm(query_pos))
    assert torch.allclose(seen["center"][0], logits, atol=1e-5)
    strides = torch.tensor(model.strides, dtype=torch.float32)
    expected_sizes = (
        torch.tensor([[128.0, 96.0], [100.0, 80.0]])[:, None, :] / strides[None, :, None]
    )
    assert images.tensor.shape[-2:] == (96, 128)  # the second image is padded
    for _x, centers, level_sizes, shapes in seen["modulation"]:
        assert torch.allclose(centers, logits.sigmoid(), atol=1e-5)
        assert torch.allclose(level_sizes, expected_sizes, atol=1e-6)
        assert len(shapes) == len(model.strides)
    hs = seen["hs"][0]
    delta = seen["bbox"][0]
    boxes = torch.cat([delta[..., :2] + logits, delta[..., 2:]], -1).sigmoid()
    assert torch.allclose(out["pred_boxes"], boxes[-1], atol=1e-5)
    assert all(
        torch.allclose(a["pred_boxes"], b, atol=1e-5)
        for a, b in zip(out["aux_outputs"], boxes[:-1])
    )
    assert torch.allclose(out["pred_logits"], model.class_embed(hs[-1]), atol=1e-5)


@pytest.mark.parametrize("which", ["single", "multi"])
def test_synthetic_config_train_step_and_inference(which, single, multi):
    model = single if which == "single" else multi
    set_prediction_train_step(model, padded_batch())
    layer = model.decoder.layers[1]
    params = [
        model.class_embed.weight,
        model.backbone.stem.conv1.weight,
        model.decoder.center_head.layers[0].weight,
        layer.modulation.offsets.weight,
        layer.modulation.scales.weight,
        layer.prior_norm.weight,
    ]
    if which == "multi":
        params += [
            layer.scale_selection.weight,
            model.neck.level_embed,
            model.neck.input_proj[2].weight,
        ]
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.eval()
    x = image_input(96, 128, with_instances=False)
    x.update(height=192, width=256)
    with torch.no_grad():
        inst = model([x])[0]["instances"]
    assert inst.image_size == (192, 256) and len(inst) == 100
    assert (inst.pred_classes < model.num_classes).all() and (
        inst.scores[:-1] >= inst.scores[1:]
    ).all()
    assert inst.pred_boxes.tensor[:, 2].max() <= 256 and inst.pred_boxes.tensor[:, 3].max() <= 192


def test_single_scale_r50_config_trains_at_small_size():
    """The COCO config itself (R50, FrozenBN) with one encoder and one decoder layer."""
    model = build_tiny(
        "smca_detr/smca_r50_50ep", "model.encoder.num_layers=1", "model.decoder.num_layers=1"
    )
    set_prediction_train_step(model, [image_input(64, 96, [[8, 8, 40, 50]], [3], seed=2)])
    assert model.decoder.layers[0].modulation.offsets.weight.grad.abs().sum() > 0


def test_multi_scale_options_build_and_run():
    """Table 3's encoder layouts and "w/o SSA" are config options."""
    model = build_tiny(
        MULTI,
        "model.encoder.layout=3multi",
        "model.decoder.layer.scale_selection=False",
        "model.decoder.num_layers=1",
    )
    assert model.encoder.layout == ["multi"] * 3 and model.decoder.layers[0].scale_selection is None
    model.eval()
    with torch.no_grad():
        out = model.compute_outputs(*model.preprocess_image(padded_batch()))
    assert torch.isfinite(out["pred_boxes"]).all() and out["pred_logits"].shape == (2, 50, 6)
    with pytest.raises(ValueError, match="built for 1 feature levels"):
        build_tiny(MULTI, "model.decoder.layer.num_levels=1")


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", COCO_CONFIGS)
def test_coco_configs_follow_the_recipe(name):
    cfg = get_config(f"smca_detr/{name}")
    ms = "_ms_" in name
    epochs = 108 if "108" in name else 50
    assert cfg.dataloader.train.total_batch_size == 16
    assert (
        cfg.model.num_queries == 300 and cfg.model.num_classes == 80 and cfg.model.test_topk == 100
    )
    assert cfg.model.decoder.num_layers == 6
    assert cfg.model.decoder.layer.dim_feedforward == (1024 if ms else 2048)
    assert (
        cfg.model.decoder.layer.scale_type == "independent"
        and cfg.model.decoder.layer.multi_head_modulation
    )
    assert cfg.model.decoder.layer.beta == 8.0
    assert cfg.model.criterion.weight_dict == {
        "loss_class": 2.0,
        "loss_bbox": 5.0,
        "loss_giou": 2.0,
    }
    matcher = cfg.model.criterion.matcher
    costs = (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou, matcher.classification)
    assert costs == (2.0, 5.0, 2.0, "sigmoid")
    assert cfg.model.criterion.classification == "sigmoid"
    assert cfg.model.classification == "sigmoid"
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-4
    assert cfg.optimizer.params.lr_multipliers == {"backbone": 0.1}
    assert cfg.train.epochs == epochs and cfg.train.clip_grad.max_norm == 0.1
    assert cfg.lr_multiplier.num_updates == epochs
    assert list(cfg.lr_multiplier.milestones) == [40 if epochs == 50 else 86]
    if ms:
        assert parse_encoder_layout(cfg.model.encoder.layout) == [
            "intra",
            "intra",
            "multi",
            "intra",
            "intra",
        ]
        assert cfg.model.encoder.layer.dim_feedforward == 1024 and cfg.model.num_feature_levels == 3
    else:
        assert cfg.model.encoder.num_layers == 6 and cfg.model.encoder.layer.dim_feedforward == 2048
    model = instantiate(cfg.model)
    assert isinstance(model, MultiScaleSMCADETR if ms else SMCADETR)
    assert len(model.backbone.res4) == (23 if "r101" in name else 6)
    assert model.strides == ([16, 32, 64] if ms else [32])


# ------------------------------------------------------------------ official checkpoints
def _official_names(state_dict):
    """Our names → the released SMCA repository's (the inverse of the converter's table), with the
    head spread over 92 rows indexed by COCO id."""
    return to_official_detr_names(state_dict, OFFICIAL_NAMES, class_rows=92)


def test_official_converter_round_trip():
    model = build_tiny(
        "smca_detr/smca_r50_50ep", "model.encoder.num_layers=1", "model.decoder.num_layers=2"
    )
    reference = {
        k: torch.randn_like(v) if v.dtype.is_floating_point else v
        for k, v in model.state_dict().items()
    }
    official = _official_names(reference)
    assert "transformer.decoder.layers.0.point1.layers.2.weight" in official
    assert official["transformer.decoder.layers.1.point3.weight"].shape == (16, 256)
    assert official["class_embed.weight"].shape == (92, 256)
    official["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(0)
    converted = convert_checkpoint({"model": official}, "official", "smca")
    assert set(converted) == set(reference)
    for name, value in reference.items():
        assert torch.equal(converted[name], value), name
    incompatible = Checkpointer(model, strict=True)._load_model({"model": converted})
    assert (
        not incompatible.missing_keys
        and not incompatible.unexpected_keys
        and not incompatible.incorrect_shapes
    )

    # a type2 checkpoint (one scale per head) loads into scale_type="single"
    single_scale = build_tiny(
        "smca_detr/smca_r50_50ep",
        "model.encoder.num_layers=1",
        "model.decoder.num_layers=2",
        "model.decoder.layer.scale_type=single",
    )
    type2 = dict(official)
    for i in range(2):
        type2[f"transformer.decoder.layers.{i}.point3.weight"] = torch.randn(8, 256)
        type2[f"transformer.decoder.layers.{i}.point3.bias"] = torch.randn(8)
    Checkpointer(single_scale, strict=True)._load_model(
        {"model": convert_checkpoint(type2, "official", "smca")}
    )
    type4 = {**official, "transformer.decoder.layers.0.point3.weight": torch.randn(24, 256)}
    with pytest.raises(ValueError, match="type4"):
        convert_checkpoint(type4, "official", "smca")
    with pytest.raises(KeyError, match="not understood"):
        convert_checkpoint(
            {**official, "transformer.decoder.layers.1.point1.layers.0.weight": torch.zeros(1)},
            "official",
            "smca",
        )


def _official_class_rows_check(model, batch, weight, bias):
    """Per-class scores of the converted model = the official head's row of that class's COCO id:
    ours[..., c] = (h · W_off[COCO_THING_IDS[c]] + b_off[...]) for the decoder outputs h of every
    layer; every official row is random, so a wrong row mapping fails. Tolerance 1e-4."""
    from detr_variants.checkpoint import COCO_THING_IDS

    # a few ids written out, so that the test does not only check the list against itself
    assert len(COCO_THING_IDS) == 80 and COCO_THING_IDS[:3] == [1, 2, 3]
    assert COCO_THING_IDS[11] == 13 and COCO_THING_IDS[79] == 90 and 12 not in COCO_THING_IDS
    seen = []
    hook = model.decoder.register_forward_hook(lambda m, a, out: seen.append(out[0]))
    model.eval()
    with torch.no_grad():
        out = model.compute_outputs(*model.preprocess_image(batch))
    hook.remove()
    official = nn.functional.linear(seen[0], weight, bias)  # (layers, B, Q, 92)
    ours = torch.stack([a["pred_logits"] for a in out["aux_outputs"]] + [out["pred_logits"]])
    assert ours.shape[-1] == 80 and official.shape[-1] == 92
    for c, coco_id in enumerate(COCO_THING_IDS):
        assert torch.allclose(ours[..., c], official[..., coco_id], atol=1e-4), (c, coco_id)


def test_official_single_scale_class_rows_map_to_coco_ids():
    model = build_tiny(
        "smca_detr/smca_r50_50ep", "model.encoder.num_layers=1", "model.decoder.num_layers=1"
    )
    official = _official_names(model.state_dict())
    g = torch.Generator().manual_seed(5)
    official["class_embed.weight"] = torch.randn(92, 256, generator=g)
    official["class_embed.bias"] = torch.randn(92, generator=g)
    model.load_state_dict(convert_checkpoint(official, "official", "smca"))
    _official_class_rows_check(
        model,
        [image_input(64, 96, with_instances=False)],
        official["class_embed.weight"],
        official["class_embed.bias"],
    )


# ------------------------------------------------------------------ the released multi-scale model
RELEASED = "smca_detr/smca_ms_released_r50_50ep"


def released_official_state_dict(enc_layers, dec_layers, shared, kernel=7, seed=0):
    """The key names and shapes of a released multi-scale SMCA R50 (``Multi_scale_SMCA.zip``,
    ``models/detr.py`` and ``models/transformer*.py``), written from its module definitions with
    random values: torchvision ResNet-50 under ``backbone.0.body.``; ``input_proj_{512,1024,2048}``
    (1x1) and ``input_proj_2048_3`` (3x3 s2); ``transformer.level_embed`` (4, 256) and
    ``transformer.conv`` (3x3 s2); encoder layers with ``conv_1``, ``self_attn_{8,16,32,64}``
    (depthwise), ``high_to_low[_i]``/``low_to_high[_i]``, ``conv_2``, ``norm1/2``, ``linear1/2``;
    decoder layers with DETR's attention, ``norm1-4``, ``point2`` (64), ``point3`` (64), ``point4``
    (4) and, in layer 0, ``point1`` (MLP 256-256-256-2); ``class_embed`` with 92 rows."""
    import torchvision

    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for k, v in torchvision.models.resnet50().state_dict().items():
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):  # FrozenBN
            shapes["backbone.0.body." + k] = v.shape
    for name, cin, k in [
        ("512", 512, 1),
        ("1024", 1024, 1),
        ("2048", 2048, 1),
        ("2048_3", 2048, 3),
    ]:
        shapes[f"input_proj_{name}.weight"], shapes[f"input_proj_{name}.bias"] = (
            (256, cin, k, k),
            (256,),
        )
    shapes["transformer.level_embed"] = (4, 256)
    shapes["transformer.conv.weight"], shapes["transformer.conv.bias"] = (256, 256, 3, 3), (256,)
    depthwise = ["self_attn_8", "self_attn_16", "self_attn_32", "self_attn_64"]
    depthwise += (
        ["high_to_low", "low_to_high"]
        if shared
        else [f"{d}_{i}" for d in ("high_to_low", "low_to_high") for i in (1, 2, 3)]
    )
    for i in range(enc_layers):
        p = f"transformer.encoder.layers.{i}."
        for conv in depthwise:
            shapes[p + conv + ".weight"], shapes[p + conv + ".bias"] = (
                (256, 1, kernel, kernel),
                (256,),
            )
        for conv in ("conv_1", "conv_2"):
            shapes[p + conv + ".weight"], shapes[p + conv + ".bias"] = (256, 256, 1, 1), (256,)
        shapes.update({p + "linear1.weight": (1024, 256), p + "linear1.bias": (1024,)})
        shapes.update({p + "linear2.weight": (256, 1024), p + "linear2.bias": (256,)})
        for norm in ("norm1", "norm2"):
            shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (256,)
    for i in range(dec_layers):
        p = f"transformer.decoder.layers.{i}."
        for attn in ("self_attn", "multihead_attn"):
            shapes[p + attn + ".in_proj_weight"], shapes[p + attn + ".in_proj_bias"] = (
                (768, 256),
                (768,),
            )
            shapes[p + attn + ".out_proj.weight"] = (256, 256)
            shapes[p + attn + ".out_proj.bias"] = (256,)
        shapes.update({p + "linear1.weight": (1024, 256), p + "linear1.bias": (1024,)})
        shapes.update({p + "linear2.weight": (256, 1024), p + "linear2.bias": (256,)})
        for norm in ("norm1", "norm2", "norm3", "norm4"):
            shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (256,)
        for point, n in (("point2", 64), ("point3", 64), ("point4", 4)):
            shapes[p + point + ".weight"], shapes[p + point + ".bias"] = (n, 256), (n,)
        if i == 0:
            for j, n in enumerate((256, 256, 2)):
                shapes[p + f"point1.layers.{j}.weight"], shapes[p + f"point1.layers.{j}.bias"] = (
                    (n, 256),
                    (n,),
                )
    shapes["transformer.decoder.norm.weight"] = shapes["transformer.decoder.norm.bias"] = (256,)
    shapes["query_embed.weight"] = (300, 256)
    shapes["class_embed.weight"], shapes["class_embed.bias"] = (92, 256), (92,)
    for j, n in enumerate((256, 256, 4)):
        shapes[f"bbox_embed.layers.{j}.weight"], shapes[f"bbox_embed.layers.{j}.bias"] = (
            (n, 256),
            (n,),
        )
    state = {k: 0.05 * torch.randn(s, generator=g) for k, s in shapes.items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = torch.rand(shapes[k], generator=g) + 0.5
    return state


# released name → ours, written out (a spot check of the renaming, independent of the converter)
RELEASED_NAMES = {
    "input_proj_512.weight": "neck.input_proj.0.weight",
    "input_proj_1024.bias": "neck.input_proj.1.bias",
    "input_proj_2048.weight": "neck.input_proj.2.weight",
    "input_proj_2048_3.weight": "neck.input_proj.3.weight",
    "transformer.level_embed": "neck.level_embed",
    "transformer.conv.weight": "memory_downsample.weight",
    "transformer.encoder.layers.1.conv_1.weight": "encoder.layers.1.input_conv.weight",
    "transformer.encoder.layers.1.conv_2.bias": "encoder.layers.1.output_conv.bias",
    "transformer.encoder.layers.0.self_attn_8.weight": "encoder.layers.0.level_convs.0.weight",
    "transformer.encoder.layers.0.self_attn_32.weight": "encoder.layers.0.level_convs.2.weight",
    "transformer.encoder.layers.1.self_attn_64.bias": "encoder.layers.1.level_convs.3.bias",
    "transformer.encoder.layers.0.norm1.weight": "encoder.layers.0.norm.weight",
    "transformer.encoder.layers.0.norm2.weight": "encoder.layers.0.ffn.norm.weight",
    "transformer.encoder.layers.0.linear1.weight": "encoder.layers.0.ffn.linear1.weight",
    "transformer.decoder.layers.1.point4.weight": "decoder.layers.1.scale_selection.weight",
    "transformer.decoder.layers.1.point2.bias": "decoder.layers.1.modulation.offsets.bias",
    "transformer.decoder.layers.0.point3.weight": "decoder.layers.0.modulation.scales.weight",
    "transformer.decoder.layers.0.norm4.bias": "decoder.layers.0.prior_norm.bias",
    "transformer.decoder.layers.0.point1.layers.2.weight": "decoder.center_head.layers.2.weight",
    "transformer.decoder.layers.1.multihead_attn.in_proj_weight": (
        "decoder.layers.1.cross_attn.in_proj_weight"
    ),
    "transformer.decoder.norm.weight": "decoder.norm.weight",
}
SHARED_NAMES = {
    "transformer.encoder.layers.0.high_to_low.weight": "encoder.layers.0.down_convs.0.weight",
    "transformer.encoder.layers.1.low_to_high.bias": "encoder.layers.1.up_convs.0.bias",
}
PER_PAIR_NAMES = {
    "transformer.encoder.layers.0.high_to_low_1.weight": "encoder.layers.0.down_convs.0.weight",
    "transformer.encoder.layers.0.high_to_low_3.weight": "encoder.layers.0.down_convs.2.weight",
    "transformer.encoder.layers.1.low_to_high_2.bias": "encoder.layers.1.up_convs.1.bias",
}


@pytest.mark.parametrize("shared", [True, False])
def test_released_converter_covers_every_key_and_maps_class_rows(shared):
    """Every key of a released checkpoint (names and shapes as in the release; 2 encoder and 2
    decoder layers) converts and loads strictly; named keys land where the table says (tolerance
    0); the class scores follow the COCO ids; unknown keys raise."""
    overrides = ["model.encoder.num_layers=2", "model.decoder.num_layers=2"]
    if not shared:
        overrides += ["model.encoder.layer.shared_cross_scale=False"]
    model = build_tiny(RELEASED, *overrides)
    official = released_official_state_dict(2, 2, shared)
    counter = {
        "backbone.0.body.bn1.num_batches_tracked": torch.tensor(0)
    }  # a trained BN's, dropped
    converted = convert_checkpoint(
        {"model": {**official, **counter}}, "official", "smca_ms_released"
    )
    assert set(converted) == set(model.state_dict())
    incompatible = Checkpointer(model, strict=True)._load_model({"model": converted})
    assert not (
        incompatible.missing_keys or incompatible.unexpected_keys or incompatible.incorrect_shapes
    )
    for theirs, ours in {**RELEASED_NAMES, **(SHARED_NAMES if shared else PER_PAIR_NAMES)}.items():
        assert torch.equal(converted[ours], official[theirs]), theirs
    _official_class_rows_check(
        model,
        [image_input(64, 96, with_instances=False)],
        official["class_embed.weight"],
        official["class_embed.bias"],
    )
    with pytest.raises(KeyError, match="not understood"):
        convert_checkpoint(
            {**official, "transformer.encoder.layers.0.self_attn_128.weight": torch.zeros(1)},
            "official",
            "smca_ms_released",
        )


@pytest.fixture(scope="module")
def released():
    return build_tiny(
        RELEASED,
        "model.backbone.depth=18",
        "model.encoder.num_layers=1",
        "model.decoder.num_layers=2",
        "model.num_queries=20",
    )


def _released_capture(model, batch):
    seen = {"encoder": [], "decoder": [], "modulation": [], "selection": []}
    hooks = [
        model.encoder.register_forward_hook(lambda m, a, out: seen["encoder"].append(out)),
        model.decoder.register_forward_pre_hook(
            lambda m, a, kw: seen["decoder"].append((a, kw)), with_kwargs=True
        ),
    ]
    for layer in model.decoder.layers:
        hooks.append(
            layer.modulation.register_forward_pre_hook(lambda m, a: seen["modulation"].append(a))
        )
        hooks.append(
            layer.scale_selection.register_forward_hook(
                lambda m, a, out: seen["selection"].append(out)
            )
        )
    model.eval()
    with torch.no_grad():
        out = model.compute_outputs(*model.preprocess_image(batch))
    for h in hooks:
        h.remove()
    return seen, out


def test_released_decoder_levels_strides_and_distance_factors(released):
    """The decoder reads [conv(C3 memory), C4, C5, P6] at strides 16, 16, 32, 64: the first level
    is memory_downsample of the stride-8 memory with C4's shape, padding mask and position
    encoding (tolerance 0); Gaussian centres in each level's unpadded cells (image size / stride,
    tolerance 1e-6) and distance factors 0.5, 0.5, 1, 2."""
    model = released
    assert model.strides == [16, 16, 32, 64] and model.neck.strides == [8, 16, 32, 64]
    assert model.neck.extra_mask_source == "previous"
    for layer in model.decoder.layers:
        assert layer.modulation.level_distance_factors == [0.5, 0.5, 1.0, 2.0]
        assert layer.num_levels == 4 and layer.scale_selection.out_features == 4
    batch = padded_batch()
    seen, _ = _released_capture(model, batch)
    memory_levels = seen["encoder"][0]
    assert [tuple(m.shape[-2:]) for m in memory_levels] == [(12, 16), (6, 8), (3, 4), (2, 2)]
    args, kwargs = seen["decoder"][0]
    _, memory, _, pos, _, shapes = args
    mask = kwargs["memory_key_padding_mask"]
    assert list(shapes) == [(6, 8), (6, 8), (3, 4), (2, 2)]
    n = 6 * 8
    with torch.no_grad():
        down = model.memory_downsample(memory_levels[0]).flatten(2).transpose(1, 2)
    assert torch.equal(memory[:, :n], down)
    assert torch.equal(memory[:, n : 2 * n], memory_levels[1].flatten(2).transpose(1, 2))
    assert torch.equal(pos[:, :n], pos[:, n : 2 * n])
    with torch.no_grad():
        images, padding = model.preprocess_image(batch)
        _, masks, level_pos = model.multi_level_features(images, padding)
    assert torch.equal(pos[:, n : 2 * n], level_pos[1].flatten(2).transpose(1, 2))
    assert torch.equal(mask[:, :n], mask[:, n : 2 * n])
    assert torch.equal(mask[:, :n], masks[1].flatten(1)) and mask[1].any()
    expected = (
        torch.tensor([[128.0, 96.0], [100.0, 80.0]])[:, None]
        / torch.tensor([16.0, 16.0, 32.0, 64.0])[None, :, None]
    )
    for args in seen["modulation"]:
        assert torch.allclose(args[2], expected, atol=1e-6)


def test_released_scale_selection_is_per_image(released):
    """Two same-size images in one batch give each image's own outputs (a softmax over the 4
    levels per query and per image; the release reads image 0's weights for all): tolerance 1e-5.
    The two images' weights do differ, so the test would see image 0's being reused."""
    a = image_input(64, 96, with_instances=False, seed=3)
    b = image_input(64, 96, with_instances=False, seed=4)
    seen, both = _released_capture(released, [a, b])
    weights = seen["selection"][1].softmax(-1)  # layer 1: its input depends on the image
    assert weights.shape == (2, 20, 4)
    assert (weights[0] - weights[1]).abs().max() > 1e-3
    _, alone_a = _released_capture(released, [a])
    _, alone_b = _released_capture(released, [b])
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(both[key][0], alone_a[key][0], atol=1e-5)
        assert torch.allclose(both[key][1], alone_b[key][0], atol=1e-5)


def test_cross_scale_conv_encoder_exchanges_only_between_adjacent_levels():
    """One layer: level l's output depends on levels l-1, l, l+1 only (perturbing level 2 changes
    levels 1-3, not level 0; tolerance 0 for unchanged); shared or per-pair cross-scale convs."""
    from detr_variants.layers.smca_conv_encoder import CrossScaleConvEncoderLayer

    torch.manual_seed(6)
    layer = CrossScaleConvEncoderLayer(d_model=32, num_levels=4, dim_feedforward=64, dropout=0.0)
    assert len(layer.down_convs) == len(layer.up_convs) == 3
    assert layer.level_convs[0].groups == 32 and layer.down_convs[0].stride == (2, 2)
    shared = CrossScaleConvEncoderLayer(
        d_model=32, num_levels=4, kernel_size=7, shared_cross_scale=True
    )
    assert len(shared.down_convs) == 1 and shared.down_convs[0].kernel_size == (7, 7)
    sizes = [(12, 10), (6, 5), (3, 3), (2, 2)]
    srcs = [torch.randn(1, 32, h, w) for h, w in sizes]
    pos = [torch.randn(1, 32, h, w) for h, w in sizes]
    layer.eval()
    with torch.no_grad():
        out = layer(srcs, pos)
        poked = list(srcs)
        poked[2] = poked[2] + 1.0
        out2 = layer(poked, pos)
    assert torch.equal(out[0], out2[0])
    assert all((out[i] - out2[i]).abs().max() > 1e-3 for i in (1, 2, 3))
    with pytest.raises(ValueError, match="stride-2 conv"):
        layer(
            srcs[:1] + [torch.randn(1, 32, 7, 5)] + srcs[2:],
            pos[:1] + [torch.randn(1, 32, 7, 5)] + pos[2:],
        )


def test_released_train_step_reaches_every_new_part(released):
    set_prediction_train_step(released, padded_batch())
    layer = released.encoder.layers[0]
    params = [
        released.memory_downsample.weight,
        released.neck.input_proj[3].weight,
        released.neck.level_embed,
        layer.input_conv.weight,
        layer.level_convs[3].weight,
        layer.down_convs[0].weight,
        layer.up_convs[0].weight,
        released.decoder.layers[1].scale_selection.weight,
    ]
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "depth,shared,log_parameters", [(50, True, 40763514), (101, False, 60010618)]
)
def test_released_configs_match_the_released_runs(depth, shared, log_parameters):
    """The recipe of the released commands, and the trainable parameters with the released 92-row
    class head equal the n_parameters of the released logs (R50 44.4 AP, R101 45.7 AP)."""
    name = f"smca_detr/smca_ms_released_r{depth}_50ep"
    cfg = get_config(name)
    assert cfg.dataloader.train.total_batch_size == 8
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-4
    assert cfg.optimizer.params.lr_multipliers == {"backbone": 0.1}
    assert cfg.train.epochs == 50 and cfg.train.clip_grad.max_norm == 0.1
    assert list(cfg.lr_multiplier.milestones) == [40]
    assert cfg.model.num_queries == 300 and cfg.model.encoder.num_layers == 6
    assert cfg.model.encoder.layer.kernel_size == 7
    assert cfg.model.encoder.layer.shared_cross_scale == shared
    model = instantiate(cfg.model)
    assert isinstance(model, ReleasedMultiScaleSMCADETR)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable + 12 * (256 + 1) == log_parameters  # the 12 unused COCO-id rows of 92
