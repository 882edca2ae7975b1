"""SMCA: the Gaussian prior, the modulated co-attention, scale selection, the multi-scale encoder,
the box head, configs and the official converter."""

import math

import pytest
import torch
from detectron2.config import instantiate
from torch import nn

from detr_variants.checkpoint import Checkpointer, convert_checkpoint
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
from detr_variants.modeling.meta_arch.smca_detr import SMCADETR, MultiScaleSMCADETR
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
    assert [p.kernel_size for p in multi.input_proj] == [(1, 1), (1, 1), (3, 3)]
    assert (
        multi.input_proj[2].in_channels == multi.backbone.output_shape()["res5"].channels
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
        params += [layer.scale_selection.weight, model.level_embed, model.input_proj[2].weight]
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
    """Our names → the released SMCA repository's (the inverse of the converter), with the head
    spread over 92 rows indexed by COCO id."""
    rules = [
        (r"^encoder\.layers\.(\d+)\.norm\.", r"transformer.encoder.layers.\1.norm1."),
        (r"^encoder\.layers\.(\d+)\.ffn\.norm\.", r"transformer.encoder.layers.\1.norm2."),
        (r"^(encoder|decoder)\.layers\.(\d+)\.ffn\.linear", r"transformer.\1.layers.\2.linear"),
        (r"^decoder\.layers\.(\d+)\.ffn\.norm\.", r"transformer.decoder.layers.\1.norm3."),
        (r"^decoder\.layers\.(\d+)\.prior_norm\.", r"transformer.decoder.layers.\1.norm4."),
        (
            r"^decoder\.layers\.(\d+)\.cross_attn\.",
            r"transformer.decoder.layers.\1.multihead_attn.",
        ),
        (
            r"^decoder\.layers\.(\d+)\.modulation\.offsets\.",
            r"transformer.decoder.layers.\1.point2.",
        ),
        (
            r"^decoder\.layers\.(\d+)\.modulation\.scales\.",
            r"transformer.decoder.layers.\1.point3.",
        ),
        (r"^decoder\.center_head\.", "transformer.decoder.layers.0.point1."),
        (r"^(encoder|decoder)\.", r"transformer.\1."),
    ]
    return to_official_detr_names(state_dict, rules, class_rows=92)


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
