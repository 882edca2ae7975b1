"""Conditional DETR: numerical equivalence with HF transformers, converters, configs, decoder details."""

import math

import pytest
import torch
from detectron2.config import instantiate
from detectron2.structures import ImageList
from torch import nn

from detr_variants.checkpoint import COCO_THING_IDS, Checkpointer, convert_checkpoint
from detr_variants.checkpoint.hf_resnet import hf_backbone_name, hf_resnet_name
from detr_variants.layers import PositionEmbeddingSine, TransformerEncoder, TransformerEncoderLayer
from detr_variants.layers.conditional_attention import (
    ConditionalDecoder,
    ConditionalDecoderLayer,
    PreprojectedAttention,
    concat_per_head,
)
from detr_variants.model_zoo import get_config
from detr_variants.modeling import HungarianMatcher, SetCriterion, make_resnet
from detr_variants.modeling.meta_arch.conditional_detr import ConditionalDETR
from helpers import (
    assert_class_scores_follow_official_rows,
    build_tiny,
    distinguishable_class_head,
    image_input,
    linear_shapes,
    norm_shapes,
    official_coco_rows,
    official_detr_layout_shapes,
    official_r18_state_dict,
    randomise_,
    set_prediction_train_step,
    small_hf_detr_config,
)

SYNTHETIC = "conditional_detr/conditional_detr_r18_synthetic"
COCO_CONFIGS = [
    "conditional_detr_r50_50ep",
    "conditional_detr_dc5_r50_50ep",
    "conditional_detr_r101_50ep",
    "conditional_detr_dc5_r101_50ep",
]


@pytest.fixture(scope="module")
def model():
    return build_tiny(SYNTHETIC)


def official_sine(points):
    """The official ``gen_sineembed_for_position`` for 256-d models, written out: 128 frequencies
    per coordinate, T = 10000, scale 2π, interleaved sin/cos, output cat(pos_y, pos_x)."""
    dim_t = torch.arange(128, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / 128)
    pos_x = points[..., 0, None] * 2 * math.pi / dim_t
    pos_y = points[..., 1, None] * 2 * math.pi / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(-2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((pos_y, pos_x), dim=-1)


# ------------------------------------------------------------------ model structure and configs
def test_registered_heads_and_init(model):
    from detectron2.modeling import META_ARCH_REGISTRY

    assert META_ARCH_REGISTRY.get("ConditionalDETR") is ConditionalDETR
    assert model.classification == "sigmoid" and model.test_topk == 100
    assert model.class_embed.out_features == model.num_classes  # sigmoid: no no-object class
    assert torch.allclose(
        model.class_embed.bias, torch.full_like(model.class_embed.bias, -math.log(99))
    )
    assert (
        model.bbox_embed.layers[-1].weight.abs().sum() == 0
        and model.bbox_embed.layers[-1].bias.abs().sum() == 0
    )
    assert isinstance(model.input_proj, nn.Conv2d) and model.input_proj.kernel_size == (1, 1)
    layers = model.decoder.layers
    assert layers[0].ca_qpos_proj is not None
    assert all(layer.ca_qpos_proj is None for layer in layers[1:])
    assert not any("layers.1.ca_qpos_proj" in k for k in model.state_dict())
    assert model.decoder.ref_point_head.layers[-1].out_features == 2
    assert model.criterion.matcher.classification == model.criterion.classification == "sigmoid"


@pytest.mark.parametrize("name", COCO_CONFIGS)
def test_coco_configs_follow_the_official_recipe(name):
    cfg = get_config(f"conditional_detr/{name}")
    dc5 = "dc5" in name
    assert cfg.dataloader.train.total_batch_size == (8 if dc5 else 16)
    assert cfg.model.num_queries == 300 and cfg.model.num_classes == 80
    assert cfg.model.decoder.num_layers == 6 and cfg.model.encoder.num_layers == 6
    assert cfg.model.decoder.layer.dim_feedforward == 2048
    assert cfg.model.criterion.weight_dict == {
        "loss_class": 2.0,
        "loss_bbox": 5.0,
        "loss_giou": 2.0,
    }
    assert (
        cfg.model.criterion.matcher.cost_class,
        cfg.model.criterion.matcher.cost_bbox,
        cfg.model.criterion.matcher.cost_giou,
    ) == (2.0, 5.0, 2.0)
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-4
    assert cfg.optimizer.params.lr_multipliers == {"backbone": 0.1}
    assert cfg.train.epochs == 50 and cfg.train.clip_grad.max_norm == 0.1
    assert list(cfg.lr_multiplier.milestones) == [40] and cfg.lr_multiplier.num_updates == 50
    model = instantiate(cfg.model)
    assert model.backbone.output_shape()["res5"].stride == (16 if dc5 else 32)
    assert len(model.backbone.res4) == (23 if "r101" in name else 6)


def test_train_step_gives_finite_losses_and_gradients(model):
    batch = [
        image_input(96, 128, [[10, 10, 60, 50], [30, 40, 90, 90]], [1, 4], seed=0),
        image_input(80, 100, [], [], seed=1),
    ]  # an image without objects
    set_prediction_train_step(model, batch)
    decoder = model.decoder
    for p in (
        model.class_embed.weight,
        model.backbone.stem.conv1.weight,
        decoder.ref_point_head.layers[0].weight,
        decoder.query_scale.layers[0].weight,
        decoder.layers[0].ca_qpos_proj.weight,
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_eval_returns_top100_instances_in_original_coordinates(model):
    model.eval()
    x = image_input(96, 128, with_instances=False)
    x.update(height=192, width=256)
    with torch.no_grad():
        out = model([x])[0]["instances"]
    assert out.image_size == (192, 256) and len(out) == 100
    assert out.pred_boxes.tensor[:, 2].max() <= 256 and out.pred_boxes.tensor[:, 3].max() <= 192
    assert (out.pred_classes < model.num_classes).all()
    assert ((out.scores >= 0) & (out.scores <= 1)).all() and (
        out.scores[:-1] >= out.scores[1:]
    ).all()


# ------------------------------------------------------------------ conditional spatial query / attention
def _capture(model, image):
    """Inputs of every decoder layer and of its cross-attention, plus each layer's raw output."""
    seen = {"layer": [], "out": [], "cross": [], "ca_q_in": []}
    hooks = []
    for layer in model.decoder.layers:
        hooks.append(
            layer.register_forward_pre_hook(
                lambda m, a, kw: seen["layer"].append({**dict(zip(("tgt", "memory"), a)), **kw}),
                with_kwargs=True,
            )
        )
        hooks.append(layer.register_forward_hook(lambda m, a, out: seen["out"].append(out)))
        hooks.append(
            layer.cross_attn.register_forward_pre_hook(
                lambda m, a, kw: seen["cross"].append((a, kw)), with_kwargs=True
            )
        )
        hooks.append(
            layer.ca_qcontent_proj.register_forward_pre_hook(
                lambda m, a: seen["ca_q_in"].append(a[0])
            )
        )
    model.eval()
    with torch.no_grad():
        model([image])
    for h in hooks:
        h.remove()
    return seen


def test_spatial_query_is_sine_of_fixed_reference_scaled_by_query_scale(model):
    """Layer 0: λ_q = 1, so the spatial query is the plain (y, x) sine embedding of s; layer l > 0:
    λ_q = query_scale(raw output of layer l-1). Tolerance 1e-5 (float32 recomputation)."""
    seen = _capture(model, image_input(64, 96, with_instances=False))
    query_pos = seen["layer"][0]["query_pos"]
    s = model.decoder.ref_point_head(query_pos).sigmoid()
    with torch.no_grad():
        plain = official_sine(s)
        assert torch.allclose(seen["layer"][0]["query_sine_embed"], plain, atol=1e-5)
        for i in range(1, len(model.decoder.layers)):
            expected = plain * model.decoder.query_scale(seen["out"][i - 1])
            assert torch.allclose(seen["layer"][i]["query_sine_embed"], expected, atol=1e-5)
            assert (
                seen["layer"][i]["query_pos"] is query_pos
            )  # the reference point is never refined


def test_cross_attention_concatenates_content_and_spatial_per_head(model):
    """q/k per head = [content (d/H) | spatial (d/H)] → 2d/H wide, values d/H; positional q/k only
    added in layer 0. Tolerance 1e-5."""
    seen = _capture(model, image_input(64, 96, with_instances=False))
    d, h = 256, 8
    with torch.no_grad():
        for i, layer in enumerate(model.decoder.layers):
            (q, k, v), kw = seen["cross"][i]
            b, nq, ns = q.shape[0], q.shape[1], k.shape[1]
            assert q.shape == (b, nq, 2 * d) and k.shape == (b, ns, 2 * d) and v.shape == (b, ns, d)
            assert (
                layer.cross_attn.head_dim == 2 * d // h
                and layer.cross_attn.value_dim // h == d // h
            )
            assert layer.cross_attn.scaling == pytest.approx((2 * d / h) ** -0.5)
            inputs = seen["layer"][i]
            q_content = layer.ca_qcontent_proj(seen["ca_q_in"][i])
            k_content = layer.ca_kcontent_proj(inputs["memory"])
            k_pos = layer.ca_kpos_proj(inputs["pos"])
            if i == 0:
                q_content = q_content + layer.ca_qpos_proj(inputs["query_pos"])
                k_content = k_content + k_pos
            q_heads, k_heads = q.view(b, nq, h, 2 * d // h), k.view(b, ns, h, 2 * d // h)
            assert torch.allclose(q_heads[..., : d // h], q_content.view(b, nq, h, -1), atol=1e-5)
            spatial = layer.ca_qpos_sine_proj(inputs["query_sine_embed"])
            assert torch.allclose(q_heads[..., d // h :], spatial.view(b, nq, h, -1), atol=1e-5)
            assert torch.allclose(k_heads[..., : d // h], k_content.view(b, ns, h, -1), atol=1e-5)
            assert torch.allclose(k_heads[..., d // h :], k_pos.view(b, ns, h, -1), atol=1e-5)


def test_preprojected_attention_matches_explicit_formula():
    """softmax(q_h k_hᵀ · (E/H)^-½ masked) v_h → out_proj; tolerance 1e-5."""
    torch.manual_seed(0)
    attn = PreprojectedAttention(16, 2, value_dim=8).eval()
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 8)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    logits = torch.einsum("bqhe,bshe->bhqs", q.view(2, 3, 2, 8), k.view(2, 5, 2, 8)) * 8**-0.5
    weights = logits.masked_fill(mask[:, None, None], float("-inf")).softmax(-1)
    expected = attn.out_proj(
        torch.einsum("bhqs,bshe->bqhe", weights, v.view(2, 5, 2, 4)).reshape(2, 3, 8)
    )
    assert torch.allclose(attn(q, k, v, key_padding_mask=mask), expected, atol=1e-5)
    content, spatial = torch.arange(8.0).view(1, 8), -torch.arange(8.0).view(1, 8)
    assert concat_per_head(content, spatial, 2).tolist() == [
        [0, 1, 2, 3, -0, -1, -2, -3, 4, 5, 6, 7, -4, -5, -6, -7]
    ]


# ------------------------------------------------------------------ HF transformers equivalence
D, HEADS, FFN, QUERIES, LABELS = 64, 4, 128, 12, 6


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    config = small_hf_detr_config(
        transformers.ConditionalDetrConfig,
        d_model=D,
        heads=HEADS,
        ffn=FFN,
        queries=QUERIES,
        num_labels=LABELS,
    )
    torch.manual_seed(0)
    model = transformers.ConditionalDetrForObjectDetection(config).eval()
    with torch.no_grad():
        randomise_(model.state_dict())
    return model


def ours_like_hf(num_classes=LABELS):
    """Our ConditionalDETR with the HF test model's hyper-parameters (R18 = HF basic [2,2,2,2])."""
    return ConditionalDETR(
        backbone=make_resnet(depth=18, norm="FrozenBN", freeze_at=0),
        encoder=TransformerEncoder(TransformerEncoderLayer(D, HEADS, FFN), 2),
        decoder=ConditionalDecoder(ConditionalDecoderLayer(D, HEADS, FFN), 3, norm=nn.LayerNorm(D)),
        position_embedding=PositionEmbeddingSine(D // 2, normalize=True),
        num_queries=QUERIES,
        hidden_dim=D,
        num_classes=num_classes,
        criterion=SetCriterion(
            num_classes=num_classes,
            matcher=HungarianMatcher(classification="sigmoid"),
            weight_dict={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        ),
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    ).eval()


def load_strict(model, state_dict):
    """Loads through detectron2's checkpointer; shape mismatches or missing keys raise."""
    incompatible = Checkpointer(model, strict=True)._load_model({"model": dict(state_dict)})
    assert (
        not incompatible.missing_keys
        and not incompatible.unexpected_keys
        and not incompatible.incorrect_shapes
    )
    return model


def test_matches_hf_transformers_on_a_padded_batch(hf_model):
    """Same weights, same normalised padded pixels and mask: logits and boxes agree to 1e-4 (abs)."""
    ours = load_strict(
        ours_like_hf(), convert_checkpoint(hf_model.state_dict(), "hf", "conditional_detr")
    )
    g = torch.Generator().manual_seed(2)
    sizes = [(96, 160), (128, 100)]  # two shapes: each image has padding on a different side
    pixels = torch.zeros(2, 3, 128, 160)
    padding = torch.ones(2, 128, 160, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        pixels[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        padding[i, :h, :w] = False
    with torch.no_grad():
        theirs = hf_model(pixel_values=pixels, pixel_mask=(~padding).long())
        mine = ours.compute_outputs(ImageList(pixels, sizes), padding)
        unmasked = ours.compute_outputs(ImageList(pixels, sizes), torch.zeros_like(padding))
    assert theirs.pred_boxes.std() > 0.05 and theirs.logits.std() > 0.1  # non-trivial outputs
    assert torch.allclose(mine["pred_logits"], theirs.logits, atol=1e-4, rtol=0)
    assert torch.allclose(mine["pred_boxes"], theirs.pred_boxes, atol=1e-4, rtol=0)
    assert (
        unmasked["pred_logits"] - theirs.logits
    ).abs().max() > 1e-2  # the padding mask matters here


def _legacy_hf_names(state_dict):
    """transformers <= 4.x names (the hub checkpoints' layout) from the current ones."""
    import re

    renames = [
        (r"^model\.backbone\.model\.", "model.backbone.conv_encoder.model."),
        (r"\.o_proj\.", ".out_proj."),
        (r"\.mlp\.fc", ".fc"),
    ]
    for ours, hf in [
        ("qcontent", "q_content"),
        ("qpos", "q_pos"),
        ("kcontent", "k_content"),
        ("kpos", "k_pos"),
        ("v", "v"),
        ("qpos_sine", "q_pos_sine"),
    ]:
        renames.append(
            (
                rf"decoder\.layers\.(\d+)\.self_attn\.{hf}_proj\.",
                rf"decoder.layers.\1.sa_{ours}_proj.",
            )
        )
        renames.append(
            (
                rf"decoder\.layers\.(\d+)\.encoder_attn\.{hf}_proj\.",
                rf"decoder.layers.\1.ca_{ours}_proj.",
            )
        )
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def test_hf_converter_reads_legacy_names_and_coco_heads(hf_model):
    sd = hf_model.state_dict()
    current = convert_checkpoint(sd, "hf", "conditional_detr")
    legacy_sd = _legacy_hf_names(sd)
    assert "model.decoder.layers.0.sa_qcontent_proj.weight" in legacy_sd
    legacy = convert_checkpoint(legacy_sd, "hf", "conditional_detr")
    assert current.keys() == legacy.keys() and all(
        torch.equal(current[k], legacy[k]) for k in current
    )

    # The hub's COCO head: 91 labels indexed by COCO id → detectron2's 80 contiguous classes.
    coco = dict(sd)
    coco["class_labels_classifier.weight"] = torch.arange(91.0)[:, None].repeat(1, D)
    coco["class_labels_classifier.bias"] = torch.arange(91.0)
    out = convert_checkpoint(coco, "hf", "conditional_detr")
    assert out["class_embed.bias"].tolist() == [float(i) for i in COCO_THING_IDS]
    assert out["class_embed.weight"][:, 0].tolist() == [float(i) for i in COCO_THING_IDS]
    load_strict(ours_like_hf(num_classes=80), out)
    with pytest.raises(KeyError, match="not understood"):
        convert_checkpoint(
            {**sd, "model.something_else.weight": torch.zeros(1)}, "hf", "conditional_detr"
        )


def test_hf_converter_maps_every_class_row_by_coco_id(hf_model):
    """A distinguishable 91-label hub head: our class c scores (logit and sigmoid, to 1e-5) as HF
    label COCO id(c)."""
    sd = dict(hf_model.state_dict())
    weight, bias = distinguishable_class_head(D, 91)
    sd["class_labels_classifier.weight"], sd["class_labels_classifier.bias"] = weight, bias
    model = load_strict(
        ours_like_hf(num_classes=80), convert_checkpoint(sd, "hf", "conditional_detr")
    )
    assert_class_scores_follow_official_rows(model, weight, bias, official_coco_rows(), "sigmoid")


def test_hf_resnet_names_and_computation_match_detectron2_resnet50():
    """Every HF ResNet-50 backbone name maps to a distinct detectron2 name, and the two compute the
    same res5 (bottleneck stride placement, stem max-pool, eval BatchNorm) to 1e-4 in float64."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.ResNetBackbone(transformers.ResNetConfig(out_features=["stage4"])).eval()
    with torch.no_grad():
        randomise_(hf.state_dict())
    hf_sd = {k: v for k, v in hf.state_dict().items() if not k.endswith("num_batches_tracked")}
    mapped = {hf_resnet_name(k): v for k, v in hf_sd.items()}
    d2 = make_resnet(depth=50, norm="FrozenBN", freeze_at=0).eval()
    assert None not in mapped and len(mapped) == len(hf_sd)
    assert set(mapped) == set(d2.state_dict())
    assert all(
        hf_backbone_name("model.backbone.model." + k) == "backbone." + hf_resnet_name(k)
        for k in hf_sd
    )  # under the HF DETR-family backbone's prefix
    d2.load_state_dict(mapped)
    # float64: with random BatchNorm statistics res5 reaches 5e4, and make_resnet folds
    # the frozen BatchNorm into the convolutions, so float32 rounding would differ by ~0.1
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        expected = hf.double()(x).feature_maps[-1]
        assert torch.allclose(d2.double()(x)["res5"], expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ official checkpoints
def official_state_dict(d=256, ffn=1024, enc=3, dec=3, queries=50, classes=91):
    """An official-layout state dict (names written out as in Atten4Vis/ConditionalDETR) for an R18
    model, from random tensors of the official shapes."""
    shapes = official_detr_layout_shapes(d, ffn, enc, queries, classes)
    heads = {"query_scale.layers.0": d, "query_scale.layers.1": d}
    heads |= {"ref_point_head.layers.0": d, "ref_point_head.layers.1": 2}
    for name, out in heads.items():  # the MLPs of the conditional spatial query
        shapes.update(linear_shapes(f"transformer.decoder.{name}", d, out))
    for i in range(dec):
        p = f"transformer.decoder.layers.{i}"
        projections = [
            "sa_qcontent_proj",
            "sa_qpos_proj",
            "sa_kcontent_proj",
            "sa_kpos_proj",
            "sa_v_proj",
            "ca_qcontent_proj",
            "ca_kcontent_proj",
            "ca_kpos_proj",
            "ca_v_proj",
            "ca_qpos_sine_proj",
            "self_attn.out_proj",
            "cross_attn.out_proj",
        ] + (["ca_qpos_proj"] if i == 0 else [])
        for name in projections:
            shapes.update(linear_shapes(f"{p}.{name}", d, d))
        shapes.update(
            {**linear_shapes(f"{p}.linear1", d, ffn), **linear_shapes(f"{p}.linear2", ffn, d)}
        )
        for n in (1, 2, 3):
            shapes.update(norm_shapes(f"{p}.norm{n}", d))
    sd = official_r18_state_dict(shapes, batch_counters=False, fan_in_scaled=False)
    sd["class_embed.bias"] = torch.arange(float(classes))
    return sd


def test_official_converter_loads_without_missing_or_unexpected_keys():
    official = official_state_dict()
    converted = convert_checkpoint({"model": official}, "official", "conditional_detr")
    model = load_strict(
        build_tiny(SYNTHETIC, "model.backbone.norm=FrozenBN", "model.num_classes=80"), converted
    )
    assert model.class_embed.bias.tolist() == [
        float(i) for i in COCO_THING_IDS
    ]  # 91 COCO ids → 80 rows
    assert torch.equal(
        model.decoder.layers[0].ca_qpos_proj.weight,
        official["transformer.decoder.layers.0.ca_qpos_proj.weight"],
    )
    assert torch.equal(
        model.encoder.layers[2].ffn.norm.weight,
        official["transformer.encoder.layers.2.norm2.weight"],
    )
    assert torch.equal(
        model.backbone.res3[0].shortcut.norm.running_var,
        official["backbone.0.body.layer2.0.downsample.1.running_var"],
    )
    # A head trained for another class count is kept as it is.
    custom = convert_checkpoint(official_state_dict(classes=6), "official", "conditional_detr")
    load_strict(build_tiny(SYNTHETIC, "model.backbone.norm=FrozenBN"), custom)


def test_official_converter_maps_every_class_row_by_coco_id():
    """A distinguishable 91-row official head: our class c scores (logit and sigmoid, to 1e-5) as
    official row COCO id(c); the same check fails for a head that takes the first 80 rows."""
    official = official_state_dict()
    weight, bias = distinguishable_class_head(256, 91)
    official["class_embed.weight"], official["class_embed.bias"] = weight, bias
    converted = convert_checkpoint(official, "official", "conditional_detr")
    model = build_tiny(SYNTHETIC, "model.backbone.norm=FrozenBN", "model.num_classes=80")
    load_strict(model, converted)
    assert_class_scores_follow_official_rows(model, weight, bias, official_coco_rows(), "sigmoid")

    naive = dict(converted, **{"class_embed.weight": weight[:80], "class_embed.bias": bias[:80]})
    load_strict(model, naive)
    with pytest.raises(AssertionError):
        assert_class_scores_follow_official_rows(
            model, weight, bias, official_coco_rows(), "sigmoid"
        )
