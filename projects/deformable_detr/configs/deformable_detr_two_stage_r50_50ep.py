# Deformable DETR ++ two-stage (with iterative box refinement, as in the paper's Table 1).
from .deformable_detr_refine_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.two_stage = True
train.output_dir = "./output/deformable_detr_two_stage_r50_50ep"
