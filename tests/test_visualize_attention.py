"""Seeing inside the models (issue #16 §1): ``record_attention`` records the tensors each
cross-attention really uses (checked against the paper's formulas and against the layer's own
output), leaves no hook behind and changes no output; ``Instances.query_indices`` names the
query / FoI / proposal behind each detection; tools/visualize_attention.py writes its PNGs.

Untrained tiny models (R18, 1-2 layers, inputs of about 64x80): nothing here needs trained weights.
"""

import importlib.util
import inspect
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import instantiate

from detr_variants.engine.lazy_train import apply_overrides
from detr_variants.layers.box_ops import box_cxcywh_to_xyxy
from detr_variants.layers.smca_attention import gaussian_log_prior
from detr_variants.model_zoo import config_path, get_config
from detr_variants.utils.recorder import record_attention
from helpers import image_input

LAYERS = ["model.encoder.num_layers=1", "model.decoder.num_layers=2"]
CONFIGS = {
    "detr": ("detr/detr_r18_synthetic", LAYERS),
    "deformable": ("deformable_detr/deformable_detr_r18_synthetic", LAYERS),
    "deformable_refine": (
        "deformable_detr/deformable_detr_refine_r50_50ep",
        [
            *LAYERS,
            "model.backbone.depth=18",
            "model.backbone.norm=BN",
            "model.backbone.freeze_at=0",
        ],
    ),
    "conditional": ("conditional_detr/conditional_detr_r18_synthetic", LAYERS),
    "smca": ("smca_detr/smca_r18_synthetic", LAYERS),
    "smca_ms": ("smca_detr/smca_ms_r18_synthetic", LAYERS[1:]),
    "tsp_fcos": ("tsp/tsp_fcos_r18_synthetic", []),
    "tsp_rcnn": ("tsp/tsp_rcnn_r18_synthetic", []),
}


def build(name):
    config, overrides = CONFIGS[name]
    torch.manual_seed(0)
    return instantiate(apply_overrides(get_config(config), overrides).model).eval()


def batch():
    """Two differently sized images (so the memory has padding), boxes rescaled x2 on output."""
    return [
        {**image_input(64, 80, with_instances=False, seed=1), "height": 128, "width": 160},
        {**image_input(40, 48, with_instances=False, seed=2), "height": 80, "width": 96},
    ]


def call_arguments(module, store):
    """A pre-hook that keeps a module call's arguments by name."""

    def hook(m, args, kwargs):
        store.update(inspect.signature(m.forward).bind(*args, **kwargs).arguments)

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def output_of(module, store):
    return module.register_forward_hook(lambda m, args, out: store.update(output=out))


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def predictions(model, inputs):
    with torch.no_grad():
        return [x["instances"] for x in model(inputs)]


def assert_same_predictions(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x.scores, y.scores) and torch.equal(x.query_indices, y.query_indices)
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)


# ---------------------------------------------------------------------------- the recorder
@pytest.mark.parametrize("name", ["deformable", "deformable_refine"])
def test_deformable_sampling_locations_and_weights_follow_eq3(name):
    """Locations = reference + offsets / (W_l, H_l) for point references, reference centre +
    offsets · (w, h) / 2P for the box references of box refinement (official ``MSDeformAttn``),
    and weights = softmax over levels x points of the query's projections (paper eq. 3), for the
    recorded (last) layer only; to 1e-5 (the layer folds the 1/(W_l, H_l) into the rows)."""
    model, inputs = build(name), batch()
    reference = predictions(model, inputs)
    attention, seen = model.decoder.layers[-1].cross_attn, {}
    handle = call_arguments(attention, seen)
    with record_attention(model, layers=[-1]) as record:
        recorded = predictions(model, inputs)
    handle.remove()
    assert record.kind == "deformable" and list(record.layers) == [1]
    rec = record.layers[1]
    n, q = seen["query"].shape[:2]
    m, lv, p = attention.num_heads, attention.num_levels, attention.num_points
    assert rec["locations"].shape == (n, q, m, lv, p, 2) and rec["weights"].shape == (
        n,
        q,
        m,
        lv,
        p,
    )
    with torch.no_grad():
        offsets = attention.sampling_offsets(seen["query"]).view(n, q, m, lv, p, 2)
        weights = attention.attention_weights(seen["query"]).view(n, q, m, lv * p).softmax(-1)
    ref = seen["reference_points"][:, :, None, :, None, :]
    assert ref.shape[-1] == (4 if name == "deformable_refine" else 2)
    if ref.shape[-1] == 2:
        expected = ref + offsets / seen["input_spatial_shapes"].flip(-1).float()[:, None, :]
    else:
        expected = ref[..., :2] + offsets * ref[..., 2:] * 0.5 / p
    torch.testing.assert_close(rec["locations"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(rec["weights"], weights.view(n, q, m, lv, p), atol=1e-6, rtol=0)
    assert torch.equal(rec["spatial_shapes"], seen["input_spatial_shapes"])
    assert no_hooks_left(model)
    assert_same_predictions(reference, recorded)


def test_conditional_spatial_and_content_maps_make_the_layers_attention():
    """softmax(content + spatial) over the unpadded tokens is the recorded attention, and
    out_proj(attention @ v) is the layer's output, to 1e-5; padded tokens get weight 0."""
    model, inputs = build("conditional"), batch()
    reference = predictions(model, inputs)
    attention, out, shape = model.decoder.layers[0].cross_attn, {}, {}
    handles = [
        output_of(attention, out),
        model.input_proj.register_forward_hook(lambda m, a, o: shape.update(hw=o.shape[-2:])),
    ]
    with record_attention(model) as record:
        recorded = predictions(model, inputs)
    for handle in handles:
        handle.remove()
    assert record.kind == "conditional" and sorted(record.layers) == [0, 1]
    rec = record.layers[0]
    b, heads, q = len(inputs), attention.num_heads, model.query_embed.weight.shape[0]
    s = shape["hw"][0] * shape["hw"][1]
    for name in ("content", "spatial", "weights"):
        assert rec[name].shape == (b, heads, q, s), name
    padding = rec["padding"][:, None, None, :]
    assert padding.any() and not padding.all()
    combined = (rec["content"] + rec["spatial"]).masked_fill(padding, float("-inf")).softmax(-1)
    torch.testing.assert_close(rec["weights"], combined, atol=1e-6, rtol=0)
    assert rec["weights"].masked_select(padding).abs().max() == 0
    with torch.no_grad():
        output = attention.out_proj((rec["weights"] @ rec["value"]).transpose(1, 2).flatten(2))
    torch.testing.assert_close(output, out["output"], atol=1e-5, rtol=0)
    assert no_hooks_left(model)
    assert_same_predictions(reference, recorded)


@pytest.mark.parametrize("name", ["smca", "smca_ms"])
def test_smca_priors_follow_eq4_and_modulate_the_layers_attention(name):
    """Each level's prior is ``−(s_x·(x−c_x)² + s_y·(y−c_y)²)/β`` on the cell grid (eq. 4, with
    the released distance factors) from the layer's centres and scales; the recorded modulated
    attention (a softmax per level with scale selection) reproduces the layer's output through
    out_proj(Σ_l α_l·W_l·v_l), to 1e-5."""
    model, inputs = build(name), batch()
    reference = predictions(model, inputs)
    layer = model.decoder.layers[-1]
    seen, out = {}, {}
    handles = [call_arguments(layer.modulation, seen), output_of(layer.cross_attn, out)]
    with record_attention(model, layers=[-1]) as record:
        recorded = predictions(model, inputs)
    for handle in handles:
        handle.remove()
    rec = record.layers[len(model.decoder.layers) - 1]
    shapes = [(int(h), int(w)) for h, w in seen["spatial_shapes"]]
    assert record.kind == "smca" and len(rec["priors"]) == len(shapes) == layer.num_levels
    with torch.no_grad():
        centers, scales = layer.modulation.centers_and_scales(
            seen["x"], seen["centers"], seen["level_sizes"]
        )
    factors = layer.modulation.level_distance_factors or [1.0] * len(shapes)
    for lvl, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
        c = centers[:, :, lvl].permute(0, 2, 1, 3)[..., None, :]  # (B, H, Q, 1, 2)
        sc = scales[:, :, lvl].permute(0, 2, 1, 3)[..., None, :]
        distance = sc[..., 0] * (xs.flatten() - c[..., 0]) ** 2
        distance = distance + sc[..., 1] * (ys.flatten() - c[..., 1]) ** 2
        expected = -distance / layer.modulation.beta * factors[lvl]
        torch.testing.assert_close(rec["priors"][lvl], expected, atol=1e-4, rtol=1e-6)
        assert rec["weights"][lvl].shape == expected.shape
    with torch.no_grad():
        values = rec["value"].split([h * w for h, w in shapes], dim=2)
        if rec["level_weights"] is None:
            mixed = sum(wt @ v for wt, v in zip(rec["weights"], values))
        else:
            alpha = rec["level_weights"].transpose(1, 2)[:, None, :, :, None]
            mixed = sum(alpha[:, :, i] * (wt @ v) for i, (wt, v) in enumerate(zip(rec["weights"], values)))  # fmt: skip
        output = layer.cross_attn.out_proj(mixed.transpose(1, 2).flatten(2))
    torch.testing.assert_close(output, out["output"], atol=1e-5, rtol=0)
    assert (name == "smca_ms") == (rec["level_weights"] is not None)
    assert no_hooks_left(model)
    assert_same_predictions(reference, recorded)


def test_gaussian_log_prior_matches_the_recorded_prior_helper():
    """The formula re-derived in the SMCA test is the library's (a 2x3 grid, one query)."""
    c, s = torch.tensor([[[[1.0, 0.5]]]]), torch.tensor([[[[2.0, 0.5]]]])
    prior = gaussian_log_prior(c, s, 2, 3, beta=8.0)[0, 0, 0]
    expected = [-(2 * (x - 1) ** 2 + 0.5 * (y - 0.5) ** 2) / 8 for y in range(2) for x in range(3)]
    torch.testing.assert_close(prior, torch.tensor(expected))


def test_recording_a_model_without_those_layers_or_a_missing_layer_is_refused():
    with pytest.raises(ValueError, match="no Deformable, Conditional or SMCA decoder layer"):
        with record_attention(build("detr")):
            pass
    model = build("conditional")
    with pytest.raises(ValueError, match=r"decoder layers \[2\] asked for; the model has 2"):
        with record_attention(model, layers=[2]):
            pass
    assert no_hooks_left(model)


# ---------------------------------------------------------------------------- query indices
def expected_detection(name, outputs, i, query, label, size):
    """(score, box in the input frame) of a detection recomputed from the raw outputs."""
    h, w = size
    if name == "detr":
        return outputs["pred_logits"][i, query].softmax(-1)[label], box_cxcywh_to_xyxy(
            outputs["pred_boxes"][i, query]
        ) * torch.tensor([w, h, w, h])
    if name == "deformable":
        return outputs["pred_logits"][i, query, label].sigmoid(), box_cxcywh_to_xyxy(
            outputs["pred_boxes"][i, query]
        ) * torch.tensor([w, h, w, h])
    if name == "tsp_fcos":
        score = outputs["pred_logits"][i, query, label].sigmoid().sqrt()
        return score, outputs["pred_boxes"][i, query]
    boxes = outputs["pred_boxes"][i, query].view(-1, 4)
    score = outputs["pred_logits"][i, query].softmax(-1)[label]
    return score, boxes[label if len(boxes) > 1 else 0]


@pytest.mark.parametrize("name", ["detr", "deformable", "tsp_fcos", "tsp_rcnn"])
def test_query_index_reproduces_each_detections_score_and_box(name):
    """Through ``detector_postprocess`` (boxes x2, clipped; empty ones dropped): the score of
    each detection is its query's (FoI's, proposal's) score for its class and the box its
    query's box, x2 and clipped, to 1e-5 (boxes 1e-4 px)."""
    model, inputs = build(name), batch()
    results = predictions(model, inputs)
    with torch.no_grad():
        images = model.preprocess_image(inputs)  # GeneralizedRCNN: an ImageList only
        images, padding = images if isinstance(images, tuple) else (images, None)
        outputs = model.compute_outputs(images, padding)
    for i, (inst, (h, w)) in enumerate(zip(results, images.image_sizes)):
        assert len(inst) > 0 and inst.query_indices.dtype == torch.long
        assert inst.image_size == (2 * h, 2 * w)
        for query, label, score, box in zip(
            inst.query_indices, inst.pred_classes, inst.scores, inst.pred_boxes.tensor
        ):
            want_score, want_box = expected_detection(name, outputs, i, query, label, (h, w))
            want_box = (want_box * 2).clamp(min=0)
            want_box = torch.minimum(want_box, torch.tensor([2.0 * w, 2.0 * h] * 2))
            torch.testing.assert_close(score, want_score, atol=1e-5, rtol=0)
            torch.testing.assert_close(box, want_box, atol=1e-4, rtol=0)


def test_tsp_rcnn_proposal_index_skips_the_rows_with_non_finite_predictions():
    """detectron2's fast_rcnn_inference drops RoIs with a NaN score before numbering what it
    keeps; the proposal index still reproduces each detection's score (1e-5), with RoI 0 of
    each image made NaN."""
    model, inputs = build("tsp_rcnn"), batch()
    counts = {}

    def nan_first_rois(module, args, out):  # the first RoI of each image gets NaN logits
        first = torch.tensor([0] + counts["rois"][:-1]).cumsum(0)
        return out[0].index_fill(0, first, float("nan")), out[1]

    hooks = [
        model.roi_heads.box_pooler.register_forward_hook(
            lambda m, args, out: counts.update(rois=[len(b) for b in args[1]])
        ),
        model.roi_heads.box_predictor.register_forward_hook(nan_first_rois),
    ]
    results = predictions(model, inputs)
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        outputs = model.compute_outputs(images)
    for handle in hooks:
        handle.remove()
    for i, inst in enumerate(results):
        assert len(inst) > 0 and not (inst.query_indices == 0).any()
        for query, label, score in zip(inst.query_indices, inst.pred_classes, inst.scores):
            want = outputs["pred_logits"][i, query].softmax(-1)[label]
            torch.testing.assert_close(score, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- the tool
def load_tool(repo_root):
    path = os.path.join(repo_root, "tools", "visualize_attention.py")
    spec = importlib.util.spec_from_file_location("visualize_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, expected",
    [
        ("deformable", ["img_deformable_det0.png", "img_deformable_det2.png"]),
        ("conditional", ["img_conditional_det0.png"]),
        ("smca_ms", ["img_smca_det0.png"]),
        ("tsp_fcos", ["img_fois.png"]),
        ("tsp_rcnn", ["img_proposals.png"]),
    ],
)
def test_visualize_attention_writes_the_pngs(name, expected, repo_root, tmp_path):
    """The tool on an untrained tiny model and a 50x70 image (resized to 64 by the overridden
    test resize): the named PNGs, each a real drawing (not one colour); SMCA with two of its
    heads (2 scales x prior/attention x 2 heads panels)."""
    tool = load_tool(repo_root)
    image = str(tmp_path / "img.png")
    cv2.imwrite(image, np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    config, overrides = CONFIGS[name]
    choice = ["--detections", "0", "2"] if name == "deformable" else ["--top", "1"]
    if name == "smca_ms":
        choice += ["--heads", "0", "5"]
    opts = [
        "train.allow_random_weights=True",
        "train.device=cpu",
        "dataloader.test.mapper.augmentations.min_size=64",
        "dataloader.test.mapper.augmentations.max_size=96",
        *overrides,
    ]
    written = tool.main(
        ["--config-file", config_path(config), "--input", image, "--output", str(tmp_path)]
        + choice
        + ["--opts", *opts]
    )
    assert [os.path.basename(p) for p in written] == expected
    for path in written:
        png = cv2.imread(path)
        assert png is not None and png.shape[0] > 100 and png.std() > 10, path


def test_frame_maps_feature_cells_back_to_the_original_image(repo_root):
    """A 50x70 image resized to 64x90 and padded to 64x96 (divisibility 32): strides from the
    rounded-up level sizes (also the stride-64 level, 1x2 cells), extents in original pixels."""
    frame = load_tool(repo_root).Frame((50, 70), (64, 90), 32)
    assert frame.padded == (64, 96)
    assert [frame.stride(*hw) for hw in [(8, 12), (4, 6), (2, 3), (1, 2)]] == [8, 16, 32, 64]
    assert frame.extent(2, 3) == pytest.approx((0.0, 96 * 70 / 90, 64 * 50 / 64, 0.0))
    assert frame.grid(6) == (2, 3)
    with pytest.raises(ValueError, match="no feature level"):
        frame.stride(5, 5)


def test_bad_choices_are_refused(repo_root):
    """A detection rank or a head that does not exist is a ValueError saying so."""
    from detectron2.structures import Boxes, Instances

    tool = load_tool(repo_root)
    inst = Instances((10, 10), scores=torch.tensor([0.2, 0.9]), query_indices=torch.tensor([4, 7]))
    inst.pred_boxes, inst.pred_classes = Boxes(torch.zeros(2, 4)), torch.tensor([1, 0])
    assert [d["query"] for d in tool.chosen_detections(inst, top=5)] == [7, 4]  # by score
    labels = [d["label"] for d in tool.chosen_detections(inst, top=2, class_names=["circle"])]
    assert labels[0].startswith("circle, score 0.90") and labels[1].startswith("class 1, ")
    with pytest.raises(ValueError, match=r"detections \[2\] do not exist: the model made 2"):
        tool.chosen_detections(inst, top=1, indices=[0, 2])
    with pytest.raises(ValueError, match=r"heads \[8\] do not exist: the layer has 8"):
        tool._heads([0, 8], 8)
