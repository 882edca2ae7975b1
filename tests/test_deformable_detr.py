import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate
from detectron2.structures import ImageList

from detr_variants.checkpoint import COCO_THING_IDS, convert_checkpoint
from detr_variants.checkpoint.deformable_detr import OFFICIAL_NAMES
from detr_variants.engine.lazy_train import apply_overrides
from detr_variants.model_zoo import get_config
from helpers import (
    build_tiny,
    distinct_class_heads,
    image_input,
    set_prediction_train_step,
    to_official_detr_names,
)

CONFIGS = [
    "deformable_detr_r50_50ep",
    "deformable_detr_single_scale_r50_50ep",
    "deformable_detr_single_scale_dc5_r50_50ep",
    "deformable_detr_refine_r50_50ep",
    "deformable_detr_two_stage_r50_50ep",
    "deformable_detr_r18_synthetic",
]


SMALL = {"encoder.num_layers": 1, "decoder.num_layers": 2, "num_queries": 20}


def small_model(name, **overrides):
    opts = [f"model.{k}={v}" for k, v in {**SMALL, **overrides}.items()]
    return build_tiny(f"deformable_detr/{name}", *opts)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_and_predicts(name):
    model = small_model(name)
    batch = [
        image_input(64, 96, [[5, 5, 40, 30], [20, 10, 90, 60]], [1, 2], seed=0),
        image_input(48, 40, [], [], seed=1),
    ]  # zero-GT image, mostly padding in the batch
    losses = set_prediction_train_step(model, batch)  # with the proposals' losses if two-stage
    grads = [
        p.grad
        for n, p in model.named_parameters()
        if "sampling_offsets" in n and p.grad is not None
    ]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert ("loss_class_enc" in losses) == model.two_stage
    model.eval()
    with torch.no_grad():
        out = model([image_input(40, 56, with_instances=False)])[0]["instances"]
    assert len(out) == 100 and (out.pred_classes < model.num_classes).all()


def test_image_smaller_than_the_largest_stride():
    model = small_model("deformable_detr_two_stage_r50_50ep").eval()
    with torch.no_grad():
        out = model(
            [image_input(30, 20, with_instances=False), image_input(90, 120, with_instances=False)]
        )
    assert all(torch.isfinite(o["instances"].pred_boxes.tensor).all() for o in out)


def test_official_initialisation():
    model = small_model("deformable_detr_refine_r50_50ep")
    assert torch.allclose(
        model.class_embed[0].bias, torch.full_like(model.class_embed[0].bias, -4.59512), atol=1e-4
    )
    last = model.bbox_embed[0].layers[-1]
    assert last.weight.abs().sum() == 0 and last.bias[:2].abs().sum() == 0
    assert torch.equal(last.bias[2:], torch.full((2,), -2.0))
    assert model.bbox_embed[1].layers[-1].bias[2:].abs().sum() == 0  # only the first refined head
    attn = model.encoder.layers[0].self_attn
    assert (
        attn.attention_weights.weight.abs().sum() == 0
        and attn.sampling_offsets.weight.abs().sum() == 0
    )
    assert model.decoder.bbox_embed is model.bbox_embed


# ------------------------------------------------------------------ equivalence with HF transformers
transformers = pytest.importorskip("transformers")


def _hf_model(with_box_refine, two_stage, d_model=64, num_queries=12, num_labels=6, levels=4):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"] if levels > 1 else ["stage4"],
    )
    cfg = DeformableDetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        use_pretrained_backbone=False,
        d_model=d_model,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        num_queries=num_queries,
        two_stage_num_proposals=num_queries,
        num_labels=num_labels,
        num_feature_levels=levels,
        with_box_refine=with_box_refine,
        two_stage=two_stage,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(cfg).eval()
    # perturb every weight and statistic so that a wrong mapping cannot go unnoticed
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                noise = 0.05 * torch.randn(t.shape, generator=g)
                t.copy_(t.abs() + 0.5 + noise.abs() if "running_var" in name else t + noise)
    return model


def _our_model(with_box_refine, two_stage, hf_cfg, num_classes=None):
    cfg = get_config("deformable_detr/deformable_detr_r18_synthetic")
    d = hf_cfg.d_model
    opts = [
        f"model.with_box_refine={with_box_refine}",
        f"model.two_stage={two_stage}",
        "model.backbone.norm=FrozenBN",
        f"model.hidden_dim={d}",
        f"model.num_queries={hf_cfg.num_queries}",
        f"model.position_embedding.num_pos_feats={d // 2}",
        f"model.num_classes={num_classes or hf_cfg.num_labels}",
    ]
    if hf_cfg.num_feature_levels == 1:
        opts += [
            "model.backbone.out_features=[res5]",
            "model.in_features=[res5]",
            "model.num_feature_levels=1",
        ]
    for part in ("encoder", "decoder"):
        opts += [
            f"model.{part}.num_layers=2",
            f"model.{part}.layer.d_model={d}",
            f"model.{part}.layer.dim_feedforward=96",
            f"model.{part}.layer.dropout=0.0",
        ]
    return instantiate(apply_overrides(cfg, opts).model).eval()


@pytest.mark.parametrize("with_box_refine,two_stage", [(False, False), (True, False), (True, True)])
def test_same_outputs_as_hf_transformers(with_box_refine, two_stage, tmp_path):
    hf = _hf_model(with_box_refine, two_stage)
    ours = _our_model(with_box_refine, two_stage, hf.config)
    converted = convert_checkpoint(hf.state_dict(), "hf", "deformable_detr")
    torch.save({"model": converted}, tmp_path / "converted.pth")
    incompatible = DetectionCheckpointer(ours)._load_model({"model": converted})
    assert (
        not incompatible.missing_keys
        and not incompatible.unexpected_keys
        and not incompatible.incorrect_shapes
    )

    # two images of different sizes, padded into one batch
    g = torch.Generator().manual_seed(2)
    pixels = torch.zeros(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.long)
    pixels[0, :, :96, :112] = torch.randn(3, 96, 112, generator=g)
    mask[0, :96, :112] = 1
    pixels[1, :, :64, :128] = torch.randn(3, 64, 128, generator=g)
    mask[1, :64, :128] = 1
    with torch.no_grad():
        expected = hf(pixel_values=pixels, pixel_mask=mask)
        got = ours.compute_outputs(ImageList(pixels, [(96, 112), (64, 128)]), mask == 0)
    assert torch.allclose(got["pred_logits"], expected.logits, atol=1e-4), (
        (got["pred_logits"] - expected.logits).abs().max()
    )
    assert torch.allclose(got["pred_boxes"], expected.pred_boxes, atol=1e-4), (
        (got["pred_boxes"] - expected.pred_boxes).abs().max()
    )


def _official_names(state_dict):
    """Our names → the official repository's (the inverse of the converter's table)."""
    state_dict = dict(state_dict)
    proposal = {k: state_dict.pop(k) for k in list(state_dict) if k.startswith("proposal_class_")}
    out = to_official_detr_names(
        state_dict, OFFICIAL_NAMES, class_copies=("", "transformer.decoder.")
    )
    # two-stage: the proposal score is column 0 of class head L (after the decoder layers' heads)
    num_layers = len({k.split(".")[1] for k in state_dict if k.startswith("class_embed.")})
    for name, value in proposal.items():
        full = torch.randn(91, *value.shape[1:])
        full[:1] = value
        leaf = name.rsplit(".", 1)[1]
        for prefix in ("", "transformer.decoder."):
            out[f"{prefix}class_embed.{num_layers}.{leaf}"] = full
    return out


def test_official_converter_round_trip():
    cfg = get_config("deformable_detr/deformable_detr_two_stage_r50_50ep")
    cfg = apply_overrides(cfg, ["model.encoder.num_layers=1", "model.decoder.num_layers=2"])
    model = instantiate(cfg.model)
    reference = {
        k: torch.randn_like(v) if v.dtype.is_floating_point else v
        for k, v in model.state_dict().items()
    }
    converted = convert_checkpoint(
        {"model": _official_names(reference)}, "official", "deformable_detr"
    )
    assert set(converted) == set(reference)
    for name, value in reference.items():
        assert torch.equal(converted[name], value), name


def _padded_pair(channels=3):
    """Two images of different sizes (96×112 and 64×128) padded into one batch, and the mask."""
    g = torch.Generator().manual_seed(2)
    pixels = torch.zeros(2, channels, 96, 128)
    pixels[0, :, :96, :112] = torch.randn(channels, 96, 112, generator=g)
    pixels[1, :, :64, :128] = torch.randn(channels, 64, 128, generator=g)
    padding = torch.ones(2, 96, 128, dtype=torch.bool)
    padding[0, :96, :112] = False
    padding[1, :64, :128] = False
    return ImageList(pixels, [(96, 112), (64, 128)]), padding


def _run_with_internals(model, images, padding):
    """Outputs plus what the heads saw: the decoder's per-layer outputs, its initial reference
    (the chosen proposals, two-stage) and the two-stage proposal features."""
    seen = {}
    hooks = [model.decoder.register_forward_hook(lambda m, i, o: seen.update(hs=o[0], ref=o[1][0]))]
    if model.two_stage:
        hooks.append(
            model.enc_output_norm.register_forward_hook(lambda m, i, o: seen.update(memory=o))
        )
    with torch.no_grad():
        out = model.compute_outputs(images, padding)
    for h in hooks:
        h.remove()
    return out, seen


@pytest.mark.parametrize(
    "name,overrides",
    [(name, {}) for name in CONFIGS[:5]]
    + [("deformable_detr_two_stage_r50_50ep", {"with_box_refine": False})],  # one shared head
)
def test_official_converter_maps_every_class_row(name, overrides):
    """Class heads whose 91 rows all differ: class c must score with official row
    ``COCO_THING_IDS[c]`` of its layer's head, and two-stage must choose the proposals that the
    official column-0 ranking of the proposal head (``class_embed[L]``) chooses."""
    model = small_model(name, **overrides).eval()
    official, heads = distinct_class_heads(
        _official_names(model.state_dict()), shared=not model.with_box_refine
    )
    incompatible = model.load_state_dict(
        convert_checkpoint(official, "official", "deformable_detr"), strict=False
    )
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    out, seen = _run_with_internals(model, *_padded_pair())

    num_layers = len(model.decoder.layers)
    got = [a["pred_logits"] for a in out["aux_outputs"]] + [out["pred_logits"]]
    ids = torch.as_tensor(COCO_THING_IDS)
    for layer in range(num_layers):
        weight, bias = heads[layer if model.with_box_refine else None]
        expected = seen["hs"][layer] @ weight[ids].T + bias[ids]
        assert torch.allclose(got[layer], expected, atol=1e-5), (
            layer,
            (got[layer] - expected).abs().max(),
        )

    if model.two_stage:
        weight, bias = heads[num_layers if model.with_box_refine else None]
        scores = seen["memory"] @ weight[0] + bias[0]  # the official ranking: column 0
        enc = out["enc_outputs"]
        chosen = scores.topk(model.num_queries, dim=1).indices
        expected_refs = enc["pred_boxes"].gather(1, chosen[..., None].expand(-1, -1, 4))
        assert torch.equal(seen["ref"], expected_refs)
        assert torch.allclose(enc["pred_logits"][..., 0], scores, atol=1e-5)


@pytest.mark.parametrize(
    "with_box_refine,two_stage,levels",
    [(False, False, 1), (False, False, 4), (True, False, 4), (True, True, 4)],
)
def test_hf_converter_maps_every_class_row(with_box_refine, two_stage, levels):
    """HF heads of 91 rows indexed by COCO id, every row different (random, perturbed): class c
    must score as HF's row ``COCO_THING_IDS[c]`` of that layer's head, and two-stage must choose
    HF's proposals (top-k of column 0 of the proposal head ``class_embed[L]``)."""
    hf = _hf_model(with_box_refine, two_stage, num_labels=91, levels=levels)
    ours = _our_model(with_box_refine, two_stage, hf.config, num_classes=80)
    incompatible = ours.load_state_dict(
        convert_checkpoint(hf.state_dict(), "hf", "deformable_detr"), strict=False
    )
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    images, padding = _padded_pair()
    with torch.no_grad():
        expected = hf(pixel_values=images.tensor, pixel_mask=(~padding).long())
        out, seen = _run_with_internals(ours, images, padding)
        ids = torch.as_tensor(COCO_THING_IDS)
        got = [a["pred_logits"] for a in out["aux_outputs"]] + [out["pred_logits"]]
        for layer, logits in enumerate(got):
            hf_logits = hf.class_embed[layer](expected.intermediate_hidden_states[:, layer])
            assert torch.allclose(logits, hf_logits[..., ids], atol=1e-4), (
                layer,
                (logits - hf_logits[..., ids]).abs().max(),
            )
    if two_stage:
        assert torch.allclose(seen["ref"], expected.init_reference_points, atol=1e-5)
        assert torch.allclose(
            out["enc_outputs"]["pred_logits"][..., 0], expected.enc_outputs_class[..., 0], atol=1e-4
        )


def test_encoder_loss_is_class_agnostic():
    """The proposals' one-logit head gets the official encoder-output losses (``_enc``, the final
    layer's weights) with every label 0: relabelling the GT changes the decoder's class loss and
    none of the ``_enc`` losses."""
    model = small_model("deformable_detr_two_stage_r50_50ep").eval()
    with torch.no_grad():
        out = model.compute_outputs(*_padded_pair())
        assert out["enc_outputs"]["pred_logits"].shape[-1] == 1
        boxes = [torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.4]]), torch.zeros(0, 4)]
        losses = [
            model.criterion(
                out,
                [
                    {"labels": torch.tensor(c, dtype=torch.long), "boxes": b}
                    for c, b in zip(cs, boxes)
                ],
            )
            for cs in ([[3, 17], []], [[40, 2], []])
        ]
    assert {k for k in losses[0] if k.endswith("_enc")} == {
        "loss_class_enc",
        "loss_bbox_enc",
        "loss_giou_enc",
    }
    assert not torch.isclose(losses[0]["loss_class"], losses[1]["loss_class"])
    for name in ("loss_class_enc", "loss_bbox_enc", "loss_giou_enc"):
        assert torch.equal(losses[0][name], losses[1][name]), name
