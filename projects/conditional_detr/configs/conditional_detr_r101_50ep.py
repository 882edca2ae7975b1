# Conditional DETR R101: the R50 recipe with a ResNet-101 (torchvision weights, see the README for
# converting them; detectron2's model zoo has torchvision weights for R50 only).
from .conditional_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
train.init_checkpoint = "./pretrained/R-101-torchvision.pth"
train.output_dir = "./output/conditional_detr_r101_50ep"
