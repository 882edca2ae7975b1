# Conditional DETR on the embedded synthetic_shapes dataset, sized for 2 CPU cores. The R50 recipe
# changed exactly as projects/detr/configs/detr_r18_synthetic.py changes DETR's: R18 trained from
# scratch (BatchNorm), 3 encoder + 3 decoder layers, FFN 1024, 50 queries, 6 classes, the same
# images, batch (8), iteration count (800) and schedule, so the APs compare directly with DETR's.
from ....configs.common.data.synthetic import dataloader
from ....configs.common.schedule import step_schedule
from .conditional_detr_r50_50ep import model, optimizer, train

model.backbone.update(depth=18, norm="BN", freeze_at=0)
model.encoder.update(num_layers=3)
model.encoder.layer.dim_feedforward = 1024
model.decoder.update(num_layers=3)
model.decoder.layer.dim_feedforward = 1024
model.num_queries = 50
model.num_classes = 6

optimizer.lr = 1e-4
lr_multiplier = step_schedule(total_epochs=10, drop_epochs=[8])  # drop at 80% of training

train.update(
    epochs=None,
    max_iter=800,
    init_checkpoint="",
    output_dir="./output/conditional_detr_r18_synthetic",
    checkpointer=dict(period=400, max_to_keep=2),
    eval_period=0,  # evaluate at the end
    log_period=20,
)
