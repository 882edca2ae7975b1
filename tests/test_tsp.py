"""TSP-FCOS / TSP-RCNN: restricted matching, FoI selection and random drop, RoI position
encoding, configs (build, train step, inference), the hybrid optimizer and transformer-only
clipping, and the official-checkpoint converters."""

import copy
import itertools
import json
import math
import os

import pytest
import torch
from detectron2.config import instantiate
from detectron2.solver import LRMultiplier
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from fvcore.common.param_scheduler import MultiStepParamScheduler
from torch import nn

from detr_variants.checkpoint import Checkpointer, convert_checkpoint
from detr_variants.checkpoint.names import rename_back
from detr_variants.checkpoint.tsp import FCOS_NAMES, RCNN_NAMES
from detr_variants.engine.lazy_train import (
    apply_overrides,
    clip_parameters,
    resolve_max_iter,
    train,
)
from detr_variants.engine.optim import HybridOptimizer, hybrid_param_groups
from detr_variants.engine.trainer import SetPredictionTrainer
from detr_variants.model_zoo import get_config
from detr_variants.modeling.matcher import RestrictedMatcher, restricted_match
from detr_variants.modeling.tsp import fcos_assignment, random_keep_count, roi_position_encoding
from helpers import build_tiny, image_input, tiny_run_overrides

SYNTHETIC = ["tsp/tsp_fcos_r18_synthetic", "tsp/tsp_rcnn_r18_synthetic"]
RECIPES = [
    "tsp/tsp_fcos_r50_36ep",
    "tsp/tsp_rcnn_r50_36ep",
    "tsp/tsp_fcos_r101_36ep",
    "tsp/tsp_rcnn_r101_36ep",
    "tsp/tsp_rcnn_r50_96ep",
]


def small_model(name, *overrides, seed=0):
    layers = (
        "model.encoder.num_layers=1"
        if "fcos" in name
        else "model.roi_heads.box_head.encoder.num_layers=1"
    )
    return build_tiny(name, layers, *overrides, seed=seed)


def criterion_inputs(model, batch):
    """What the training step hands the criterion (outputs and FCOS targets), via a hook."""
    seen = {}
    handle = model.criterion.register_forward_pre_hook(lambda m, args: seen.update(args[0]))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        handle.remove()
    return seen


def batch_with_and_without_objects():
    return [
        image_input(
            96, 128, [[5, 5, 40, 30], [20, 10, 90, 60], [60, 40, 120, 90]], [1, 2, 5], seed=0
        ),
        image_input(64, 80, [], [], seed=1),
    ]  # no objects, mostly padding in the batch


# ------------------------------------------------------------------ restricted matching
def _brute_force(cost, candidate_gt, num_gt):
    """The maximum-cardinality, then minimum-cost, assignment of GTs to distinct predictions that
    respects the candidates, by enumeration: {gt: prediction}."""
    options = [[None] + [i for i, g in enumerate(candidate_gt) if g == gt] for gt in range(num_gt)]
    best_key, best = None, None
    for choice in itertools.product(*options):
        used = [c for c in choice if c is not None]
        if len(used) != len(set(used)):
            continue
        key = (len(used), -sum(cost[c] for c in used))
        if best_key is None or key > best_key:
            best_key, best = key, {g: c for g, c in enumerate(choice) if c is not None}
    return best


def test_restricted_matching_against_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n, num_gt = (
            int(torch.randint(1, 8, (1,), generator=g)),
            int(torch.randint(1, 4, (1,), generator=g)),
        )
        cost = torch.randn(n, generator=g)
        candidate_gt = torch.randint(-1, num_gt, (n,), generator=g)
        pred, gt = restricted_match(cost, candidate_gt)
        assert len(set(pred.tolist())) == len(pred)  # no prediction given to two GTs
        assert len(set(gt.tolist())) == len(gt)  # at most one prediction per GT
        assert (candidate_gt[pred] == gt).all()  # only from its candidates
        assert dict(zip(gt.tolist(), pred.tolist())) == _brute_force(
            cost.tolist(), candidate_gt.tolist(), num_gt
        )


def test_restricted_matcher_weights_and_empty_input():
    class_cost, giou_cost = torch.tensor([0.0, -1.0, 0.0]), torch.tensor([0.1, 0.9, 0.2])
    candidates = torch.tensor([0, 0, 0])
    # cost = class + 2 GIoU: 0.2, 0.8, 0.4 → prediction 0; with weight 0 on GIoU → prediction 1
    assert RestrictedMatcher(1.0, 2.0)(class_cost, giou_cost, candidates)[0].tolist() == [0]
    assert RestrictedMatcher(1.0, 0.0)(class_cost, giou_cost, candidates)[0].tolist() == [1]
    pred, gt = restricted_match(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert pred.numel() == 0 and gt.numel() == 0
    assert restricted_match(torch.ones(3), torch.full((3,), -1))[0].numel() == 0


# ------------------------------------------------------------------ FoI selection and random drop
def test_fcos_positives_outrank_negatives_below_one_half():
    """Boosted to 0.5·(p + 1) >= 0.5, every positive is selected when no negative scores above
    that (here: an untrained FoI classifier, then negatives below 0.5)."""
    model = small_model(SYNTHETIC[0], "model.num_fois=60", "model.random_drop=1.0").train()
    batch = batch_with_and_without_objects()
    out = criterion_inputs(model, batch)
    positives = out["fcos_labels"] != model.num_classes
    assert positives[0].sum() >= 10 and positives[1].sum() == 0
    assert positives[0].sum() < 60  # fewer positives than FoIs, so all of them must be selected
    for b in range(len(batch)):
        assert set(positives[b].nonzero().flatten().tolist()) <= set(out["selected"][b].tolist())
    # and also when positives have the lowest objectness of all (scores boosted to >= 0.5, and
    # every negative scores below 0.5)
    scores = torch.rand(2, 500) * 0.5
    positive = torch.zeros(2, 500, dtype=torch.bool)
    positive[:, :30] = True
    scores[positive] = 0.0
    selected = model.select_fois(scores, torch.ones_like(positive), positive)
    assert all(set(range(30)) <= set(row.tolist()) for row in selected)


def _official_sine(h, w, num_pos_feats):
    """The released ``PositionEmbeddingSine`` (normalize, 2π) of an (h, w) map with no padding:
    row/column index 1..n divided by n, 10000^(2⌊i/2⌋/F) frequencies, sin/cos interleaved,
    y then x. (F·2, h·w) → (h·w, 2F)."""
    scale, eps = 2 * math.pi, 1e-6
    y = torch.arange(1, h + 1, dtype=torch.float32)[:, None].expand(h, w) / (h + eps) * scale
    x = torch.arange(1, w + 1, dtype=torch.float32)[None].expand(h, w) / (w + eps) * scale
    i = torch.arange(num_pos_feats, dtype=torch.float32)
    freq = 10000 ** (2 * torch.div(i, 2, rounding_mode="floor") / num_pos_feats)

    def enc(v):
        v = v[..., None] / freq
        return torch.stack((v[..., 0::2].sin(), v[..., 1::2].cos()), dim=-1).flatten(-2)

    return torch.cat([enc(y), enc(x)], dim=-1).flatten(0, 1)


def _encoder_inputs(model):
    """Records the keyword inputs of every call of the model's transformer encoder."""
    calls = []
    model.encoder.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True
    )
    return calls


def test_padding_to_size_divisibility_counts_as_image_at_batch_size_1():
    """Released behaviour (issue #13): one 100x140 image is padded to 128x160; the released mask
    is built at 100x140, so the padding is image: every location can be a FoI, the sine
    encoding is normalised over the padded map and the encoder gets no padding. Exact up to
    float32 rounding (atol 1e-5)."""
    model = small_model(SYNTHETIC[0], "model.num_fois=200").eval()
    calls = _encoder_inputs(model)
    images, mask = model.preprocess_image([image_input(100, 140, with_instances=False)])
    assert tuple(images.tensor.shape[-2:]) == (128, 160)
    with torch.no_grad():
        out = model.compute_outputs(images, mask)
    shapes = [(math.ceil(128 / s), math.ceil(160 / s)) for s in (8, 16, 32, 64, 128)]
    d = model.level_embed.shape[1]
    pos = torch.cat(
        [_official_sine(h, w, d // 2) + model.level_embed[i] for i, (h, w) in enumerate(shapes)]
    )
    scores = out["local_logits"][0].sigmoid().max(-1).values
    assert len(scores) == sum(h * w for h, w in shapes)
    selected = out["selected"][0]
    torch.testing.assert_close(calls[-1]["pos"][0], pos[selected], atol=1e-5, rtol=0)
    assert selected.tolist() == scores.topk(200).indices.tolist()  # padding ranks as image
    assert not calls[-1]["key_padding_mask"].any() and out["valid"].all()


def test_padding_of_other_images_is_masked_by_default_and_official_on_request():
    """Default: an image's masks, encoding and validity are those it has alone (batch
    independence); ``official_padding=True``: the released masks of the whole batch."""
    model = small_model(SYNTHETIC[0]).eval()
    small, large = image_input(100, 140, with_instances=False), image_input(190, 150, seed=1)
    dense = {}
    with torch.no_grad():
        for name, batch in (("alone", [small]), ("batch", [small, large])):
            dense[name] = model.dense_outputs(model.preprocess_image(batch)[0])
        model.official_padding = True
        official = model.dense_outputs(model.preprocess_image([small, large])[0])
        official_alone = model.dense_outputs(model.preprocess_image([small])[0])
    levels_alone, levels_batch = dense["alone"]["levels"], dense["batch"]["levels"]
    for level in range(5):
        a = dense["alone"]["pos"][0][levels_alone == level]
        b = dense["batch"]["pos"][0][levels_batch == level]
        valid_b = dense["batch"]["valid"][0][levels_batch == level]
        assert valid_b.sum() == len(a) and dense["alone"]["valid"].all()
        torch.testing.assert_close(b[valid_b], a, atol=1e-6, rtol=0)  # same cells, same encoding
    assert not dense["batch"]["valid"][0].all() and dense["batch"]["valid"][1].all()
    # released: everything valid, the small image's encoding normalised over the padded batch
    # extent wherever the other image is larger, and equal to the default alone
    assert official["valid"].all()
    torch.testing.assert_close(official_alone["pos"], dense["alone"]["pos"], atol=0, rtol=0)
    assert not torch.allclose(official["pos"][0], dense["batch"]["pos"][0], atol=1e-3)


def test_fcos_scale_ranges_include_their_bounds():
    """A 128-px GT centred on a P3 location: max(l, t, r, b) = 64 exactly there, which the
    released ``[-1, 64]`` range of P3 includes (detectron2's strict one excludes it)."""
    model = small_model(SYNTHETIC[0], "model.random_drop=1.0").train()
    batch = [image_input(160, 160, [[4.0, 4.0, 132.0, 132.0]], [3])]
    out = criterion_inputs(model, batch)
    p3_width = 160 // 8
    location = 8 * p3_width + 8  # P3 row 8, column 8: (68, 68), the GT centre
    assert out["fcos_labels"][0, location] == 3
    torch.testing.assert_close(out["fcos_reg_targets"][0, location], torch.full((4,), 8.0))
    # the P4 location (72, 72): max distance 68, in P4's [64, 128] only
    assert out["fcos_labels"][0, 20 * 20 + 4 * 10 + 4] == 3


def test_fcos_ties_go_to_the_smaller_area_exactly():
    """GTs of areas 1003 (listed first) and 1000 both claim two locations: the released min-area
    rule gives them to the 1000 px² one; detectron2 ranks 1e8 - area in float32 (steps of 8)
    and keeps the first."""
    boxes = torch.tensor([[100.0, 100, 117, 159], [100.0, 100, 125, 140]])
    points = torch.tensor([[100.0 + x, 100.0 + y] for y in range(1, 60) for x in range(1, 25)])
    ranges = torch.tensor([[-1.0, math.inf]]).expand(len(points), 2)
    strides = torch.full((len(points),), 8.0)
    alone = [
        fcos_assignment(points, strides, ranges, boxes[k : k + 1], torch.tensor([k]), 80)[1] >= 0
        for k in range(2)
    ]
    shared = alone[0] & alone[1]
    labels, index, _ = fcos_assignment(points, strides, ranges, boxes, torch.tensor([1, 2]), 80)
    assert shared.sum() > 0 and (index[shared] == 1).all() and (labels[shared] == 2).all()


def test_fcos_training_targets_break_ties_by_exact_area():
    """The same two GTs in a training step: the P3 locations inside both go to the second."""
    boxes = torch.tensor([[100.0, 100, 117, 159], [100.0, 100, 125, 140]])
    model = small_model(SYNTHETIC[0], "model.random_drop=1.0").train()
    out = criterion_inputs(model, [image_input(192, 192, boxes.tolist(), [1, 2])])
    xy = torch.tensor([[4.0 + 8 * (i % 24), 4.0 + 8 * (i // 24)] for i in range(24 * 24)])
    # candidates of a GT: inside it and within 1.5 strides of its centre (max distance < 64)
    near = [
        ((xy > b[:2]) & (xy < b[2:]) & ((xy - (b[:2] + b[2:]) / 2).abs() < 12)).all(1)
        for b in boxes
    ]
    both = torch.nonzero(near[0] & near[1]).squeeze(1)
    assert len(both) > 0 and (out["fcos_gt_index"][0, both] == 1).all()


def test_fcos_positives_rank_with_the_released_half_boost():
    """Training FoI ranking as released: positives score 0.5·(p + 1), so negatives above that
    outrank them (issue #13: the project had added 1 more)."""
    model = small_model(SYNTHETIC[0], "model.num_fois=40", "model.random_drop=1.0").train()
    g = torch.Generator().manual_seed(0)

    def spread_logits(module, args, output):  # distinct objectness over (-6, 6)
        logits = [torch.full_like(x, -20.0) for x in output[0]]
        for x in logits:
            x[:, 0] = torch.rand(x[:, 0].shape, generator=g) * 12 - 6
        return (logits, *output[1:])

    model.foi_head.register_forward_hook(spread_logits)
    batch = [image_input(160, 192, [[10.0, 10, 60, 70], [50, 40, 120, 110]], [1, 2])]
    out = criterion_inputs(model, batch)
    p = out["local_logits"][0].sigmoid().max(-1).values
    positive = out["fcos_labels"][0] != model.num_classes
    expected = torch.where(positive, 0.5 * (p + 1), p).topk(40).indices
    assert out["selected"][0].tolist() == expected.tolist()
    left_out = positive.sum() - positive[expected].sum()
    assert 0 < left_out < positive.sum()  # the case where the rankings differ


def test_random_drop_keeps_70_to_100_percent():
    counts = [random_keep_count(700, 0.7) for _ in range(3000)]
    assert min(counts) >= 490 and max(counts) <= 700
    assert min(counts) < 500 and max(counts) > 690  # the whole range is drawn (3000 uniform draws)
    assert random_keep_count(1, 0.7) == 1 and random_keep_count(0, 0.7) == 0

    model = small_model(SYNTHETIC[0], "model.num_fois=100").train()
    scores = torch.rand(2, 400)
    top = scores.topk(100).indices
    for _ in range(20):
        selected = model.select_fois(scores, torch.ones(2, 400, dtype=torch.bool))
        assert 70 <= selected.shape[1] <= 100  # one size for the whole batch
        assert all(set(s.tolist()) <= set(t.tolist()) for s, t in zip(selected, top))
    model.eval()
    assert (
        model.select_fois(scores, torch.ones(2, 400, dtype=torch.bool)).shape[1] == 100
    )  # no drop at test

    roi_heads = small_model(SYNTHETIC[1]).train().roi_heads
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(400, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 8 + 40 * torch.rand(400, 2, generator=g)], 1)
    proposals = Instances(
        (128, 128), proposal_boxes=Boxes(boxes), objectness_logits=torch.randn(400, generator=g)
    )
    targets = Instances(
        (128, 128), gt_boxes=Boxes(torch.tensor([[10.0, 10, 60, 60]])), gt_classes=torch.tensor([3])
    )
    roi_heads.batch_size_per_image = 200
    with EventStorage():
        for _ in range(10):
            sampled = roi_heads.label_and_sample_proposals([proposals], [targets])[0]
            assert 140 <= len(sampled) <= 200
            assert sampled.has("gt_idxs") and sampled.has("gt_boxes")


# ------------------------------------------------------------------ RoI position encoding
def test_roi_position_encoding_on_a_known_box():
    box = torch.tensor([[20.0, 20.0, 60.0, 60.0]])  # in a 100 (h) x 200 (w) image
    values = [0.2, 0.4, 0.2, 0.4, 0.1, 0.2, 0.3, 0.6]  # cx, cy, w, h, x1, y1, x2, y2, normalised
    pe = roi_position_encoding(box, (100, 200), num_pos_feats=4)[0]
    # 4 frequencies: 10000^(2·(i//2)/4) = 1, 1, 100, 100; sin on even, cos on odd channels
    expected = []
    for v in values:
        a = 2 * math.pi * v
        expected += [math.sin(a), math.cos(a), math.sin(a / 100), math.cos(a / 100)]
    assert pe.shape == (32,)
    assert torch.allclose(pe, torch.tensor(expected), atol=1e-6)
    full = roi_position_encoding(box, (100, 200))[0]  # the released 8 x 64 = 512 channels
    assert full.shape == (512,)
    assert full[4 * 64] == pytest.approx(
        math.sin(2 * math.pi * 0.1), abs=1e-6
    )  # x1 block, first frequency
    t = 10000 ** (2 * 31 / 64)  # the last frequency pair of the h block
    assert full[3 * 64 + 63] == pytest.approx(math.cos(2 * math.pi * 0.4 / t), abs=1e-6)


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["tsp/tsp_fcos_r50_36ep", "tsp/tsp_rcnn_r50_96ep"])
def test_warmup_covers_the_released_images_whatever_the_batch_size(name):
    """The released warmup is 1000 iterations at batch 16; resolved from epochs it ends after
    the same 16,000 COCO train2017 images (117,266 with annotations) at batch 16 and at 4."""
    cfg = get_config(name)
    for batch in (16, 4):
        max_iter = resolve_max_iter(cfg.train, 117266, batch)
        schedule = instantiate(cfg.lr_multiplier)
        ramp = [schedule(i / max_iter) for i in range(0, 20000 // batch)]
        warm = next(i for i, v in enumerate(ramp) if v == 1.0)
        assert ramp[0] == pytest.approx(0.001) and all(a < b for a, b in zip(ramp, ramp[1:warm]))
        # one iteration of rounding, plus fvcore's 1e-6 of training (WHERE_EPSILON)
        assert abs(warm - 16000 / batch) <= 1 + 1e-6 * max_iter, (batch, warm)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_configs_instantiate(name):
    cfg = get_config(name)
    model = instantiate(cfg.model)
    assert model.input_format == "BGR" and model.pixel_std.flatten().tolist() == [1.0, 1.0, 1.0]
    assert cfg.train.init_checkpoint.startswith("detectron2://ImageNetPretrained/MSRA/R-")
    assert cfg.train.clip_grad.max_norm == 0.01 and cfg.train.clip_grad.params == "encoder."
    assert cfg.dataloader.train.total_batch_size == 16
    resnet = model.backbone.bottom_up
    assert len(resnet.res4) == (23 if "r101" in name else 6)
    encoder = model.encoder if "fcos" in name else model.roi_heads.box_head.encoder
    assert (
        len(encoder.layers) == 6 and encoder.layers[0].normalize_before and encoder.norm is not None
    )
    assert (
        encoder.layers[0].ffn.linear1.out_features == 2048
        and encoder.layers[0].self_attn.embed_dim == 512
    )
    assert set(model.backbone.output_shape()) >= {"p3", "p4", "p5", "p6", "p7"}


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_config_matches_detr_synthetic(name):
    cfg, detr = get_config(name), get_config("detr/detr_r18_synthetic")
    assert cfg.dataloader == detr.dataloader
    assert cfg.train.max_iter == detr.train.max_iter and cfg.lr_multiplier == detr.lr_multiplier
    bottom_up = cfg.model.backbone.bottom_up
    assert (bottom_up.depth, bottom_up.norm, bottom_up.freeze_at) == (18, "BN", 0)
    encoder = cfg.model.encoder if "fcos" in name else cfg.model.roi_heads.box_head.encoder
    hidden = cfg.model.hidden_dim if "fcos" in name else cfg.model.roi_heads.box_head.hidden_dim
    assert (hidden, encoder.num_layers, encoder.layer.dim_feedforward) == (
        detr.model.hidden_dim,
        detr.model.encoder.num_layers,
        detr.model.encoder.layer.dim_feedforward,
    )


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_config_trains_and_predicts(name):
    model = small_model(name).train()
    losses = model(batch_with_and_without_objects())
    total = sum(losses.values())
    assert torch.isfinite(total) and len(losses) == 4
    total.backward()
    encoder = [p.grad for n, p in model.named_parameters() if "encoder." in n]
    assert (
        encoder and all(g is not None for g in encoder) and any(g.abs().sum() > 0 for g in encoder)
    )
    model.eval()
    with torch.no_grad():
        out = model(
            [image_input(72, 100, with_instances=False), image_input(128, 96, with_instances=False)]
        )
    for o, (h, w) in zip(out, [(72, 100), (128, 96)]):
        inst = o["instances"]
        assert 0 < len(inst) <= 100 and inst.image_size == (h, w)
        assert (inst.pred_classes < model.num_classes).all() and (inst.scores >= 0).all()
        boxes = inst.pred_boxes.tensor
        assert torch.isfinite(boxes).all() and (boxes[:, 2:] >= boxes[:, :2]).all()


def test_batches_without_any_object_and_fewer_than_700_proposals():
    rcnn = small_model(
        SYNTHETIC[1],
        "model.proposal_generator.post_nms_topk=[700,700]",
        "model.roi_heads.batch_size_per_image=700",
    ).train()
    images = [image_input(64, 64, [], [], seed=0), image_input(48, 64, [], [], seed=1)]
    with EventStorage():
        norm = rcnn.preprocess_image(images)
        proposals, _ = rcnn.proposal_generator(
            norm, rcnn.backbone(norm.tensor), [x["instances"] for x in images]
        )
    assert all(0 < len(p) < 700 for p in proposals)
    for model in (rcnn, small_model(SYNTHETIC[0]).train()):
        losses = model(images)
        assert all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()  # the graph is intact even with no object in the batch


def test_fcos_inference_with_and_without_nms():
    model = small_model(SYNTHETIC[0]).eval()
    images, mask = model.preprocess_image([image_input(128, 128, with_instances=False)])
    with torch.no_grad():
        outputs = model.compute_outputs(images, mask)
        nms = model.detect(outputs, images.image_sizes)[
            0
        ]  # before detector_postprocess drops empty boxes
        model.test_nms_thresh = None
        raw = model.detect(outputs, images.image_sizes)[0]
    assert len(raw) == 100 and (raw.scores[:-1] >= raw.scores[1:]).all() and len(nms) <= 100
    probs = outputs["pred_logits"][0].sigmoid().flatten()
    assert torch.allclose(raw.scores, probs.topk(100).values.sqrt())  # score = sqrt(p), as released
    from detectron2.structures import pairwise_iou

    for c in nms.pred_classes.unique():
        boxes = nms.pred_boxes[nms.pred_classes == c]
        iou = pairwise_iou(boxes, boxes).fill_diagonal_(0)
        assert (iou <= 0.6 + 1e-4).all()  # class-wise NMS 0.6


def test_fcos_class_loss_weights_and_normaliser():
    """One GT, two FCOS-positive FoIs: the lower-cost one is the target, the other weighs
    eos_coef on its GT class; normaliser 2·(1 matched + 0.1·2 candidates)."""
    model = small_model(SYNTHETIC[0])
    crit, k = model.criterion, model.num_classes
    logits = torch.full((1, 3, k), -2.0)
    logits[0, 1, 4] = 1.0  # FoI 1 is the more confident one
    ltrb = torch.ones(1, 3, 4)
    outputs = {
        "local_logits": torch.zeros(1, 5, k),
        "fcos_labels": torch.tensor([[4, 4, k, k, k]]),
        "fcos_gt_index": torch.tensor([[0, 0, -1, -1, -1]]),
        "fcos_reg_targets": torch.ones(1, 5, 4),
        "selected": torch.tensor([[0, 1, 2]]),
        "valid": torch.ones(1, 3, dtype=torch.bool),
        "pred_logits": logits,
        "pred_ltrb": ltrb,
        "pred_ctrness": torch.zeros(1, 3),
    }
    losses = crit(outputs)
    from detr_variants.modeling.criterion import sigmoid_focal_loss

    targets = torch.zeros(3, k)
    targets[1, 4] = 1
    weights = torch.ones(3, k)
    weights[0, 4] = 0.1
    expected = (sigmoid_focal_loss(logits[0], targets) * weights).sum() / (2 * (1 + 0.1 * 2))
    assert losses["loss_fcos_cls"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["loss_fcos_loc"].item() == pytest.approx(0.0, abs=1e-6)  # perfect boxes
    bce = (
        nn.functional.binary_cross_entropy_with_logits(
            torch.zeros(2), torch.ones(2), reduction="sum"
        )
        / 2
    )
    assert losses["loss_fcos_ctr"].item() == pytest.approx(
        bce.item(), rel=1e-5
    )  # centerness target 1


def test_rcnn_class_loss_matches_the_lowest_cost_candidate():
    predictor = small_model(SYNTHETIC[1]).roi_heads.box_predictor
    k = predictor.num_classes
    boxes = torch.tensor([[10.0, 10, 50, 50], [12, 12, 52, 52], [60, 60, 90, 90], [0, 0, 5, 5]])
    props = Instances(
        (100, 100),
        proposal_boxes=Boxes(boxes),
        gt_classes=torch.tensor([2, 2, 4, k]),
        gt_boxes=Boxes(torch.tensor([[10.0, 10, 50, 50]] * 2 + [[60.0, 60, 90, 90]] * 2)),
        gt_idxs=torch.tensor([0, 0, 1, 1]),
    )
    scores = torch.zeros(4, k + 1)
    scores[1, 2] = 3.0  # RoI 1 is confident, but its box is worse; cost decides
    deltas = torch.zeros(4, 4 * k)
    with EventStorage():
        losses = predictor.losses((scores, deltas), [props])
    # costs: RoI 0 -p + 2·0 (perfect box), RoI 1 -p' + 2·GIoU loss; recompute and pick the lower
    p = scores.softmax(-1)
    from fvcore.nn import giou_loss

    c0 = -p[0, 2] + 2 * giou_loss(boxes[0], boxes[0])
    c1 = -p[1, 2] + 2 * giou_loss(boxes[1], torch.tensor([10.0, 10, 50, 50]))
    winner = 0 if c0 <= c1 else 1
    target = torch.tensor([k, k, 4, k])
    target[winner] = 2
    ce = nn.functional.cross_entropy(scores, target, reduction="none")
    p_t = p.gather(1, target[:, None]).squeeze(1)
    focal = torch.where(target < k, torch.ones(4), 2 * (1 - p_t) ** 2)
    weight = torch.where(target < k, torch.ones(4), torch.full((4,), 0.1))
    expected = (ce * focal * weight).sum() / (weight.sum() + 1e-6)
    assert losses["loss_cls"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["loss_box_reg"].item() > 0  # RoI 1 has a box error


# ------------------------------------------------------------------ hybrid optimizer and clipping
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.encoder(x))


def _toy_optimizer(model):
    return HybridOptimizer(
        hybrid_param_groups(
            model,
            lr=0.01,
            adamw_lr=1e-4,
            weight_decay=1e-4,
            adamw_params=["encoder."],
            weight_decay_norm=0.0,
        ),
        lr=0.01,
        momentum=0.9,
        adamw_lr=1e-4,
        weight_decay=1e-4,
    )


def test_hybrid_optimizer_groups_follow_the_recipe():
    model = small_model(SYNTHETIC[0])
    cfg = get_config(SYNTHETIC[0])
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    sgd = {id(p) for g in opt.sgd.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in adamw) == name.startswith("encoder."), name
        assert (id(p) in sgd) == (not name.startswith("encoder.")), name
    assert {g["lr"] for g in opt.adamw.param_groups} == {1e-4}
    assert {g["lr"] for g in opt.sgd.param_groups} == {0.01}
    assert all(g["momentum"] == 0.9 for g in opt.sgd.param_groups)
    norms = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d))
        for p in m.parameters(recurse=False)
    }
    for g in opt.param_groups:
        assert g["weight_decay"] == (0.0 if all(id(p) in norms for p in g["params"]) else 1e-4)
    assert opt.param_groups == opt.sgd.param_groups + opt.adamw.param_groups


def test_hybrid_optimizer_lr_schedule_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = _Toy()
    opt = _toy_optimizer(model)
    scheduler = LRMultiplier(
        opt, MultiStepParamScheduler([1.0, 0.1], milestones=[5], num_updates=10), max_iter=10
    )
    x = torch.randn(8, 4)
    for _ in range(6):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
        scheduler.step()
    assert [g["lr"] for g in opt.sgd.param_groups] == pytest.approx(
        [0.001] * len(opt.sgd.param_groups)
    )
    assert [g["lr"] for g in opt.adamw.param_groups] == pytest.approx(
        [1e-5] * len(opt.adamw.param_groups)
    )

    state = copy.deepcopy(opt.state_dict())
    clone = copy.deepcopy(model)
    restored = _toy_optimizer(clone)
    restored.load_state_dict(state)
    assert restored.param_groups == restored.sgd.param_groups + restored.adamw.param_groups
    assert [g["lr"] for g in restored.param_groups] == [g["lr"] for g in opt.param_groups]
    restored.param_groups[0]["lr"] = (
        0.5  # what LRMultiplier does: it must reach the inner optimizer
    )
    assert restored.sgd.param_groups[0]["lr"] == 0.5
    restored.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    for m, o in ((model, opt), (clone, restored)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.allclose(a, b, atol=1e-7)  # same momentum buffers and Adam moments


def test_clipping_only_the_transformer_parameters():
    torch.manual_seed(0)
    model = _Toy()

    class LossModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, data):
            return {"loss": 1000 * self.net(data[0]).square().sum()}

    wrapper = LossModel().train()
    params = clip_parameters(wrapper, "encoder.")
    assert {id(p) for p in params} == {id(p) for p in model.encoder.parameters()}
    assert clip_parameters(wrapper, None) is None
    with pytest.raises(ValueError):
        clip_parameters(wrapper, "no_such_module")
    opt = _toy_optimizer(wrapper)
    seen = {}

    def record(*args, **kwargs):
        seen["encoder"] = torch.norm(
            torch.stack([p.grad.norm() for p in model.encoder.parameters()])
        )
        seen["head"] = torch.norm(torch.stack([p.grad.norm() for p in model.head.parameters()]))

    opt.step = record
    trainer = SetPredictionTrainer(
        wrapper, [[torch.randn(4, 4)]] * 2, opt, clip_max_norm=0.01, clip_params=params
    )
    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer.iter = 0
        trainer.run_step()
    assert seen["encoder"].item() == pytest.approx(0.01, rel=1e-3)  # clipped
    assert seen["head"].item() > 1.0  # untouched


def test_training_loop_with_the_hybrid_optimizer_checkpoints_and_resumes(tiny_shapes, tmp_path):
    cfg = apply_overrides(
        get_config(SYNTHETIC[0]),
        [
            "model.encoder.num_layers=1",
            "model.num_fois=50",
            *tiny_run_overrides(tmp_path),
            "train.max_iter=2",
            "train.checkpointer.period=1",
        ],
    )
    train(cfg)
    checkpoint = torch.load(os.path.join(tmp_path, "model_final.pth"), weights_only=False)
    state = checkpoint["trainer"]["optimizer"]
    assert state["sgd"]["state"] and state["adamw"]["state"]
    cfg.train.max_iter = 3
    train(cfg, resume=True)
    with open(os.path.join(tmp_path, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    iterations = [r["iteration"] for r in records if "total_loss" in r]
    assert iterations == [0, 1, 2] and all(
        math.isfinite(r["total_loss"]) for r in records if "total_loss" in r
    )


# ------------------------------------------------------------------ official checkpoints
def _official_fcos_names(state_dict):
    """Our TSP-FCOS names → the released ``MyFCOS`` names (the inverse of the converter's table),
    with the persistent buffers the release holds."""
    return rename_back(state_dict, FCOS_NAMES) | {
        "pixel_mean": torch.zeros(3, 1, 1),
        "pixel_std": torch.ones(3, 1, 1),
    }


def _official_rcnn_names(state_dict):
    """Our TSP-RCNN names → the released ones (the inverse of the converter's table)."""
    return rename_back(state_dict, RCNN_NAMES) | {
        "pixel_mean": torch.zeros(3, 1, 1),
        "pixel_std": torch.ones(3, 1, 1),
        "proposal_generator.anchor_generator.cell_anchors.0": torch.zeros(9, 4),
    }


@pytest.mark.parametrize(
    "name,arch,inverse",
    [
        (SYNTHETIC[0], "tsp_fcos", _official_fcos_names),
        (SYNTHETIC[1], "tsp_rcnn", _official_rcnn_names),
    ],
)
def test_official_converter_round_trip(name, arch, inverse):
    model = small_model(
        name, "model.num_classes=80" if "fcos" in name else "model.roi_heads.num_classes=80"
    )
    reference = {
        k: torch.randn_like(v) if v.dtype.is_floating_point else v
        for k, v in model.state_dict().items()
    }
    official = inverse(reference)
    assert (
        "transformer_encoder.layers.0.norm1.weight" in official
        or "roi_heads.box_head.transformer_encoder.layers.0.norm1.weight" in official
    )
    converted = convert_checkpoint({"model": official}, "official", arch)
    assert set(converted) == set(reference)
    for key, value in reference.items():
        assert torch.equal(converted[key], value), key
    incompatible = Checkpointer(model, strict=True)._load_model({"model": converted})
    assert not incompatible.unexpected_keys
    with pytest.raises(KeyError, match="not understood"):
        convert_checkpoint(
            {"model": official | {"some.unknown.weight": torch.zeros(1)}}, "official", arch
        )


# ------------------------------------------------------------------ converters vs official forwards
def _perturbed(model, scale=0.05, seed=0):
    """The model's state with every float entry perturbed, so that every row and tensor is
    distinguishable (variances kept positive)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if not v.dtype.is_floating_point:
            out[k] = v
        elif k.endswith("running_var"):
            out[k] = v * (1 + 0.5 * torch.rand(v.shape, generator=g))
        else:
            out[k] = v + scale * torch.randn(v.shape, generator=g)
    return out


def _official_encoder(sd, prefix, x, pos, nhead, key_padding_mask=None):
    """The released pre-norm ``TransformerEncoder`` (``forward_pre``, eval) on (B, N, d), read
    from official names: norm1 → self-attention (q = k = x + pos) → norm2 → linear1/ReLU/linear2,
    then the final ``norm``."""
    d = x.shape[-1]
    layers = sorted(
        {int(k[len(prefix) :].split(".")[1]) for k in sd if k.startswith(prefix + "layers.")}
    )
    for i in layers:
        p = f"{prefix}layers.{i}."
        h = nn.functional.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        q = (h + pos).transpose(0, 1)
        attn = nn.functional.multi_head_attention_forward(
            q,
            q,
            h.transpose(0, 1),
            d,
            nhead,
            sd[p + "self_attn.in_proj_weight"],
            sd[p + "self_attn.in_proj_bias"],
            None,
            None,
            False,
            0.0,
            sd[p + "self_attn.out_proj.weight"],
            sd[p + "self_attn.out_proj.bias"],
            training=False,
            key_padding_mask=key_padding_mask,
            need_weights=False,
        )[0]
        x = x + attn.transpose(0, 1)
        h = nn.functional.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        h = nn.functional.linear(h, sd[p + "linear1.weight"], sd[p + "linear1.bias"]).relu()
        x = x + nn.functional.linear(h, sd[p + "linear2.weight"], sd[p + "linear2.bias"])
    return nn.functional.layer_norm(x, (d,), sd[prefix + "norm.weight"], sd[prefix + "norm.bias"])


def _official_bn(x, sd, p):
    return nn.functional.batch_norm(
        x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], eps=1e-5
    )


def _official_top_block(sd, p5):
    """``LastLevelMaxPoolV2``: P6 = BN(conv_s2(P5)), P7 = BN(conv_s2(ReLU(P6)))."""
    out = []
    for name, x in (("p6", p5), ("p7", None)):
        x = p5 if name == "p6" else out[-1].relu()
        p = f"backbone.top_block.{name}."
        x = nn.functional.conv2d(x, sd[p + "conv.weight"], sd.get(p + "conv.bias"), 2, 1)
        out.append(_official_bn(x, sd, p + "bn."))
    return out


def test_official_fcos_checkpoint_gives_the_official_head_outputs():
    """A converted official-named TSP-FCOS state (every entry distinct) reproduces, per class
    and FoI, what the released forward computes from the official names: P6/P7, the FCOS
    towers and FoI logits, and the transformer part (enc_proj, post_enc_proj_norm, pyramid
    embedding, pre-norm encoder, cls_logits/ctrness/bbox_pred·scales). A swapped row or name
    fails it. Tolerance 1e-4 (float32, different op order)."""
    model = small_model(SYNTHETIC[0], "model.num_fois=50").eval()
    official = _official_fcos_names(_perturbed(model))
    model.load_state_dict(convert_checkpoint({"model": official}, "official", "tsp_fcos"))
    sd, tol = official, dict(atol=1e-4, rtol=1e-4)
    images, _ = model.preprocess_image([image_input(96, 128, with_instances=False)])
    with torch.no_grad():
        feats = model.backbone(images.tensor)
        dense = model.dense_outputs(images)
        selected = model.select_fois(dense["scores"], dense["valid"])
        out = model.encode(dense, selected)
        levels = model.in_features
        for ref, name in zip(_official_top_block(sd, feats["p5"]), ("p6", "p7")):
            torch.testing.assert_close(feats[name], ref, **tol)
        towers, logits = {}, []
        for head in ("cls", "bbox"):
            towers[head] = []
            for level in levels:
                x = feats[level]
                for j in range(model.foi_head.cls_subnet.__len__() // 3):
                    p = f"fcos_head.{head}_tower."
                    x = nn.functional.conv2d(
                        x, sd[f"{p}{3 * j}.weight"], sd[f"{p}{3 * j}.bias"], 1, 1
                    )
                    gn = sd[f"{p}{3 * j + 1}.weight"], sd[f"{p}{3 * j + 1}.bias"]
                    x = nn.functional.group_norm(x, 32, *gn).relu()
                towers[head].append(x)
        for x in towers["cls"]:
            w, b = sd["fcos_head.cls_logits.weight"], sd["fcos_head.cls_logits.bias"]
            logits.append(nn.functional.conv2d(x, w, b, 1, 1).flatten(2).transpose(1, 2))
        torch.testing.assert_close(dense["local_logits"], torch.cat(logits, 1), **tol)
        joint = torch.cat(
            [torch.cat([c, b], 1).flatten(2).transpose(1, 2) for c, b in zip(*towers.values())], 1
        )[0, selected[0]]
        x = nn.functional.linear(joint, sd["enc_proj.weight"], sd["enc_proj.bias"])
        x = nn.functional.layer_norm(
            x, x.shape[-1:], sd["post_enc_proj_norm.weight"], sd["post_enc_proj_norm.bias"]
        )
        level = dense["levels"][selected[0]]
        sine = dense["pos"][0, selected[0]] - model.level_embed[level]  # checked above
        pos = sine + sd["pyramid_position_embedding"][level]
        memory = _official_encoder(sd, "transformer_encoder.", x[None], pos[None], 8)[0]
        cls = nn.functional.linear(memory, sd["cls_logits.weight"], sd["cls_logits.bias"])
        ctr = nn.functional.linear(memory, sd["ctrness.weight"], sd["ctrness.bias"])[:, 0]
        reg = nn.functional.linear(memory, sd["bbox_pred.weight"], sd["bbox_pred.bias"]).relu()
        reg = reg * sd["scales"][level, None]
    torch.testing.assert_close(out["pred_logits"][0], cls, **tol)
    torch.testing.assert_close(out["pred_ctrness"][0], ctr, **tol)
    torch.testing.assert_close(out["pred_ltrb"][0], reg, **tol)
    assert cls.std(0).min() > 1e-3  # the classes are told apart


def test_official_rcnn_checkpoint_gives_the_official_head_outputs():
    """The same for TSP-RCNN: P6/P7, the RPN towers (``obj_conv``/``anchor_conv`` with the
    per-level ``*_bn_list``) and the box head (input_proj + dec_pos_embed_proj(RoI encoding) →
    post_input_proj_norm → encoder → cls_score rows / bbox_pred MLP). Tolerance 1e-4."""
    model = small_model(SYNTHETIC[1]).eval()
    official = _official_rcnn_names(_perturbed(model, scale=0.01))
    model.load_state_dict(convert_checkpoint({"model": official}, "official", "tsp_rcnn"))
    sd, tol = official, dict(atol=1e-4, rtol=1e-4)
    seen = {}
    model.proposal_generator.rpn_head.register_forward_hook(
        lambda m, args, out: seen.update(rpn_in=args[0], rpn_out=out)
    )
    model.roi_heads.box_head.register_forward_hook(
        lambda m, args, out: seen.update(pooled=args[0], proposals=args[1])
    )
    model.roi_heads.box_predictor.register_forward_hook(
        lambda m, args, out: seen.update(predictions=out)
    )
    with torch.no_grad():
        feats = model.backbone(
            model.preprocess_image([image_input(96, 128, with_instances=False)]).tensor
        )
        for ref, name in zip(_official_top_block(sd, feats["p5"]), ("p6", "p7")):
            torch.testing.assert_close(feats[name], ref, **tol)
        model([image_input(96, 128, with_instances=False)])
        rpn = "proposal_generator.rpn_head."
        for level, x in enumerate(seen["rpn_in"]):
            for tower, out_name, out in (
                ("obj", "objectness_logits", seen["rpn_out"][0]),
                ("anchor", "anchor_deltas", seen["rpn_out"][1]),
            ):
                t = x
                for j in range(len(model.proposal_generator.rpn_head.obj_convs)):
                    p = f"{rpn}{tower}_conv.{j}.conv."
                    t = nn.functional.conv2d(t, sd[p + "weight"], sd[p + "bias"], 1, 1)
                    t = _official_bn(t, sd, f"{rpn}{tower}_bn_list.{level}.{j}.").relu()
                ref = nn.functional.conv2d(
                    t, sd[f"{rpn}{out_name}.weight"], sd[f"{rpn}{out_name}.bias"]
                )
                torch.testing.assert_close(out[level], ref, **tol)
        (props,) = seen["proposals"]
        box = "roi_heads.box_head."
        pe = roi_position_encoding(
            props.proposal_boxes.tensor, props.image_size, model.roi_heads.box_head.hidden_dim // 8
        )
        x = nn.functional.linear(
            seen["pooled"].flatten(1), sd[box + "input_proj.weight"], sd[box + "input_proj.bias"]
        )
        x = x + nn.functional.linear(
            pe, sd[box + "dec_pos_embed_proj.weight"], sd[box + "dec_pos_embed_proj.bias"]
        )
        x = nn.functional.layer_norm(
            x,
            x.shape[-1:],
            sd[box + "post_input_proj_norm.weight"],
            sd[box + "post_input_proj_norm.bias"],
        )
        memory = _official_encoder(sd, box + "transformer_encoder.", x[None], pe[None], 8)[0]
        pred = "roi_heads.box_predictor."
        scores = nn.functional.linear(
            memory, sd[pred + "cls_score.weight"], sd[pred + "cls_score.bias"]
        )
        deltas = memory
        for j in range(3):
            p = f"{pred}bbox_pred.layers.{j}."
            deltas = nn.functional.linear(deltas, sd[p + "weight"], sd[p + "bias"])
            deltas = deltas.relu() if j < 2 else deltas
    torch.testing.assert_close(seen["predictions"][0], scores, **tol)
    torch.testing.assert_close(seen["predictions"][1], deltas, **tol)
    assert len(props) > 10 and scores.std(0).min() > 1e-3
