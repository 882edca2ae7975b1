# The demo recipe (`make demo`, README "The demo"): what learns fastest per CPU-second on the
# shapes_demo level, measured on 2 cores (README): R18 trained from scratch at the full learning
# rate (no pretrained weights, so BatchNorm and no 0.1x backbone multiplier), transformers 128
# wide with 3+3 layers and FFN 512, 20 queries (at most 4 objects per image), AdamW 4e-4,
# batch 4 without random crops (configs/common/data/shapes_demo.py), a x0.1 drop at 80% of the
# iterations.
from .data.shapes_demo import dataloader  # noqa: F401
from .schedule import step_schedule

lr_multiplier = step_schedule(total_epochs=10, drop_epochs=[8])

WIDTH = 128


def make_demo_sized(model, optimizer, train, *, max_iter: int, output_dir: str):
    """Applies the demo recipe to a paper's model config, optimizer and ``train`` in place."""
    model.backbone.update(depth=18, norm="BN", freeze_at=0)
    model.update(hidden_dim=WIDTH, num_queries=20, num_classes=3)
    model.position_embedding.num_pos_feats = WIDTH // 2
    for part in ("encoder", "decoder"):
        model[part].num_layers = 3
        model[part].layer.update(d_model=WIDTH, dim_feedforward=512)
        if model[part].get("norm") is not None:
            model[part].norm.normalized_shape = WIDTH
    optimizer.lr = 4e-4
    optimizer.params.lr_multipliers.backbone = 1.0
    train.update(
        epochs=None,
        max_iter=max_iter,
        init_checkpoint="",
        output_dir=output_dir,
        checkpointer=dict(period=max_iter, max_to_keep=1),
        eval_period=0,  # evaluate at the end
        log_period=50,
        seed=0,
    )
