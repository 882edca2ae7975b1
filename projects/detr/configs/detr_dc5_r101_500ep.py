# DETR-DC5 R101 (official release detr-r101-dc5): res5 dilated (stride 16), otherwise the R101
# recipe; evaluate with 1 image per GPU (see detr_dc5_r50_500ep.py).
from .detr_r101_500ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.dc5 = True
train.output_dir = "./output/detr_dc5_r101_500ep"
