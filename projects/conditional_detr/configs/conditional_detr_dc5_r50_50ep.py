# Conditional DETR DC5-R50: res5 dilated (stride 16), batch 8 (1 per GPU x 8), otherwise the R50 recipe.
from .conditional_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.dc5 = True
dataloader.train.total_batch_size = 8
train.output_dir = "./output/conditional_detr_dc5_r50_50ep"
