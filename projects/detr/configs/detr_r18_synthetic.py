# DETR on the embedded synthetic_shapes dataset, sized for 2 CPU cores. Same architecture as the
# paper's, made smaller: R18 trained from scratch (no pretrained weights here, so BatchNorm
# instead of frozen statistics), 3 encoder + 3 decoder layers, FFN 1024, 50 queries (at most 8
# objects per image). Every *_r18_synthetic config of this repository uses the same backbone,
# images, batch and iteration count, so their COCO APs compare directly.
from ....configs.common.data.synthetic import dataloader
from ....configs.common.schedule import step_schedule
from .detr_r50_500ep import model, optimizer, train

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
    output_dir="./output/detr_r18_synthetic",
    checkpointer=dict(period=400, max_to_keep=2),
    eval_period=0,  # evaluate at the end
    log_period=20,
)
