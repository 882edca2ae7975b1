# What every *_r18_synthetic experiment shares, so their COCO APs on synthetic_shapes compare
# directly: the data (configs/common/data/synthetic.py), R18 trained from scratch (no pretrained
# weights here, so BatchNorm instead of frozen statistics), transformers of 3 layers with FFN 1024,
# 50 queries (at most 8 objects per image), batch 8, 700 iterations with a x0.1 drop at 80%.
from .data.synthetic import dataloader  # noqa: F401
from .schedule import step_schedule

lr_multiplier = step_schedule(total_epochs=10, drop_epochs=[8])


def make_cpu_sized(model, train, output_dir: str):
    """Applies the shared CPU-sized settings to a paper's model config and ``train`` in place."""
    model.backbone.update(depth=18, norm="BN", freeze_at=0)
    for part in ("encoder", "decoder"):
        if part in model:
            if "num_layers" in model[part]:
                model[part].num_layers = 3
            model[part].layer.dim_feedforward = 1024
    if "num_queries" in model:
        model.num_queries = 50
    model.num_classes = 6
    train.update(
        epochs=None,
        max_iter=700,
        init_checkpoint="",
        output_dir=output_dir,
        checkpointer=dict(period=400, max_to_keep=2),
        eval_period=0,  # evaluate at the end
        log_period=20,
    )
