"""DETR: model behaviour, configs, HF ``DetrForObjectDetection`` equivalence, converters."""

import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from detectron2.structures import ImageList
from torch import nn

from detr_variants.checkpoint import Checkpointer, convert_checkpoint
from detr_variants.checkpoint.convert import class_head_rows
from detr_variants.checkpoint.detr import convert_official
from detr_variants.layers import (
    PositionEmbeddingSine,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from detr_variants.model_zoo import get_config
from detr_variants.modeling import DETR, HungarianMatcher, SetCriterion, make_resnet
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


class PatchBackbone(Backbone):
    """Non-overlapping 32x32 patches: unlike a ResNet, blind to padding beyond the image."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 64, kernel_size=32, stride=32)

    def forward(self, x):
        return {"res5": self.proj(x)}

    def output_shape(self):
        return {"res5": ShapeSpec(channels=64, stride=32)}


TWO_LAYERS = ("model.encoder.num_layers=2", "model.decoder.num_layers=2")


@pytest.fixture(scope="module")
def model():
    return build_tiny("detr/detr_r18_synthetic", *TWO_LAYERS)


def test_registered_and_official_head_sizes(model):
    from detectron2.modeling import META_ARCH_REGISTRY

    assert META_ARCH_REGISTRY.get("DETR") is DETR
    assert model.class_embed.out_features == model.num_classes + 1  # + no-object
    assert model.query_embed.num_embeddings == 50  # the synthetic config's


def test_train_step_gives_finite_losses_and_gradients(model):
    batch = [
        image_input(96, 128, [[10, 10, 60, 50], [30, 40, 90, 90]], [1, 4], seed=0),
        image_input(80, 100, [], [], seed=1),
    ]  # an image without objects
    set_prediction_train_step(model, batch)
    assert model.class_embed.weight.grad.abs().sum() > 0
    assert model.backbone.stem.conv1.weight.grad.abs().sum() > 0


def test_eval_returns_instances_in_original_coordinates(model):
    model.eval()
    x = image_input(96, 128, with_instances=False)
    x.update(height=192, width=256)
    with torch.no_grad():
        out = model([x])[0]["instances"]
    assert out.image_size == (192, 256)
    assert len(out) == model.query_embed.num_embeddings  # one detection per query
    assert out.pred_boxes.tensor[:, 2].max() <= 256 and out.pred_boxes.tensor[:, 3].max() <= 192
    assert (out.pred_classes < model.num_classes).all()  # the no-object class is never predicted
    assert ((out.scores >= 0) & (out.scores <= 1)).all()


def test_results_do_not_depend_on_batch_composition():
    """Padding masks keep a small image's prediction unchanged when batched with a larger one.

    A ResNet's receptive field does see the padding (as in the official code), so a patch backbone
    with image sides at multiples of its stride isolates what this checks: the transformer
    ignores padded tokens.
    """
    model = build_tiny("detr/detr_r18_synthetic", *TWO_LAYERS, backbone=L(PatchBackbone)()).eval()
    small = image_input(64, 96, with_instances=False, seed=3)
    large = image_input(128, 160, with_instances=False, seed=4)
    with torch.no_grad():
        alone = model([small])[0]["instances"]
        batched = model([small, large])[0]["instances"]
    assert torch.allclose(alone.scores, batched.scores, atol=1e-5)
    assert torch.allclose(alone.pred_boxes.tensor, batched.pred_boxes.tensor, atol=1e-3)


def test_image_smaller_than_the_largest_stride(model):
    model.eval()
    with torch.no_grad():
        out = model([image_input(20, 24, with_instances=False)])[0]["instances"]
    assert len(out) > 0 and torch.isfinite(out.pred_boxes.tensor).all()


def test_gt_class_outside_the_model_range_is_an_error(model):
    model.train()
    with pytest.raises(ValueError, match="num_classes"):
        model([image_input(64, 64, [[1, 1, 30, 30]], [model.num_classes])])


@pytest.mark.parametrize(
    "config, value",
    [("detr/detr_r50_500ep", "sigmoid"), ("deformable_detr/deformable_detr_r50_50ep", "softmax")],
)
def test_one_classification_override_switches_head_loss_and_matching(config, value):
    from detr_variants.engine.lazy_train import apply_overrides

    cfg = apply_overrides(get_config(config), [f"model.classification={value}"])
    assert cfg.model.criterion.classification == value
    assert cfg.model.criterion.matcher.classification == value


def test_sigmoid_detr_has_one_logit_per_class_and_a_variant_rejects_what_it_lacks():
    cfg = get_config("detr/detr_r18_synthetic")
    cfg.model.update(classification="sigmoid", num_queries=4)
    cfg.model.encoder.num_layers = cfg.model.decoder.num_layers = 1
    model = instantiate(cfg.model)
    assert model.class_embed.out_features == model.num_classes  # no no-object column
    assert model.criterion.classification == model.criterion.matcher.classification == "sigmoid"
    cfg = get_config("conditional_detr/conditional_detr_r18_synthetic")
    cfg.model.classification = "softmax"
    with pytest.raises(ValueError, match="classification must be one of \\['sigmoid'\\]"):
        instantiate(cfg.model)


# ------------------------------------------------------------------ configs of the releases
@pytest.mark.parametrize(
    "name, depth, dc5",
    [
        ("detr_r50_500ep", 50, False),
        ("detr_dc5_r50_500ep", 50, True),
        ("detr_r101_500ep", 101, False),
        ("detr_dc5_r101_500ep", 101, True),
    ],
)
def test_released_model_configs(name, depth, dc5):
    """The four released detection models (official README): the same recipe, backbones differ."""
    cfg = get_config(f"detr/{name}")
    assert cfg.model.backbone.depth == depth and cfg.model.backbone.get("dc5", False) == dc5
    assert cfg.model.num_queries == 100 and cfg.model.encoder.num_layers == 6
    assert cfg.train.epochs == 500 and cfg.dataloader.train.total_batch_size == 64
    assert cfg.train.output_dir.endswith(name)


# ------------------------------------------------------------------ HF transformers equivalence
D, HEADS, FFN, QUERIES = 64, 4, 128, 12
UNUSED = -1e4  # bias of the 11 never-target COCO-id rows, so that both softmaxes agree


def masked_coco_head_(weight, bias):
    """Gives the rows of a 92-row head that detectron2 drops no mass, in place."""
    unused = sorted(set(range(92)) - set(official_coco_rows(91)))
    weight[unused] = 0.0
    bias[unused] = UNUSED


@pytest.fixture(scope="module")
def hf_detr():
    """A small random HF DETR with the hub's COCO head: 91 labels (label id = COCO id) + no-object."""
    transformers = pytest.importorskip("transformers")
    config = small_hf_detr_config(
        transformers.DetrConfig, d_model=D, heads=HEADS, ffn=FFN, queries=QUERIES, num_labels=91
    )
    torch.manual_seed(0)
    model = transformers.DetrForObjectDetection(config).eval()
    with torch.no_grad():
        randomise_(model.state_dict())
        masked_coco_head_(model.class_labels_classifier.weight, model.class_labels_classifier.bias)
    return model


def ours_like_hf_detr():
    """Our DETR with the HF test model's hyper-parameters (R18 = HF basic [2,2,2,2]), 80 classes."""
    return DETR(
        backbone=make_resnet(depth=18, norm="FrozenBN", freeze_at=0),
        encoder=TransformerEncoder(TransformerEncoderLayer(D, HEADS, FFN), 2),
        decoder=TransformerDecoder(TransformerDecoderLayer(D, HEADS, FFN), 3, norm=nn.LayerNorm(D)),
        position_embedding=PositionEmbeddingSine(D // 2, normalize=True),
        num_queries=QUERIES,
        hidden_dim=D,
        num_classes=80,
        criterion=SetCriterion(
            num_classes=80,
            matcher=HungarianMatcher(
                cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, classification="softmax"
            ),
            weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
            classification="softmax",
            eos_coef=0.1,
        ),
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    ).eval()


def load_strict(model, state_dict):
    """Loads through detectron2's checkpointer; shape mismatches or missing keys raise."""
    incompatible = Checkpointer(model, strict=True)._load_model({"model": dict(state_dict)})
    assert not (
        incompatible.missing_keys or incompatible.unexpected_keys or incompatible.incorrect_shapes
    )
    return model


def padded_batch(sizes=((96, 160), (128, 100)), seed=2):
    """Normalised pixels of two images, each padded on a different side, and the padding mask."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(2, 3, 128, 160)
    padding = torch.ones(2, 128, 160, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        pixels[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        padding[i, :h, :w] = False
    return ImageList(pixels, list(sizes)), padding


def test_matches_hf_transformers_outputs_and_losses(hf_detr):
    """Same weights (HF → ``convert_checkpoint(sd, "hf", "detr")``), same padded batch:

    - our logits of class c equal HF's of label ``COCO id(c)``, our no-object logit HF's label 91,
      and the probabilities (softmax over 81 vs 92 rows whose 11 unused rows have bias -1e4)
      and the boxes agree, all to 1e-4 (abs);
    - the Hungarian-matched losses agree to 1e-4 (relative): our class / L1 / GIoU losses are
      HF's ``loss_ce`` / ``loss_bbox`` / ``loss_giou`` times 1 / 5 / 2.
    """
    ours = load_strict(ours_like_hf_detr(), convert_checkpoint(hf_detr.state_dict(), "hf", "detr"))
    images, padding = padded_batch()
    rows = torch.as_tensor(official_coco_rows(91))
    targets = [
        {"labels": torch.tensor([0, 17, 79]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3]] * 3)},
        {"labels": torch.tensor([44]), "boxes": torch.tensor([[0.6, 0.5, 0.5, 0.4]])},
    ]
    targets[0]["boxes"][1:, :2] += torch.tensor([[0.2, 0.1], [0.4, 0.3]])
    labels = [{"class_labels": rows[t["labels"]], "boxes": t["boxes"]} for t in targets]
    with torch.no_grad():
        theirs = hf_detr(pixel_values=images.tensor, pixel_mask=(~padding).long(), labels=labels)
        mine = ours.compute_outputs(images, padding)
        losses = ours.criterion(mine, targets)
        unmasked = ours.compute_outputs(images, torch.zeros_like(padding))
    assert theirs.pred_boxes.std() > 0.05 and theirs.logits[..., rows].std() > 0.1
    torch.testing.assert_close(mine["pred_logits"], theirs.logits[..., rows], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        mine["pred_logits"].softmax(-1), theirs.logits.softmax(-1)[..., rows], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(mine["pred_boxes"], theirs.pred_boxes, atol=1e-4, rtol=0)
    assert (unmasked["pred_logits"] - theirs.logits[..., rows]).abs().max() > 1e-2  # mask matters
    hf_losses = theirs.loss_dict
    for name, hf_name, weight in [
        ("loss_class", "loss_ce", 1.0),
        ("loss_bbox", "loss_bbox", 5.0),
        ("loss_giou", "loss_giou", 2.0),
    ]:
        torch.testing.assert_close(losses[name], weight * hf_losses[hf_name], atol=0, rtol=1e-4)


def _legacy_hf_detr_names(state_dict):
    """transformers <= 4.x names (the layout of the hub's ``facebook/detr-resnet-50``)."""
    import re

    renames = [
        (r"^model\.backbone\.model\.", "model.backbone.conv_encoder.model."),
        (r"\.o_proj\.", ".out_proj."),
        (r"\.mlp\.fc", ".fc"),
    ]
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def test_hf_converter_reads_legacy_and_timm_names(hf_detr):
    current = convert_checkpoint(hf_detr.state_dict(), "hf", "detr")
    legacy_sd = _legacy_hf_detr_names(hf_detr.state_dict())
    assert "model.decoder.layers.0.encoder_attn.out_proj.weight" in legacy_sd
    legacy = convert_checkpoint(legacy_sd, "hf", "detr")
    assert current.keys() == legacy.keys() and all(
        torch.equal(current[k], legacy[k]) for k in current
    )
    # The hub's timm ResNet keeps torchvision names under conv_encoder.model.
    assert convert_checkpoint(
        {
            **legacy_sd,
            "model.backbone.conv_encoder.model.layer2.0.downsample.1.weight": 1.0 * torch.ones(2),
        },
        "hf",
        "detr",
    )["backbone.res3.0.shortcut.norm.weight"].tolist() == [1.0, 1.0]
    with pytest.raises(KeyError, match="not understood"):
        convert_checkpoint({**legacy_sd, "model.something.weight": torch.zeros(1)}, "hf", "detr")
    incomplete = {
        k: v for k, v in legacy_sd.items() if k != "model.decoder.layers.1.encoder_attn.k_proj.bias"
    }
    with pytest.raises(KeyError, match="incomplete q/k/v"):
        convert_checkpoint(incomplete, "hf", "detr")


def test_hf_converter_maps_every_class_row_and_the_no_object_row(hf_detr):
    """A distinguishable 92-row hub head: class c scores as HF label COCO id(c), no-object as 91."""
    sd = dict(hf_detr.state_dict())
    weight, bias = distinguishable_class_head(D, 92)
    masked_coco_head_(weight, bias)
    sd["class_labels_classifier.weight"], sd["class_labels_classifier.bias"] = weight, bias
    model = load_strict(ours_like_hf_detr(), convert_checkpoint(sd, "hf", "detr"))
    assert_class_scores_follow_official_rows(model, weight, bias, official_coco_rows(91), "softmax")


# ------------------------------------------------------------------ official checkpoints
def official_detr_state_dict(d=256, ffn=1024, enc=3, dec=3, queries=50, rows=92):
    """An official-layout state dict (names written out as in facebookresearch/detr
    ``models/detr.py`` and ``models/transformer.py``) for an R18 model, random tensors of the
    official shapes."""
    mha = lambda prefix: {  # noqa: E731
        f"{prefix}.in_proj_weight": (3 * d, d),
        f"{prefix}.in_proj_bias": (3 * d,),
        **linear_shapes(f"{prefix}.out_proj", d, d),
    }
    shapes = official_detr_layout_shapes(d, ffn, enc, queries, rows)
    for i in range(dec):
        p = f"transformer.decoder.layers.{i}"
        shapes.update({**mha(f"{p}.self_attn"), **mha(f"{p}.multihead_attn")})
        shapes.update(
            {**linear_shapes(f"{p}.linear1", d, ffn), **linear_shapes(f"{p}.linear2", ffn, d)}
        )
        for n in (1, 2, 3):
            shapes.update(norm_shapes(f"{p}.norm{n}", d))
    return official_r18_state_dict(shapes)


def official_model(num_classes=80):
    cfg = get_config("detr/detr_r18_synthetic")
    cfg.model.backbone.norm = "FrozenBN"
    cfg.model.num_classes = num_classes
    return instantiate(cfg.model)


def test_official_converter_loads_without_missing_or_unexpected_keys():
    official = official_detr_state_dict()
    converted = convert_checkpoint({"model": official}, "official", "detr")
    model = load_strict(official_model(), converted)
    for ours, theirs in [
        (
            model.decoder.layers[1].cross_attn.in_proj_weight,
            "decoder.layers.1.multihead_attn.in_proj_weight",
        ),
        (model.decoder.layers[2].ffn.norm.bias, "decoder.layers.2.norm3.bias"),
        (model.decoder.layers[0].norm2.weight, "decoder.layers.0.norm2.weight"),
        (model.encoder.layers[2].ffn.norm.weight, "encoder.layers.2.norm2.weight"),
        (model.encoder.layers[0].norm.weight, "encoder.layers.0.norm1.weight"),
        (model.decoder.norm.weight, "decoder.norm.weight"),
    ]:
        assert torch.equal(ours, official["transformer." + theirs])
    assert torch.equal(
        model.backbone.res3[0].shortcut.norm.running_var,
        official["backbone.0.body.layer2.0.downsample.1.running_var"],
    )
    # A head trained for another class count (num_classes + 1 rows) is kept as it is.
    custom = convert_checkpoint(official_detr_state_dict(rows=7), "official", "detr")
    load_strict(official_model(num_classes=6), custom)
    with pytest.raises(ValueError, match="no-object"):  # 7 rows cannot make 80 classes
        convert_official(official_detr_state_dict(rows=7), num_classes=80)
    with pytest.raises(KeyError, match="not understood"):  # e.g. a panoptic checkpoint's keys
        convert_checkpoint(
            {**official, "detr.mask_head.lay1.weight": torch.zeros(1)}, "official", "detr"
        )


def test_official_converter_maps_every_class_row_and_the_no_object_row():
    """Official 92-row head, each row distinguishable: class c scores as official row COCO id(c),
    no-object as row 91 (logits and softmax probabilities to 1e-5). A mapping that takes the
    first 81 rows fails the same check, and the generic 91/92-row mapping drops the no-object
    row, so its head does not even fit."""
    official = official_detr_state_dict()
    weight, bias = distinguishable_class_head(256, 92)
    masked_coco_head_(weight, bias)
    official["class_embed.weight"], official["class_embed.bias"] = weight, bias
    converted = convert_checkpoint(official, "official", "detr")
    model = load_strict(official_model(), converted)
    assert_class_scores_follow_official_rows(model, weight, bias, official_coco_rows(91), "softmax")

    naive = dict(converted, **{"class_embed.weight": weight[:81], "class_embed.bias": bias[:81]})
    with pytest.raises(AssertionError):
        assert_class_scores_follow_official_rows(
            load_strict(official_model(), naive), weight, bias, official_coco_rows(91), "softmax"
        )
    assert class_head_rows(weight).shape[0] == 80 != model.class_embed.out_features
