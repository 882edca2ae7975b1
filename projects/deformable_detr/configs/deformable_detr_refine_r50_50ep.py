# Deformable DETR + iterative bounding box refinement (Sec. 4.2).
from .deformable_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.with_box_refine = True
train.output_dir = "./output/deformable_detr_refine_r50_50ep"
