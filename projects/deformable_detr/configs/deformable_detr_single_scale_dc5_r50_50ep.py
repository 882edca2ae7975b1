# Single-scale Deformable DETR on a dilated C5 (DC5, stride 16).
from .deformable_detr_single_scale_r50_50ep import (
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.backbone.dc5 = True
train.output_dir = "./output/deformable_detr_single_scale_dc5_r50_50ep"
