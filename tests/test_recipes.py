"""The *_r18_synthetic recipes (configs/common/synthetic.py): each paper's model with DETR's
CPU-sized settings, so their COCO APs compare directly, and each one trains through the engine."""

import pytest

from detr_variants.engine.lazy_train import apply_overrides
from detr_variants.layers.smca_attention import parse_encoder_layout
from detr_variants.model_zoo import get_config
from helpers import tiny_run_overrides, train_and_evaluate_tiny

DETR = "detr/detr_r18_synthetic"
_LAYERS, _BLOCKS = (lambda enc: enc.num_layers), (lambda enc: len(parse_encoder_layout(enc.layout)))
# config, its encoder's layer count (a multi-scale SMCA layout counts its blocks), its features
SAME_AS_DETR = [
    ("conditional_detr/conditional_detr_r18_synthetic", _LAYERS, ["res5"]),
    ("smca_detr/smca_r18_synthetic", _LAYERS, ["res5"]),
    ("smca_detr/smca_ms_r18_synthetic", _BLOCKS, ["res4", "res5"]),
]
# config -> the overrides that shrink it further for two iterations and a COCO evaluation
ENGINE_RUNS = {
    "conditional_detr/conditional_detr_r18_synthetic": [
        "model.encoder.num_layers=1",
        "model.decoder.num_layers=2",
    ],
    "smca_detr/smca_ms_r18_synthetic": [
        "model.encoder.layout=intra-multi",
        "model.decoder.num_layers=2",
    ],
}


@pytest.mark.parametrize(
    "name, encoder_layers, features", SAME_AS_DETR, ids=[row[0] for row in SAME_AS_DETR]
)
def test_synthetic_config_matches_detr_synthetic(name, encoder_layers, features):
    """Same backbone, images, data, batch, iterations, schedule, layer counts, FFN and queries."""
    ours, detr = get_config(name), get_config(DETR)
    assert ours.dataloader == detr.dataloader
    for field in ("depth", "norm", "freeze_at"):
        assert ours.model.backbone[field] == detr.model.backbone[field]
    assert list(ours.model.backbone.out_features) == features
    assert encoder_layers(ours.model.encoder) == detr.model.encoder.num_layers
    assert ours.model.decoder.num_layers == detr.model.decoder.num_layers
    for part in ("encoder", "decoder"):
        assert ours.model[part].layer.dim_feedforward == detr.model[part].layer.dim_feedforward
    for field in ("num_queries", "num_classes", "hidden_dim"):
        assert ours.model[field] == detr.model[field]
    assert ours.lr_multiplier == detr.lr_multiplier and ours.optimizer.lr == detr.optimizer.lr
    for field in (
        "max_iter",
        "epochs",
        "init_checkpoint",
        "eval_period",
        "checkpointer",
        "clip_grad",
    ):
        assert ours.train[field] == detr.train[field]


def test_multi_scale_smca_keeps_the_papers_encoder_shape():
    """Intra-scale blocks around one multi-scale block."""
    cfg = get_config("smca_detr/smca_ms_r18_synthetic")
    assert parse_encoder_layout(cfg.model.encoder.layout) == ["intra", "multi", "intra"]
    assert list(get_config(DETR).model.backbone.out_features) == ["res5"]


@pytest.mark.parametrize("name", ENGINE_RUNS)
def test_synthetic_config_trains_and_evaluates_through_the_engine(name, tiny_shapes, tmp_path):
    """Two CPU iterations of the synthetic recipe on the tiny dataset, then COCO evaluation."""
    cfg = apply_overrides(get_config(name), [*ENGINE_RUNS[name], *tiny_run_overrides(tmp_path)])
    train_and_evaluate_tiny(cfg, tmp_path)
