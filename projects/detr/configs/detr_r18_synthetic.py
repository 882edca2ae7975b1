# DETR on the embedded synthetic_shapes dataset, sized for 2 CPU cores: R18 trained from scratch
# (no pretrained weights here, so BatchNorm instead of frozen statistics), images of 160-256 px.
# The other papers' *_r18_synthetic configs use the same backbone, images, batch and iterations.
from ....configs.common.data.synthetic import dataloader
from .detr_r50_500ep import lr_multiplier, model, optimizer, train

from ....configs.common.schedule import step_schedule

model.backbone.update(depth=18, norm="BN", freeze_at=0)
model.num_classes = 6

optimizer.lr = 1e-4
lr_multiplier = step_schedule(total_epochs=10, drop_epochs=[8])

dataloader.train.total_batch_size = 8
train.update(
    epochs=None,
    max_iter=1500,
    init_checkpoint="",
    output_dir="./output/detr_r18_synthetic",
    checkpointer=dict(period=500, max_to_keep=2),
    eval_period=0,
    log_period=20,
)
