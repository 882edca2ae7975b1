# Multi-scale SMCA R101, 50 epochs (Table 4: 44.4 AP): the R50 recipe with a ResNet-101
# (torchvision weights; see projects/conditional_detr/README.md for writing them).
from .smca_ms_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
train.init_checkpoint = "./pretrained/R-101-torchvision.pth"
train.output_dir = "./output/smca_ms_r101_50ep"
