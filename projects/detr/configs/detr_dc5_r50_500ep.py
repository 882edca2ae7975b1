# DETR-DC5 R50 (official release detr-r50-dc5): res5 dilated (stride 16), otherwise the R50 recipe.
# The official README trained DC5 models with 1 image per GPU (2 for the others) and warns that
# they lose AP when evaluated with more than one image per GPU (padding); evaluate with 1.
from .detr_r50_500ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.dc5 = True
train.output_dir = "./output/detr_dc5_r50_500ep"
